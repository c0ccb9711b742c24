package bpf

import (
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/internal/pkttest"
	"github.com/idcni/idcni/policy"
)

// TCP state moves the deadline of a flow: a SYN alone is kept a minute, an
// answered connection hours, a reset one seconds.
func TestConntrackTCPTimeouts(t *testing.T) {
	s := newSeed(t)
	s.policy(manual(policy.ManualRule{Action: policy.Allow, Src: idA, Dst: idB, Proto: policy.ProtoTCP}))
	syn := pkttest.Packet{Src: ipA, Dst: ipB, Proto: pkttest.TCP, SrcPort: 41000, DstPort: 443, TCPFlags: pkttest.SYN}
	expires := func() time.Duration {
		t.Helper()
		flows, err := s.d.Conntrack()
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range flows {
			if f.Scope == ScopeEgress && f.SrcPort == 41000 {
				return f.Expires
			}
		}
		t.Fatal("flow not in conntrack")
		return 0
	}
	within := func(what string, got, lo, hi time.Duration) {
		t.Helper()
		if got < lo || got > hi {
			t.Fatalf("%s: expires in %s, want %s..%s", what, got, lo, hi)
		}
	}
	s.send(syn.Frame(), ScopeEgress, s.a, 0)
	within("SYN", expires(), 50*time.Second, 61*time.Second)

	synack := syn.Reverse()
	synack.TCPFlags = pkttest.SYN | pkttest.ACK
	s.send(synack.Frame(), ScopeIngress, s.a, s.b) // the reply enters A
	ack := syn
	ack.TCPFlags = pkttest.ACK
	s.send(ack.Frame(), ScopeEgress, s.a, 0)
	within("established", expires(), 5*time.Hour, 6*time.Hour+time.Second)

	rst := syn
	rst.TCPFlags = pkttest.RST
	s.send(rst.Frame(), ScopeEgress, s.a, 0)
	within("reset", expires(), 5*time.Second, 11*time.Second)
}

// A full conntrack table evicts the least recently used flows instead of
// refusing new ones, and nothing fails to insert; the evictions are
// counted against the endpoint whose table it is. The shared table (slot
// 0) behaves the same.
func TestConntrackFullTableEvicts(t *testing.T) {
	const idC identity.ID = 1003
	ipC := netip.MustParseAddr("10.13.0.4")
	p := newPair(t, 3, Options{ConntrackEntries: 256})
	a := p.endpointTable(0, Endpoint{Identity: idA, IPv4: ipA}, 256)
	p.endpoint(1, Endpoint{Identity: idB, IPv4: ipB})
	shared := p.sharedEndpoint(2, Endpoint{Identity: idC, IPv4: ipC})
	p.policy(manual(
		policy.ManualRule{Action: policy.Allow, Src: idA, Dst: idB},
		policy.ManualRule{Action: policy.Allow, Src: idC, Dst: idB},
	))
	for _, src := range []struct {
		ifindex int
		addr    netip.Addr
	}{{a, ipA}, {shared, ipC}} {
		for i := 0; i < 2000; i++ {
			pkt := pkttest.Packet{Src: src.addr, Dst: ipB, Proto: pkttest.UDP, SrcPort: uint16(10000 + i), DstPort: 53}
			// Not through the reference: it has no size limit, and evicted
			// flows are new again to the kernel only.
			r, err := p.run(pkt.Frame(), ScopeEgress, src.ifindex, 0)
			if err != nil || r != ReasonAllowRule {
				t.Fatalf("%s flow %d: %s %v", src.addr, i, r, err)
			}
		}
		// The most recent flow survived.
		last := pkttest.Packet{Src: src.addr, Dst: ipB, Proto: pkttest.UDP, SrcPort: 10000 + 1999, DstPort: 53}
		if r, _ := p.run(last.Frame(), ScopeEgress, src.ifindex, 0); r != ReasonAllowEstablished {
			t.Fatalf("%s: latest flow after eviction: %s", src.addr, r)
		}
	}
	flows, err := p.d.Conntrack()
	if err != nil {
		t.Fatal(err)
	}
	perSlot := map[uint32]int{}
	for _, f := range flows {
		perSlot[f.Slot]++
	}
	for slot, n := range perSlot {
		if n > 256 {
			t.Fatalf("%d flows in the 256-entry table of slot %d", n, slot)
		}
	}
	stats, err := p.d.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if stats[StatCTInsertFail] != 0 {
		t.Fatalf("%d failed inserts: the LRU should have evicted", stats[StatCTInsertFail])
	}
	usage, err := p.d.ConntrackUsage()
	if err != nil {
		t.Fatal(err)
	}
	epA, _, _ := p.d.Endpoint(a)
	for _, u := range usage {
		if u.Slot != 0 && u.Slot != epA.ConntrackSlot {
			continue
		}
		// 2000 new flows into 256 entries, one CPU at a time: 1744
		// pushed older ones out, all of the flows the pod opened.
		if u.Capacity != 256 || u.Opened != (TableUsage{Entries: 256, Created: 2000, Evicted: 1744}) || u.Admitted != (TableUsage{}) {
			t.Errorf("slot %d: %+v, want capacity 256, 2000 opened, 256 kept, 1744 evicted, none admitted", u.Slot, u)
		}
	}
}

// One pod's flood of new flows evicts only its own flows: an isolated
// pod's idle connection, whose server's push passes only as a reply,
// survives another pod's flood, and a flood into it, in tables of its own
// (one for the flows it opened, one for those it admitted). When the
// pod's own flows push the connection out, the push is dropped as
// unknown-flow, not as a policy drop.
func TestConntrackFloodEvictsOnlyItsSender(t *testing.T) {
	const idF identity.ID = 1003
	ipF := netip.MustParseAddr("10.13.0.4")
	p := newPair(t, 3, Options{})
	victim := p.endpointTable(0, Endpoint{Identity: idA, IPv4: ipA}, 64)
	server := p.endpoint(1, Endpoint{Identity: idB, IPv4: ipB})
	flooder := p.endpointTable(2, Endpoint{Identity: idF, IPv4: ipF}, 256)
	p.policy(manual(
		policy.ManualRule{Action: policy.Allow, Src: idA, Dst: idB, Proto: policy.ProtoTCP},
		policy.ManualRule{Action: policy.Allow, Src: idF, Dst: identity.World},
		policy.ManualRule{Action: policy.Allow, Src: idF, Dst: idA, Proto: policy.ProtoUDP},
	))
	syn := pkttest.Packet{Src: ipA, Dst: ipB, Proto: pkttest.TCP, SrcPort: 40000, DstPort: 80, TCPFlags: pkttest.SYN}
	if r := p.send(syn.Frame(), ScopeEgress, victim, 0); r != ReasonAllowRule {
		t.Fatalf("victim's SYN: %s", r)
	}
	push := syn.Reverse()
	push.TCPFlags = pkttest.ACK | pkttest.PSH
	if r := p.send(push.Frame(), ScopeIngress, victim, server); r != ReasonAllowReply {
		t.Fatalf("server's answer: %s", r)
	}
	// flood sends n two-packet flows (as in the attack: the kernel's LRU
	// spares an entry used since it last looked) through a hook, not
	// through the reference, which has no size limit.
	flood := func(what string, n int, pkt func(i int) pkttest.Packet, scope Scope, ifindex, from int, first Reason) {
		t.Helper()
		for i := 0; i < n; i++ {
			f := pkt(i).Frame()
			for k, want := range []Reason{first, ReasonAllowEstablished} {
				if r, err := p.run(f, scope, ifindex, from); err != nil || r != want {
					t.Fatalf("%s, flow %d, packet %d: %s %v, want %s", what, i, k, r, err, want)
				}
			}
		}
	}
	flood("flood to the world", 5000, func(i int) pkttest.Packet {
		return pkttest.Packet{Src: ipF, Dst: netip.MustParseAddr("192.0.2.1"), Proto: pkttest.UDP, SrcPort: uint16(1024 + i), DstPort: 53}
	}, ScopeEgress, flooder, 0, ReasonAllowRule)
	if r := p.send(push.Frame(), ScopeIngress, victim, server); r != ReasonAllowReply {
		t.Fatalf("server's push after another pod's flood: %s, want reply", r)
	}
	flood("flood into the victim", 2000, func(i int) pkttest.Packet {
		return pkttest.Packet{Src: ipF, Dst: ipA, Proto: pkttest.UDP, SrcPort: uint16(1024 + i), DstPort: 53}
	}, ScopeIngress, victim, flooder, ReasonAllowRule)
	if r := p.send(push.Frame(), ScopeIngress, victim, server); r != ReasonAllowReply {
		t.Fatalf("server's push after a flood into the victim: %s, want reply", r)
	}
	// The victim's own churn is another matter: flows of its own push
	// the connection out of its 64 entries, and the push is dropped as a
	// flow the table lost.
	flood("the victim's own flows", 2000, func(i int) pkttest.Packet {
		f := syn
		f.SrcPort = uint16(50000 + i)
		return f
	}, ScopeEgress, victim, 0, ReasonAllowRule)
	if r, err := p.run(push.Frame(), ScopeIngress, victim, server); err != nil || r != ReasonDropUnknownFlow {
		t.Fatalf("push after the victim's own table evicted its flow: %s %v, want unknown-flow", r, err)
	}
	usage, err := p.d.ConntrackUsage()
	if err != nil {
		t.Fatal(err)
	}
	slots := map[uint32]ConntrackUsage{}
	for _, u := range usage {
		slots[u.Slot] = u
	}
	vep, _, _ := p.d.Endpoint(victim)
	fep, _, _ := p.d.Endpoint(flooder)
	v, f := slots[vep.ConntrackSlot], slots[fep.ConntrackSlot]
	full := func(u TableUsage, capacity uint32) bool { return u.Entries == capacity && u.Evicted > 0 }
	if !full(v.Opened, 64) || !full(v.Admitted, 64) || !full(f.Opened, 256) || f.Admitted != (TableUsage{}) {
		t.Errorf("victim %+v, flooder %+v: want both victim tables full and evicting, the flooder's opened one too", v, f)
	}
}

// A connection that reuses a closed one's tuple (a client reconnecting
// from the same port soon after, which a fast client does within
// seconds) is a new flow, decided again and kept as one: the table holds
// one entry for the tuple, the new connection's (its subject, not closing,
// an open connection's deadline), and counts no flow more than it holds. The same holds through a Service
// frontend, whose flow has two entries: the pod's tuple and the
// translated one.
func TestConntrackReusedTupleIsOneFlow(t *testing.T) {
	p := newPair(t, 2, Options{})
	a := p.endpointTable(0, Endpoint{Identity: idA, IPv4: ipA}, 64)
	b := p.endpoint(1, Endpoint{Identity: idB, IPv4: ipB})
	fe := ServiceFrontend{Addr: vip, Port: 80, Proto: unix.IPPROTO_TCP}
	p.service(fe, Service{Backends: []ServiceBackend{{Addr: ipB, Port: 8080}}})
	p.policy(manual(policy.ManualRule{Action: policy.Allow, Src: idA, Dst: idB, Proto: policy.ProtoTCP}))
	epA, _, err := p.d.Endpoint(a)
	if err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name    string
		sport   uint16
		dst     netip.Addr
		dport   uint16
		entries uint32 // per connection, in A's table of the flows it opened
	}{
		{"to the pod", 42000, ipB, 8080, 1},
		{"through a frontend", 42001, vip, 80, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			syn := pkttest.Packet{Src: ipA, Dst: tc.dst, Proto: pkttest.TCP, SrcPort: tc.sport, DstPort: tc.dport, TCPFlags: pkttest.SYN}
			connect := func(what string) {
				t.Helper()
				if r := p.send(syn.Frame(), ScopeEgress, a, 0); r != ReasonAllowRule {
					t.Fatalf("%s: SYN %s, want rule", what, r)
				}
				synack := pkttest.Packet{Src: ipB, Dst: ipA, Proto: pkttest.TCP, SrcPort: 8080, DstPort: tc.sport, TCPFlags: pkttest.SYN | pkttest.ACK}
				if r := p.send(synack.Frame(), ScopeIngress, a, b); r != ReasonAllowReply {
					t.Fatalf("%s: SYN-ACK %s, want reply", what, r)
				}
				ack := syn
				ack.TCPFlags = pkttest.ACK
				if r := p.send(ack.Frame(), ScopeEgress, a, 0); r != ReasonAllowEstablished {
					t.Fatalf("%s: ACK %s, want established", what, r)
				}
			}
			opened := func() TableUsage {
				t.Helper()
				usage, err := p.d.ConntrackUsage()
				if err != nil {
					t.Fatal(err)
				}
				for _, u := range usage {
					if u.Slot == epA.ConntrackSlot {
						return u.Opened
					}
				}
				t.Fatalf("no usage for slot %d", epA.ConntrackSlot)
				return TableUsage{}
			}

			before := opened()
			connect("first connection")
			rst := syn
			rst.TCPFlags = pkttest.RST
			if r := p.send(rst.Frame(), ScopeEgress, a, 0); r != ReasonAllowEstablished {
				t.Fatalf("RST: %s, want established", r)
			}
			// The pod is relabelled in between: the new connection's entry
			// is its own, not the last one's with new flags.
			relabelled := identity.ID(1100 + tc.sport - 42000)
			p.endpointTable(0, Endpoint{Identity: relabelled, IPv4: ipA}, 64)
			p.policy(manual(policy.ManualRule{Action: policy.Allow, Src: relabelled, Dst: idB, Proto: policy.ProtoTCP}))
			connect("same port again")

			want := TableUsage{Entries: before.Entries + tc.entries, Created: before.Created + uint64(tc.entries)}
			if got := opened(); got != want {
				t.Errorf("usage after two connections on one tuple: %+v, want %+v", got, want)
			}
			flows, err := p.d.Conntrack()
			if err != nil {
				t.Fatal(err)
			}
			var n uint32
			for _, f := range flows {
				if f.Slot != epA.ConntrackSlot || f.SrcPort != tc.sport || f.Scope != ScopeEgress {
					continue
				}
				n++
				if f.Subject != relabelled || f.Peer != idB {
					t.Errorf("entry %s:%d: subject %d, peer %d; want the second connection's, %d and %d",
						f.Dst, f.DstPort, f.Subject, f.Peer, relabelled, idB)
				}
				if f.Closing || f.Expires < 5*time.Hour {
					t.Errorf("entry %s:%d after the second connection's ACK: closing %t, expires in %s; want an established flow's",
						f.Dst, f.DstPort, f.Closing, f.Expires)
				}
			}
			if n != tc.entries {
				t.Errorf("%d entries for the tuple, want %d", n, tc.entries)
			}
		})
	}
}
