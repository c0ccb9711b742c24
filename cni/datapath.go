package cni

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/desired"
	"github.com/idcni/idcni/identity"
)

// enforce attaches the TC programs to the host veth and enters the pod in
// the maps under id, pushing the inverse of each step on u. It runs before
// the pod has an address or a route, so the pod never sends a packet the
// programs do not judge.
func enforce(dp *bpf.Datapath, u *undo, hostName string, ifindex int, id identity.ID, addrs []netip.Addr, local *bpf.LocalPod, ctSize uint32) error {
	// The root lock first: the agent replaces the programs under it
	// (moving every attachment it finds), and dp's programs are those
	// pinned when the plugin opened the datapath, without the lock. An
	// attach in between would put this pod on the old program for good;
	// under the lock, the pinned programs are the current ones until the
	// attachment is in place for the next replacement to move.
	// endpointctl and policyctl change the maps too; take turns.
	unlock, err := dp.Lock()
	if err != nil {
		return err
	}
	defer unlock()
	// The maps too: an agent that migrated the pins meanwhile replaced
	// the ones dp holds, and a write to those would be lost.
	if err := dp.Refresh(); err != nil {
		return fmt.Errorf("open the current TC programs and maps: %w", err)
	}
	if err := dp.Attach(hostName); err != nil {
		return fmt.Errorf("attach TC programs to host veth %s: %w", hostName, err)
	}
	u.push("attach of TC programs to "+hostName, func() error { return dp.Detach(hostName) })
	// An address bound with `endpointctl add` keeps its identity for
	// whichever pod gets it: the seed binds addresses, not pods.
	id = desired.EndpointIdentity(id, addrs, manualBinding(dp))
	// The pod's own conntrack table, before the endpoint names it: its
	// first packet already keeps its flows apart from every other pod's.
	slot, err := dp.AddConntrackTable(ctSize)
	if err != nil {
		return fmt.Errorf("add conntrack table of %d flows for ifindex %d: %w", ctSize, ifindex, err)
	}
	u.push(fmt.Sprintf("conntrack table in slot %d", slot), func() error { return dp.DeleteConntrackTable(slot) })
	ep := bpf.NewEndpoint(id, addrs)
	ep.ConntrackSlot = slot
	if err := dp.PutEndpoint(ifindex, ep); err != nil {
		return fmt.Errorf("add endpoint (ifindex %d, %v) to the datapath: %w", ifindex, addrs, err)
	}
	u.push(fmt.Sprintf("endpoint entry of ifindex %d", ifindex), func() error { return dp.DeleteEndpoint(ifindex) })

	bound := manualBinding(dp)
	for _, a := range addrs {
		b, _ := bound(a)
		want, _ := desired.Claims{Binding: b, Local: id}.Identity()
		if want == b {
			continue // the binding's entry stays as it is, ADD failing or not
		}
		p := desired.HostPrefix(a)
		if err := dp.PutIPCache(p, want); err != nil {
			return fmt.Errorf("add ipcache entry %s -> identity %s: %w", p, want, err)
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
	// The pins may have been migrated since dp was opened: remove the
	// entries from the maps the programs use now. Pins this build cannot
	// read leave dp as it was; DEL still removes what it can.
	if err := dp.Refresh(); err != nil {
		warn("reopen the datapath under the lock: %v", err)
	}

	eps, err := dp.Endpoints()
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("list datapath endpoints: %w", err))...)
	}
	if ep, ok := eps[ifindex]; ok && ifindex > 0 {
		// Ours if it carries one of our addresses; with no addresses
		// known, the caller vouches for the ifindex (it just read it off
		// our host veth).
		if len(addrs) == 0 || ep.HoldsAny(addrs) {
			if err := dp.DeleteEndpoint(ifindex); err != nil {
				errs = append(errs, fmt.Errorf("delete endpoint entry of ifindex %d: %w", ifindex, err))
			} else if err := dp.DeleteConntrackTable(ep.ConntrackSlot); err != nil {
				errs = append(errs, err)
			}
			if len(addrs) == 0 {
				addrs = ep.Addrs()
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
	return errors.Join(append(errs, forgetAddrs(dp, eps, addrs))...)
}

// forgetAddrs makes the ipcache entries of addresses no endpoint in eps
// holds any more what package desired says they must be, as far as the
// plugin knows: a manual binding (an entry in the manual range) outlives
// its pod, an address another endpoint holds is that endpoint's, anything
// else goes (with an agent, the agent writes the pod's entry back while
// its Pod object still reports the address). The flows of every address
// that changed hands are flushed: the next pod with the address must not
// inherit their verdicts. DEL and GC both come here.
func forgetAddrs(dp *bpf.Datapath, eps map[int]bpf.Endpoint, addrs []netip.Addr) error {
	var errs []error
	var gone []netip.Addr
	bound := manualBinding(dp)
	for _, a := range addrs {
		var c desired.Claims
		c.Binding, _ = bound(a)
		for _, ep := range eps {
			if ep.HoldsAny([]netip.Addr{a}) {
				c.Local = ep.Identity
			}
		}
		if c.Local != identity.Unknown {
			continue // the other endpoint's entry, as its ADD wrote it
		}
		p := desired.HostPrefix(a)
		if want, ok := c.Identity(); ok {
			if err := dp.PutIPCache(p, want); err != nil {
				errs = append(errs, fmt.Errorf("write ipcache entry %s: %w", p, err))
				continue
			}
		} else if err := dp.DeleteIPCache(p); err != nil {
			errs = append(errs, fmt.Errorf("delete ipcache entry %s: %w", p, err))
			continue
		}
		gone = append(gone, a)
	}
	if len(gone) > 0 {
		if _, err := dp.FlushConntrack(gone...); err != nil {
			errs = append(errs, fmt.Errorf("flush connection tracking of %v: %w", gone, err))
		}
	}
	return errors.Join(errs...)
}

// manualBinding reads the manual bindings off the ipcache: without the
// agent's state file (the agent holds its lock), an entry in the manual
// range is a binding.
func manualBinding(dp *bpf.Datapath) func(netip.Addr) (identity.ID, bool) {
	return func(a netip.Addr) (identity.ID, bool) {
		id, ok, err := dp.IPCacheLookup(a)
		if err != nil || !ok || !id.IsManual() {
			return identity.Unknown, false
		}
		return id, true
	}
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
