package main

import (
	"net/netip"
	"slices"
	"testing"
)

func TestParsePodCIDRs(t *testing.T) {
	got, err := parsePodCIDRs([]string{"10.13.1.0/24", " fd00:13:1::/64"})
	if err != nil {
		t.Fatal(err)
	}
	if want := []netip.Prefix{netip.MustParsePrefix("10.13.1.0/24"), netip.MustParsePrefix("fd00:13:1::/64")}; !slices.Equal(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
	for _, bad := range [][]string{{"10.13.1.5/24"}, {"10.13.1.0/24", "10.13.2.0/24"}, {"nonsense"}} {
		if _, err := parsePodCIDRs(bad); err == nil {
			t.Errorf("--pod-cidr %v accepted", bad)
		}
	}
}
