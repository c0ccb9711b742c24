package bpf

import (
	"testing"
	"time"

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
// refusing new ones, and nothing fails to insert.
func TestConntrackFullTableEvicts(t *testing.T) {
	p := newPair(t, 2, Options{ConntrackEntries: 256})
	a := p.endpoint(0, Endpoint{Identity: idA, IPv4: ipA})
	p.endpoint(1, Endpoint{Identity: idB, IPv4: ipB})
	p.policy(manual(policy.ManualRule{Action: policy.Allow, Src: idA, Dst: idB}))
	for i := 0; i < 2000; i++ {
		pkt := pkttest.Packet{Src: ipA, Dst: ipB, Proto: pkttest.UDP, SrcPort: uint16(10000 + i), DstPort: 53}
		// Not through the reference: it has no size limit, and evicted
		// flows are new again to the kernel only.
		r, err := p.run(pkt.Frame(), ScopeEgress, a, 0)
		if err != nil || r != ReasonAllowRule {
			t.Fatalf("flow %d: %s %v", i, r, err)
		}
	}
	flows, err := p.d.Conntrack()
	if err != nil {
		t.Fatal(err)
	}
	if len(flows) > 256 {
		t.Fatalf("%d flows in a 256-entry table", len(flows))
	}
	stats, err := p.d.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if stats[StatCTInsertFail] != 0 {
		t.Fatalf("%d failed inserts: the LRU should have evicted", stats[StatCTInsertFail])
	}
	// The most recent flow survived.
	last := pkttest.Packet{Src: ipA, Dst: ipB, Proto: pkttest.UDP, SrcPort: 10000 + 1999, DstPort: 53}
	if r, _ := p.run(last.Frame(), ScopeEgress, a, 0); r != ReasonAllowEstablished {
		t.Fatalf("latest flow after eviction: %s", r)
	}
}
