// Package reference is the datapath written again in plain Go: it takes the
// same Ethernet frames the TC programs see and decides them by the same
// steps (parse, endpoint, anti-spoofing, fragments, conntrack, policy), with
// policy.Set.Decide as the rule book. The datapath tests and the fuzzer
// hold bpf/kernel/datapath.c to it, packet by packet.
//
// It checks policy from the rules themselves, not from the compiled map
// entries, so a mistake in policy.Compile shows as a disagreement too.
//
// It sits beside the datapath it models but imports only identity and
// policy, never package bpf, so bpf's own tests can import it.
package reference

import (
	"net/netip"
	"time"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// Scope is the hook a packet is seen at (numbers as in the datapath).
type Scope uint8

const (
	Egress  Scope = 0 // host veth TC ingress: the packet leaves the pod
	Ingress Scope = 1 // host veth TC egress: the packet enters the pod
)

// Reason numbers are the datapath's (enum reason in idcni.h).
type Reason uint8

const (
	AllowNonIP Reason = iota
	AllowND
	AllowEstablished
	AllowReply
	AllowRule
	AllowOpen
	AllowHost
	AllowRelated
	DropNoRule
	DropDeny
	DropSpoof
	DropMalformed
	DropNoEndpoint
	DropFrag
	DropRevoked
	DropUnknownFlow
	DropNoBackend
)

// Drop reports whether the reason drops the packet.
func (r Reason) Drop() bool { return r >= DropNoRule }

var reasonNames = [...]string{"non-ip", "ipv6-link-control", "established", "reply", "rule", "not-isolated", "from-host",
	"related", "no-rule", "deny-rule", "spoofed-source", "malformed", "no-endpoint", "unknown-fragment", "revoked",
	"unknown-flow", "no-service-backend"}

func (r Reason) String() string {
	if int(r) < len(reasonNames) {
		return reasonNames[r]
	}
	return "unknown"
}

// Endpoint is a pod behind a host veth. Slot names its conntrack table:
// endpoints of one slot share their flows, as the datapath's do.
type Endpoint struct {
	Identity   identity.ID
	IPv4, IPv6 netip.Addr
	Slot       uint32
}

// Datapath is the state the TC programs read and keep.
type Datapath struct {
	Endpoints map[int]Endpoint
	IPCache   map[netip.Prefix]identity.ID
	// Local names the pods on this node that from_pod delivers to
	// itself, by address: the host veth of each (the local_pods map).
	Local map[netip.Addr]int
	// Remote are other nodes' pod ranges (the remote_cidrs map): from_pod
	// hands packets for them to the FIB past the node's forwarding, and
	// from_net takes packets from them in.
	Remote []netip.Prefix
	Policy *policy.Set
	// Rev is the policy revision; conntrack entries remember theirs.
	Rev uint32
	// Pick chooses the slot of backends a new flow to fe goes to when no
	// affinity decides it: the datapath picks at random, so a test tells
	// the model what the datapath picked. nil: slot 0.
	Pick func(fe Frontend, backends []Backend) int
	// Now is the clock session affinity is timed by (the datapath's is
	// bpf_ktime_get_coarse_ns). nil: always 0.
	Now func() time.Duration

	// hairpinFlow: the last check's flow is a hairpin one (ctHairpin).
	hairpinFlow bool

	ct       map[ctKey]*ctEntry
	frags    map[fragKey][2]uint16
	services map[Frontend]svcEntry
	affinity map[affKey]affEntry
}

// New returns an empty datapath at revision 1, as the loader leaves it.
func New() *Datapath {
	return &Datapath{
		Endpoints: map[int]Endpoint{},
		IPCache:   map[netip.Prefix]identity.ID{},
		Local:     map[netip.Addr]int{},
		Policy:    &policy.Set{},
		Rev:       1,
		ct:        map[ctKey]*ctEntry{},
		frags:     map[fragKey][2]uint16{},
		services:  map[Frontend]svcEntry{},
		affinity:  map[affKey]affEntry{},
	}
}

// SetPolicy replaces the policy and moves the revision on, as
// bpf.Datapath.ApplyPolicy does.
func (d *Datapath) SetPolicy(s *policy.Set) {
	d.Policy = s
	d.BumpRevision()
}

// BumpRevision moves the revision on (after ipcache or policy changes).
func (d *Datapath) BumpRevision() {
	d.Rev++
	if d.Rev == 0 {
		d.Rev = 1
	}
}

// Flows returns the number of conntrack entries.
func (d *Datapath) Flows() int { return len(d.ct) }

type ctKey struct {
	slot         uint32
	saddr, daddr [16]byte
	sport, dport uint16
	proto        uint8
	scope        Scope
}

const (
	ctSeenReply   = 1 << 0
	ctClosing     = 1 << 1
	ctReplyDenied = 1 << 2
	ctFinFwd      = 1 << 3
	ctFinRev      = 1 << 4
	ctHost        = 1 << 5
	ctHairpin     = 1 << 9 // a pod's flow to itself through a frontend: its peer is the pod
)

type ctEntry struct {
	rev, replyRev uint32
	subject, peer identity.ID
	flags         uint32
	nat           *natInfo // a Service flow's translation
}

type fragKey struct {
	saddr, daddr [16]byte
	id           uint32
	proto        uint8
}

const (
	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
	tcpACK = 0x10
)

// Verdict is what one program run did with a frame.
type Verdict struct {
	// Reason is the hook's own check.
	Reason Reason
	// To is the host veth of the local pod from_pod checked the frame for
	// on its way there, 0 when it did not.
	To int
	// Ingress is that pod's ingress check, made by from_pod.
	Ingress Reason
	// Src, Dst, SrcPort and DstPort are the packet's as it goes on, after
	// any Service translation (IPv4 as IPv4-mapped IPv6).
	Src, Dst         [16]byte
	SrcPort, DstPort uint16
	// Forward: from_pod handed the frame to the node's FIB for another
	// node's pod, to send it out itself (one hop off its TTL) when the
	// FIB names a next hop, to the stack when it does not.
	Forward bool
}

// Delivered reports whether from_pod handed the frame to a local pod itself,
// past the node's routing.
func (v Verdict) Delivered() bool { return v.To != 0 && !v.Ingress.Drop() }

// Process decides one frame at a hook. ifindex is the host veth the frame
// is on; ingressIfindex is the device the frame came in on before being
// forwarded, 0 when the local node sent it.
func (d *Datapath) Process(frame []byte, scope Scope, ifindex, ingressIfindex int) (out Verdict) {
	var p pkt
	res := d.parse(frame, &p)
	switch res {
	case parseNonIP:
		return Verdict{Reason: AllowNonIP}
	case parseMalformed:
		return Verdict{Reason: DropMalformed}
	}
	ep, ok := d.Endpoints[ifindex]
	if !ok {
		return Verdict{Reason: DropNoEndpoint}
	}
	if scope == Egress && !sourceOK(ep, &p, res == parseND) {
		return Verdict{Reason: DropSpoof}
	}
	if res == parseND {
		return Verdict{Reason: AllowND}
	}
	if res == parseFragUnknown {
		return Verdict{Reason: DropFrag}
	}
	v := Verdict{Reason: d.check(&p, scope, ep, scope == Ingress && ingressIfindex == 0, false, false)}
	defer func() { out.Src, out.Dst, out.SrcPort, out.DstPort = p.saddr, p.daddr, p.sport, p.dport }()
	if v.Reason.Drop() {
		return v
	}
	if scope == Ingress {
		d.pass(&p)
		return v
	}
	if (p.xlated == 1 && p.saddr == p.daddr) || d.hairpinFlow {
		return d.hairpin(&p, ep, ifindex, v)
	}
	// A packet for a local pod is checked against its ingress here and
	// handed to it, unless it is a reply to a flow that never left a
	// local pod (the node translated it: only the stack can undo that),
	// or routing would refuse its hop limit.
	to, ok := d.Local[netip.AddrFrom16(p.daddr).Unmap()]
	if !ok {
		d.pass(&p)
		v.Forward = p.ttl > 1 && d.remote(p.daddr)
		return v
	}
	if to == ifindex || p.ttl <= 1 {
		d.pass(&p)
		return v
	}
	dst, ok := d.Endpoints[to]
	if !ok {
		d.pass(&p)
		return v
	}
	in := d.check(&p, Ingress, dst, false, v.Reason == AllowReply, false)
	if in == toStack {
		d.pass(&p)
		return v
	}
	if !in.Drop() {
		d.pass(&p)
	}
	v.To, v.Ingress = to, in
	return v
}

// NetVerdict is what from_net did with a frame.
type NetVerdict struct {
	// To is the host veth of the local pod from_net checked the frame
	// for, 0 when it left the frame to the stack untouched.
	To int
	// Ingress is that pod's ingress check.
	Ingress Reason
}

// Delivered reports whether from_net handed the frame to the local pod.
func (v NetVerdict) Delivered() bool { return v.To != 0 && !v.Ingress.Drop() }

// ProcessNet decides one frame at from_net, on a device that carries
// routes to other nodes: a packet from another node's pod to a pod here
// is checked against that pod's ingress as its to_pod would and handed
// to it; anything else is left to the stack, unparsed or not. Only a bare
// SYN starts a flow there: another packet of no known flow may be a
// reply the node must translate back (a Service's), which only the stack
// can.
func (d *Datapath) ProcessNet(frame []byte) NetVerdict {
	var p pkt
	if d.parse(frame, &p) != parseOK || p.ttl <= 1 {
		return NetVerdict{}
	}
	to, ok := d.Local[netip.AddrFrom16(p.daddr).Unmap()]
	if !ok || !d.remote(p.saddr) {
		return NetVerdict{}
	}
	dst, ok := d.Endpoints[to]
	if !ok {
		return NetVerdict{}
	}
	bareSYN := p.proto == protoTCP && p.tcpFlags&(tcpSYN|tcpACK) == tcpSYN
	in := d.check(&p, Ingress, dst, false, !bareSYN, false)
	if in == toStack {
		return NetVerdict{}
	}
	v := NetVerdict{To: to, Ingress: in}
	if !v.Ingress.Drop() {
		d.pass(&p)
	}
	return v
}

// remote reports whether addr is in another node's pod range.
func (d *Datapath) remote(addr [16]byte) bool {
	a := netip.AddrFrom16(addr).Unmap()
	for _, r := range d.Remote {
		if r.Contains(a) {
			return true
		}
	}
	return false
}

// sourceOK is the spoof check: the pod's own address, or for neighbour
// discovery also its link-local address or :: (RFC 4862).
func sourceOK(ep Endpoint, p *pkt, nd bool) bool {
	if p.family == 4 {
		return ep.IPv4.IsValid() && p.saddr == netip.AddrFrom16(ep.IPv4.As16()).As16()
	}
	if ep.IPv6.IsValid() && p.saddr == ep.IPv6.As16() {
		return true
	}
	return nd && ((p.saddr[0] == 0xfe && p.saddr[1]&0xc0 == 0x80) || p.saddr == [16]byte{})
}

// pass is a packet going on: a first fragment's ports are remembered.
func (d *Datapath) pass(p *pkt) {
	if p.fragFirst {
		d.fragFirst(p)
	}
}

// toStack is check's answer when noNew forbids starting a flow.
const toStack Reason = 255

// ctStatus is what conntrack knows of a packet at one hook (enum
// ct_status in the datapath).
type ctStatus uint8

const (
	ctNew         ctStatus = iota // no flow: policy decides it as a new one
	ctEstablished                 // a packet of a flow this hook admitted
	ctReply                       // the reverse of a flow the endpoint's other hook admitted
	ctRelated                     // an ICMP error quoting a flow of either hook
	ctNoBackend                   // a new flow to a frontend without backends
)

// flow is a packet's flow at one hook, as check's steps pass it on.
type flow struct {
	key ctKey    // the entry's key: found, or to insert for a new flow
	ct  *ctEntry // the entry; nil for a new flow
	// hostFlow: the node opened the flow to its pod (ctHost), so only
	// deny rules hold for it, and its peer is the node.
	hostFlow  bool
	peer      identity.ID
	peerKnown bool
}

func found(k ctKey, ct *ctEntry) flow {
	f := flow{key: k, ct: ct, hostFlow: ct.flags&ctHost != 0}
	if f.hostFlow {
		f.peer, f.peerKnown = identity.Host, true
	}
	if ct.flags&ctHairpin != 0 {
		f.peer, f.peerKnown = ct.peer, true
	}
	return f
}

// check is the datapath's check() for one hook of the endpoint ep, in its
// steps: conntrack says what the packet is to its flow, a Service's
// address is translated, policy decides, and the verdict says what
// conntrack keeps.
func (d *Datapath) check(p *pkt, scope Scope, ep Endpoint, fromHost, noNew, hairpin bool) Reason {
	var x svcPick
	d.hairpinFlow = false
	st, f := d.ctLookup(p, scope, ep.Slot)
	if hairpin && !f.peerKnown {
		f.peer, f.peerKnown = ep.Identity, true
	}
	st = d.translate(p, scope, st, &f, &x)
	reason := d.policyCheck(p, scope, ep.Identity, fromHost, noNew, st, &f)
	switch reason {
	case DropRevoked:
		delete(d.ct, f.key)
	case AllowEstablished, AllowReply:
		f.ct.touch(p, reason == AllowReply)
		d.hairpinFlow = f.ct.flags&ctHairpin != 0
		// An allowed reply of a translated flow comes from the frontend
		// the client sent to.
		if reason == AllowReply && f.ct.nat != nil && !f.ct.nat.orig {
			p.rewriteSrc(f.ct.nat.addr, f.ct.nat.port)
		}
	case AllowRelated:
		// An ICMP error about a translated flow, on its way to the
		// client, names the frontend where it named the backend.
		if scope == Ingress && f.key.scope == Egress && f.ct.nat != nil && !f.ct.nat.orig && hasPorts(p.innerProto) {
			if p.saddr == p.innerDaddr {
				p.saddr = f.ct.nat.addr
			}
			p.innerDaddr, p.innerDport = f.ct.nat.addr, f.ct.nat.port
		}
	case AllowRule, AllowOpen, AllowHost:
		nct := &ctEntry{rev: d.Rev, subject: ep.Identity, peer: d.peer(p, scope, fromHost, &f)}
		if reason == AllowHost {
			nct.flags = ctHost
		}
		if hairpin {
			nct.flags |= ctHairpin
		}
		if p.xlated == 1 && !hairpin {
			nct.nat = &natInfo{addr: p.origAddr, port: p.origPort}
		}
		nct.touch(p, false)
		d.ct[f.key] = nct
		if x.picked {
			d.remember(p, ep.Slot, nct, &x)
		}
	}
	return reason
}

// ctLookup classifies a packet at one hook. An ICMP error about a flow
// this endpoint's hooks admitted is related to it while the flow is of
// the current policy revision (or the node's); a bare SYN is never a
// reply, and it reopens a closing flow's tuple.
func (d *Datapath) ctLookup(p *pkt, scope Scope, slot uint32) (ctStatus, flow) {
	bareSYN := p.proto == protoTCP && p.tcpFlags&(tcpSYN|tcpACK) == tcpSYN
	if p.related {
		k := ctKey{slot, p.innerSaddr, p.innerDaddr, p.innerSport, p.innerDport, p.innerProto, scope ^ 1}
		ct := d.ct[k]
		if ct == nil {
			k = ctKey{slot, p.innerDaddr, p.innerSaddr, p.innerDport, p.innerSport, p.innerProto, scope}
			ct = d.ct[k]
		}
		if ct != nil && (ct.rev == d.Rev || ct.flags&ctHost != 0) {
			return ctRelated, found(k, ct)
		}
	}
	k := ctKey{slot, p.saddr, p.daddr, p.sport, p.dport, p.proto, scope}
	if ct := d.ct[k]; ct != nil && !(ct.flags&ctClosing != 0 && bareSYN) {
		return ctEstablished, found(k, ct)
	}
	rk := ctKey{slot, p.daddr, p.saddr, p.dport, p.sport, p.proto, scope ^ 1}
	if ct := d.ct[rk]; ct != nil && !bareSYN {
		return ctReply, found(rk, ct)
	}
	return ctNew, flow{key: k}
}

// peer is the identity at the flow's other end.
func (d *Datapath) peer(p *pkt, scope Scope, fromHost bool, f *flow) identity.ID {
	if !f.peerKnown {
		f.peerKnown = true
		switch {
		case scope == Egress:
			f.peer = d.lookup(p.daddr)
		case fromHost:
			f.peer = identity.Host
		default:
			f.peer = d.lookup(p.saddr)
		}
	}
	return f.peer
}

// policyCheck decides the packet by its status under the current
// revision. A flow of an older revision is checked again as new (a drop
// revokes it); the node's flows need no rule, but deny rules hold for
// them, on every revision and for their replies.
func (d *Datapath) policyCheck(p *pkt, scope Scope, subject identity.ID, fromHost, noNew bool, st ctStatus, f *flow) Reason {
	dir, rdir := policy.Egress, policy.Ingress
	if scope == Ingress {
		dir, rdir = policy.Ingress, policy.Egress
	}
	peer := func() identity.ID { return d.peer(p, scope, fromHost, f) }
	ct := f.ct
	switch st {
	case ctNoBackend:
		return DropNoBackend
	case ctRelated:
		if d.decide(subject, dir, peer(), p.proto, 0, true) == DropDeny {
			return DropDeny
		}
		return AllowRelated
	case ctEstablished:
		if ct.rev != d.Rev {
			if r := d.decide(subject, dir, peer(), p.proto, p.dport, f.hostFlow); r.Drop() {
				return DropRevoked
			}
			ct.rev = d.Rev
		}
		return AllowEstablished
	case ctReply:
		if ct.rev != d.Rev {
			if r := d.decide(subject, rdir, peer(), p.proto, p.sport, f.hostFlow); r.Drop() {
				return DropRevoked
			}
			ct.rev = d.Rev
		}
		if ct.replyRev != d.Rev || ct.replyRev == 0 {
			if d.decide(subject, dir, peer(), p.proto, p.dport, true) == DropDeny {
				ct.flags |= ctReplyDenied
			} else {
				ct.flags &^= ctReplyDenied
			}
			ct.replyRev = d.Rev
		}
		if ct.flags&ctReplyDenied != 0 {
			return DropDeny
		}
		return AllowReply
	}
	if noNew {
		return toStack
	}
	if scope == Ingress && fromHost {
		if d.decide(subject, dir, peer(), p.proto, p.dport, true) == DropDeny {
			return DropDeny
		}
		return AllowHost
	}
	reason := d.decide(subject, dir, peer(), p.proto, p.dport, false)
	if reason == DropNoRule && p.midFlow() {
		reason = DropUnknownFlow
	}
	return reason
}

// midFlow: a packet only a flow under way sends (any TCP segment but a
// bare SYN, an echo reply).
func (p *pkt) midFlow() bool {
	if p.proto == protoTCP {
		return p.tcpFlags&(tcpSYN|tcpACK) != tcpSYN
	}
	return p.echoReply
}

// decide is the datapath's decide(): one side of a packet by the rules.
// denyOnly asks only whether a deny rule matches (for replies).
func (d *Datapath) decide(subject identity.ID, dir policy.Direction, peer identity.ID, proto uint8, dport uint16, denyOnly bool) Reason {
	dec := d.Policy.Decide(subject, dir, peer, policy.Proto(proto), dport)
	if denyOnly {
		if dec.Reason == policy.ReasonDenyRule {
			return DropDeny
		}
		return AllowOpen
	}
	switch dec.Reason {
	case policy.ReasonDenyRule:
		return DropDeny
	case policy.ReasonNotIsolated:
		return AllowOpen
	case policy.ReasonAllowRule:
		return AllowRule
	}
	return DropNoRule
}

func (ct *ctEntry) touch(p *pkt, reply bool) {
	if reply {
		ct.flags |= ctSeenReply
	}
	if p.proto != 6 {
		return
	}
	if p.tcpFlags&tcpFIN != 0 {
		if reply {
			ct.flags |= ctFinRev
		} else {
			ct.flags |= ctFinFwd
		}
	}
	if p.tcpFlags&tcpRST != 0 || ct.flags&(ctFinFwd|ctFinRev) == ctFinFwd|ctFinRev {
		ct.flags |= ctClosing
	}
}

// lookup is the ipcache: longest matching prefix, world when none.
func (d *Datapath) lookup(addr [16]byte) identity.ID {
	a := netip.AddrFrom16(addr)
	best, id := -1, identity.World
	for p, pid := range d.IPCache {
		p16 := p
		if p.Addr().Is4() {
			p16 = netip.PrefixFrom(netip.AddrFrom16(p.Addr().As16()), p.Bits()+96)
		}
		if p16.Contains(a) && p16.Bits() > best {
			best, id = p16.Bits(), pid
		}
	}
	return id
}
