// Package reference is the datapath written again in plain Go: it takes the
// same Ethernet frames the TC programs see and decides them by the same
// steps (parse, endpoint, anti-spoofing, fragments, conntrack, policy), with
// policy.Set.Decide as the rule book. The datapath tests and the fuzzer
// hold bpf/kernel/datapath.c to it, packet by packet.
//
// It checks policy from the rules themselves, not from the compiled map
// entries, so a mistake in policy.Compile shows as a disagreement too.
package reference

import (
	"net/netip"

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
	DropNoRule
	DropDeny
	DropSpoof
	DropMalformed
	DropNoEndpoint
	DropFrag
	DropRevoked
)

// Drop reports whether the reason drops the packet.
func (r Reason) Drop() bool { return r >= DropNoRule }

var reasonNames = [...]string{"non-ip", "ipv6-link-control", "established", "reply", "rule", "not-isolated", "from-host",
	"no-rule", "deny-rule", "spoofed-source", "malformed", "no-endpoint", "unknown-fragment", "revoked"}

func (r Reason) String() string {
	if int(r) < len(reasonNames) {
		return reasonNames[r]
	}
	return "unknown"
}

// Endpoint is a pod behind a host veth.
type Endpoint struct {
	Identity   identity.ID
	IPv4, IPv6 netip.Addr
}

// Datapath is the state the TC programs read and keep.
type Datapath struct {
	Endpoints map[int]Endpoint
	IPCache   map[netip.Prefix]identity.ID
	Policy    *policy.Set
	// Rev is the policy revision; conntrack entries remember theirs.
	Rev uint32

	ct    map[ctKey]*ctEntry
	frags map[fragKey][2]uint16
}

// New returns an empty datapath at revision 1, as the loader leaves it.
func New() *Datapath {
	return &Datapath{
		Endpoints: map[int]Endpoint{},
		IPCache:   map[netip.Prefix]identity.ID{},
		Policy:    &policy.Set{},
		Rev:       1,
		ct:        map[ctKey]*ctEntry{},
		frags:     map[fragKey][2]uint16{},
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
)

type ctEntry struct {
	rev, replyRev uint32
	subject, peer identity.ID
	flags         uint32
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

// Process decides one frame at a hook. ifindex is the host veth the frame
// is on; ingressIfindex is the device the frame came in on before being
// forwarded, 0 when the local node sent it.
func (d *Datapath) Process(frame []byte, scope Scope, ifindex, ingressIfindex int) Reason {
	var p pkt
	res := d.parse(frame, &p)
	switch res {
	case parseNonIP:
		return AllowNonIP
	case parseND:
		return AllowND
	case parseMalformed:
		return DropMalformed
	}
	ep, ok := d.Endpoints[ifindex]
	if !ok {
		return DropNoEndpoint
	}
	subject := ep.Identity
	peerOnce := false
	var peerID identity.ID
	peer := func() identity.ID {
		if !peerOnce {
			peerOnce = true
			switch {
			case scope == Egress:
				peerID = d.lookup(p.daddr)
			case ingressIfindex == 0:
				peerID = identity.Host
			default:
				peerID = d.lookup(p.saddr)
			}
		}
		return peerID
	}
	dir, rdir := policy.Egress, policy.Ingress
	if scope == Ingress {
		dir, rdir = policy.Ingress, policy.Egress
	}
	if scope == Egress {
		var ok bool
		if p.family == 4 {
			ok = ep.IPv4.IsValid() && p.saddr == netip.AddrFrom16(ep.IPv4.As16()).As16()
		} else {
			ok = ep.IPv6.IsValid() && p.saddr == ep.IPv6.As16()
		}
		if !ok {
			return DropSpoof
		}
	}
	if res == parseFragUnknown {
		return DropFrag
	}

	k := ctKey{p.saddr, p.daddr, p.sport, p.dport, p.proto, scope}
	if ct := d.ct[k]; ct != nil && !(ct.flags&ctClosing != 0 && p.tcpFlags&(tcpSYN|tcpACK) == tcpSYN) {
		if ct.rev != d.Rev && ct.flags&ctHost == 0 {
			if r := d.decide(subject, dir, peer(), p.proto, p.dport, false); r.Drop() {
				delete(d.ct, k)
				return DropRevoked
			}
			ct.rev = d.Rev
		}
		ct.touch(&p, false)
		return AllowEstablished
	}

	rk := ctKey{p.daddr, p.saddr, p.dport, p.sport, p.proto, scope ^ 1}
	bareSYN := p.proto == protoTCP && p.tcpFlags&(tcpSYN|tcpACK) == tcpSYN
	if ct := d.ct[rk]; ct != nil && !bareSYN {
		if ct.flags&ctHost == 0 {
			if ct.rev != d.Rev {
				if r := d.decide(subject, rdir, peer(), p.proto, p.sport, false); r.Drop() {
					delete(d.ct, rk)
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
		}
		ct.touch(&p, true)
		return AllowReply
	}

	var reason Reason
	nct := &ctEntry{}
	if scope == Ingress && peer() == identity.Host {
		reason = AllowHost
		nct.flags = ctHost
	} else {
		reason = d.decide(subject, dir, peer(), p.proto, p.dport, false)
	}
	if !reason.Drop() {
		nct.rev = d.Rev
		nct.subject = subject
		nct.peer = peer()
		nct.touch(&p, false)
		d.ct[k] = nct
	}
	return reason
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
