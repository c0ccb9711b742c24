package netpol

import (
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// computePolicy compiles one policy against the current pods, namespaces
// and CIDR identities.
func (c *Compiler) computePolicy(p *parsedPolicy) *policyOut {
	out := &policyOut{
		iso:      policy.Isolation{Ingress: p.ingress, Egress: p.egress},
		subjects: map[identity.ID]struct{}{},
	}
	for _, g := range c.groupsByNS[p.ns] {
		if p.subject.Matches(g.labels) {
			out.subjects[g.id] = struct{}{}
			out.refs = append(out.refs, g.id)
		}
	}
	if len(out.subjects) == 0 {
		return emptyOut
	}
	out.rules = make([]ruleOut, len(p.rules))
	for ri := range p.rules {
		c.resolveRule(p, &p.rules[ri], out, &out.rules[ri])
	}
	out.refs = sortUnique(out.refs)
	return out
}

// resolveRule resolves one ingress or egress rule: its peers, its ports, and
// its named ports on the destination pods.
func (c *Compiler) resolveRule(p *parsedPolicy, r *parsedRule, out *policyOut, ro *ruleOut) {
	ro.dir, ro.origin = r.dir, r.origin
	var labelPeers []identity.ID
	if r.allPeers {
		ro.peers = []identity.ID{identity.Any}
	} else {
		labelPeers = c.resolvePeers(p, r)
		out.refs = append(out.refs, labelPeers...)
		ro.peers = append(slices.Clip(labelPeers), c.resolveCIDRs(r)...)
	}
	if len(r.ports) == 0 {
		ro.ports = []portSel{{proto: policy.ProtoAny, ports: policy.AnyPort}}
		return
	}
	var named []parsedPort
	for _, pt := range r.ports {
		if pt.isNamed {
			named = append(named, pt)
		} else {
			ro.ports = append(ro.ports, portSel{proto: pt.proto, ports: pt.ports})
		}
	}
	slices.SortFunc(ro.ports, comparePortSel)
	ro.ports = slices.Compact(ro.ports)
	if len(named) == 0 {
		return
	}
	if r.dir == policy.Ingress {
		// The destination is the subject: resolve on its pods.
		for s := range out.subjects {
			if ps := resolveNamed(named, c.idPorts[s]); len(ps) > 0 {
				if ro.bySubject == nil {
					ro.bySubject = map[identity.ID][]portSel{}
				}
				ro.bySubject[s] = ps
			}
		}
		return
	}
	// Egress: the destination is the peer. CIDR peers have no container
	// ports, so a name never resolves on them; a rule without "to" resolves
	// on every pod.
	targets := labelPeers
	if r.allPeers {
		targets = c.allPodPeers()
		out.refs = append(out.refs, targets...)
	}
	for _, peer := range targets {
		if ps := resolveNamed(named, c.idPorts[peer]); len(ps) > 0 {
			ro.byPeer = append(ro.byPeer, peerPorts{peer: peer, ports: ps})
		}
	}
}

// resolveNamed returns what named ports are on an identity whose pods
// declare ports: each name with its protocol, as single-port ranges, sorted
// and unique.
func resolveNamed(named []parsedPort, ports map[containerPort]int) []portSel {
	var out []portSel
	for cp := range ports {
		for _, pt := range named {
			if cp.name == pt.name && cp.proto == pt.k8s {
				out = append(out, portSel{proto: pt.proto, ports: policy.PortRange{Lo: cp.port, Hi: cp.port}})
			}
		}
	}
	slices.SortFunc(out, comparePortSel)
	return slices.Compact(out)
}

// allPodPeers returns every endpoint identity: the destinations of an
// egress rule without "to".
func (c *Compiler) allPodPeers() []identity.ID {
	ps := make([]identity.ID, 0, len(c.groups))
	for _, g := range c.groups {
		ps = append(ps, g.id)
	}
	return sortUnique(ps)
}

// sortUnique sorts ids and drops repeats, in place.
func sortUnique(ids []identity.ID) []identity.ID {
	slices.Sort(ids)
	return slices.Compact(ids)
}

// resolvePeers returns the pod identities a rule's peers select, sorted.
func (c *Compiler) resolvePeers(p *parsedPolicy, r *parsedRule) []identity.ID {
	var ps []identity.ID
	for i := range r.peers {
		peer := &r.peers[i]
		if peer.isBlock() {
			// ipBlock matches pod addresses too; those resolve to the pod's
			// identity in the ipcache, never to a CIDR identity.
			for id := range c.blocks[peer.blockKey].counts {
				ps = append(ps, id)
			}
			continue
		}
		if peer.nsSel == nil {
			for _, g := range c.groupsByNS[p.ns] {
				if peer.podSel.Matches(g.labels) {
					ps = append(ps, g.id)
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
					ps = append(ps, g.id)
				}
			}
		}
	}
	return sortUnique(ps)
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
