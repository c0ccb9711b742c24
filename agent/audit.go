package agent

import (
	"net/netip"

	"github.com/idcni/idcni/identity"
)

// audit compares the maps with what the writer last wrote. An entry that
// differs (someone else wrote it, a tool deleted it, a bug) is taken as it
// is, its key marked dirty, and counted: the next flush writes what it
// must hold. Entries the agent does not own are left alone: endpoints
// nobody registered (the plugin's, until registration), and the ipcache
// entries of their addresses.
func (a *Agent) audit() error {
	// The registry first: entries whose host veth is gone are pruned,
	// live veths it lost are rebuilt.
	if err := a.auditEndpoints(); err != nil {
		a.log.Warn("endpoint registry audit", "err", err)
	}
	// Then what the kernel runs for them: an entry in the maps polices
	// nothing without its programs.
	a.auditAttachments()
	if err := a.syncLocal(); err != nil {
		return err
	}
	// The routes too: one of the agent's that someone deleted comes back.
	if err := a.syncRoutes(); err != nil {
		a.log.Warn("node routes audit", "err", err)
	}
	// And the nftables table, which a firewall reload may have deleted.
	if err := a.auditNFT(); err != nil {
		a.log.Warn("nftables table audit", "err", err)
	}
	// The service map keeps its own account, and its drift revokes no
	// flow: translation decides where a new flow goes, not whether.
	if err := a.auditServices(); err != nil {
		return err
	}
	s := a.st
	drift := map[string]int{}
	ipc, err := a.maps.IPCache()
	if err != nil {
		return err
	}
	eps, err := a.maps.Endpoints()
	if err != nil {
		return err
	}
	unowned := map[netip.Addr]bool{}
	for ifindex, ep := range eps {
		if _, ok := s.local[ifindex]; !ok {
			for _, addr := range ep.Addrs() {
				unowned[addr] = true
			}
		}
	}
	for p, id := range ipc {
		if have, ok := s.ipc[p]; (!ok || have != id) && !(p.Bits() == p.Addr().BitLen() && unowned[p.Addr()]) {
			s.putIPC(p, id)
			s.dirtyPfx[p] = struct{}{}
			drift["ipcache"]++
		}
	}
	for p := range s.ipc {
		if _, ok := ipc[p]; !ok {
			s.delIPC(p)
			s.dirtyPfx[p] = struct{}{}
			drift["ipcache"]++
		}
	}
	for ifindex, want := range s.eps {
		have, ok := eps[ifindex]
		have.ConntrackSlot = 0
		if !ok || have != want {
			if ok {
				s.eps[ifindex] = have
			} else {
				delete(s.eps, ifindex)
			}
			s.refSubject(want.Identity, -1)
			if ok {
				s.refSubject(have.Identity, 1)
			}
			s.dirtyEP[ifindex] = struct{}{}
			drift["endpoints"]++
		}
	}
	pol, err := a.maps.Policy()
	if err != nil {
		return err
	}
	for k, e := range pol.Entries {
		if have := s.pol[k]; have == nil || !have.Equal(e) {
			s.putPolicy(k, e)
			s.dirtySub[k.Subject] = struct{}{}
			drift["policy"]++
		}
	}
	for k := range s.pol {
		if _, ok := pol.Entries[k]; !ok {
			s.delPolicy(k)
			s.dirtySub[k.Subject] = struct{}{}
			drift["policy"]++
		}
	}
	flagDrift := func(id identity.ID) {
		s.dirtySub[id] = struct{}{}
		drift["identities"]++
	}
	for id, f := range pol.Identities {
		if have, ok := s.flags[id]; !ok || have != f {
			s.flags[id] = f
			flagDrift(id)
		}
	}
	for id := range s.flags {
		if _, ok := pol.Identities[id]; !ok {
			delete(s.flags, id)
			flagDrift(id)
		}
	}
	for m, n := range drift {
		a.metrics.auditDrift.WithLabelValues(m).Add(float64(n))
	}
	if len(drift) > 0 {
		a.log.Warn("maps drifted from what the agent wrote; repairing", "entries", drift)
		// Whatever changed them may have let flows in that policy does
		// not allow.
		s.revokeAll = true
	}
	return nil
}
