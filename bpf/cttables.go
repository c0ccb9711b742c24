package bpf

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// maxEndpoints is MAX_ENDPOINTS in datapath.c: the slots of ep_states,
// and half the tables of ct_tables. TestConstantsMatchKernel holds the two
// together.
const maxEndpoints = 16384

// DefaultConntrackPerEndpoint is the size of each of the two conntrack
// tables the CNI plugin gives a pod unless its config says otherwise: one
// for the flows the pod opens, one for the flows its ingress admits. An
// LRU table evicts its oldest flow when full: at this size a pod keeps
// 8,192 flows of each kind before it starts forgetting its own idle ones,
// and both cost about 2 MiB of kernel memory.
const DefaultConntrackPerEndpoint = 8192

// ConntrackUsage is what the datapath counted of one endpoint's conntrack
// tables: the one of the flows it opened and the one of the flows its
// ingress admitted. Counts are approximate when CPUs race: they are
// reports, not verdicts.
type ConntrackUsage struct {
	Slot     uint32     `json:"slot"`
	Capacity uint32     `json:"capacity"` // of each table
	Opened   TableUsage `json:"opened"`
	Admitted TableUsage `json:"admitted"`
}

// TableUsage is one conntrack table's counts. Entries counts expired
// flows too (an LRU table frees nothing until it needs the room); Evicted
// counts flows added to the full table, each of which pushed out the
// endpoint's least recently used flow of that table.
type TableUsage struct {
	Entries uint32 `json:"entries"`
	Created uint64 `json:"created"`
	Evicted uint64 `json:"evicted"`
}

// Entries sums both tables.
func (u ConntrackUsage) Entries() uint32 { return u.Opened.Entries + u.Admitted.Entries }

// Evicted sums both tables.
func (u ConntrackUsage) Evicted() uint64 { return u.Opened.Evicted + u.Admitted.Evicted }

// ctIndex is where ct_tables holds a slot's table for keys of scope.
func ctIndex(slot uint32, scope Scope) uint32 { return slot*2 + uint32(scope) }

// initSharedConntrack makes the node's shared table both tables of slot
// 0, where endpoints without tables of their own keep their flows.
func (d *Datapath) initSharedConntrack() error {
	for _, scope := range []Scope{ScopeEgress, ScopeIngress} {
		if err := d.objs.CtTables.Update(ctIndex(0, scope), d.objs.Conntrack, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("install the shared conntrack table in slot 0: %w", err)
		}
	}
	var st datapathEpState
	if err := d.objs.EpStates.Lookup(uint32(0), &st); err != nil {
		return fmt.Errorf("read endpoint state 0: %w", err)
	}
	if st.CtCapacity != d.objs.Conntrack.MaxEntries() {
		st.CtCapacity = d.objs.Conntrack.MaxEntries()
		if err := d.objs.EpStates.Update(uint32(0), &st, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("write endpoint state 0: %w", err)
		}
	}
	return nil
}

// AddConntrackTable creates an endpoint's two conntrack tables of capacity
// flows each in the lowest slot no endpoint uses, and returns the slot for
// the endpoint entry. Hold Lock: slots are chosen from the endpoints map.
func (d *Datapath) AddConntrackTable(capacity uint32) (uint32, error) {
	if capacity == 0 {
		capacity = DefaultConntrackPerEndpoint
	}
	eps, err := d.Endpoints()
	if err != nil {
		return 0, err
	}
	used := make(map[uint32]bool, len(eps))
	for _, ep := range eps {
		used[ep.ConntrackSlot] = true
	}
	slot := uint32(1)
	for ; slot < maxEndpoints && used[slot]; slot++ {
	}
	if slot == maxEndpoints {
		return 0, fmt.Errorf("add conntrack table: all %d slots are in use by endpoints: %w", maxEndpoints-1, unix.E2BIG)
	}
	// State first: the tables count their flows against this capacity
	// from their first packet on.
	if err := d.objs.EpStates.Update(slot, &datapathEpState{CtCapacity: capacity}, ebpf.UpdateAny); err != nil {
		return 0, fmt.Errorf("write endpoint state %d: %w", slot, err)
	}
	for _, scope := range []Scope{ScopeEgress, ScopeIngress} {
		inner := d.ctTable.Copy()
		inner.Name = fmt.Sprintf("ct_%d_%d", slot, scope)
		inner.MaxEntries = capacity
		m, err := ebpf.NewMap(inner)
		if err != nil {
			return 0, fmt.Errorf("create conntrack table of %d flows: %w", capacity, err)
		}
		err = d.objs.CtTables.Update(ctIndex(slot, scope), m, ebpf.UpdateAny)
		m.Close()
		if err != nil {
			return 0, fmt.Errorf("install conntrack table in slot %d: %w", slot, err)
		}
	}
	return slot, nil
}

// DeleteConntrackTable frees a slot's table and state. Slot 0, the shared
// table, is never freed; an empty slot is not an error.
func (d *Datapath) DeleteConntrackTable(slot uint32) error {
	if slot == 0 || slot >= maxEndpoints {
		return nil
	}
	for _, scope := range []Scope{ScopeEgress, ScopeIngress} {
		if err := d.objs.CtTables.Delete(ctIndex(slot, scope)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("free conntrack table in slot %d: %w", slot, err)
		}
	}
	if err := d.objs.EpStates.Update(slot, &datapathEpState{}, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("clear endpoint state %d: %w", slot, err)
	}
	return nil
}

// slotStates reads the state of every slot that holds tables: the ones
// with a capacity, which AddConntrackTable writes before it installs the
// tables and DeleteConntrackTable clears after it frees them. One batch
// read of ep_states answers what walking ct_tables' 32,768 indexes would
// take as many lookups for.
func (d *Datapath) slotStates() (map[uint32]datapathEpState, error) {
	keys := make([]uint32, maxEndpoints)
	vals := make([]datapathEpState, maxEndpoints)
	var cursor ebpf.MapBatchCursor
	n, err := d.objs.EpStates.BatchLookup(&cursor, keys, vals, nil)
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil, fmt.Errorf("read endpoint states: %w", err)
	}
	out := map[uint32]datapathEpState{}
	for i := range n {
		if vals[i].CtCapacity != 0 {
			out[keys[i]] = vals[i]
		}
	}
	return out, nil
}

// conntrackTables opens every installed table by its index in ct_tables
// (slot * 2 + scope), each table once: slot 0's two indexes are one
// shared table. The caller closes them.
func (d *Datapath) conntrackTables() (map[uint32]*ebpf.Map, error) {
	states, err := d.slotStates()
	if err != nil {
		return nil, err
	}
	out := map[uint32]*ebpf.Map{}
	seen := map[uint32]bool{}
	for slot := range states {
		for _, scope := range []Scope{ScopeEgress, ScopeIngress} {
			var id uint32
			idx := ctIndex(slot, scope)
			err := d.objs.CtTables.Lookup(idx, &id)
			if errors.Is(err, ebpf.ErrKeyNotExist) || seen[id] {
				continue
			}
			var m *ebpf.Map
			if err == nil {
				seen[id] = true
				m, err = ebpf.NewMapFromID(ebpf.MapID(id))
				if errors.Is(err, os.ErrNotExist) {
					continue // freed since the lookup
				}
			}
			if err != nil {
				closeTables(out)
				return nil, fmt.Errorf("open conntrack table of slot %d: %w", slot, err)
			}
			out[idx] = m
		}
	}
	return out, nil
}

// ConntrackSlots lists the slots that hold tables, the shared slot 0
// included.
func (d *Datapath) ConntrackSlots() ([]uint32, error) {
	states, err := d.slotStates()
	if err != nil {
		return nil, err
	}
	return slices.Sorted(maps.Keys(states)), nil
}

// ConntrackUsage reads the datapath's counts for every installed table.
func (d *Datapath) ConntrackUsage() ([]ConntrackUsage, error) {
	states, err := d.slotStates()
	if err != nil {
		return nil, err
	}
	out := make([]ConntrackUsage, 0, len(states))
	for _, slot := range slices.Sorted(maps.Keys(states)) {
		st := states[slot]
		var tables [2]TableUsage
		for scope, u := range st.Ct {
			tables[scope] = TableUsage{Entries: u.Count, Created: u.Created, Evicted: u.Evicted}
		}
		out = append(out, ConntrackUsage{Slot: slot, Capacity: st.CtCapacity,
			Opened: tables[ScopeEgress], Admitted: tables[ScopeIngress]})
	}
	return out, nil
}

// forgetFlows lowers a slot's entry counts by what userspace deleted (by
// key scope), so later inserts are not counted as evictions.
func (d *Datapath) forgetFlows(slot uint32, gone [2]int) {
	var st datapathEpState
	if gone == [2]int{} || d.objs.EpStates.Lookup(slot, &st) != nil {
		return
	}
	for scope, n := range gone {
		st.Ct[scope].Count -= min(st.Ct[scope].Count, uint32(n))
	}
	_ = d.objs.EpStates.Update(slot, &st, ebpf.UpdateAny)
}

// EventLoss is how many events of one reason the datapath did not send:
// Lost when the ring was full, Suppressed when the sending endpoint's rate
// limit held them back.
type EventLoss struct {
	Lost       uint64 `json:"lost"`
	Suppressed uint64 `json:"suppressed"`
}

// EventLosses reads the event loss counters by reason.
func (d *Datapath) EventLosses() (map[Reason]EventLoss, error) {
	out := map[Reason]EventLoss{}
	for r := Reason(0); r < reasonMax; r++ {
		var l EventLoss
		for kind, dst := range []*uint64{&l.Lost, &l.Suppressed} {
			var per []uint64
			if err := d.objs.EventLoss.Lookup(uint32(r)*2+uint32(kind), &per); err != nil {
				return nil, fmt.Errorf("read event loss counters: %w", err)
			}
			for _, v := range per {
				*dst += v
			}
		}
		if l != (EventLoss{}) {
			out[r] = l
		}
	}
	return out, nil
}

// LossWatch tells, each time it is asked, how many events of each reason
// the datapath lost to a full ring since it was last asked: what a reader
// of the events must report as a gap in what it read.
type LossWatch struct {
	d    *Datapath
	last map[Reason]uint64
}

// WatchLosses starts a LossWatch from the counts as they are now.
func (d *Datapath) WatchLosses() (*LossWatch, error) {
	w := &LossWatch{d: d, last: map[Reason]uint64{}}
	_, err := w.Since()
	return w, err
}

// Since returns the events lost since the last call, by reason; the map
// is empty when none were.
func (w *LossWatch) Since() (map[Reason]uint64, error) {
	l, err := w.d.EventLosses()
	if err != nil {
		return nil, err
	}
	out := map[Reason]uint64{}
	for r, n := range l {
		if n.Lost > w.last[r] {
			out[r] = n.Lost - w.last[r]
		}
		w.last[r] = n.Lost
	}
	return out, nil
}
