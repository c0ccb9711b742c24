package bpf

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// Flow is one conntrack entry, in the table of Slot.
type Flow struct {
	Slot             uint32
	Src, Dst         netip.Addr
	SrcPort, DstPort uint16
	Proto            policy.Proto
	Scope            Scope
	Subject, Peer    identity.ID
	Revision         uint32
	Expires          time.Duration // from now; negative when expired
	Closing          bool
}

// Conntrack lists every conntrack table.
func (d *Datapath) Conntrack() ([]Flow, error) {
	now, err := monotonicNow(unix.CLOCK_MONOTONIC_COARSE)
	if err != nil {
		return nil, err
	}
	tables, err := d.conntrackTables()
	if err != nil {
		return nil, err
	}
	defer closeTables(tables)
	var out []Flow
	for idx, m := range tables {
		var k datapathCtKey
		var v datapathCtValue
		it := m.Iterate()
		for it.Next(&k, &v) {
			out = append(out, Flow{
				Slot: idx / 2, Src: addrFrom16(k.Saddr), Dst: addrFrom16(k.Daddr), SrcPort: k.Sport, DstPort: k.Dport,
				Proto: policy.Proto(k.Proto), Scope: Scope(k.Scope), Subject: identity.ID(v.Subject), Peer: identity.ID(v.Peer),
				Revision: v.Rev, Expires: time.Duration(int64(v.Expires) - int64(now)), Closing: v.Flags&ctClosing != 0,
			})
		}
		if err := it.Err(); err != nil {
			return nil, fmt.Errorf("list conntrack slot %d: %w", idx/2, err)
		}
	}
	return out, nil
}

func closeTables(tables map[uint32]*ebpf.Map) {
	for _, m := range tables {
		m.Close()
	}
}

const (
	ctClosing = 1 << 1 // CT_F_CLOSING
	ctSvcOrig = 1 << 7 // CT_F_SVC_ORIG
)

// FlushConntrack removes every conntrack entry (and fragment record) with one
// of addrs as source or destination, or as the backend of a Service flow,
// in every table, so a reused pod IP starts with no flows. It returns how many flows it removed.
func (d *Datapath) FlushConntrack(addrs ...netip.Addr) (int, error) {
	want := make([][16]byte, 0, len(addrs))
	for _, a := range addrs {
		want = append(want, addr16(a))
	}
	tables, err := d.conntrackTables()
	if err != nil {
		return 0, err
	}
	defer closeTables(tables)
	n := 0
	for idx, m := range tables {
		slot := idx / 2
		var keys []datapathCtKey
		var k datapathCtKey
		var v datapathCtValue
		it := m.Iterate()
		for it.Next(&k, &v) {
			// A Service flow's entry keyed by the client's tuple names
			// its backend: a flow to a pod that is gone must pick again.
			if slices.Contains(want, k.Saddr) || slices.Contains(want, k.Daddr) ||
				(v.Flags&ctSvcOrig != 0 && slices.Contains(want, v.NatAddr)) {
				keys = append(keys, k)
			}
		}
		if err := it.Err(); err != nil {
			return n, fmt.Errorf("scan conntrack slot %d: %w", slot, err)
		}
		var gone [2]int
		for i := range keys {
			err := m.Delete(&keys[i])
			if err == nil {
				gone[keys[i].Scope&1]++
				n++
			} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
				d.forgetFlows(slot, gone)
				return n, fmt.Errorf("delete conntrack entry: %w", err)
			}
		}
		d.forgetFlows(slot, gone)
	}
	var fk datapathFragKey
	var fv datapathFragValue
	var frags []datapathFragKey
	fit := d.objs.Fragments.Iterate()
	for fit.Next(&fk, &fv) {
		if slices.Contains(want, fk.Saddr) || slices.Contains(want, fk.Daddr) {
			frags = append(frags, fk)
		}
	}
	for i := range frags {
		_ = d.objs.Fragments.Delete(&frags[i])
	}
	return n, nil
}

// monotonicNow reads a monotonic clock as the datapath does: conntrack
// deadlines are bpf_ktime_get_coarse_ns() (CLOCK_MONOTONIC_COARSE), event
// times bpf_ktime_get_ns() (CLOCK_MONOTONIC).
func monotonicNow(clock int32) (uint64, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(clock, &ts); err != nil {
		return 0, fmt.Errorf("read monotonic clock: %w", err)
	}
	return uint64(ts.Nano()), nil
}

// Counter is a packet and byte count.
type Counter struct {
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

// CounterKey names a counter: a reason seen at a hook.
type CounterKey struct {
	Reason Reason
	Scope  Scope
}

// Counters sums the per-CPU packet counters by reason and scope.
func (d *Datapath) Counters() (map[CounterKey]Counter, error) {
	out := map[CounterKey]Counter{}
	for _, r := range Reasons() {
		for _, s := range []Scope{ScopeEgress, ScopeIngress} {
			var per []datapathCounter
			if err := d.objs.Counters.Lookup(uint32(r)*2+uint32(s), &per); err != nil {
				return nil, fmt.Errorf("read counters: %w", err)
			}
			var c Counter
			for _, p := range per {
				c.Packets += p.Packets
				c.Bytes += p.Bytes
			}
			out[CounterKey{r, s}] = c
		}
	}
	return out, nil
}

// Stats sums the per-CPU error counters.
func (d *Datapath) Stats() (map[Stat]uint64, error) {
	out := map[Stat]uint64{}
	for s := Stat(0); s < statMax; s++ {
		var per []uint64
		if err := d.objs.Stats.Lookup(uint32(s), &per); err != nil {
			return nil, fmt.Errorf("read stats: %w", err)
		}
		for _, p := range per {
			out[s] += p
		}
	}
	return out, nil
}
