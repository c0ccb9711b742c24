package api

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/idcni/idcni/identity"
)

func TestNodeIdentities(t *testing.T) {
	set, err := identity.FromPod(map[string]string{"app": "web"}, "shop", nil, identity.Options{})
	if err != nil {
		t.Fatal(err)
	}
	idle := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	a, b := netip.MustParseAddr("10.13.0.3"), netip.MustParseAddr("10.13.0.2")
	got := NodeIdentities(
		[]identity.Entry{{ID: 65537, Set: set, Users: []string{"pod/shop/web-1"}}, {ID: 65536, Set: set, IdleSince: idle}},
		map[identity.ID][]netip.Addr{1001: {a, b}},
		// Rules name manual identities and reserved peers; 1001 is bound
		// already, host is listed anyway.
		[]identity.ID{1001, 1002, identity.Host},
		map[identity.ID]netip.Prefix{identity.MinCIDR: netip.MustParsePrefix("10.0.0.0/8")})
	labels := map[string]string{"app": "web", identity.NamespaceLabel: "shop"}
	want := []Identity{
		{ID: 1, Kind: KindReserved, Name: "host"},
		{ID: 2, Kind: KindReserved, Name: "world"},
		{ID: 5, Kind: KindReserved, Name: "unresolved"},
		{ID: 6, Kind: KindReserved, Name: "remote-node"},
		{ID: 1001, Kind: KindManual, Addresses: []netip.Addr{b, a}},
		{ID: 1002, Kind: KindManual},
		{ID: 65536, Kind: KindLabel, Labels: labels, IdleSince: &idle},
		{ID: 65537, Kind: KindLabel, Labels: labels, Pods: []string{"shop/web-1"}},
		{ID: identity.MinCIDR, Kind: KindCIDR, CIDR: "10.0.0.0/8"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("NodeIdentities =\n%+v\nwant\n%+v", got, want)
	}
	if x, err := FindIdentity(got, 65537, true); err != nil || x.Pods[0] != "shop/web-1" {
		t.Errorf("FindIdentity(65537) = %+v, %v", x, err)
	}
	for id, msg := range map[identity.ID]string{
		0:                    "0 is not an identity",
		3:                    "reserved but unused",
		1003:                 "manual identity 1003 is not bound",
		65538:                "label identity 65538 is not allocated on this node; identity numbers are node-local",
		identity.MinCIDR + 1: "CIDR identity 16777217 is not in use on this node",
	} {
		if _, err := FindIdentity(got, id, true); err == nil || !strings.Contains(err.Error(), msg) {
			t.Errorf("FindIdentity(%d) error %v, want %q", id, err, msg)
		}
	}
	if err := UnknownIdentity(identity.MinCIDR, false); !strings.Contains(err.Error(), "no agent answers") {
		t.Errorf("UnknownIdentity of a CIDR number without an agent: %v", err)
	}
}
