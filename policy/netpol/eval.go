package netpol

import (
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// peerSet is the label identities one rule's peers select, each with the
// pods that got it selected (for resolving egress named ports on them).
type peerSet map[identity.ID]*peerPods

type peerPods struct {
	groups []*group   // whole groups, from selectors
	pods   []*podInfo // single pods, from ipBlocks
	seen   map[*group]bool
}

func (ps peerSet) addGroup(g *group) {
	e := ps.entry(g.id)
	if !e.seen[g] {
		e.seen[g] = true
		e.groups = append(e.groups, g)
	}
}

func (ps peerSet) addPod(p *podInfo) {
	e := ps.entry(p.id)
	e.pods = append(e.pods, p)
}

func (ps peerSet) entry(id identity.ID) *peerPods {
	e := ps[id]
	if e == nil {
		e = &peerPods{seen: map[*group]bool{}}
		ps[id] = e
	}
	return e
}

// eachPod calls f for every pod behind a peer identity.
func (e *peerPods) eachPod(f func(*podInfo)) {
	for _, g := range e.groups {
		for _, p := range g.pods {
			f(p)
		}
	}
	for _, p := range e.pods {
		f(p)
	}
}

// computePolicy compiles one policy against the current pods, namespaces
// and CIDR identities.
func (c *Compiler) computePolicy(p *parsedPolicy) *policyOut {
	subjects := map[identity.ID][]*group{}
	for _, g := range c.groupsByNS[p.ns] {
		if p.subject.Matches(g.labels) {
			subjects[g.id] = append(subjects[g.id], g)
		}
	}
	if len(subjects) == 0 {
		return emptyOut
	}
	out := &policyOut{bySubject: map[identity.ID]*subjectOut{}, refs: map[identity.ID]struct{}{}}
	for id := range subjects {
		out.bySubject[id] = &subjectOut{iso: policy.Isolation{Ingress: p.ingress, Egress: p.egress}}
		out.refs[id] = struct{}{}
	}
	for ri := range p.rules {
		c.emitRule(p, &p.rules[ri], subjects, out)
	}
	for _, so := range out.bySubject {
		slices.SortFunc(so.rules, compareRules)
		so.rules = slices.Compact(so.rules)
	}
	return out
}

// emitRule adds the rules of one ingress or egress rule for every subject.
func (c *Compiler) emitRule(p *parsedPolicy, r *parsedRule, subjects map[identity.ID][]*group, out *policyOut) {
	var peers peerSet
	var cidrPeers []identity.ID
	if !r.allPeers {
		peers = c.resolvePeers(p, r)
		cidrPeers = c.resolveCIDRs(r)
		for id := range peers {
			out.refs[id] = struct{}{}
		}
	}
	// fixedPeers are the peers of a port whose number does not depend on
	// the peer: every peer (any) or the selected ones.
	var fixedPeers []identity.ID
	if r.allPeers {
		fixedPeers = []identity.ID{identity.Any}
	} else {
		fixedPeers = make([]identity.ID, 0, len(peers)+len(cidrPeers))
		for id := range peers {
			fixedPeers = append(fixedPeers, id)
		}
		fixedPeers = append(fixedPeers, cidrPeers...)
	}
	add := func(subject, peer identity.ID, proto policy.Proto, ports policy.PortRange) {
		so := out.bySubject[subject]
		so.rules = append(so.rules, policy.Rule{
			Subject: subject, Direction: r.dir, Peer: peer, Proto: proto, Ports: ports,
			Action: policy.Allow, Origin: r.origin,
		})
	}
	if len(r.ports) == 0 {
		for s := range subjects {
			for _, peer := range fixedPeers {
				add(s, peer, policy.ProtoAny, policy.AnyPort)
			}
		}
		return
	}
	for _, pt := range r.ports {
		switch {
		case !pt.isNamed:
			for s := range subjects {
				for _, peer := range fixedPeers {
					add(s, peer, pt.proto, pt.ports)
				}
			}
		case r.dir == policy.Ingress:
			// The destination is the subject: resolve on its pods.
			for s, gs := range subjects {
				nums := resolveNamed(pt, func(f func(*podInfo)) {
					for _, g := range gs {
						for _, pod := range g.pods {
							f(pod)
						}
					}
				})
				for _, n := range nums {
					for _, peer := range fixedPeers {
						add(s, peer, pt.proto, policy.PortRange{Lo: n, Hi: n})
					}
				}
			}
		default:
			// Egress: the destination is the peer. CIDR peers have no
			// container ports, so a name never resolves on them.
			targets := peers
			if r.allPeers {
				targets = c.allPodPeers()
				for id := range targets {
					out.refs[id] = struct{}{}
				}
			}
			for peer, e := range targets {
				nums := resolveNamed(pt, e.eachPod)
				for _, n := range nums {
					for s := range subjects {
						add(s, peer, pt.proto, policy.PortRange{Lo: n, Hi: n})
					}
				}
			}
		}
	}
}

// resolveNamed returns the numbers, sorted and unique, the pods given by
// each map pt's name to, with pt's protocol.
func resolveNamed(pt parsedPort, each func(func(*podInfo))) []uint16 {
	var nums []uint16
	each(func(pod *podInfo) {
		for _, cp := range pod.ports {
			if cp.name == pt.name && cp.proto == pt.k8s {
				nums = append(nums, cp.port)
			}
		}
	})
	slices.Sort(nums)
	return slices.Compact(nums)
}

// allPodPeers returns every endpoint group, by identity: the destinations
// of an egress rule without "to".
func (c *Compiler) allPodPeers() peerSet {
	ps := peerSet{}
	for _, g := range c.groups {
		ps.addGroup(g)
	}
	return ps
}

// resolvePeers returns the pod identities a rule's peers select.
func (c *Compiler) resolvePeers(p *parsedPolicy, r *parsedRule) peerSet {
	ps := peerSet{}
	for i := range r.peers {
		peer := &r.peers[i]
		if peer.isBlock() {
			// ipBlock matches pod addresses too; those resolve to the pod's
			// identity in the ipcache, never to a CIDR identity.
			for _, pod := range c.pods {
				if slices.ContainsFunc(pod.ips, peer.blockMatches) {
					ps.addPod(pod)
				}
			}
			continue
		}
		if peer.nsSel == nil {
			for _, g := range c.groupsByNS[p.ns] {
				if peer.podSel.Matches(g.labels) {
					ps.addGroup(g)
				}
			}
			continue
		}
		for ns, gs := range c.groupsByNS {
			if !peer.nsSel.Matches(c.nsLabelsOf(ns)) {
				continue
			}
			for _, g := range gs {
				if peer.podSel.Matches(g.labels) {
					ps.addGroup(g)
				}
			}
		}
	}
	return ps
}

// resolveCIDRs returns the CIDR identities a rule's ipBlocks allow: every
// known prefix inside a block and not inside one of its excepts. Prefixes
// nest or are disjoint, so an address whose longest match is such a prefix
// is in the block and outside the excepts, and no other address is.
func (c *Compiler) resolveCIDRs(r *parsedRule) []identity.ID {
	var ids []identity.ID
	for i := range r.peers {
		peer := &r.peers[i]
		if !peer.isBlock() {
			continue
		}
		for pf, e := range c.cidrs {
			if !prefixWithin(pf, peer.block) {
				continue
			}
			if slices.ContainsFunc(peer.except, func(ex netip.Prefix) bool { return prefixWithin(pf, ex) }) {
				continue
			}
			ids = append(ids, e.id)
		}
	}
	slices.Sort(ids)
	return slices.Compact(ids)
}

// protoOf maps the API's protocol names to IP protocol numbers.
var protoOf = map[corev1.Protocol]policy.Proto{
	corev1.ProtocolTCP:  policy.ProtoTCP,
	corev1.ProtocolUDP:  policy.ProtoUDP,
	corev1.ProtocolSCTP: policy.ProtoSCTP,
}
