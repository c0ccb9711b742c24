package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"time"
	"unsafe"

	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// Event is one verdict the datapath reported: every drop, and the first
// packet of every allowed flow.
type Event struct {
	Time    time.Time    `json:"time"`
	Ifindex int          `json:"ifindex"`
	Src     identity.ID  `json:"srcIdentity"`
	Dst     identity.ID  `json:"dstIdentity"`
	SrcAddr netip.Addr   `json:"srcAddr"`
	DstAddr netip.Addr   `json:"dstAddr"`
	SrcPort uint16       `json:"srcPort"`
	DstPort uint16       `json:"dstPort"`
	Proto   policy.Proto `json:"proto"`
	Allowed bool         `json:"allowed"`
	Reason  Reason       `json:"reason"`
	Scope   Scope        `json:"scope"`
	Len     uint32       `json:"len"`
	// Suppressed counts the events of this endpoint its rate limit held
	// back just before this one.
	Suppressed uint32 `json:"suppressed,omitzero"`
}

func (e Event) String() string { return e.Format(e.Src.String(), e.Dst.String()) }

// Format is String with the identities spelled as the caller says:
// policyctl monitor adds their label sets, since numbers are node-local.
func (e Event) Format(src, dst string) string {
	verdict := "ALLOW"
	if !e.Allowed {
		verdict = "DROP"
	}
	return fmt.Sprintf("%s %s id %s %s -> id %s %s %s (%s, %s)", e.Time.Format("15:04:05.000"), verdict,
		src, hostPort(e.SrcAddr, e.SrcPort, e.Proto), dst, hostPort(e.DstAddr, e.DstPort, e.Proto), e.Proto, e.Reason, e.Scope)
}

func hostPort(a netip.Addr, port uint16, p policy.Proto) string {
	if !p.HasPorts() {
		return a.String()
	}
	return netip.AddrPortFrom(a, port).String()
}

// EventReader reads verdict events. A ring buffer has one consumer: while
// an agent runs it owns the stream, and tools ask the agent for events.
//
// It consumes the ring in batches. A reader that takes each event as soon
// as it is written shares the ring's positions and data with the producing
// CPU line by line, and that cost lands on the packet: a new flow took 100
// to 300 ns longer with such a reader than with none. So the reader drains
// what is waiting once a batch has gathered (or the oldest event has waited
// pollInterval), hands it out from memory, and leaves the ring alone in
// between.
type EventReader struct {
	rd *ringbuf.Reader
	// offset turns bpf_ktime_get_ns() into wall-clock time.
	offset   time.Duration
	deadline time.Time

	rec       ringbuf.Record
	batch     []datapathEvent
	next      int
	lastDrain time.Time

	// The library's AvailableBytes does not guard against a concurrent
	// Close, and Close comes from another goroutine (an agent shutting
	// down): mu keeps the two apart, done wakes a Read that waits.
	mu     sync.RWMutex
	closed bool
	done   chan struct{}
}

// Events opens the event stream.
func (d *Datapath) Events() (*EventReader, error) {
	rd, err := ringbuf.NewReader(d.objs.Events)
	if err != nil {
		return nil, fmt.Errorf("open event ring buffer: %w", err)
	}
	mono, err := monotonicNow(unix.CLOCK_MONOTONIC)
	if err != nil {
		rd.Close()
		return nil, err
	}
	return &EventReader{rd: rd, offset: time.Duration(time.Now().UnixNano() - int64(mono)), lastDrain: time.Now(), done: make(chan struct{})}, nil
}

const (
	// pollInterval bounds how long an event waits in the ring.
	pollInterval = 100 * time.Millisecond
	// batchBytes is the waiting data that makes a batch; the datapath
	// wakes a blocked reader when it crosses this (EVENTS_WAKEUP_BYTES in
	// datapath.c).
	batchBytes = 64 << 10
	// pollStep is how often a reader with a partial batch looks again.
	// At 80 bytes an event the 1 MiB ring holds 13,000 events: more than
	// a million new flows a second fill it within one step.
	pollStep = 10 * time.Millisecond
	// recordBytes is one event in the ring: header and padded sample.
	recordBytes = 8 + (int(unsafe.Sizeof(datapathEvent{}))+7)/8*8
)

// SetDeadline makes Read return os.ErrDeadlineExceeded after t; the zero
// time waits for ever.
func (r *EventReader) SetDeadline(t time.Time) { r.deadline = t }

// Read returns the next event. It blocks until one arrives, the deadline
// passes or the reader is closed (ringbuf.ErrClosed).
func (r *EventReader) Read() (Event, error) {
	for r.next >= len(r.batch) {
		if err := r.fill(); err != nil {
			return Event{}, err
		}
	}
	k := r.batch[r.next]
	r.next++
	return Event{
		Time:    time.Unix(0, int64(k.Ts)+int64(r.offset)),
		Ifindex: int(k.Ifindex),
		Src:     identity.ID(k.SrcIdentity), Dst: identity.ID(k.DstIdentity),
		SrcAddr: addrFrom16(k.Saddr), DstAddr: addrFrom16(k.Daddr),
		SrcPort: k.Sport, DstPort: k.Dport,
		Proto:      policy.Proto(k.Proto),
		Allowed:    k.Verdict == 1,
		Reason:     Reason(k.Reason),
		Scope:      Scope(k.Scope),
		Len:        k.Len,
		Suppressed: k.Suppressed,
	}, nil
}

// fill waits until a batch is due and reads it from the ring.
func (r *EventReader) fill() error {
	r.batch, r.next = r.batch[:0], 0
	for {
		now := time.Now()
		if !r.deadline.IsZero() && !now.Before(r.deadline) {
			return os.ErrDeadlineExceeded
		}
		avail, err := r.available()
		if err != nil {
			return err
		}
		due := r.lastDrain.Add(pollInterval)
		if avail >= batchBytes || (avail > 0 && !now.Before(due)) {
			return r.drain(avail)
		}
		if avail > 0 {
			wake := now.Add(pollStep)
			if due.Before(wake) {
				wake = due
			}
			if !r.deadline.IsZero() && r.deadline.Before(wake) {
				wake = r.deadline
			}
			t := time.NewTimer(wake.Sub(now))
			select {
			case <-t.C:
			case <-r.done:
				t.Stop()
				return ringbuf.ErrClosed
			}
			continue
		}
		// Nothing waits: block until the datapath wakes us for a batch,
		// or for the poll interval, which catches a trickle of events
		// too small to wake anyone.
		wake := now.Add(pollInterval)
		if !r.deadline.IsZero() && r.deadline.Before(wake) {
			wake = r.deadline
		}
		r.rd.SetDeadline(wake)
		err = r.rd.ReadInto(&r.rec)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			r.lastDrain = time.Now()
			continue
		}
		if err != nil {
			return err
		}
		if err := r.keep(r.rec.RawSample); err != nil {
			return err
		}
		return r.drain(r.rec.Remaining)
	}
}

// drain reads the records that were waiting when it was called, about
// avail bytes, and not the ones written meanwhile: chasing the producer is
// what the batching avoids.
func (r *EventReader) drain(avail int) error {
	r.lastDrain = time.Now()
	// The deadline only matters when the ring runs dry under us.
	r.rd.SetDeadline(r.lastDrain)
	for n := 0; n < avail; n += recordBytes {
		err := r.rd.ReadInto(&r.rec)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			break
		}
		if err != nil {
			return err
		}
		if err := r.keep(r.rec.RawSample); err != nil {
			return err
		}
	}
	return nil
}

func (r *EventReader) keep(raw []byte) error {
	k, err := decodeEvent(raw)
	if err != nil {
		return err
	}
	r.batch = append(r.batch, k)
	return nil
}

// decodeEvent reads struct event field by field: binary.Read's reflection
// costs more than the datapath spends producing the event.
func decodeEvent(b []byte) (datapathEvent, error) {
	var k datapathEvent
	if len(b) < int(unsafe.Sizeof(k)) {
		return k, fmt.Errorf("decode event: %d bytes, want %d", len(b), unsafe.Sizeof(k))
	}
	le := binary.LittleEndian
	k.Ts = le.Uint64(b[0:])
	k.Ifindex = le.Uint32(b[8:])
	k.SrcIdentity = le.Uint32(b[12:])
	k.DstIdentity = le.Uint32(b[16:])
	k.Len = le.Uint32(b[20:])
	copy(k.Saddr[:], b[24:40])
	copy(k.Daddr[:], b[40:56])
	k.Sport = le.Uint16(b[56:])
	k.Dport = le.Uint16(b[58:])
	k.Proto, k.Family, k.Verdict, k.Reason, k.Scope = b[60], b[61], b[62], b[63], b[64]
	k.Suppressed = le.Uint32(b[68:])
	return k, nil
}

// available is the waiting data, or ringbuf.ErrClosed once Close ran.
func (r *EventReader) available() (int, error) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if r.closed {
		return 0, ringbuf.ErrClosed
	}
	return r.rd.AvailableBytes(), nil
}

// Close stops the reader; a blocked Read returns ringbuf.ErrClosed. It is
// safe to call from another goroutine, and more than once.
func (r *EventReader) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	close(r.done)
	return r.rd.Close()
}
