package bpf

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/idcni/idcni/internal/pkttest"
	"github.com/idcni/idcni/policy"
)

// newLocalSeed is the walkthrough's two pods, both local pods that from_pod
// delivers to.
func newLocalSeed(t *testing.T) *seed {
	s := newSeed(t)
	s.local(s.a, ipA, ip6A)
	s.local(s.b, ipB, ip6B)
	return s
}

// A packet for a local pod is checked against both pods' rules in one run
// and handed over with the Ethernet header and hop count routing would
// give it.
func TestLocalDeliveryChecksBothSides(t *testing.T) {
	s := newLocalSeed(t)
	s.policy(manual(policy.ManualRule{Action: policy.Allow, Src: idA, Dst: idB, Proto: policy.ProtoTCP, Ports: policy.PortRange{Lo: 80, Hi: 80}}))

	for _, c := range []struct {
		name   string
		src    Reason
		dst    Reason
		pkt    pkttest.Packet
		fromIf int
	}{
		{"syn", ReasonAllowRule, ReasonAllowRule, pkttest.Packet{Src: ipA, Dst: ipB, Proto: pkttest.TCP, SrcPort: 40000, DstPort: 80, TCPFlags: pkttest.SYN}, s.a},
		{"syn-ack", ReasonAllowReply, ReasonAllowReply, pkttest.Packet{Src: ipB, Dst: ipA, Proto: pkttest.TCP, SrcPort: 80, DstPort: 40000, TCPFlags: pkttest.SYN | pkttest.ACK}, s.b},
		{"ack", ReasonAllowEstablished, ReasonAllowEstablished, pkttest.Packet{Src: ipA, Dst: ipB, Proto: pkttest.TCP, SrcPort: 40000, DstPort: 80, TCPFlags: pkttest.ACK}, s.a},
		{"v6 syn", ReasonAllowRule, ReasonAllowRule, pkttest.Packet{Src: ip6A, Dst: ip6B, Proto: pkttest.TCP, SrcPort: 40000, DstPort: 80, TCPFlags: pkttest.SYN, HopLimit: 9}, s.a},
	} {
		frame := c.pkt.Frame()
		o := s.sendFull(frame, ScopeEgress, c.fromIf, 0)
		if o.reason != c.src || o.ingress != c.dst || !o.delivered {
			t.Fatalf("%s: got %s, want %s then %s, delivered", c.name, o, c.src, c.dst)
		}
		to := s.b
		if c.fromIf == s.b {
			to = s.a
		}
		if !bytes.Equal(o.out[0:6], podMAC(to)) || !bytes.Equal(o.out[6:12], hostMAC(to)) {
			t.Fatalf("%s: delivered with Ethernet addresses %x -> %x, want %s -> %s", c.name, o.out[6:12], o.out[0:6], hostMAC(to), podMAC(to))
		}
		// The rest changes by the hop alone, checksum included.
		want := append([]byte{}, frame...)
		if c.pkt.Src.Is4() {
			want[14+8]--
			binary.BigEndian.PutUint16(want[14+10:], 0)
			binary.BigEndian.PutUint16(want[14+10:], ipv4Checksum(want[14:34]))
		} else {
			want[14+7]--
		}
		if !bytes.Equal(o.out[12:], want[12:]) {
			t.Fatalf("%s: delivered\n% x\nwant\n% x", c.name, o.out[12:], want[12:])
		}
	}
}

func ipv4Checksum(h []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(h); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(h[i:]))
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

// The local pod's ingress rules hold on the direct path as on the routed
// one: its drop drops the packet where it left.
func TestLocalDeliveryIngressDrop(t *testing.T) {
	s := newLocalSeed(t)
	// A may send to B, but B's ingress allows nothing.
	s.policy(&policy.Set{Rules: []policy.Rule{{Subject: idA, Direction: policy.Egress, Peer: idB, Action: policy.Allow}}})
	o := s.sendFull(pkttest.Packet{Src: ipA, Dst: ipB, Proto: pkttest.UDP, SrcPort: 5000, DstPort: 53}.Frame(), ScopeEgress, s.a, 0)
	if o.reason != ReasonAllowRule || o.ingress != ReasonDropNoRule || o.delivered {
		t.Fatalf("got %s, want allow-rule then no-rule, dropped", o)
	}
	// And a packet its own egress drops is never checked at the other end.
	o = s.sendFull(pkttest.Packet{Src: ipB, Dst: ipA, Proto: pkttest.UDP, SrcPort: 5000, DstPort: 53}.Frame(), ScopeEgress, s.b, 0)
	if o.reason != ReasonDropNoRule || o.ingress != noCheck {
		t.Fatalf("got %s, want no-rule at B's egress only", o)
	}
}

// A reply to a flow that never left a local pod was translated by the node
// (a Service's backend answering a client that dialled the Service
// address): only the stack can undo that, so from_pod leaves it to the
// stack. So it does a packet routing must refuse for its hop limit.
func TestLocalDeliveryLeavesTranslatedRepliesToTheStack(t *testing.T) {
	s := newLocalSeed(t)
	s.policy(manual(policy.ManualRule{Action: policy.Allow, Src: idA, Dst: idB, Symmetric: true}))
	// A dialled a Service address; the node translated it to B, and B's
	// to_pod saw A -> B arrive from A's veth.
	syn := pkttest.Packet{Src: ipA, Dst: ipB, Proto: pkttest.TCP, SrcPort: 41000, DstPort: 8080, TCPFlags: pkttest.SYN}
	if r := s.send(syn.Frame(), ScopeIngress, s.b, s.a); r != ReasonAllowRule {
		t.Fatalf("B's ingress: %s", r)
	}
	synAck := pkttest.Packet{Src: ipB, Dst: ipA, Proto: pkttest.TCP, SrcPort: 8080, DstPort: 41000, TCPFlags: pkttest.SYN | pkttest.ACK}
	o := s.sendFull(synAck.Frame(), ScopeEgress, s.b, 0)
	if o.reason != ReasonAllowReply || o.ingress != noCheck || o.delivered {
		t.Fatalf("reply of a translated flow: got %s, want a reply left to the stack", o)
	}
	// A new flow from B to A with TTL 1 is routed (and refused there).
	last := pkttest.Packet{Src: ipB, Dst: ipA, Proto: pkttest.UDP, SrcPort: 5000, DstPort: 53, HopLimit: 1}
	o = s.sendFull(last.Frame(), ScopeEgress, s.b, 0)
	if o.reason != ReasonAllowRule || o.ingress != noCheck || o.delivered {
		t.Fatalf("TTL 1: got %s, want it left to the stack", o)
	}
	// With TTL 2 the same packet goes straight to A.
	last.HopLimit, last.SrcPort = 2, 5001
	if o = s.sendFull(last.Frame(), ScopeEgress, s.b, 0); !o.delivered {
		t.Fatalf("TTL 2: got %s, want delivered", o)
	}
}
