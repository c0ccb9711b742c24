package agent

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// fakeMaps is the datapath's maps in memory, for tests that run the agent
// without root. It logs every write, so tests can check what was written
// and in which order.
type fakeMaps struct {
	ipc      map[netip.Prefix]identity.ID
	eps      map[int]bpf.Endpoint
	pol      map[policy.Key]*policy.Entry
	flags    map[identity.ID]policy.IdentityFlags
	svc      map[svcFrontend]svcValue
	rev      uint32
	polCap   int
	ipcCap   int
	svcCap   int
	ops      []string
	failNext error // returned by the next write
}

func newFakeMaps() *fakeMaps {
	return &fakeMaps{
		ipc: map[netip.Prefix]identity.ID{}, eps: map[int]bpf.Endpoint{},
		pol: map[policy.Key]*policy.Entry{}, flags: map[identity.ID]policy.IdentityFlags{},
		svc:    map[svcFrontend]svcValue{},
		polCap: 65536, ipcCap: 65536, svcCap: 65536,
	}
}

func (f *fakeMaps) write(op string) error {
	if err := f.failNext; err != nil {
		f.failNext = nil
		return err
	}
	f.ops = append(f.ops, op)
	return nil
}

func (f *fakeMaps) PutIPCache(p netip.Prefix, id identity.ID) error {
	if _, ok := f.ipc[p]; !ok && len(f.ipc) >= f.ipcCap {
		return fmt.Errorf("write ipcache %s: %w", p, bpf.ErrMapFull)
	}
	if err := f.write("ipcache put " + p.String()); err != nil {
		return err
	}
	f.ipc[p] = id
	return nil
}

func (f *fakeMaps) DeleteIPCache(p netip.Prefix) error {
	if err := f.write("ipcache delete " + p.String()); err != nil {
		return err
	}
	delete(f.ipc, p)
	return nil
}

func (f *fakeMaps) IPCacheCapacity() int { return f.ipcCap }

func (f *fakeMaps) IPCache() (map[netip.Prefix]identity.ID, error) { return maps.Clone(f.ipc), nil }

func (f *fakeMaps) PutEndpoint(ifindex int, ep bpf.Endpoint) error {
	if err := f.write(fmt.Sprintf("endpoint put %d", ifindex)); err != nil {
		return err
	}
	if ep.ConntrackSlot == 0 {
		ep.ConntrackSlot = f.eps[ifindex].ConntrackSlot
	}
	f.eps[ifindex] = ep
	return nil
}

func (f *fakeMaps) DeleteEndpoint(ifindex int) error {
	if err := f.write(fmt.Sprintf("endpoint delete %d", ifindex)); err != nil {
		return err
	}
	delete(f.eps, ifindex)
	return nil
}

func (f *fakeMaps) Endpoint(ifindex int) (bpf.Endpoint, bool, error) {
	ep, ok := f.eps[ifindex]
	return ep, ok, nil
}

func (f *fakeMaps) Endpoints() (map[int]bpf.Endpoint, error) { return maps.Clone(f.eps), nil }

func (f *fakeMaps) WritePolicy(have int, upsert map[policy.Key]*policy.Entry, del []policy.Key, flags map[identity.ID]policy.IdentityFlags, flagDel []identity.ID) error {
	added := 0
	for k := range upsert {
		if _, ok := f.pol[k]; !ok {
			added++
		}
	}
	if len(f.pol)+added-len(del) > f.polCap {
		return fmt.Errorf("write policy: %w", bpf.ErrMapFull)
	}
	if len(upsert) > 0 {
		if err := f.write(fmt.Sprintf("policy put %d", len(upsert))); err != nil {
			return err
		}
	}
	for k, e := range upsert {
		f.pol[k] = e
	}
	for id, fl := range flags {
		f.flags[id] = fl
	}
	if len(del) > 0 {
		if err := f.write(fmt.Sprintf("policy delete %d", len(del))); err != nil {
			return err
		}
	}
	for _, k := range del {
		delete(f.pol, k)
	}
	for _, id := range flagDel {
		delete(f.flags, id)
	}
	return nil
}

func (f *fakeMaps) PolicyCapacity() int { return f.polCap }

func (f *fakeMaps) Policy() (*policy.MapState, error) {
	return &policy.MapState{Entries: maps.Clone(f.pol), Identities: maps.Clone(f.flags)}, nil
}

func (f *fakeMaps) BumpRevision() error {
	if err := f.write("revision"); err != nil {
		return err
	}
	f.rev++
	return nil
}

// subjects lists the identities with policy entries.
func (f *fakeMaps) subjects() map[identity.ID]int {
	out := map[identity.ID]int{}
	for k := range f.pol {
		out[k.Subject]++
	}
	return out
}

func (f *fakeMaps) PutService(fe svcFrontend, v svcValue) error {
	if _, ok := f.svc[fe]; !ok && len(f.svc) >= f.svcCap {
		return fmt.Errorf("write service %v: %w", fe, bpf.ErrMapFull)
	}
	if err := f.write("service put " + fe.String()); err != nil {
		return err
	}
	v.Backends = slices.Clone(v.Backends)
	f.svc[fe] = v
	return nil
}

func (f *fakeMaps) DeleteService(fe svcFrontend) error {
	if err := f.write("service delete " + fe.String()); err != nil {
		return err
	}
	delete(f.svc, fe)
	return nil
}

func (f *fakeMaps) Services() (map[svcFrontend]svcValue, error) { return maps.Clone(f.svc), nil }
