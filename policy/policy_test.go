package policy

import (
	"math/rand/v2"
	"testing"

	"github.com/idcni/idcni/identity"
)

func TestManualRuleExpand(t *testing.T) {
	m := ManualRule{Action: Allow, Src: 1001, Dst: 1002, Symmetric: true}
	got := m.Expand()
	want := []Rule{
		{Subject: 1001, Direction: Egress, Peer: 1002, Action: Allow, Origin: "manual"},
		{Subject: 1002, Direction: Ingress, Peer: 1001, Action: Allow, Origin: "manual"},
		{Subject: 1002, Direction: Egress, Peer: 1001, Action: Allow, Origin: "manual"},
		{Subject: 1001, Direction: Ingress, Peer: 1002, Action: Allow, Origin: "manual"},
	}
	if len(got) != len(want) {
		t.Fatalf("got %v", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("rule %d = %v, want %v", i, got[i], want[i])
		}
	}
	// World, host and remote-node carry no rules of their own.
	for _, src := range []identity.ID{identity.World, identity.Host, identity.RemoteNode} {
		if got := (ManualRule{Action: Allow, Src: src, Dst: 1002, Symmetric: true}).Expand(); len(got) != 2 || got[0].Subject != 1002 || got[1].Subject != 1002 {
			t.Fatalf("%s source: %v", src, got)
		}
	}
}

func TestParsePortRange(t *testing.T) {
	for in, want := range map[string]PortRange{"": AnyPort, "80": {80, 80}, "1-65535": {1, 65535}, "any": AnyPort} {
		got, err := ParsePortRange(in)
		if err != nil || got != want {
			t.Errorf("ParsePortRange(%q) = %v, %v", in, got, err)
		}
	}
	for _, bad := range []string{"0", "80-79", "65536", "x", "1-", "-5", "1-2-3"} {
		if _, err := ParsePortRange(bad); err == nil {
			t.Errorf("ParsePortRange(%q) accepted", bad)
		}
	}
	if err := (ManualRule{Action: Allow, Src: 1001, Dst: 1002, Proto: ProtoICMP, Ports: PortRange{80, 80}}).Validate(); err == nil {
		t.Error("icmp with a port accepted")
	}
}

func TestSeedSemantics(t *testing.T) {
	s := &Set{}
	if s.Allowed(1001, 1002, ProtoICMP, 0) {
		t.Fatal("manual identities must start isolated")
	}
	if !s.Allowed(70000, 70001, ProtoTCP, 80) {
		t.Fatal("label identities start open")
	}
	s.Rules = ManualRule{Action: Allow, Src: 1001, Dst: 1002, Symmetric: true}.Expand()
	if !s.Allowed(1001, 1002, ProtoICMP, 0) || !s.Allowed(1002, 1001, ProtoICMP, 0) {
		t.Fatal("symmetric allow")
	}
	s.Rules = append(s.Rules, ManualRule{Action: Deny, Src: 1002, Dst: 1001}.Expand()...)
	if s.Allowed(1002, 1001, ProtoICMP, 0) || !s.Allowed(1001, 1002, ProtoICMP, 0) {
		t.Fatal("deny wins only its way")
	}
	if d := s.Decide(1002, Egress, 1001, ProtoTCP, 1); d.Reason != ReasonDenyRule || d.Rule == nil || d.Rule.Action != Deny {
		t.Fatalf("deny decision %+v", d)
	}
}

func TestMergeRanges(t *testing.T) {
	got := mergeRanges([]PortRange{{80, 80}, {1, 10}, {11, 20}, {79, 81}, {100, 200}, {150, 160}})
	want := []PortRange{{1, 20}, {79, 81}, {100, 200}}
	if len(got) != len(want) {
		t.Fatalf("got %v", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
}

// The compiled map entries must decide every packet as the rules do.
func TestCompileAgreesWithRules(t *testing.T) {
	ids := []identity.ID{1001, 1002, 70000, 70001, 16777300, identity.Any, identity.World, identity.Host}
	protos := []Proto{ProtoAny, ProtoTCP, ProtoUDP, ProtoSCTP, ProtoICMP}
	ports := []PortRange{AnyPort, {53, 53}, {80, 80}, {1, 1024}, {443, 6000}, {6000, 65535}}
	rng := rand.New(rand.NewPCG(1, 2))
	for iter := 0; iter < 2000; iter++ {
		s := &Set{}
		if rng.IntN(2) == 0 {
			s.Isolation = map[identity.ID]Isolation{70000: {Ingress: rng.IntN(2) == 0, Egress: rng.IntN(2) == 0}}
		}
		for n := rng.IntN(12); n > 0; n-- {
			r := Rule{Subject: ids[rng.IntN(3)], Direction: Direction(1 + rng.IntN(2)), Peer: ids[rng.IntN(len(ids))],
				Proto: protos[rng.IntN(len(protos))], Action: Action(1 + rng.IntN(2))}
			if r.Proto.HasPorts() {
				r.Ports = ports[rng.IntN(len(ports))]
			}
			s.Rules = append(s.Rules, r)
		}
		ms, err := s.Compile()
		if err != nil {
			t.Fatal(err)
		}
		for q := 0; q < 200; q++ {
			subj, peer := ids[rng.IntN(3)], ids[rng.IntN(len(ids))]
			if peer == identity.Any {
				peer = identity.World
			}
			dir := Direction(1 + rng.IntN(2))
			proto := []Proto{ProtoTCP, ProtoUDP, ProtoSCTP, ProtoICMP, 47}[rng.IntN(5)]
			port := uint16([]int{0, 1, 53, 80, 443, 1024, 1025, 5999, 6000, 65535}[rng.IntN(10)])
			want := s.Decide(subj, dir, peer, proto, port)
			got, reason := ms.Decide(subj, dir, peer, proto, port)
			if got != want.Allowed || reason != want.Reason {
				t.Fatalf("set %+v: %s %s %s %s/%d: compiled %v (%s), rules %v (%s)", s, subj, dir, peer, proto, port, got, reason, want.Allowed, want.Reason)
			}
		}
	}
}

func TestCompileRefusesTooManyRanges(t *testing.T) {
	s := &Set{}
	for i := 0; i < MaxAllowRanges+1; i++ {
		p := uint16(1000 + 2*i)
		s.Rules = append(s.Rules, Rule{Subject: 1001, Direction: Ingress, Peer: 1002, Proto: ProtoTCP, Ports: PortRange{p, p}, Action: Allow})
	}
	if _, err := s.Compile(); err == nil {
		t.Fatal("compile accepted more port ranges than an entry holds")
	}
	s.Rules = s.Rules[:MaxAllowRanges]
	if _, err := s.Compile(); err != nil {
		t.Fatal(err)
	}
}

func TestDiffWritesBeforeDeletes(t *testing.T) {
	a, _ := (&Set{Rules: ManualRule{Action: Allow, Src: 1001, Dst: 1002}.Expand()}).Compile()
	b, _ := (&Set{Rules: ManualRule{Action: Allow, Src: 1001, Dst: 1003}.Expand()}).Compile()
	up, del := Diff(a, b)
	if len(up) != 2 || len(del) != 2 {
		t.Fatalf("diff: %d upserts, %d deletes", len(up), len(del))
	}
	up, del = Diff(a, a)
	if len(up) != 0 || len(del) != 0 {
		t.Fatal("diff of equal states is not empty")
	}
}
