package desired

import (
	"net/netip"
	"testing"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

func TestClaimsPrecedence(t *testing.T) {
	for _, tc := range []struct {
		c    Claims
		want identity.ID
		ok   bool
	}{
		{Claims{}, 0, false},
		{Claims{CIDR: 16777300}, 16777300, true},
		{Claims{Node: identity.RemoteNode, CIDR: 16777300}, identity.RemoteNode, true},
		{Claims{Pod: 70000, Node: identity.Host}, 70000, true},
		{Claims{Local: identity.Unresolved, Pod: 70000}, identity.Unresolved, true},
		{Claims{Binding: 1001, Local: 70000, Pod: 70001}, 1001, true},
	} {
		got, ok := tc.c.Identity()
		if got != tc.want || ok != tc.ok {
			t.Errorf("%+v: %s %v, want %s %v", tc.c, got, ok, tc.want, tc.ok)
		}
	}
}

func TestEndpointIdentity(t *testing.T) {
	a4, a6 := netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("fd00::2")
	none := func(netip.Addr) (identity.ID, bool) { return 0, false }
	v6bound := func(a netip.Addr) (identity.ID, bool) { return 1001, a == a6 }
	if got := EndpointIdentity(70000, []netip.Addr{a4, a6}, none); got != 70000 {
		t.Errorf("unbound: %s", got)
	}
	if got := EndpointIdentity(0, []netip.Addr{a4}, none); got != identity.Unresolved {
		t.Errorf("unknown own identity: %s, want unresolved", got)
	}
	if got := EndpointIdentity(70000, []netip.Addr{a4, a6}, v6bound); got != 1001 {
		t.Errorf("one address bound: %s, want the binding", got)
	}
}

func rng(lo, hi uint16) policy.PortRange { return policy.PortRange{Lo: lo, Hi: hi} }

func TestEntryRevokes(t *testing.T) {
	for _, tc := range []struct {
		name     string
		old, new *policy.Entry
		want     bool
	}{
		{"new allow", nil, &policy.Entry{Allow: []policy.PortRange{rng(80, 80)}}, false},
		{"allow widened", &policy.Entry{Allow: []policy.PortRange{rng(80, 80)}}, &policy.Entry{Allow: []policy.PortRange{rng(80, 81)}}, false},
		{"allow all from ranges", &policy.Entry{Allow: []policy.PortRange{rng(80, 80)}}, &policy.Entry{AllowAll: true}, false},
		{"allow narrowed", &policy.Entry{Allow: []policy.PortRange{rng(80, 81)}}, &policy.Entry{Allow: []policy.PortRange{rng(80, 80)}}, true},
		{"allow split", &policy.Entry{Allow: []policy.PortRange{rng(80, 90)}}, &policy.Entry{Allow: []policy.PortRange{rng(80, 84), rng(86, 90)}}, true},
		{"allow all to ranges", &policy.Entry{AllowAll: true}, &policy.Entry{Allow: []policy.PortRange{rng(1, 65535)}}, true},
		{"entry removed", &policy.Entry{Allow: []policy.PortRange{rng(80, 80)}}, nil, true},
		{"deny added", &policy.Entry{AllowAll: true}, &policy.Entry{AllowAll: true, Deny: []policy.PortRange{rng(22, 22)}}, true},
		{"deny all added", nil, &policy.Entry{DenyAll: true}, true},
		{"deny removed", &policy.Entry{Deny: []policy.PortRange{rng(22, 22)}}, nil, false},
		{"deny narrowed", &policy.Entry{Deny: []policy.PortRange{rng(20, 22)}}, &policy.Entry{Deny: []policy.PortRange{rng(22, 22)}}, false},
		{"moved deny", &policy.Entry{Deny: []policy.PortRange{rng(20, 22)}}, &policy.Entry{Deny: []policy.PortRange{rng(23, 23)}}, true},
		{"same", &policy.Entry{Allow: []policy.PortRange{rng(80, 80), rng(443, 443)}}, &policy.Entry{Allow: []policy.PortRange{rng(80, 80), rng(443, 443)}}, false},
	} {
		if got := EntryRevokes(tc.old, tc.new); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestPeerChangeRevokes(t *testing.T) {
	const db, web, web2, other = 70000, 70001, 70002, 70003
	entries := map[policy.Key]*policy.Entry{
		{Subject: db, Peer: web, Direction: policy.Ingress, Proto: policy.ProtoTCP}:   {Allow: []policy.PortRange{rng(80, 80)}},
		{Subject: db, Peer: web2, Direction: policy.Ingress, Proto: policy.ProtoTCP}:  {Allow: []policy.PortRange{rng(80, 80)}},
		{Subject: db, Peer: other, Direction: policy.Ingress, Proto: policy.ProtoTCP}: {Deny: []policy.PortRange{rng(80, 80)}},
	}
	lookup := func(k policy.Key) *policy.Entry { return entries[k] }
	byPeer := func(id identity.ID) []policy.Key {
		var out []policy.Key
		for k := range entries {
			if k.Peer == id {
				out = append(out, k)
			}
		}
		return out
	}
	for _, tc := range []struct {
		name     string
		old, new identity.ID
		want     bool
	}{
		{"to an identity allowed the same", web, web2, false},
		{"world to an allowed pod", identity.World, web, false},
		{"allowed pod to world", web, identity.World, true},
		{"world to a denied pod", identity.World, other, true},
		{"unknown to unknown", 70010, 70011, false},
	} {
		if got := PeerChangeRevokes(lookup, byPeer, tc.old, tc.new); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}
