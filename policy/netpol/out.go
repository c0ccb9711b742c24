package netpol

import (
	"cmp"
	"slices"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// policyOut is what one policy compiles to, kept factored: a rule's rules
// for a subject are its peers times its ports, so the compiler stores peers
// and ports once per NetworkPolicy rule instead of their product per
// subject. Recompiling a policy then costs its number of peers and
// subjects, not the number of rules, and policy.Rules are only built when
// asked for (appendRules).
type policyOut struct {
	iso      policy.Isolation
	subjects map[identity.ID]struct{}
	rules    []ruleOut
	// refs holds every label identity the output depends on, sorted:
	// subjects and resolved peers.
	refs []identity.ID
}

var emptyOut = &policyOut{}

// ruleOut is one ingress or egress rule of a policy, resolved.
type ruleOut struct {
	dir    policy.Direction
	origin string
	// peers (sorted) times ports (sorted) apply to every subject. peers is
	// [identity.Any] for a rule without from/to.
	peers []identity.ID
	ports []portSel
	// bySubject holds ingress named ports, resolved on each subject, times
	// peers.
	bySubject map[identity.ID][]portSel
	// byPeer holds egress named ports, resolved on each peer (sorted by
	// peer).
	byPeer []peerPorts
}

type portSel struct {
	proto policy.Proto
	ports policy.PortRange
}

func comparePortSel(a, b portSel) int {
	return cmp.Or(cmp.Compare(a.proto, b.proto), cmp.Compare(a.ports.Lo, b.ports.Lo), cmp.Compare(a.ports.Hi, b.ports.Hi))
}

type peerPorts struct {
	peer  identity.ID
	ports []portSel
}

// sharedEqual reports whether two versions of a rule give every subject the
// same rules, apart from per-subject named ports.
func (r *ruleOut) sharedEqual(o *ruleOut) bool {
	return r.dir == o.dir && r.origin == o.origin &&
		slices.Equal(r.peers, o.peers) && slices.Equal(r.ports, o.ports) &&
		slices.EqualFunc(r.byPeer, o.byPeer, func(a, b peerPorts) bool {
			return a.peer == b.peer && slices.Equal(a.ports, b.ports)
		})
}

// appendRules appends the rules po gives subject, in a fixed order: by
// NetworkPolicy rule, then peer, protocol and ports.
func (po *policyOut) appendRules(out []policy.Rule, subject identity.ID) []policy.Rule {
	if _, ok := po.subjects[subject]; !ok {
		return out
	}
	for i := range po.rules {
		r := &po.rules[i]
		start := len(out)
		add := func(peer identity.ID, ps portSel) {
			out = append(out, policy.Rule{
				Subject: subject, Direction: r.dir, Peer: peer, Proto: ps.proto, Ports: ps.ports,
				Action: policy.Allow, Origin: r.origin,
			})
		}
		for _, peer := range r.peers {
			for _, ps := range r.ports {
				add(peer, ps)
			}
			for _, ps := range r.bySubject[subject] {
				add(peer, ps)
			}
		}
		for _, pp := range r.byPeer {
			for _, ps := range pp.ports {
				add(pp.peer, ps)
			}
		}
		seg := out[start:]
		slices.SortFunc(seg, func(a, b policy.Rule) int {
			return cmp.Or(cmp.Compare(a.Peer, b.Peer), comparePortSel(portSel{a.Proto, a.Ports}, portSel{b.Proto, b.Ports}))
		})
		out = append(out[:start], slices.Compact(seg)...)
	}
	return out
}

// applyOut replaces policy key's output old by nw in the per-subject and
// reverse indexes, and adds to changed the subjects whose rules or
// isolation differ.
func (c *Compiler) applyOut(key string, old, nw *policyOut, changed map[identity.ID]struct{}) {
	shared := old.iso == nw.iso && len(old.rules) == len(nw.rules)
	for i := 0; shared && i < len(old.rules); i++ {
		shared = old.rules[i].sharedEqual(&nw.rules[i])
	}
	sameFor := func(id identity.ID) bool {
		for i := range old.rules {
			if !slices.Equal(old.rules[i].bySubject[id], nw.rules[i].bySubject[id]) {
				return false
			}
		}
		return true
	}
	for id := range old.subjects {
		if _, ok := nw.subjects[id]; ok {
			continue
		}
		changed[id] = struct{}{}
		delete(c.subjects[id], key)
		if len(c.subjects[id]) == 0 {
			delete(c.subjects, id)
		}
	}
	for id := range nw.subjects {
		_, had := old.subjects[id]
		if !had || !shared || !sameFor(id) {
			changed[id] = struct{}{}
		}
		m := c.subjects[id]
		if m == nil {
			m = map[string]*policyOut{}
			c.subjects[id] = m
		}
		m[key] = nw
	}
	// Both ref lists are sorted: walk them together and touch only the
	// reverse-index entries that differ.
	o, n := old.refs, nw.refs
	for len(o) > 0 || len(n) > 0 {
		switch {
		case len(n) == 0 || (len(o) > 0 && o[0] < n[0]):
			delete(c.usedBy[o[0]], key)
			if len(c.usedBy[o[0]]) == 0 {
				delete(c.usedBy, o[0])
			}
			o = o[1:]
		case len(o) == 0 || n[0] < o[0]:
			m := c.usedBy[n[0]]
			if m == nil {
				m = map[string]struct{}{}
				c.usedBy[n[0]] = m
			}
			m[key] = struct{}{}
			n = n[1:]
		default:
			o, n = o[1:], n[1:]
		}
	}
}
