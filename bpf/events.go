package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"
	"unsafe"

	"github.com/cilium/ebpf/ringbuf"

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
}

func (e Event) String() string {
	verdict := "ALLOW"
	if !e.Allowed {
		verdict = "DROP"
	}
	return fmt.Sprintf("%s %s id %s %s -> id %s %s %s (%s, %s)", e.Time.Format("15:04:05.000"), verdict,
		e.Src, hostPort(e.SrcAddr, e.SrcPort, e.Proto), e.Dst, hostPort(e.DstAddr, e.DstPort, e.Proto), e.Proto, e.Reason, e.Scope)
}

func hostPort(a netip.Addr, port uint16, p policy.Proto) string {
	if !p.HasPorts() {
		return a.String()
	}
	return netip.AddrPortFrom(a, port).String()
}

// EventReader reads verdict events. A ring buffer has one consumer: while
// an agent runs it owns the stream, and tools ask the agent for events.
type EventReader struct {
	rd *ringbuf.Reader
	// offset turns bpf_ktime_get_ns() into wall-clock time.
	offset   time.Duration
	deadline time.Time
}

// Events opens the event stream.
func (d *Datapath) Events() (*EventReader, error) {
	rd, err := ringbuf.NewReader(d.objs.Events)
	if err != nil {
		return nil, fmt.Errorf("open event ring buffer: %w", err)
	}
	mono, err := monotonicNow()
	if err != nil {
		rd.Close()
		return nil, err
	}
	return &EventReader{rd: rd, offset: time.Duration(time.Now().UnixNano() - int64(mono))}, nil
}

// pollInterval bounds how long an event waits in the ring: the datapath
// wakes readers only once a batch is waiting (see emit in datapath.c).
const pollInterval = 100 * time.Millisecond

// SetDeadline makes Read return os.ErrDeadlineExceeded after t; the zero
// time waits for ever.
func (r *EventReader) SetDeadline(t time.Time) { r.deadline = t }

// Read blocks until an event arrives, the deadline passes or the reader is
// closed (ringbuf.ErrClosed).
func (r *EventReader) Read() (Event, error) {
	var rec ringbuf.Record
	for {
		wake := time.Now().Add(pollInterval)
		if !r.deadline.IsZero() && r.deadline.Before(wake) {
			wake = r.deadline
		}
		r.rd.SetDeadline(wake)
		err := r.rd.ReadInto(&rec)
		if err == nil {
			break
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			return Event{}, err
		}
		if !r.deadline.IsZero() && !time.Now().Before(r.deadline) {
			return Event{}, err
		}
	}
	k, err := decodeEvent(rec.RawSample)
	if err != nil {
		return Event{}, err
	}
	return Event{
		Time:    time.Unix(0, int64(k.Ts)+int64(r.offset)),
		Ifindex: int(k.Ifindex),
		Src:     identity.ID(k.SrcIdentity), Dst: identity.ID(k.DstIdentity),
		SrcAddr: addrFrom16(k.Saddr), DstAddr: addrFrom16(k.Daddr),
		SrcPort: k.Sport, DstPort: k.Dport,
		Proto:   policy.Proto(k.Proto),
		Allowed: k.Verdict == 1,
		Reason:  Reason(k.Reason),
		Scope:   Scope(k.Scope),
		Len:     k.Len,
	}, nil
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
	return k, nil
}

// Close stops the reader; a blocked Read returns.
func (r *EventReader) Close() error { return r.rd.Close() }
