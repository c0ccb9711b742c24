package cni

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/identity"
)

// endpointOf builds the datapath's view of a pod.
func endpointOf(id identity.ID, addrs []netip.Addr) bpf.Endpoint {
	ep := bpf.Endpoint{Identity: id}
	for _, a := range addrs {
		if a.Is4() {
			ep.IPv4 = a
		} else {
			ep.IPv6 = a
		}
	}
	return ep
}

// endpointAddrs lists the valid addresses of an endpoint.
func endpointAddrs(ep bpf.Endpoint) []netip.Addr {
	var out []netip.Addr
	for _, a := range []netip.Addr{ep.IPv4, ep.IPv6} {
		if a.IsValid() {
			out = append(out, a)
		}
	}
	return out
}

// enforce attaches the TC programs to the host veth and enters the pod in
// the maps under id, pushing the inverse of each step on u. It runs before
// the pod has an address or a route, so the pod never sends a packet the
// programs do not judge.
func enforce(dp *bpf.Datapath, u *undo, hostName string, ifindex int, id identity.ID, addrs []netip.Addr, local *bpf.LocalPod, ctSize uint32) error {
	if err := dp.Attach(hostName); err != nil {
		return fmt.Errorf("attach TC programs to host veth %s: %w", hostName, err)
	}
	u.push("attach of TC programs to "+hostName, func() error { return dp.Detach(hostName) })

	// endpointctl and policyctl change these maps too; take turns.
	unlock, err := dp.Lock()
	if err != nil {
		return err
	}
	defer unlock()
	// An address bound with `endpointctl add` keeps its identity for
	// whichever pod gets it: the seed binds addresses, not pods.
	bound := map[netip.Addr]bool{}
	for _, a := range addrs {
		if b, ok, err := dp.IPCacheLookup(a); err == nil && ok && b.IsManual() {
			id = b
			bound[a] = true
		}
	}
	// The pod's own conntrack table, before the endpoint names it: its
	// first packet already keeps its flows apart from every other pod's.
	slot, err := dp.AddConntrackTable(ctSize)
	if err != nil {
		return fmt.Errorf("add conntrack table of %d flows for ifindex %d: %w", ctSize, ifindex, err)
	}
	u.push(fmt.Sprintf("conntrack table in slot %d", slot), func() error { return dp.DeleteConntrackTable(slot) })
	ep := endpointOf(id, addrs)
	ep.ConntrackSlot = slot
	if err := dp.PutEndpoint(ifindex, ep); err != nil {
		return fmt.Errorf("add endpoint (ifindex %d, %v) to the datapath: %w", ifindex, addrs, err)
	}
	u.push(fmt.Sprintf("endpoint entry of ifindex %d", ifindex), func() error { return dp.DeleteEndpoint(ifindex) })

	for _, a := range addrs {
		if bound[a] {
			continue // the binding's entry stays as it is, ADD failing or not
		}
		p := hostPrefix(a)
		if err := dp.PutIPCache(p, id); err != nil {
			return fmt.Errorf("add ipcache entry %s -> identity %s: %w", p, id, err)
		}
		u.push("ipcache entry "+p.String(), func() error { return dp.DeleteIPCache(p) })
	}
	// Last, once the pod's endpoint and identity are in place: other pods'
	// programs may now deliver to it directly.
	if local != nil {
		for _, a := range addrs {
			if err := dp.PutLocalPod(a, *local); err != nil {
				return fmt.Errorf("add local pod entry %s -> ifindex %d: %w", a, ifindex, err)
			}
			u.push("local pod entry "+a.String(), func() error { return dp.DeleteLocalPod(a, ifindex) })
		}
	}
	return nil
}

// release takes an attachment out of the datapath: programs, endpoint entry,
// ipcache entries and connection tracking state of its addresses. Every
// part is idempotent. ifindex may be 0 and addrs empty when DEL knows
// nothing about the attachment.
//
// ifindex and addresses come from a record that may be old, and the kernel
// reuses both: an entry is removed only while it is still this
// attachment's, never another pod's that got the index or the address since.
func release(dp *bpf.Datapath, hostName string, ifindex int, addrs []netip.Addr) error {
	var errs []error
	if err := dp.Detach(hostName); err != nil {
		errs = append(errs, fmt.Errorf("detach TC programs from %s: %w", hostName, err))
	}
	unlock, err := dp.Lock()
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	defer unlock()

	eps, err := dp.Endpoints()
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("list datapath endpoints: %w", err))...)
	}
	if ep, ok := eps[ifindex]; ok && ifindex > 0 {
		epAddrs := endpointAddrs(ep)
		// Ours if it carries one of our addresses; with no addresses
		// known, the caller vouches for the ifindex (it just read it off
		// our host veth).
		mine := len(addrs) == 0 || ep.HoldsAny(addrs)
		if mine {
			if err := dp.DeleteEndpoint(ifindex); err != nil {
				errs = append(errs, fmt.Errorf("delete endpoint entry of ifindex %d: %w", ifindex, err))
			} else if err := dp.DeleteConntrackTable(ep.ConntrackSlot); err != nil {
				errs = append(errs, err)
			}
			if len(addrs) == 0 {
				addrs = epAddrs
			}
			delete(eps, ifindex)
		}
	}
	// Only entries that still name this pod's host veth: with ifindex
	// unknown, GC finds them once the veth is gone.
	for _, a := range addrs {
		if err := dp.DeleteLocalPod(a, ifindex); err != nil {
			errs = append(errs, err)
		}
	}

	var gone []netip.Addr
	for _, a := range addrs {
		if claimedByOther(eps, a) {
			continue
		}
		// A manual binding outlives the pod (see enforce); its flows do
		// not.
		if bound, ok, err := dp.IPCacheLookup(a); err == nil && ok && bound.IsManual() {
			gone = append(gone, a)
			continue
		}
		if err := dp.DeleteIPCache(hostPrefix(a)); err != nil {
			errs = append(errs, fmt.Errorf("delete ipcache entry %s: %w", hostPrefix(a), err))
			continue
		}
		gone = append(gone, a)
	}
	if len(gone) > 0 {
		// Flows of a deleted pod must not let the next pod with the same
		// address inherit their verdicts.
		if _, err := dp.FlushConntrack(gone...); err != nil {
			errs = append(errs, fmt.Errorf("flush connection tracking of %v: %w", gone, err))
		}
	}
	return errors.Join(errs...)
}

// claimedByOther reports whether another endpoint holds a.
func claimedByOther(others map[int]bpf.Endpoint, a netip.Addr) bool {
	for _, ep := range others {
		if ep.IPv4 == a || ep.IPv6 == a {
			return true
		}
	}
	return false
}

// loadDatapath loads the datapath, or opens it when it is pinned already.
// A first load lists the host's links, and the kernel interrupts that dump
// when links change meanwhile, as they do on a node starting many pods at
// once; that error is worth another try, no other is.
func loadDatapath(root string) (*bpf.Datapath, error) {
	var err error
	for range 5 {
		var dp *bpf.Datapath
		dp, err = bpf.Load(bpf.Options{Root: root})
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return dp, err
		}
	}
	return nil, err
}
