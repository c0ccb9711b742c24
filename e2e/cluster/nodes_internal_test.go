package cluster

import (
	"net/netip"
	"testing"
)

// The address plan needs no root: the subnets stay in the benchmarking
// range and clear of other clusters', and the nodes, the host and the
// router never share an address.
func TestAddressPlan(t *testing.T) {
	inRange := func(p netip.Prefix) bool {
		b := p.Addr().As4()
		return b[0] == 198 && b[1] == 19 && b[2] >= 200 && b[2] <= 254 && p.Bits() == segmentBits && p == p.Masked()
	}
	var others []*State
	seen := map[netip.Prefix]bool{}
	for range 40 {
		seg, far, err := pickAddresses(others, true)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range []netip.Prefix{seg, far} {
			if !inRange(p) {
				t.Fatalf("subnet %s: want a /%d in 198.19.200.0-198.19.254.255", p, segmentBits)
			}
			if seen[p] {
				t.Fatalf("subnet %s picked twice", p)
			}
			seen[p] = true
		}
		others = append(others, &State{Segment: seg, FarSubnet: far})
	}
	// A cluster of the older layout is known by its host address only.
	old := netip.MustParseAddr("198.19.201.5")
	for range 200 {
		seg, _, err := pickAddresses([]*State{{HostIP: old}}, false)
		if err != nil {
			t.Fatal(err)
		}
		if seg.Contains(old) {
			t.Fatalf("segment %s holds the older cluster's address %s", seg, old)
		}
	}

	if got := lastAddr(netip.MustParsePrefix("198.19.210.32/27")); got != netip.MustParseAddr("198.19.210.63") {
		t.Errorf("lastAddr(198.19.210.32/27) = %s", got)
	}
	if got := nthAddr(netip.MustParsePrefix("198.19.210.32/27"), 1); got != netip.MustParseAddr("198.19.210.33") {
		t.Errorf("nthAddr(198.19.210.32/27, 1) = %s", got)
	}

	c := &Cluster{State: State{Name: "plan", Dir: t.TempDir(),
		Segment: netip.MustParsePrefix("198.19.210.32/27"), FarSubnet: netip.MustParsePrefix("198.19.220.0/27")}}
	c.HostIP = nthAddr(c.Segment, 1)
	c.RouterIP, c.RouterFarIP = lastAddr(c.Segment).Prev(), nthAddr(c.FarSubnet, 1)
	used := map[netip.Addr]string{c.HostIP: "host", c.RouterIP: "router", c.RouterFarIP: "router"}
	for i := range 30 {
		n, err := c.newNode(i == 0)
		if i == 29 {
			// The host, the router and 28 nodes fill the /27's 30
			// addresses (the far node is on the far subnet).
			if err == nil {
				t.Fatalf("node %s got %s on a full segment", n.Name, n.IP)
			}
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		want := c.Segment
		if n.Far {
			want = c.FarSubnet
		}
		if !want.Contains(n.IP) || n.IP == lastAddr(want) || used[n.IP] != "" {
			t.Fatalf("node %s: address %s (used by %q), want a free one in %s", n.Name, n.IP, used[n.IP], want)
		}
		used[n.IP] = n.Name
		c.Nodes = append(c.Nodes, n)
	}
	if c.Nodes[0].ID != "n0" || c.Nodes[1].ID != "n1" || c.Nodes[0].Name != "idcni-plan-n0" {
		t.Errorf("node IDs and names: %s %s %s", c.Nodes[0].ID, c.Nodes[1].ID, c.Nodes[0].Name)
	}
}
