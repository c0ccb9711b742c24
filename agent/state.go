package agent

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/desired"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// nodeState is what the writer loop knows, and only the writer loop touches
// it: the claims on every ipcache prefix, the local endpoints, the map
// entries it last wrote, and the keys a change touched since (dirty). A
// flush asks package desired what each dirty key must hold, compares it
// with what was written, and writes the difference.
type nodeState struct {
	// Claims.
	pods      map[string]podClaim // "ns/name" of a pod the compiler resolved
	addrPods  map[netip.Addr][]string
	nodes     map[netip.Addr]identity.ID
	cidrs     map[netip.Prefix]identity.ID
	bindings  map[netip.Addr]identity.ID
	local     map[int]localEndpoint // registered endpoints by host ifindex
	localAddr map[netip.Addr]int
	// foreign are endpoints in the map that no registration explains:
	// pods the plugin started while no agent answered. Their addresses
	// keep the identity their entry has; the plugin's DEL and GC own them.
	foreign map[int]bpf.Endpoint

	// Written: the maps as this agent left them.
	ipc   map[netip.Prefix]identity.ID
	wide  map[netip.Prefix]struct{} // prefixes of ipc shorter than an address
	eps   map[int]bpf.Endpoint      // conntrack slot left out
	pol   map[policy.Key]*policy.Entry
	flags map[identity.ID]policy.IdentityFlags
	// bySubject and byPeer index pol.
	bySubject map[identity.ID]map[policy.Key]struct{}
	byPeer    map[identity.ID]map[policy.Key]struct{}
	// subjects counts written endpoints per identity: the identities whose
	// rules this node needs.
	subjects map[identity.ID]int

	// projected are the entry counts of subjects whose new rules were
	// sized (a policy's fit) and are not written yet.
	projected map[identity.ID]int

	// revokeAll makes the next flush move the revision whatever it
	// writes: set when the maps were adopted from an earlier run, whose
	// flows this run cannot judge.
	revokeAll bool

	dirtyPfx map[netip.Prefix]struct{}
	dirtyEP  map[int]struct{}
	dirtySub map[identity.ID]struct{}
}

type podClaim struct {
	id    identity.ID
	addrs []netip.Addr
}

// localEndpoint is a registered endpoint: its addresses and the pod whose
// identity it takes.
type localEndpoint struct {
	containerID string
	pod         string // "ns/name"
	addrs       []netip.Addr
}

func newNodeState() *nodeState {
	return &nodeState{
		pods: map[string]podClaim{}, addrPods: map[netip.Addr][]string{}, nodes: map[netip.Addr]identity.ID{},
		cidrs: map[netip.Prefix]identity.ID{}, bindings: map[netip.Addr]identity.ID{},
		local: map[int]localEndpoint{}, localAddr: map[netip.Addr]int{}, foreign: map[int]bpf.Endpoint{},
		ipc: map[netip.Prefix]identity.ID{}, wide: map[netip.Prefix]struct{}{}, eps: map[int]bpf.Endpoint{},
		pol: map[policy.Key]*policy.Entry{}, flags: map[identity.ID]policy.IdentityFlags{},
		bySubject: map[identity.ID]map[policy.Key]struct{}{}, byPeer: map[identity.ID]map[policy.Key]struct{}{},
		subjects: map[identity.ID]int{}, projected: map[identity.ID]int{},
		dirtyPfx: map[netip.Prefix]struct{}{}, dirtyEP: map[int]struct{}{}, dirtySub: map[identity.ID]struct{}{},
	}
}

func (s *nodeState) dirty() bool {
	return len(s.dirtyPfx) > 0 || len(s.dirtyEP) > 0 || len(s.dirtySub) > 0
}

func (s *nodeState) touchAddr(a netip.Addr) { s.dirtyPfx[desired.HostPrefix(a)] = struct{}{} }

func (s *nodeState) touchSubjects(ids []identity.ID) {
	for _, id := range ids {
		s.dirtySub[id] = struct{}{}
	}
}

// setPod records a pod's identity and addresses (ok false: the pod is not
// an endpoint, or gone) and marks what moved.
func (s *nodeState) setPod(key string, id identity.ID, addrs []netip.Addr, ok bool) {
	old, had := s.pods[key]
	if had && ok && old.id == id && slices.Equal(old.addrs, addrs) {
		return
	}
	if had {
		for _, a := range old.addrs {
			s.addrPods[a] = slices.DeleteFunc(s.addrPods[a], func(k string) bool { return k == key })
			if len(s.addrPods[a]) == 0 {
				delete(s.addrPods, a)
			}
			s.touchAddr(a)
		}
		delete(s.pods, key)
	}
	if ok {
		s.pods[key] = podClaim{id: id, addrs: addrs}
		for _, a := range addrs {
			ks := append(s.addrPods[a], key)
			slices.Sort(ks)
			s.addrPods[a] = ks
			s.touchAddr(a)
		}
	}
	if ifindex, ok := s.findLocal(func(ep localEndpoint) bool { return ep.pod == key }); ok {
		s.dirtyEP[ifindex] = struct{}{}
	}
}

// findLocal finds the local endpoint match picks. Local endpoints are few
// (a node's pods), so a scan is fine.
func (s *nodeState) findLocal(match func(localEndpoint) bool) (int, bool) {
	for ifindex, ep := range s.local {
		if match(ep) {
			return ifindex, true
		}
	}
	return 0, false
}

// localOf is the local endpoint a registration describes.
func localOf(r api.EndpointRequest) localEndpoint {
	return localEndpoint{containerID: r.ContainerID, pod: r.PodNamespace + "/" + r.PodName, addrs: sortedAddrs(r.Addresses)}
}

func (s *nodeState) setLocal(ifindex int, ep localEndpoint, ok bool) {
	if old, had := s.local[ifindex]; had {
		for _, a := range old.addrs {
			if s.localAddr[a] == ifindex {
				delete(s.localAddr, a)
			}
			s.touchAddr(a)
		}
		delete(s.local, ifindex)
	}
	if ok {
		s.local[ifindex] = ep
		for _, a := range ep.addrs {
			s.localAddr[a] = ifindex
			s.touchAddr(a)
		}
	}
	s.dirtyEP[ifindex] = struct{}{}
}

func (s *nodeState) setNodes(want map[netip.Addr]identity.ID) {
	for _, a := range changedAddrs(s.nodes, want) {
		s.touchAddr(a)
	}
	s.nodes = want
}

func (s *nodeState) setBindings(want map[netip.Addr]identity.ID) {
	for _, a := range changedAddrs(s.bindings, want) {
		s.touchAddr(a)
		if ifindex, ok := s.localAddr[a]; ok {
			s.dirtyEP[ifindex] = struct{}{}
		}
	}
	s.bindings = want
}

// changedAddrs lists the addresses whose identity differs between two
// address maps, one missing from either counting as a difference.
func changedAddrs(old, new map[netip.Addr]identity.ID) []netip.Addr {
	var out []netip.Addr
	for a, id := range old {
		if new[a] != id {
			out = append(out, a)
		}
	}
	for a, id := range new {
		if _, ok := old[a]; !ok && id != identity.Unknown {
			out = append(out, a)
		}
	}
	return out
}

func (s *nodeState) setCIDR(p netip.Prefix, id identity.ID, ok bool) {
	if ok {
		s.cidrs[p] = id
	} else {
		delete(s.cidrs, p)
	}
	s.dirtyPfx[p] = struct{}{}
}

func (s *nodeState) bound(a netip.Addr) (identity.ID, bool) {
	id, ok := s.bindings[a]
	return id, ok
}

// endpointIdentity is what a local endpoint is enforced under.
func (s *nodeState) endpointIdentity(ep localEndpoint) identity.ID {
	return desired.EndpointIdentity(s.pods[ep.pod].id, ep.addrs, s.bound)
}

// wantEndpoint is the endpoint entry ifindex must hold.
func (s *nodeState) wantEndpoint(ifindex int) (bpf.Endpoint, bool) {
	ep, ok := s.local[ifindex]
	if !ok {
		return bpf.Endpoint{}, false
	}
	return bpf.NewEndpoint(s.endpointIdentity(ep), ep.addrs), true
}

// wantIPCache is the ipcache entry p must hold.
func (s *nodeState) wantIPCache(p netip.Prefix) (identity.ID, bool) {
	var c desired.Claims
	c.CIDR = s.cidrs[p]
	if p.Bits() == p.Addr().BitLen() {
		a := p.Addr()
		c.Binding = s.bindings[a]
		if ifindex, ok := s.localAddr[a]; ok {
			c.Local = s.endpointIdentity(s.local[ifindex])
		} else {
			for _, ep := range s.foreign {
				if ep.IPv4 == a || ep.IPv6 == a {
					c.Local = ep.Identity
				}
			}
		}
		// Two pods at one address (a deleted pod's object outliving its
		// sandbox) resolve the same way on every node: the first key.
		if ks := s.addrPods[a]; len(ks) > 0 {
			c.Pod = s.pods[ks[0]].id
		}
		c.Node = s.nodes[a]
	}
	return c.Identity()
}

// resolve is what the written ipcache makes of an address, leaving out
// skip: its host entry, else the longest written prefix holding it, else
// world.
func (s *nodeState) resolve(a netip.Addr, skip netip.Prefix) identity.ID {
	if p := desired.HostPrefix(a); p != skip {
		if id, ok := s.ipc[p]; ok {
			return id
		}
	}
	best, id := -1, identity.World
	for p := range s.wide {
		if p != skip && p.Contains(a) && p.Bits() > best {
			best, id = p.Bits(), s.ipc[p]
		}
	}
	return id
}

func (s *nodeState) putIPC(p netip.Prefix, id identity.ID) {
	s.ipc[p] = id
	if p.Bits() < p.Addr().BitLen() {
		s.wide[p] = struct{}{}
	}
}

func (s *nodeState) delIPC(p netip.Prefix) {
	delete(s.ipc, p)
	delete(s.wide, p)
}

func (s *nodeState) putPolicy(k policy.Key, e *policy.Entry) {
	s.pol[k] = e
	index(s.bySubject, k.Subject, k)
	index(s.byPeer, k.Peer, k)
}

func (s *nodeState) delPolicy(k policy.Key) {
	delete(s.pol, k)
	unindex(s.bySubject, k.Subject, k)
	unindex(s.byPeer, k.Peer, k)
}

func index(m map[identity.ID]map[policy.Key]struct{}, id identity.ID, k policy.Key) {
	if m[id] == nil {
		m[id] = map[policy.Key]struct{}{}
	}
	m[id][k] = struct{}{}
}

func unindex(m map[identity.ID]map[policy.Key]struct{}, id identity.ID, k policy.Key) {
	delete(m[id], k)
	if len(m[id]) == 0 {
		delete(m, id)
	}
}

func (s *nodeState) entry(k policy.Key) *policy.Entry { return s.pol[k] }

func (s *nodeState) keysOfPeer(id identity.ID) []policy.Key {
	return slices.Collect(maps.Keys(s.byPeer[id]))
}

// entriesOf is how many policy entries id has, or will have once the
// changes sized so far are written.
func (s *nodeState) entriesOf(id identity.ID) int {
	if n, ok := s.projected[id]; ok {
		return n
	}
	return len(s.bySubject[id])
}

// projectedEntries is the size of the policy map once the changes sized so
// far are written.
func (s *nodeState) projectedEntries() int {
	n := len(s.pol)
	for id, p := range s.projected {
		n += p - len(s.bySubject[id])
	}
	return n
}

// wantsRules reports whether id has, or is about to have, rules in this
// node's maps: a subject now, or the identity a local endpoint is about to
// be written under. Sizing a policy asks this, so that at start, before the
// endpoints are rewritten under their identities, their rules count.
func (s *nodeState) wantsRules(id identity.ID) bool {
	if s.isSubject(id) {
		return true
	}
	for _, ep := range s.local {
		if s.endpointIdentity(ep) == id {
			return true
		}
	}
	return false
}

// isSubject reports whether id's rules belong in this node's maps.
func (s *nodeState) isSubject(id identity.ID) bool {
	return desired.IsSubject(id, func(id identity.ID) bool { return s.subjects[id] > 0 })
}

// adopt takes the maps as a previous run (or the plugin) left them as what
// was written, and marks every key for the first flush, which then makes
// them what this run wants.
func (s *nodeState) adopt(m datapathMaps) error {
	s.revokeAll = true
	ipc, err := m.IPCache()
	if err != nil {
		return err
	}
	for p, id := range ipc {
		s.putIPC(p, id)
		s.dirtyPfx[p] = struct{}{}
	}
	eps, err := m.Endpoints()
	if err != nil {
		return err
	}
	for ifindex, ep := range eps {
		ep.ConntrackSlot = 0
		if _, ok := s.local[ifindex]; ok {
			s.eps[ifindex] = ep
			s.subjects[ep.Identity]++
		} else {
			s.foreign[ifindex] = ep
			for _, a := range []netip.Addr{ep.IPv4, ep.IPv6} {
				if a.IsValid() {
					s.touchAddr(a)
				}
			}
		}
	}
	pol, err := m.Policy()
	if err != nil {
		return err
	}
	for k, e := range pol.Entries {
		s.putPolicy(k, e)
		s.dirtySub[k.Subject] = struct{}{}
	}
	for id, f := range pol.Identities {
		s.flags[id] = f
		s.dirtySub[id] = struct{}{}
	}
	for ifindex := range s.local {
		s.dirtyEP[ifindex] = struct{}{}
	}
	for id := range s.subjects {
		s.dirtySub[id] = struct{}{}
	}
	// Rules a previous run wrote for identities with no endpoint here go
	// with the first flush: they take no room from this run's policies.
	for id := range s.bySubject {
		if !s.isSubject(id) {
			s.projected[id] = 0
		}
	}
	for p := range s.cidrs {
		s.dirtyPfx[p] = struct{}{}
	}
	for a := range s.addrPods {
		s.touchAddr(a)
	}
	for a := range s.nodes {
		s.touchAddr(a)
	}
	for a := range s.bindings {
		s.touchAddr(a)
	}
	return nil
}

// subjectRules gives one subject's rules and isolation: the compiled
// NetworkPolicies' and the manual rules'.
type subjectRules func(identity.ID) ([]policy.Rule, policy.Isolation)

// flushStats says what one flush wrote.
type flushStats struct {
	ipcPut, ipcDel, epPut, epDel, polPut, polDel int
	revoked                                      bool
	overflow                                     []identity.ID // subjects whose rules did not fit
	ipcFull                                      int           // ipcache entries that did not fit
	ipcErr                                       error         // the first of their errors
}

// flushPlan is what a flush writes, computed before the first write.
type flushPlan struct {
	epPut  map[int]bpf.Endpoint
	epDel  []int
	epSeen []int // dirty endpoints handled

	polPut  map[policy.Key]*policy.Entry
	polDel  []policy.Key
	flagPut map[identity.ID]policy.IdentityFlags
	flagDel []identity.ID
	subSeen []identity.ID // dirty subjects handled (written or unchanged)

	ipcPut   map[netip.Prefix]identity.ID
	ipcStale []netip.Prefix
}

// flush writes what the dirty keys must hold and differs from what was
// written. Order: the policy's new and changed entries (a new peer's
// allows are in place before its address resolves to it), ipcache puts,
// endpoint puts, then stale policy entries, stale ipcache entries and
// endpoints, then, when anything could revoke what an established flow
// relies on, one revision bump. Keys that fail stay dirty for the next
// flush.
func (s *nodeState) flush(m datapathMaps, rulesOf subjectRules) (st flushStats, err error) {
	p := &flushPlan{epPut: map[int]bpf.Endpoint{}, polPut: map[policy.Key]*policy.Entry{},
		flagPut: map[identity.ID]policy.IdentityFlags{}, ipcPut: map[netip.Prefix]identity.ID{}}
	// Endpoints first: they decide which subjects are local.
	s.planEndpoints(p, &st)
	if err := s.planPolicy(p, &st, m.PolicyCapacity(), rulesOf); err != nil {
		return st, err
	}
	// Allows first; deletes with them only when there is no room for
	// both.
	first := p.polDel
	if len(s.pol)+len(p.polPut) <= m.PolicyCapacity() {
		first = nil
	}
	if err := s.writePolicy(m, p.polPut, first, p.flagPut, nil); err != nil {
		return st, err
	}
	st.polPut = len(p.polPut)
	if first != nil {
		p.polDel = nil
	}
	// The ipcache is judged against the policy as it now stands.
	s.planIPCache(p, &st)
	if err := s.writeIPCache(m, p, &st); err != nil {
		return st, err
	}
	for ifindex, ep := range p.epPut {
		if err := m.PutEndpoint(ifindex, ep); err != nil {
			return st, err
		}
		s.eps[ifindex] = ep
		delete(s.foreign, ifindex)
		st.epPut++
	}
	if err := s.writePolicy(m, nil, p.polDel, nil, p.flagDel); err != nil {
		return st, err
	}
	st.polDel = len(first) + len(p.polDel)
	for _, id := range p.subSeen {
		delete(s.dirtySub, id)
		delete(s.projected, id)
	}
	if err := s.deleteIPCache(m, p.ipcStale, &st); err != nil {
		return st, err
	}
	for _, ifindex := range p.epDel {
		// The plugin may have given the ifindex to a new pod since: its
		// entry is not ours to remove.
		have, ok, err := m.Endpoint(ifindex)
		if err != nil {
			return st, err
		}
		if ok && have.HoldsAny(s.eps[ifindex].Addrs()) {
			if err := m.DeleteEndpoint(ifindex); err != nil {
				return st, err
			}
			st.epDel++
		}
		delete(s.eps, ifindex)
	}
	for _, ifindex := range p.epSeen {
		delete(s.dirtyEP, ifindex)
	}
	st.revoked = st.revoked || s.revokeAll
	if st.revoked {
		if err := m.BumpRevision(); err != nil {
			return st, err
		}
	}
	s.revokeAll = false
	return st, nil
}

// planEndpoints decides the dirty endpoints' entries, and counts them in
// or out of their identities (which marks subjects that gain their first
// endpoint or lose their last one).
func (s *nodeState) planEndpoints(p *flushPlan, st *flushStats) {
	p.epSeen = slices.Sorted(maps.Keys(s.dirtyEP))
	for _, ifindex := range p.epSeen {
		want, ok := s.wantEndpoint(ifindex)
		have, had := s.eps[ifindex]
		switch {
		case ok && (!had || have != want):
			p.epPut[ifindex] = want
			if had && have.Identity != want.Identity {
				// Its established flows were admitted as the old
				// identity.
				st.revoked = true
			}
			if had {
				s.refSubject(have.Identity, -1)
			}
			s.refSubject(want.Identity, 1)
		case !ok && had:
			p.epDel = append(p.epDel, ifindex)
			s.refSubject(have.Identity, -1)
		}
	}
}

// planPolicy decides the dirty subjects' entries and flags. A subject's
// entries go in whole or not at all: what does not fit waits, its old
// entries in force, for room.
func (s *nodeState) planPolicy(p *flushPlan, st *flushStats, capacity int, rulesOf subjectRules) error {
	room := capacity - len(s.pol)
	for _, id := range slices.Sorted(maps.Keys(s.dirtySub)) {
		want := &policy.MapState{}
		if s.isSubject(id) {
			rules, iso := rulesOf(id)
			var err error
			if want, err = desired.Subject(id, rules, iso); err != nil {
				return fmt.Errorf("compile rules of identity %s: %w", id, err)
			}
		}
		var put, gone []policy.Key
		added := 0
		for k, e := range want.Entries {
			if have := s.pol[k]; have == nil || !have.Equal(e) {
				put = append(put, k)
				if have == nil {
					added++
				}
			}
		}
		for k := range s.bySubject[id] {
			if _, ok := want.Entries[k]; !ok {
				gone = append(gone, k)
			}
		}
		if added-len(gone) > room {
			st.overflow = append(st.overflow, id)
			// A new subject that does not fit is isolated as its
			// policies say, with no allows yet: it fails closed, not
			// open. One that had entries keeps them and its flags.
			if newF, ok := want.Identities[id]; ok && len(s.bySubject[id]) == 0 && s.flags[id] != newF {
				p.flagPut[id] = newF &^ (policy.FlagAnyPeerIngress | policy.FlagAnyPeerEgress | policy.FlagAnyProtoIngress | policy.FlagAnyProtoEgress)
				st.revoked = true
			}
			continue
		}
		room -= added - len(gone)
		p.subSeen = append(p.subSeen, id)
		for _, k := range put {
			st.revoked = st.revoked || desired.EntryRevokes(s.pol[k], want.Entries[k])
			p.polPut[k] = want.Entries[k]
		}
		for _, k := range gone {
			st.revoked = st.revoked || desired.EntryRevokes(s.pol[k], nil)
			p.polDel = append(p.polDel, k)
		}
		have, hadF := s.flags[id]
		newF, hasF := want.Identities[id]
		// Endpoints cache their identity's flags stamped with the
		// revision (subject_flags in the datapath): any change of them
		// needs a new revision to be seen, revoking or not.
		switch {
		case hasF && (!hadF || have != newF):
			p.flagPut[id] = newF
			st.revoked = true
		case !hasF && hadF:
			p.flagDel = append(p.flagDel, id)
			st.revoked = true
		}
	}
	return nil
}

// writePolicy writes a part of a plan and records it as written.
func (s *nodeState) writePolicy(m datapathMaps, put map[policy.Key]*policy.Entry, del []policy.Key, flags map[identity.ID]policy.IdentityFlags, flagDel []identity.ID) error {
	if len(put) == 0 && len(del) == 0 && len(flags) == 0 && len(flagDel) == 0 {
		return nil
	}
	if err := m.WritePolicy(len(s.pol), put, del, flags, flagDel); err != nil {
		return err
	}
	for k, e := range put {
		s.putPolicy(k, e)
	}
	for _, k := range del {
		s.delPolicy(k)
	}
	for id, f := range flags {
		s.flags[id] = f
	}
	for _, id := range flagDel {
		delete(s.flags, id)
	}
	return nil
}

// planIPCache decides the dirty prefixes' entries, and whether moving an
// address to another identity can revoke something.
func (s *nodeState) planIPCache(p *flushPlan, st *flushStats) {
	for _, pfx := range slices.SortedFunc(maps.Keys(s.dirtyPfx), netip.Prefix.Compare) {
		want, ok := s.wantIPCache(pfx)
		have, had := s.ipc[pfx]
		if ok == had && want == have {
			delete(s.dirtyPfx, pfx)
			continue
		}
		before, after := have, want
		if !had {
			before = s.resolve(pfx.Addr(), pfx)
		}
		if !ok {
			after = s.resolve(pfx.Addr(), pfx)
		}
		st.revoked = st.revoked || desired.PeerChangeRevokes(s.entry, s.keysOfPeer, before, after)
		if ok {
			p.ipcPut[pfx] = want
		} else {
			p.ipcStale = append(p.ipcStale, pfx)
		}
	}
}

// writeIPCache writes the plan's ipcache entries: changed ones first (they
// need no room), then new ones. Near capacity the stale entries go first,
// or a churn that adds before it removes would find the map full and
// never shrink it (nothing wanted resolves through a stale prefix). New
// entries that find no room stay dirty.
func (s *nodeState) writeIPCache(m datapathMaps, p *flushPlan, st *flushStats) error {
	var changed, added []netip.Prefix
	for pfx := range p.ipcPut {
		if _, had := s.ipc[pfx]; had {
			changed = append(changed, pfx)
		} else {
			added = append(added, pfx)
		}
	}
	if len(p.ipcStale) > 0 && len(s.ipc)+len(added) > m.IPCacheCapacity() {
		if err := s.deleteIPCache(m, p.ipcStale, st); err != nil {
			return err
		}
		p.ipcStale = nil
	}
	for _, pfx := range append(changed, added...) {
		if err := m.PutIPCache(pfx, p.ipcPut[pfx]); err != nil {
			if !errors.Is(err, bpf.ErrMapFull) {
				return err
			}
			if st.ipcFull == 0 {
				st.ipcErr = err
			}
			st.ipcFull++
			continue
		}
		s.putIPC(pfx, p.ipcPut[pfx])
		delete(s.dirtyPfx, pfx)
		st.ipcPut++
	}
	return nil
}

func (s *nodeState) deleteIPCache(m datapathMaps, stale []netip.Prefix, st *flushStats) error {
	for _, pfx := range stale {
		if err := m.DeleteIPCache(pfx); err != nil {
			return err
		}
		s.delIPC(pfx)
		delete(s.dirtyPfx, pfx)
		st.ipcDel++
	}
	return nil
}

// refSubject counts an endpoint in or out of its identity; an identity
// that gains its first endpoint or loses its last one has its rules
// written or removed.
func (s *nodeState) refSubject(id identity.ID, n int) {
	before := s.subjects[id]
	s.subjects[id] += n
	if s.subjects[id] <= 0 {
		delete(s.subjects, id)
	}
	if (before > 0) != (s.subjects[id] > 0) {
		s.dirtySub[id] = struct{}{}
	}
}
