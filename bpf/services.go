package bpf

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// ServiceFrontend is a ClusterIP:port/protocol a pod's flows are translated from.
type ServiceFrontend struct {
	Addr  netip.Addr // unmapped IPv4 or IPv6
	Port  uint16
	Proto uint8 // IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP
}

func (fe ServiceFrontend) String() string {
	name := map[uint8]string{unix.IPPROTO_TCP: "tcp", unix.IPPROTO_UDP: "udp", unix.IPPROTO_SCTP: "sctp"}[fe.Proto]
	if name == "" {
		name = fmt.Sprintf("proto %d", fe.Proto)
	}
	return netip.AddrPortFrom(fe.Addr, fe.Port).String() + "/" + name
}

// ServiceBackend is one endpoint a frontend's new flows may go to.
type ServiceBackend struct {
	Addr netip.Addr
	Port uint16
}

// Service is what the datapath holds of one frontend.
type Service struct {
	Backends        []ServiceBackend // may be empty: the datapath then rejects new flows at once
	AffinityTimeout uint32           // sessionAffinity ClientIP timeout in seconds; 0 = none
}

// validate refuses what the datapath could not translate, before anything
// is written: ClusterIPs carry TCP, UDP and SCTP only (ICMP has no port to
// translate), and a backend of the other family would need a packet of
// another shape.
func (fe ServiceFrontend) validate() error {
	if !fe.Addr.IsValid() || fe.Addr.Is4In6() || fe.Addr.Zone() != "" {
		return fmt.Errorf("service frontend %s: need a plain IPv4 or IPv6 address", fe)
	}
	switch fe.Proto {
	case unix.IPPROTO_TCP, unix.IPPROTO_UDP, unix.IPPROTO_SCTP:
	default:
		return fmt.Errorf("service frontend %s: protocol must be TCP, UDP or SCTP", fe)
	}
	if fe.Port == 0 {
		return fmt.Errorf("service frontend %s: port 0", fe)
	}
	return nil
}

func (s Service) validate(fe ServiceFrontend) error {
	for _, b := range s.Backends {
		if !b.Addr.IsValid() || b.Addr.Is4In6() || b.Addr.Zone() != "" || b.Addr.Is4() != fe.Addr.Is4() {
			return fmt.Errorf("service %s: backend %s: need a plain address of the frontend's family", fe, netip.AddrPortFrom(b.Addr, b.Port))
		}
		if b.Port == 0 {
			return fmt.Errorf("service %s: backend %s: port 0", fe, b.Addr)
		}
	}
	return nil
}

func svcKey(fe ServiceFrontend) datapathSvcKey {
	return datapathSvcKey{Addr: addr16(fe.Addr), Port: fe.Port, Proto: fe.Proto}
}

// PutService makes new flows to fe go to s's backends. fe keeps the id it
// has; a new frontend gets the lowest free one. The datapath reads the
// frontend's count and then one slot below it, so the writes keep every
// slot below every count a reader may hold filled: new slots before a
// larger count, a smaller count before the slots above it go. A reader
// that read the old, larger count just before a shrink may still miss a
// slot; the datapath then takes slot 0, which outlives every count but 0.
// Replaced slots change in place, one backend for another.
//
// Calls are serialised within this handle; the agent is the maps' one
// writer.
func (d *Datapath) PutService(fe ServiceFrontend, s Service) error {
	if err := fe.validate(); err != nil {
		return err
	}
	if err := s.validate(fe); err != nil {
		return err
	}
	d.svcMu.Lock()
	defer d.svcMu.Unlock()
	k := svcKey(fe)
	var old datapathSvcValue
	err := d.objs.Services.Lookup(&k, &old)
	switch {
	case errors.Is(err, ebpf.ErrKeyNotExist):
		old = datapathSvcValue{}
		if old.Id, err = d.freeServiceID(); err != nil {
			return fmt.Errorf("service %s: %w", fe, err)
		}
	case err != nil:
		return fmt.Errorf("read service %s: %w", fe, err)
	}
	n := uint32(len(s.Backends))
	// The slots no reader uses yet go first: when the map is full, the
	// frontend is left as it was.
	for i := old.Count; i < n; i++ {
		if err := d.putBackend(old.Id, i, s.Backends[i]); err != nil {
			_ = d.deleteBackends(old.Id, old.Count, i)
			return fmt.Errorf("service %s: %w", fe, err)
		}
	}
	for i := uint32(0); i < min(n, old.Count); i++ {
		if err := d.putBackend(old.Id, i, s.Backends[i]); err != nil {
			return fmt.Errorf("service %s: %w", fe, err)
		}
	}
	v := datapathSvcValue{Id: old.Id, Count: n, AffinityTimeout: s.AffinityTimeout}
	if err := d.objs.Services.Update(&k, &v, ebpf.UpdateAny); err != nil {
		_ = d.deleteBackends(old.Id, old.Count, n)
		return fmt.Errorf("write service %s: %w", fe, mapFull(err, "services"))
	}
	d.setServiceID(v.Id, true)
	return d.deleteBackends(old.Id, n, old.Count)
}

func (d *Datapath) putBackend(id, slot uint32, b ServiceBackend) error {
	bk := datapathBackendKey{Id: id, Slot: slot}
	bv := datapathBackend{Addr: addr16(b.Addr), Port: b.Port}
	if err := d.objs.Backends.Update(&bk, &bv, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write backend %d: %w", slot, mapFull(err, "backends"))
	}
	return nil
}

// deleteBackends removes the backend slots [from, to) of frontend id.
func (d *Datapath) deleteBackends(id, from, to uint32) error {
	for slot := from; slot < to; slot++ {
		bk := datapathBackendKey{Id: id, Slot: slot}
		if err := d.objs.Backends.Delete(&bk); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete backend %d of service %d: %w", slot, id, err)
		}
	}
	return nil
}

// serviceIDs are the ids the frontends of one services map hold, read
// from the map once and kept by this handle's writes: a new frontend then
// costs no walk of the map (with 10,000 Services, writing them one by one
// took minutes when each took one). Hold svcMu.
type serviceIDs struct {
	of   *ebpf.Map // the map they were read from: a Refresh or migration replaces it
	used map[uint32]bool
	low  uint32 // no id under low is free
}

// ids returns d's serviceIDs, reading the map when the cache is not of
// the map d writes now.
func (d *Datapath) ids() (*serviceIDs, error) {
	if d.svcIDs != nil && d.svcIDs.of == d.objs.Services {
		return d.svcIDs, nil
	}
	ids := &serviceIDs{of: d.objs.Services, used: map[uint32]bool{}, low: 1}
	var k datapathSvcKey
	var v datapathSvcValue
	it := d.objs.Services.Iterate()
	for it.Next(&k, &v) {
		ids.used[v.Id] = true
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list services: %w", err)
	}
	d.svcIDs = ids
	return ids, nil
}

// freeServiceID is the lowest id no frontend has. Ids start at 1, so a
// zero value never names a frontend. Take it (take) once the frontend is
// written.
func (d *Datapath) freeServiceID() (uint32, error) {
	ids, err := d.ids()
	if err != nil {
		return 0, err
	}
	if len(ids.used) >= int(d.objs.Services.MaxEntries()) {
		return 0, fmt.Errorf("services %w: %d frontends (remove frontends)", ErrMapFull, len(ids.used))
	}
	for ids.used[ids.low] {
		ids.low++
	}
	return ids.low, nil
}

// setServiceID records that a frontend holds id (used) or let it go.
func (d *Datapath) setServiceID(id uint32, used bool) {
	ids := d.svcIDs
	if ids == nil || ids.of != d.objs.Services {
		return // read afresh on the next new frontend
	}
	if used {
		ids.used[id] = true
		return
	}
	delete(ids.used, id)
	ids.low = min(ids.low, id)
}

// DeleteService removes fe: the frontend first, so no new flow picks a
// backend from it, then its backends. Flows already translated keep their
// backend. An absent frontend is not an error.
func (d *Datapath) DeleteService(fe ServiceFrontend) error {
	d.svcMu.Lock()
	defer d.svcMu.Unlock()
	k := svcKey(fe)
	var v datapathSvcValue
	err := d.objs.Services.Lookup(&k, &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read service %s: %w", fe, err)
	}
	if err := d.objs.Services.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete service %s: %w", fe, err)
	}
	d.setServiceID(v.Id, false)
	if err := d.deleteBackends(v.Id, 0, v.Count); err != nil {
		return fmt.Errorf("service %s: %w", fe, err)
	}
	return nil
}

// Services reads every frontend back with its backends in slot order.
func (d *Datapath) Services() (map[ServiceFrontend]Service, error) {
	out := map[ServiceFrontend]Service{}
	var k datapathSvcKey
	var v datapathSvcValue
	type entry struct {
		fe ServiceFrontend
		v  datapathSvcValue
	}
	var all []entry
	it := d.objs.Services.Iterate()
	for it.Next(&k, &v) {
		all = append(all, entry{ServiceFrontend{Addr: addrFrom16(k.Addr), Port: k.Port, Proto: k.Proto}, v})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list services: %w", err)
	}
	for _, e := range all {
		s := Service{AffinityTimeout: e.v.AffinityTimeout}
		for slot := uint32(0); slot < e.v.Count; slot++ {
			var b datapathBackend
			if err := d.objs.Backends.Lookup(&datapathBackendKey{Id: e.v.Id, Slot: slot}, &b); err != nil {
				return nil, fmt.Errorf("read backend %d of service %s: %w", slot, e.fe, err)
			}
			s.Backends = append(s.Backends, ServiceBackend{Addr: addrFrom16(b.Addr), Port: b.Port})
		}
		out[e.fe] = s
	}
	return out, nil
}
