package bpf

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/internal/pkttest"
	"github.com/idcni/idcni/policy"
)

var (
	vip  = netip.MustParseAddr("10.96.0.10")
	vip6 = netip.MustParseAddr("fd96::10")
)

// svcFlow is one family's addresses for the Service tests: pod A reaches
// pod B's port 8080 through frontend fe (port 80).
type svcFlow struct {
	name   string
	a, b   netip.Addr
	fe     ServiceFrontend
	proto  uint8
	policy policy.Proto
}

func svcFlows() []svcFlow {
	return []svcFlow{
		{"v4 tcp", ipA, ipB, ServiceFrontend{Addr: vip, Port: 80, Proto: unix.IPPROTO_TCP}, pkttest.TCP, policy.ProtoTCP},
		{"v6 tcp", ip6A, ip6B, ServiceFrontend{Addr: vip6, Port: 80, Proto: unix.IPPROTO_TCP}, pkttest.TCP, policy.ProtoTCP},
		{"v4 udp", ipA, ipB, ServiceFrontend{Addr: vip, Port: 53, Proto: unix.IPPROTO_UDP}, pkttest.UDP, policy.ProtoUDP},
		{"v6 udp", ip6A, ip6B, ServiceFrontend{Addr: vip6, Port: 53, Proto: unix.IPPROTO_UDP}, pkttest.UDP, policy.ProtoUDP},
	}
}

func (c svcFlow) pkt(flags uint8) pkttest.Packet {
	return pkttest.Packet{Src: c.a, Dst: c.fe.Addr, Proto: c.proto, SrcPort: 40000, DstPort: c.fe.Port, TCPFlags: flags, Payload: []byte("hello")}
}

// checkOut fails unless frame's tuple is want and its checksums are right.
func checkOut(t *testing.T, what string, frame []byte, want tuple) {
	t.Helper()
	got, ports := parseTuple(frame)
	if !ports || got != want {
		t.Fatalf("%s: packet goes %s, want %s:\n% x", what, got, want, frame)
	}
	if !pkttest.ChecksumsOK(frame) {
		t.Fatalf("%s: checksums wrong after the rewrite:\n% x", what, frame)
	}
}

func tupleOf(src netip.Addr, sport uint16, dst netip.Addr, dport uint16) tuple {
	return tuple{src: addr16(src), dst: addr16(dst), sport: sport, dport: dport}
}

// A pod's flow to a frontend goes to the backend and its replies come back
// from the frontend, routed (B's packets reach A's to_pod) and delivered
// directly (from_pod hands them to the other pod itself), IPv4 and IPv6,
// TCP and UDP, with checksums right throughout. Policy judges the backend:
// an egress rule for B's identity and port 8080 admits it.
func TestServiceTranslation(t *testing.T) {
	eachSvcPath(t, false, func(t *testing.T, s *seed, c svcFlow, direct bool) {
		s.policy(manual(policy.ManualRule{Action: policy.Allow, Src: idA, Dst: idB, Proto: c.policy, Ports: policy.PortRange{Lo: 8080, Hi: 8080}}))
		be := tupleOf(c.a, 40000, c.b, 8080)
		for i, flags := range []uint8{pkttest.SYN, pkttest.ACK} {
			if c.proto == pkttest.UDP && i > 0 {
				break
			}
			frame := pkttest.WithChecksums(c.pkt(flags).Frame())
			o := s.sendFull(frame, ScopeEgress, s.a, 0)
			want := []Reason{ReasonAllowRule, ReasonAllowEstablished}[i]
			if o.reason != want || o.delivered != direct {
				t.Fatalf("packet %d to the frontend: %s, want %s (delivered %t)", i, o, want, direct)
			}
			checkOut(t, "to the frontend", o.out, be)
			if !direct {
				if r := s.send(o.out, ScopeIngress, s.b, s.a); r.Drop() {
					t.Fatalf("at B's to_pod: %s", r)
				}
			}
		}
		reply := pkttest.Packet{Src: c.b, Dst: c.a, Proto: c.proto, SrcPort: 8080, DstPort: 40000, TCPFlags: pkttest.SYN | pkttest.ACK, Payload: []byte("world")}
		frame := pkttest.WithChecksums(reply.Frame())
		var out []byte
		if direct {
			o := s.sendFull(frame, ScopeEgress, s.b, 0)
			if o.ingress != ReasonAllowReply || !o.delivered {
				t.Fatalf("reply from B delivered to A: %s", o)
			}
			out = o.out
		} else {
			o := s.sendFull(frame, ScopeIngress, s.a, s.b)
			if o.reason != ReasonAllowReply {
				t.Fatalf("reply at A's to_pod: %s", o)
			}
			out = o.out
		}
		checkOut(t, "reply", out, tupleOf(c.fe.Addr, c.fe.Port, c.a, 40000))
	})
}

// eachSvcPath runs f for every Service flow (only TCP's with tcpOnly),
// routed and delivered directly (both pods local), each in a seed of its
// own with c's frontend and B behind it.
func eachSvcPath(t *testing.T, tcpOnly bool, f func(t *testing.T, s *seed, c svcFlow, direct bool)) {
	for _, direct := range []bool{false, true} {
		for _, c := range svcFlows() {
			if tcpOnly && c.proto != pkttest.TCP {
				continue
			}
			name := c.name + " routed"
			if direct {
				name = c.name + " direct"
			}
			t.Run(name, func(t *testing.T) {
				s := newSeed(t)
				if direct {
					s.local(s.a, ipA, ip6A)
					s.local(s.b, ipB, ip6B)
				}
				s.service(c.fe, Service{Backends: []ServiceBackend{{Addr: c.b, Port: 8080}}})
				f(t, s, c, direct)
			})
		}
	}
}

// Egress policy decides on the backend: a rule for another identity, or
// for the frontend's port, does not admit a flow to B through the
// frontend, and a denied flow leaves no trace in conntrack.
func TestServiceEgressPolicyJudgesTheBackend(t *testing.T) {
	for _, c := range svcFlows() {
		t.Run(c.name, func(t *testing.T) {
			s := newSeed(t)
			s.service(c.fe, Service{Backends: []ServiceBackend{{Addr: c.b, Port: 8080}}})
			for _, rule := range []policy.ManualRule{
				{Action: policy.Allow, Src: idA, Dst: identity.ID(4242), Proto: c.policy},
				{Action: policy.Allow, Src: idA, Dst: idB, Proto: c.policy, Ports: policy.PortRange{Lo: c.fe.Port, Hi: c.fe.Port}},
				{Action: policy.Allow, Src: idA, Dst: identity.World, Proto: c.policy},
			} {
				s.policy(manual(rule))
				o := s.sendFull(c.pkt(pkttest.SYN).Frame(), ScopeEgress, s.a, 0)
				if o.reason != ReasonDropNoRule {
					t.Fatalf("with only %+v: %s, want no-rule", rule, o)
				}
				flows, err := s.d.Conntrack()
				if err != nil {
					t.Fatal(err)
				}
				if len(flows) != 0 {
					t.Fatalf("a denied flow left %d conntrack entries: %+v", len(flows), flows)
				}
			}
			s.policy(manual(policy.ManualRule{Action: policy.Allow, Src: idA, Dst: idB, Proto: c.policy}))
			if o := s.sendFull(c.pkt(pkttest.SYN).Frame(), ScopeEgress, s.a, 0); o.reason != ReasonAllowRule {
				t.Fatalf("with a rule for B: %s", o)
			}
		})
	}
}

// A frontend without backends answers a new flow at once with ICMP (or
// ICMPv6) port unreachable from the frontend, quoting the pod's packet,
// sent back into the pod.
func TestServiceWithoutBackendsRejects(t *testing.T) {
	for _, c := range svcFlows() {
		t.Run(c.name, func(t *testing.T) {
			s := newSeed(t)
			s.service(c.fe, Service{})
			in := pkttest.WithChecksums(c.pkt(pkttest.SYN).Frame())
			o := s.sendFull(in, ScopeEgress, s.a, 0)
			if o.reason != ReasonDropNoBackend {
				t.Fatalf("got %s, want %s", o, ReasonDropNoBackend)
			}
			f := o.out
			if string(f[0:6]) != string(in[6:12]) || string(f[6:12]) != string(in[0:6]) {
				t.Fatalf("Ethernet addresses not swapped: % x", f[:12])
			}
			var typ, code byte
			var quote []byte
			var src, dst netip.Addr
			if c.a.Is4() {
				if binary.BigEndian.Uint16(f[12:14]) != 0x0800 || f[14+9] != pkttest.ICMP {
					t.Fatalf("not ICMP: % x", f)
				}
				src, dst = netip.AddrFrom4([4]byte(f[14+12:14+16])), netip.AddrFrom4([4]byte(f[14+16:14+20]))
				typ, code, quote = f[34], f[35], f[42:]
				if typ != 3 || code != 3 {
					t.Fatalf("ICMP type %d code %d, want 3/3", typ, code)
				}
				if quote, want := quote, in[14:14+20+l4Quote(c.proto)]; string(quote) != string(want) {
					t.Fatalf("quotes\n% x\nwant\n% x", quote, want)
				}
			} else {
				if binary.BigEndian.Uint16(f[12:14]) != 0x86dd || f[14+6] != pkttest.ICMPv6 {
					t.Fatalf("not ICMPv6: % x", f)
				}
				src, dst = netip.AddrFrom16([16]byte(f[14+8:14+24])), netip.AddrFrom16([16]byte(f[14+24:14+40]))
				typ, code, quote = f[54], f[55], f[62:]
				if typ != 1 || code != 4 {
					t.Fatalf("ICMPv6 type %d code %d, want 1/4", typ, code)
				}
				if want := in[14 : 14+40+l4Quote(c.proto)]; string(quote) != string(want) {
					t.Fatalf("quotes\n% x\nwant\n% x", quote, want)
				}
			}
			if src != c.fe.Addr || dst != c.a {
				t.Fatalf("answer goes %s -> %s, want %s -> %s", src, dst, c.fe.Addr, c.a)
			}
			if !pkttest.ChecksumsOK(f) {
				t.Fatalf("answer's checksums wrong:\n% x", f)
			}
			flows, err := s.d.Conntrack()
			if err != nil || len(flows) != 0 {
				t.Fatalf("a rejected flow left conntrack entries: %v %+v", err, flows)
			}
		})
	}
}

// l4Quote is how much of its L4 header a rejection quotes: up to and
// with the checksum.
func l4Quote(proto uint8) int {
	if proto == pkttest.TCP {
		return 20
	}
	return 8
}

// Later packets of a flow keep their backend; new flows spread; a client
// with affinity keeps its backend for new flows until the affinity times
// out or its backend leaves its slot.
func TestServiceBackendsAndAffinity(t *testing.T) {
	s := newSeed(t)
	backends := []ServiceBackend{{Addr: ipB, Port: 8080}, {Addr: ipB, Port: 8081}, {Addr: ipB, Port: 8082}}
	fe := ServiceFrontend{Addr: vip, Port: 80, Proto: unix.IPPROTO_TCP}
	s.service(fe, Service{Backends: backends})
	s.policy(manual(policy.ManualRule{Action: policy.Allow, Src: idA, Dst: idB, Proto: policy.ProtoTCP}))
	port := uint16(30000)
	// send opens a new flow and sends a few more packets of it; it
	// returns the backend port the flow went to.
	send := func() uint16 {
		t.Helper()
		port++
		pkt := pkttest.Packet{Src: ipA, Dst: vip, Proto: pkttest.TCP, SrcPort: port, DstPort: 80, TCPFlags: pkttest.SYN}
		o := s.sendFull(pkt.Frame(), ScopeEgress, s.a, 0)
		if o.reason != ReasonAllowRule {
			t.Fatalf("new flow: %s", o)
		}
		out, _ := parseTuple(o.out)
		for i := 0; i < 3; i++ {
			pkt.TCPFlags = pkttest.ACK
			o := s.sendFull(pkt.Frame(), ScopeEgress, s.a, 0)
			if o.reason != ReasonAllowEstablished {
				t.Fatalf("packet %d of the flow: %s", i+1, o)
			}
			if later, _ := parseTuple(o.out); later != out {
				t.Fatalf("packet %d of the flow went %s, its first %s", i+1, later, out)
			}
		}
		return out.dport
	}
	spread := func() map[uint16]int {
		t.Helper()
		seen := map[uint16]int{}
		for i := 0; i < 30; i++ {
			seen[send()]++
		}
		return seen
	}
	// 30 flows over 3 backends at random all miss one with probability
	// 3 * (2/3)^30, about 1.5e-5.
	if seen := spread(); len(seen) != 3 {
		t.Fatalf("30 new flows without affinity went to %v, want all 3 backends", seen)
	}
	s.service(fe, Service{Backends: backends, AffinityTimeout: 600})
	first := send()
	if seen := spread(); len(seen) != 1 || seen[first] != 30 {
		t.Fatalf("with affinity, 30 new flows went to %v, want all to %d", seen, first)
	}
	// An affinity timed out picks again (and holds again): age the
	// client's entry past the timeout before each new flow.
	seen := map[uint16]int{}
	for i := 0; i < 30; i++ {
		s.ageAffinity(601 * time.Second)
		seen[send()]++
	}
	if len(seen) != 3 {
		t.Fatalf("with the affinity timed out before each, 30 new flows went to %v, want all 3 backends", seen)
	}
	// The affinity's backend leaves: new flows go elsewhere at once.
	now := send()
	var rest []ServiceBackend
	for _, b := range backends {
		if b.Port != now {
			rest = append(rest, b)
		}
	}
	s.service(fe, Service{Backends: rest, AffinityTimeout: 600})
	next := send()
	if next == now {
		t.Fatalf("after its backend %d left, the client's new flow still went to it", now)
	}
	if seen := spread(); len(seen) != 1 || seen[next] != 30 {
		t.Fatalf("with affinity to %d, 30 new flows went to %v", next, seen)
	}
}

// ageAffinity moves every affinity entry's last use back by d, in the
// datapath and the reference.
func (p *pair) ageAffinity(d time.Duration) {
	p.t.Helper()
	var k datapathAffinityKey
	var v datapathAffinityValue
	var keys []datapathAffinityKey
	var vals []datapathAffinityValue
	it := p.d.objs.Affinity.Iterate()
	for it.Next(&k, &v) {
		v.LastUsed -= uint64(d)
		keys, vals = append(keys, k), append(vals, v)
	}
	if err := it.Err(); err != nil {
		p.t.Fatal(err)
	}
	for i := range keys {
		if err := p.d.objs.Affinity.Update(&keys[i], &vals[i], 0); err != nil {
			p.t.Fatal(err)
		}
	}
	p.ref.AgeAffinity(d)
}

// A pod reaching itself through its own Service is subject to its own
// egress and ingress rules, and its packets come back into it from the
// frontend's address: the pod's kernel drops a packet from its own address
// on its interface, and would keep its answer to its own address inside.
func TestServiceHairpin(t *testing.T) {
	for _, c := range svcFlows() {
		t.Run(c.name, func(t *testing.T) {
			s := newSeed(t)
			s.local(s.a, ipA, ip6A)
			s.service(c.fe, Service{Backends: []ServiceBackend{{Addr: c.a, Port: 8080}}})
			self := func(dir policy.Direction) policy.Rule {
				return policy.Rule{Subject: idA, Direction: dir, Peer: idA, Proto: c.policy, Action: policy.Allow}
			}
			s.policy(&policy.Set{Rules: []policy.Rule{self(policy.Egress)}})
			o := s.sendFull(c.pkt(pkttest.SYN).Frame(), ScopeEgress, s.a, 0)
			if o.reason != ReasonAllowRule || o.ingress != ReasonDropNoRule {
				t.Fatalf("hairpin without an ingress rule for itself: %s, want rule then no-rule", o)
			}
			// A flow of its own (the one above was admitted by its egress).
			fresh := c.pkt(pkttest.SYN)
			fresh.SrcPort = 40001
			s.policy(&policy.Set{Rules: []policy.Rule{self(policy.Ingress)}})
			if o := s.sendFull(fresh.Frame(), ScopeEgress, s.a, 0); o.reason != ReasonDropNoRule {
				t.Fatalf("hairpin without an egress rule for itself: %s, want no-rule", o)
			}
			s.policy(&policy.Set{Rules: []policy.Rule{self(policy.Ingress), self(policy.Egress)}})
			// The first flow again: its egress admitted it before.
			in := pkttest.WithChecksums(c.pkt(pkttest.SYN).Frame())
			o = s.sendFull(in, ScopeEgress, s.a, 0)
			if o.reason != ReasonAllowEstablished || o.ingress != ReasonAllowRule || !o.delivered {
				t.Fatalf("hairpin with both rules: %s, want established then rule, delivered", o)
			}
			checkOut(t, "hairpin", o.out, tupleOf(c.fe.Addr, 40000, c.a, 8080))
			if string(o.out[0:6]) != string(in[6:12]) || string(o.out[6:12]) != string(in[0:6]) {
				t.Fatalf("hairpin: Ethernet addresses not swapped: % x", o.out[:12])
			}
			reply := pkttest.Packet{Src: c.a, Dst: c.fe.Addr, Proto: c.proto, SrcPort: 8080, DstPort: 40000, TCPFlags: pkttest.SYN | pkttest.ACK}
			o = s.sendFull(pkttest.WithChecksums(reply.Frame()), ScopeEgress, s.a, 0)
			if o.reason != ReasonAllowReply || o.ingress != ReasonAllowReply || !o.delivered {
				t.Fatalf("hairpin reply: %s", o)
			}
			checkOut(t, "hairpin reply", o.out, tupleOf(c.fe.Addr, c.fe.Port, c.a, 40000))
			if c.proto == pkttest.TCP {
				o = s.sendFull(c.pkt(pkttest.ACK).Frame(), ScopeEgress, s.a, 0)
				if o.reason != ReasonAllowEstablished || o.ingress != ReasonAllowEstablished || !o.delivered {
					t.Fatalf("hairpin ack: %s", o)
				}
			}
		})
	}
}

// An ICMP error about a translated flow reaches the client naming the
// frontend: as the quoted packet's destination, and as its own source when
// the backend sent it, so the client's stack finds the socket it
// connected to the frontend. Checksums stay right, the quoted IPv4
// header's included.
func TestServiceRelatedICMPTranslated(t *testing.T) {
	for _, c := range svcFlows() {
		if c.proto != pkttest.UDP {
			continue
		}
		t.Run(c.name, func(t *testing.T) {
			s := newSeed(t)
			s.service(c.fe, Service{Backends: []ServiceBackend{{Addr: c.b, Port: 8053}}})
			s.policy(manual(policy.ManualRule{Action: policy.Allow, Src: idA, Dst: idB, Proto: c.policy}))
			o := s.sendFull(c.pkt(0).Frame(), ScopeEgress, s.a, 0)
			if o.reason != ReasonAllowRule {
				t.Fatalf("datagram to the frontend: %s", o)
			}
			quoted := o.out[14:]
			hlen, proto, typ := 20, uint8(pkttest.ICMP), uint8(3)
			if c.a.Is6() {
				hlen, proto, typ = 40, pkttest.ICMPv6, 1
			}
			quoted = quoted[:hlen+8]
			icmp := pkttest.Packet{Src: c.b, Dst: c.a, Proto: proto, L4: append([]byte{typ, 3, 0, 0, 0, 0, 0, 0}, quoted...)}
			in := pkttest.WithChecksums(icmp.Frame())
			o = s.sendFull(in, ScopeIngress, s.a, s.b)
			if o.reason != ReasonAllowRelated {
				t.Fatalf("port unreachable from the backend: %s, want related", o)
			}
			f := o.out
			var src netip.Addr
			var q []byte
			if c.a.Is4() {
				src, q = netip.AddrFrom4([4]byte(f[14+12:14+16])), f[14+20+8:]
			} else {
				src, q = netip.AddrFrom16([16]byte(f[14+8:14+24])), f[14+40+8:]
			}
			if src != c.fe.Addr {
				t.Fatalf("the error comes from %s, want the frontend %s", src, c.fe.Addr)
			}
			var qdst netip.Addr
			var qports []byte
			if c.a.Is4() {
				qdst, qports = netip.AddrFrom4([4]byte(q[16:20])), q[20:24]
				if ipv4Checksum(q[:20]) != 0 {
					t.Fatalf("quoted IPv4 header checksum wrong: % x", q[:20])
				}
			} else {
				qdst, qports = netip.AddrFrom16([16]byte(q[24:40])), q[40:44]
			}
			if qdst != c.fe.Addr || binary.BigEndian.Uint16(qports[2:]) != c.fe.Port || binary.BigEndian.Uint16(qports[:2]) != 40000 {
				t.Fatalf("the error quotes a packet to %s port %d, want %s", qdst, binary.BigEndian.Uint16(qports[2:]), netip.AddrPortFrom(c.fe.Addr, c.fe.Port))
			}
			if !pkttest.ChecksumsOK(f) {
				t.Fatalf("ICMP checksum wrong after the translation:\n% x", f)
			}
		})
	}
}

// FlushConntrack of a backend's address forgets the Service flows that go
// to it: their next packet picks a backend again.
func TestFlushConntrackForgetsFlowsToABackend(t *testing.T) {
	s := newSeed(t)
	fe := ServiceFrontend{Addr: vip, Port: 80, Proto: unix.IPPROTO_TCP}
	s.service(fe, Service{Backends: []ServiceBackend{{Addr: ipB, Port: 8080}}})
	s.policy(manual(policy.ManualRule{Action: policy.Allow, Src: idA, Dst: idB, Proto: policy.ProtoTCP}))
	syn := pkttest.Packet{Src: ipA, Dst: vip, Proto: pkttest.TCP, SrcPort: 40000, DstPort: 80, TCPFlags: pkttest.SYN}
	if r, err := s.run(syn.Frame(), ScopeEgress, s.a, 0); err != nil || r != ReasonAllowRule {
		t.Fatalf("SYN to the frontend: %s %v", r, err)
	}
	n, err := s.d.FlushConntrack(ipB)
	if err != nil {
		t.Fatal(err)
	}
	flows, err := s.d.Conntrack()
	if err != nil {
		t.Fatal(err)
	}
	if n != 2 || len(flows) != 0 {
		t.Fatalf("flushing the backend removed %d entries and left %+v; want both of the flow's gone", n, flows)
	}
}

// An established translated flow's packets take the pod's entry's answer
// while it holds (see translate in datapath.c), and still: a policy change
// that no longer allows the backend revokes the flow at its next packet,
// and the FINs of both sides close the entry the replies meet: the
// translated one when B's replies are routed to A, the pod's own when B's
// from_pod delivers them (it gives them the frontend's address first).
func TestServiceEstablishedFlowFollowsPolicyAndCloses(t *testing.T) {
	eachSvcPath(t, true, func(t *testing.T, s *seed, c svcFlow, direct bool) {
		allow := manual(policy.ManualRule{Action: policy.Allow, Src: idA, Dst: idB, Proto: c.policy, Ports: policy.PortRange{Lo: 8080, Hi: 8080}})
		s.policy(allow)
		sport := uint16(40000)
		fwd := func(flags uint8, want Reason) {
			t.Helper()
			pkt := c.pkt(flags)
			pkt.SrcPort = sport
			o := s.sendFull(pkttest.WithChecksums(pkt.Frame()), ScopeEgress, s.a, 0)
			if o.reason != want {
				t.Fatalf("A's packet (flags %#x) to the frontend: %s, want %s", flags, o, want)
			}
			if !want.Drop() {
				checkOut(t, "to the frontend", o.out, tupleOf(c.a, sport, c.b, 8080))
			}
		}
		back := func(flags uint8) {
			t.Helper()
			reply := pkttest.WithChecksums(pkttest.Packet{Src: c.b, Dst: c.a, Proto: c.proto, SrcPort: 8080, DstPort: sport, TCPFlags: flags}.Frame())
			var o outcome
			if direct {
				o = s.sendFull(reply, ScopeEgress, s.b, 0)
				if o.ingress != ReasonAllowReply || !o.delivered {
					t.Fatalf("B's reply (flags %#x) delivered to A: %s", flags, o)
				}
			} else if o = s.sendFull(reply, ScopeIngress, s.a, s.b); o.reason != ReasonAllowReply {
				t.Fatalf("B's reply (flags %#x) at A's to_pod: %s", flags, o)
			}
			checkOut(t, "reply", o.out, tupleOf(c.fe.Addr, c.fe.Port, c.a, sport))
		}
		// the entry B's replies meet at A
		replied := func() Flow {
			t.Helper()
			flows, err := s.d.Conntrack()
			if err != nil {
				t.Fatal(err)
			}
			dst, dport := c.b, uint16(8080)
			if direct {
				dst, dport = c.fe.Addr, c.fe.Port
			}
			for _, f := range flows {
				if f.Scope == ScopeEgress && f.Src == c.a && f.SrcPort == sport && f.Dst == dst && f.DstPort == dport {
					return f
				}
			}
			t.Fatalf("no entry for %s:%d -> %s:%d in %+v", c.a, sport, dst, dport, flows)
			return Flow{}
		}
		fwd(pkttest.SYN, ReasonAllowRule)
		back(pkttest.SYN | pkttest.ACK)
		for range 3 {
			fwd(pkttest.ACK, ReasonAllowEstablished)
		}
		s.policy(manual(policy.ManualRule{Action: policy.Allow, Src: idA, Dst: identity.ID(4242), Proto: c.policy}))
		fwd(pkttest.ACK, ReasonDropRevoked)

		// Another flow, allowed, to its end.
		s.policy(allow)
		sport++
		fwd(pkttest.SYN, ReasonAllowRule)
		back(pkttest.SYN | pkttest.ACK)
		fwd(pkttest.ACK, ReasonAllowEstablished)
		fwd(pkttest.FIN|pkttest.ACK, ReasonAllowEstablished)
		if f := replied(); f.Closing {
			t.Fatalf("entry closing after A's FIN alone: %+v", f)
		}
		back(pkttest.FIN | pkttest.ACK)
		if f := replied(); !f.Closing || f.Expires > 11*time.Second {
			t.Fatalf("entry after both FINs: %+v, want closing within 10s", f)
		}
	})
}
