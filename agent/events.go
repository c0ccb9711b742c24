package agent

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"github.com/cilium/ebpf/ringbuf"

	"github.com/idcni/idcni/agent/api"
)

// eventHub reads the datapath's verdict events (a ring buffer has one
// reader: the agent), names the pods behind the addresses, counts them, and
// fans them out to every `policyctl monitor` attached. No reader ever
// misses events silently: a reader that falls behind, and every reader
// when the datapath's ring overflowed, gets a gap marker before its next
// event.
type eventHub struct {
	a    *Agent
	mu   sync.Mutex
	subs map[*subscriber]struct{}
	pods map[netip.Addr]string
}

// subscriber is one attached stream. missed counts the events dropped for
// it since it last got a gap marker; the hub's mutex guards it.
type subscriber struct {
	ch     chan api.Event
	missed uint64
}

// lossPoll is how often the hub looks at the datapath's count of events
// lost to a full ring.
const lossPoll = time.Second

func newEventHub(a *Agent) *eventHub {
	return &eventHub{a: a, subs: map[*subscriber]struct{}{}, pods: map[netip.Addr]string{}}
}

// setPod names the pod at addr; delPod forgets it if it is still key's.
func (h *eventHub) setPod(addr netip.Addr, key string) {
	h.mu.Lock()
	if h.pods == nil {
		h.pods = map[netip.Addr]string{}
	}
	h.pods[addr] = key
	h.mu.Unlock()
}

func (h *eventHub) delPod(addr netip.Addr, key string) {
	h.mu.Lock()
	if h.pods[addr] == key {
		delete(h.pods, addr)
	}
	h.mu.Unlock()
}

// podAt names the pod at addr, "" when none is known.
func (h *eventHub) podAt(addr netip.Addr) string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.pods[addr]
}

func (h *eventHub) run(ctx context.Context) {
	rd, err := h.a.dp.Events()
	if err != nil {
		h.a.log.Error("verdict events unavailable", "err", err)
		return
	}
	go func() { <-ctx.Done(); rd.Close() }()
	go h.watchLosses(ctx)
	for {
		ev, err := rd.Read()
		if errors.Is(err, ringbuf.ErrClosed) {
			return
		}
		if err != nil {
			h.a.log.Warn("read verdict event", "err", err)
			continue
		}
		h.a.metrics.observeEvent(ev)
		h.mu.Lock()
		h.publish(api.Event{Event: ev, SrcPod: h.pods[ev.SrcAddr], DstPod: h.pods[ev.DstAddr]})
		h.mu.Unlock()
	}
}

// publish hands e to every reader that has room. A slow reader loses
// events rather than stalling the rest, and learns how many before the
// next one it gets. Hold h.mu.
func (h *eventHub) publish(e api.Event) {
	for s := range h.subs {
		if s.missed > 0 {
			select {
			case s.ch <- api.Event{Gap: &api.Gap{Missed: s.missed}}:
				s.missed = 0
			default:
				s.missed++
				continue
			}
		}
		select {
		case s.ch <- e:
		default:
			s.missed++
		}
	}
}

// watchLosses tells every reader when the datapath lost events because
// the ring was full: they never reached the agent, so only the datapath's
// counters know.
func (h *eventHub) watchLosses(ctx context.Context) {
	w, err := h.a.dp.WatchLosses()
	if err != nil {
		h.a.log.Error("event loss counters unavailable: gaps from a full ring go untold", "err", err)
		return
	}
	t := time.NewTicker(lossPoll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		lost, err := w.Since()
		if err != nil {
			h.a.log.Warn("read event loss counters", "err", err)
			continue
		}
		if gap := api.LostGap(lost); gap != nil {
			h.mu.Lock()
			h.publish(api.Event{Gap: gap})
			h.mu.Unlock()
		}
	}
}

// serve streams matching events as NDJSON until the client goes away.
func (h *eventHub) serve(w http.ResponseWriter, r *http.Request) {
	f, err := parseEventFilter(r.URL.Query())
	if err != nil {
		fail(w, http.StatusBadRequest, err)
		return
	}
	sub := &subscriber{ch: make(chan api.Event, 1024)}
	h.mu.Lock()
	h.subs[sub] = struct{}{}
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		delete(h.subs, sub)
		h.mu.Unlock()
	}()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)
	if flusher != nil {
		flusher.Flush()
	}
	enc := json.NewEncoder(w)
	// Labels are added here, per reader and after its filter, not where
	// the ring is read: only events someone reads pay for the lookups,
	// and a slow lookup holds up this reader alone.
	labels := newEventLabeler(h.a)
	for {
		select {
		case <-r.Context().Done():
			return
		case e := <-sub.ch:
			if e.Gap == nil && !f.match(e) {
				continue
			}
			if err := enc.Encode(labels.label(e)); err != nil {
				return
			}
			if flusher != nil {
				flusher.Flush()
			}
		}
	}
}
