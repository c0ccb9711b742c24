package bpf

import (
	"net/netip"
	"testing"

	"github.com/idcni/idcni/internal/pkttest"
	"github.com/idcni/idcni/policy"
)

// icmpError is an ICMP error from src to dst quoting the start of the
// packet orig (its IP header and 8 bytes of L4 header), as a router or the
// peer would send it.
func icmpError(src, dst netip.Addr, typ, code uint8, orig pkttest.Packet) pkttest.Packet {
	f := orig.Frame()
	hlen := 20
	if orig.Src.Is6() {
		hlen = 40
	}
	quote := f[14 : 14+hlen+8]
	p := pkttest.Packet{Src: src, Dst: dst, Proto: pkttest.ICMP}
	if src.Is6() {
		p.Proto = pkttest.ICMPv6
	}
	p.L4 = append([]byte{typ, code, 0, 0, 0, 0, 0x05, 0xdc}, quote...)
	return p
}

// ICMP errors about a flow a pod's hooks admitted reach it (path MTU
// discovery, a closed port), also from addresses no rule names; errors
// about anything else are ICMP packets like any other. Deny rules still
// win.
func TestICMPErrorsOfTrackedFlows(t *testing.T) {
	s := newSeed(t)
	router := netip.MustParseAddr("10.20.5.5")
	router6 := netip.MustParseAddr("fd20::1")
	s.ipcache(netip.PrefixFrom(router, 32), 70001)
	s.policy(manual(policy.ManualRule{Action: policy.Allow, Src: idA, Dst: idB}))
	syn := pkttest.Packet{Src: ipA, Dst: ipB, Proto: pkttest.TCP, SrcPort: 40000, DstPort: 80, TCPFlags: pkttest.SYN}
	wantReasons(t, "A -> B syn", s.send(syn.Frame(), ScopeEgress, s.a, 0), s.send(syn.Frame(), ScopeIngress, s.b, s.a), ReasonAllowRule, ReasonAllowRule)

	// A router on the way says the packet was too big: A must hear it.
	if r := s.send(icmpError(router, ipA, 3, 4, syn).Frame(), ScopeIngress, s.a, 999); r != ReasonAllowRelated {
		t.Errorf("fragmentation needed from a router to A about A's flow: %s, want related", r)
	}
	// B answers the SYN with an error about it: out of B, into A.
	portUnreach := icmpError(ipB, ipA, 3, 3, syn)
	if r1, r2 := s.send(portUnreach.Frame(), ScopeEgress, s.b, 0), s.send(portUnreach.Frame(), ScopeIngress, s.a, s.b); r1 != ReasonAllowRelated || r2 != ReasonAllowRelated {
		t.Errorf("B's error about A's flow: %s, %s; want related both ways", r1, r2)
	}
	// The same error about a flow nobody admitted is an ICMP packet from
	// the router, and A's ingress admits none.
	other := syn
	other.SrcPort = 40001
	if r := s.send(icmpError(router, ipA, 3, 4, other).Frame(), ScopeIngress, s.a, 999); r != ReasonDropNoRule {
		t.Errorf("error about an unknown flow: %s, want no-rule", r)
	}
	// A deny rule between the two holds for their errors too.
	s.policy(manual(policy.ManualRule{Action: policy.Allow, Src: idA, Dst: idB}, policy.ManualRule{Action: policy.Deny, Src: idB, Dst: idA, Proto: policy.ProtoICMP}))
	wantReasons(t, "A -> B syn under the new policy", s.send(syn.Frame(), ScopeEgress, s.a, 0), s.send(syn.Frame(), ScopeIngress, s.b, s.a), ReasonAllowEstablished, ReasonAllowEstablished)
	if r := s.send(portUnreach.Frame(), ScopeIngress, s.a, s.b); r != ReasonDropDeny {
		t.Errorf("B's error with B -> A icmp denied: %s, want deny-rule", r)
	}

	// IPv6: packet too big about a flow A opened.
	s.ipcache(netip.MustParsePrefix("fd20::/64"), 70002)
	syn6 := pkttest.Packet{Src: ip6A, Dst: ip6B, Proto: pkttest.TCP, SrcPort: 40002, DstPort: 80, TCPFlags: pkttest.SYN}
	if r := s.send(syn6.Frame(), ScopeEgress, s.a, 0); r != ReasonAllowRule {
		t.Fatalf("A -> B syn over IPv6: %s", r)
	}
	if r := s.send(icmpError(router6, ip6A, 2, 0, syn6).Frame(), ScopeIngress, s.a, 999); r != ReasonAllowRelated {
		t.Errorf("packet too big from a router to A: %s, want related", r)
	}
}

// Between local pods the error is checked for both and delivered.
func TestICMPErrorsDeliveredLocally(t *testing.T) {
	s := newLocalSeed(t)
	s.policy(manual(policy.ManualRule{Action: policy.Allow, Src: idA, Dst: idB}))
	udp := pkttest.Packet{Src: ipA, Dst: ipB, Proto: pkttest.UDP, SrcPort: 5353, DstPort: 9}
	if o := s.sendFull(udp.Frame(), ScopeEgress, s.a, 0); !o.delivered {
		t.Fatalf("A -> B udp: %s", o)
	}
	o := s.sendFull(icmpError(ipB, ipA, 3, 3, udp).Frame(), ScopeEgress, s.b, 0)
	if o.reason != ReasonAllowRelated || o.ingress != ReasonAllowRelated || !o.delivered {
		t.Errorf("B's port unreachable to A: %s, want related both sides and delivered", o)
	}
}
