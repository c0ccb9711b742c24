package agent

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/netip"
	"sync"

	"github.com/cilium/ebpf/ringbuf"
)

// eventHub reads the datapath's verdict events (a ring buffer has one
// reader: the agent), names the pods behind the addresses, counts them, and
// fans them out to every `policyctl monitor` attached.
type eventHub struct {
	a    *Agent
	mu   sync.Mutex
	subs map[chan Event]struct{}
	pods map[netip.Addr]string
}

func newEventHub(a *Agent) *eventHub {
	return &eventHub{a: a, subs: map[chan Event]struct{}{}, pods: map[netip.Addr]string{}}
}

// setPods replaces the address -> "ns/name" index (built on every flush).
func (h *eventHub) setPods(m map[netip.Addr]string) {
	h.mu.Lock()
	h.pods = m
	h.mu.Unlock()
}

func (h *eventHub) run(ctx context.Context) {
	rd, err := h.a.dp.Events()
	if err != nil {
		h.a.log.Error("verdict events unavailable", "err", err)
		return
	}
	go func() { <-ctx.Done(); rd.Close() }()
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
		e := Event{Event: ev, SrcPod: h.pods[ev.SrcAddr], DstPod: h.pods[ev.DstAddr]}
		for ch := range h.subs {
			select {
			case ch <- e:
			default: // a slow reader loses events rather than stalling the rest
			}
		}
		h.mu.Unlock()
	}
}

// serve streams matching events as NDJSON until the client goes away.
func (h *eventHub) serve(w http.ResponseWriter, r *http.Request) {
	f, err := parseEventFilter(r.URL.Query())
	if err != nil {
		fail(w, http.StatusBadRequest, err)
		return
	}
	ch := make(chan Event, 1024)
	h.mu.Lock()
	h.subs[ch] = struct{}{}
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		delete(h.subs, ch)
		h.mu.Unlock()
	}()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)
	if flusher != nil {
		flusher.Flush()
	}
	enc := json.NewEncoder(w)
	for {
		select {
		case <-r.Context().Done():
			return
		case e := <-ch:
			if !f.match(e) {
				continue
			}
			if err := enc.Encode(e); err != nil {
				return
			}
			if flusher != nil {
				flusher.Flush()
			}
		}
	}
}
