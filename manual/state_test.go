package manual

import (
	"net/netip"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
	"github.com/idcni/idcni/store"
)

func TestParseIP(t *testing.T) {
	for in, want := range map[string]string{
		"10.13.0.2":          "10.13.0.2",
		"::ffff:10.13.0.2":   "10.13.0.2",
		"fd00:13::2":         "fd00:13::2",
		"10.13.0.300":        "bad IP address",
		"10.13.0.0/24":       "bad IP address",
		"":                   "bad IP address",
		"0.0.0.0":            "unicast",
		"224.0.0.1":          "unicast",
		"127.0.0.1":          "unicast",
		"255.255.255.255":    "unicast",
		"fe80::1%eth0":       "zones",
		"pod.example.com":    "bad IP address",
		" 10.13.0.2":         "bad IP address",
		"10.13.0.2\n":        "bad IP address",
		"1:2:3:4:5:6:7:8:9":  "bad IP address",
		"10.013.0.2":         "bad IP address", // leading zeros are ambiguous
		"2001:db8::10.0.0.1": "2001:db8::a00:1",
	} {
		got, err := ParseIP(in)
		if err != nil {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("ParseIP(%q) error = %v, want one containing %q", in, err, want)
			}
			continue
		}
		if got.String() != want {
			t.Errorf("ParseIP(%q) = %s, want %s", in, got, want)
		}
	}
}

func TestBindUnbind(t *testing.T) {
	var st State
	a, b := netip.MustParseAddr("10.13.0.3"), netip.MustParseAddr("10.13.0.2")
	if prev, err := st.Bind(a, 1001); err != nil || prev != 0 {
		t.Fatalf("Bind = %v, %v", prev, err)
	}
	if _, err := st.Bind(b, 1002); err != nil {
		t.Fatal(err)
	}
	if st.Bindings[0].IP != b || st.Bindings[1].IP != a {
		t.Errorf("bindings not sorted: %v", st.Bindings)
	}
	if prev, err := st.Bind(a, 1003); err != nil || prev != 1001 {
		t.Fatalf("rebind = %v, %v; want previous 1001", prev, err)
	}
	if got, ok := st.Binding(a); !ok || got.Identity != 1003 {
		t.Errorf("Binding(a) = %v, %v", got, ok)
	}
	for _, id := range []identity.ID{0, 5, 255, 65536, 16777216} {
		if _, err := st.Bind(a, id); err == nil || !strings.Contains(err.Error(), "manual range 256-65535") {
			t.Errorf("Bind(%d) error = %v, want the manual range error", id, err)
		}
	}
	if got, _ := st.Binding(a); got.Identity != 1003 {
		t.Errorf("a failed Bind changed the binding to %v", got)
	}
	if _, err := st.Unbind(netip.MustParseAddr("10.13.0.9")); err == nil || !strings.Contains(err.Error(), "no manual endpoint has IP 10.13.0.9") {
		t.Errorf("Unbind of an unbound address = %v", err)
	}
	if got, err := st.Unbind(a); err != nil || got.Identity != 1003 {
		t.Errorf("Unbind = %v, %v", got, err)
	}
	if len(st.Bindings) != 1 || st.Bindings[0].IP != b {
		t.Errorf("after Unbind: %v", st.Bindings)
	}
}

func rule(a policy.Action, src, dst identity.ID, sym bool, proto policy.Proto, lo, hi uint16) policy.ManualRule {
	return policy.ManualRule{Action: a, Src: src, Dst: dst, Symmetric: sym, Proto: proto, Ports: policy.PortRange{Lo: lo, Hi: hi}}
}

func TestRules(t *testing.T) {
	var st State
	sym := rule(policy.Allow, 1001, 1002, true, policy.ProtoAny, 0, 0)
	if added, err := st.AddRule(sym); !added || err != nil {
		t.Fatalf("AddRule = %v, %v", added, err)
	}
	// The same symmetric rule spelled the other way round is no new rule.
	if added, err := st.AddRule(rule(policy.Allow, 1002, 1001, true, policy.ProtoAny, 0, 0)); added || err != nil {
		t.Errorf("AddRule of the swapped symmetric rule = %v, %v; want not added", added, err)
	}
	oneWay := rule(policy.Allow, 1002, 1001, false, policy.ProtoAny, 0, 0)
	if added, _ := st.AddRule(oneWay); !added {
		t.Error("a one-way rule was taken for the symmetric one")
	}
	deny := rule(policy.Deny, 1002, 1001, false, policy.ProtoAny, 0, 0)
	if added, _ := st.AddRule(deny); !added {
		t.Error("deny with the same flags as an allow was not added")
	}
	for _, bad := range []policy.ManualRule{
		rule(policy.Allow, 1001, 70000, false, policy.ProtoAny, 0, 0),
		rule(policy.Allow, 0, 1002, false, policy.ProtoAny, 0, 0),
		rule(policy.Allow, 1001, 1002, false, policy.ProtoICMP, 80, 80),
		rule(policy.Allow, 1001, 1002, false, policy.ProtoTCP, 90, 80),
		rule(0, 1001, 1002, false, policy.ProtoAny, 0, 0),
	} {
		if _, err := st.AddRule(bad); err == nil {
			t.Errorf("AddRule(%+v) accepted", bad)
		}
	}
	if len(st.Rules) != 3 {
		t.Fatalf("rules = %v", st.Rules)
	}

	// Delete with no action takes allow and deny alike.
	removed, err := st.DeleteRules(rule(0, 1002, 1001, false, policy.ProtoAny, 0, 0))
	if err != nil || len(removed) != 2 {
		t.Fatalf("DeleteRules = %v, %v; want the one-way allow and the deny", removed, err)
	}
	if _, err := st.DeleteRules(rule(policy.Deny, 1001, 1002, true, policy.ProtoAny, 0, 0)); err == nil || !strings.Contains(err.Error(), "no manual deny rule matches --src 1001 --dst 1002 --symmetric") {
		t.Errorf("DeleteRules of a deny that is an allow = %v", err)
	}
	if removed, err := st.DeleteRules(rule(policy.Allow, 1002, 1001, true, policy.ProtoAny, 0, 0)); err != nil || len(removed) != 1 {
		t.Errorf("DeleteRules of the swapped symmetric rule = %v, %v", removed, err)
	}
	if len(st.Rules) != 0 {
		t.Errorf("rules left: %v", st.Rules)
	}
}

func TestPolicyFromRules(t *testing.T) {
	var st State
	for _, r := range []policy.ManualRule{
		rule(policy.Allow, 1001, 1002, true, policy.ProtoAny, 0, 0),
		rule(policy.Deny, 1002, 1001, false, policy.ProtoAny, 0, 0),
		rule(policy.Allow, 1003, 1002, false, policy.ProtoTCP, 8080, 8089),
	} {
		if _, err := st.AddRule(r); err != nil {
			t.Fatal(err)
		}
	}
	ms, err := st.Compile()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		src, dst identity.ID
		proto    policy.Proto
		port     uint16
		want     bool
	}{
		{1001, 1002, policy.ProtoICMP, 0, true},
		{1002, 1001, policy.ProtoICMP, 0, false}, // deny wins over the symmetric allow
		{1003, 1002, policy.ProtoTCP, 8085, true},
		{1003, 1002, policy.ProtoTCP, 8090, false},
		{1003, 1002, policy.ProtoUDP, 8085, false},
		{1002, 1003, policy.ProtoTCP, 8085, false},
		{1004, 1002, policy.ProtoTCP, 8085, false}, // no rule: manual identities are isolated
	} {
		eg, _ := ms.Decide(c.src, policy.Egress, c.dst, c.proto, c.port)
		in, _ := ms.Decide(c.dst, policy.Ingress, c.src, c.proto, c.port)
		if got := eg && in; got != c.want {
			t.Errorf("%s -> %s %s/%d allowed = %v, want %v", c.src, c.dst, c.proto, c.port, got, c.want)
		}
		if got := st.PolicySet().Allowed(c.src, c.dst, c.proto, c.port); got != c.want {
			t.Errorf("reference: %s -> %s %s/%d allowed = %v, want %v", c.src, c.dst, c.proto, c.port, got, c.want)
		}
	}
}

func TestTooManyPortRangesFailsValidation(t *testing.T) {
	var st State
	for i := range policy.MaxAllowRanges + 1 {
		p := uint16(1000 + 10*i)
		if _, err := st.AddRule(rule(policy.Allow, 1001, 1002, false, policy.ProtoTCP, p, p)); err != nil {
			t.Fatal(err)
		}
	}
	if err := st.Validate(); err == nil || !strings.Contains(err.Error(), "port ranges") {
		t.Errorf("Validate = %v, want the map entry limit", err)
	}
}

func openStore(t *testing.T) *store.DB {
	t.Helper()
	db, err := store.Open(filepath.Join(t.TempDir(), "state.db"), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func TestStoreRoundTrip(t *testing.T) {
	db := openStore(t)
	empty, err := Load(db)
	if err != nil || len(empty.Bindings) != 0 || len(empty.Rules) != 0 {
		t.Fatalf("Load of a fresh file = %+v, %v", empty, err)
	}
	var st State
	for _, s := range []string{"10.13.0.10", "10.13.0.9", "fd00::2", "10.13.0.100"} {
		if _, err := st.Bind(netip.MustParseAddr(s), 1001); err != nil {
			t.Fatal(err)
		}
	}
	// Enough rules that byte order and number order of keys differ.
	for i := range 300 {
		if _, err := st.AddRule(rule(policy.Allow, identity.ID(300+i), 1001, i%2 == 0, policy.ProtoUDP, uint16(i+1), uint16(i+1))); err != nil {
			t.Fatal(err)
		}
	}
	if err := Save(db, st); err != nil {
		t.Fatal(err)
	}
	got, err := Load(db)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, st) {
		t.Errorf("round trip changed the state:\n got %+v\nwant %+v", got, st)
	}
	// A smaller state replaces, not merges.
	small := State{Rules: st.Rules[:1]}
	if err := Save(db, small); err != nil {
		t.Fatal(err)
	}
	if got, _ := Load(db); len(got.Bindings) != 0 || len(got.Rules) != 1 {
		t.Errorf("after saving a smaller state: %+v", got)
	}
}

func TestSaveRefusesInvalidState(t *testing.T) {
	db := openStore(t)
	bad := State{Bindings: []Binding{{IP: netip.MustParseAddr("10.0.0.1"), Identity: 5}}}
	if err := Save(db, bad); err == nil {
		t.Fatal("Save accepted a binding to a reserved identity")
	}
	if got, _ := Load(db); len(got.Bindings) != 0 {
		t.Errorf("a refused Save wrote %+v", got)
	}
}

// Rules may name host, world and remote-node on one side; the other side
// must be a manual identity, since only manual identities are policed by
// these rules.
func TestRulesNameReservedPeers(t *testing.T) {
	var s State
	for _, r := range []policy.ManualRule{
		{Action: policy.Allow, Src: identity.RemoteNode, Dst: 1001},
		{Action: policy.Deny, Src: identity.RemoteNode, Dst: 1001},
		{Action: policy.Deny, Src: identity.Host, Dst: 1001},
		{Action: policy.Allow, Src: 1001, Dst: identity.World, Symmetric: true},
	} {
		if _, err := s.AddRule(r); err != nil {
			t.Errorf("AddRule(%s): %v", r, err)
		}
	}
	if err := s.Validate(); err != nil {
		t.Errorf("state with rules naming reserved identities: %v", err)
	}
	for _, r := range []policy.ManualRule{
		{Action: policy.Allow, Src: identity.RemoteNode, Dst: identity.Host},
		{Action: policy.Allow, Src: identity.Unresolved, Dst: 1001},
		{Action: policy.Allow, Src: 1001, Dst: identity.MinLabel},
		{Action: policy.Allow, Src: identity.Any, Dst: 1001},
	} {
		if _, err := s.AddRule(r); err == nil {
			t.Errorf("AddRule(%s) accepted", r)
		}
	}
}
