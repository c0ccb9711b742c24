package agent

import (
	"context"
	"net/netip"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// fakeRoutes is a main routing table in memory: the agent's routes (of
// RouteProtocol) and routes someone else made, which the agent must never
// change.
type fakeRoutes struct {
	connected []connectedNet
	owned     map[netip.Prefix]nodeRoute
	foreign   map[netip.Prefix]nodeRoute
	ops       int
	// The vxlan device: tunnel is nil without one; index changes when
	// it is made again, and the routes through it and entries go.
	tunnel    *tunnelSpec
	index     int
	entries   map[tunnelEntry]bool
	recreated int
}

func newFakeRoutes(connected ...connectedNet) *fakeRoutes {
	return &fakeRoutes{connected: connected, owned: map[netip.Prefix]nodeRoute{}, foreign: map[netip.Prefix]nodeRoute{}, index: 99}
}

func (f *fakeRoutes) dropTunnel() {
	for dst, r := range f.owned {
		if r.LinkIndex == f.index {
			delete(f.owned, dst)
		}
	}
	f.tunnel, f.entries = nil, nil
}

func (f *fakeRoutes) EnsureTunnel(spec tunnelSpec) (int, error) {
	if f.tunnel != nil && (f.tunnel.Local != spec.Local || f.tunnel.Port != spec.Port) {
		f.dropTunnel()
		f.recreated++
	}
	if f.tunnel == nil {
		f.ops++
		f.index++
		f.entries = map[tunnelEntry]bool{}
	}
	f.tunnel = &spec
	return f.index, nil
}

func (f *fakeRoutes) RemoveTunnel() (bool, error) {
	if f.tunnel == nil {
		return false, nil
	}
	f.ops++
	f.dropTunnel()
	return true, nil
}

func (f *fakeRoutes) TunnelEntries(index int) ([]tunnelEntry, error) {
	if f.tunnel == nil || index != f.index {
		panic("entries of a device that is not there")
	}
	return sortedEntries(f.entries), nil
}

func (f *fakeRoutes) AddTunnelEntry(index int, e tunnelEntry) error {
	f.ops++
	f.entries[e] = true
	return nil
}

func (f *fakeRoutes) DeleteTunnelEntry(index int, e tunnelEntry) error {
	f.ops++
	delete(f.entries, e)
	return nil
}

func (f *fakeRoutes) Connected() ([]connectedNet, error) { return slices.Clone(f.connected), nil }

func (f *fakeRoutes) Owned() ([]nodeRoute, error) {
	var out []nodeRoute
	for _, r := range f.owned {
		out = append(out, r)
	}
	return out, nil
}

func (f *fakeRoutes) Add(r nodeRoute) error {
	f.ops++
	if r.LinkIndex == tunnelLink || (r.LinkIndex == f.index && f.tunnel == nil) {
		panic("route through a device that is not there: " + r.String())
	}
	if _, ok := f.foreign[r.Dst]; ok {
		return errRouteExists
	}
	if _, ok := f.owned[r.Dst]; ok {
		return errRouteExists
	}
	f.owned[r.Dst] = r
	return nil
}

func (f *fakeRoutes) Replace(r nodeRoute) error {
	f.ops++
	if _, ok := f.owned[r.Dst]; !ok {
		panic("Replace of a route the agent does not own: " + r.String())
	}
	f.owned[r.Dst] = r
	return nil
}

func (f *fakeRoutes) Delete(r nodeRoute) error {
	f.ops++
	if f.owned[r.Dst] == r {
		delete(f.owned, r.Dst)
	}
	return nil
}

func (f *fakeRoutes) routes() []nodeRoute { return sortedRoutes(f.owned) }

// withRoutes routes directly only, as the agent did before VXLAN.
func withRoutes(f *fakeRoutes) func(*Agent) { return withRouting(f, RoutingDirect) }

func withRouting(f *fakeRoutes, mode RoutingMode) func(*Agent) {
	return func(a *Agent) { a.routes = newNodeRouter(f, a.log, a.metrics, mode, 0) }
}

func route(dst, via string, link int) nodeRoute {
	return nodeRoute{Dst: netip.MustParsePrefix(dst), Via: netip.MustParseAddr(via), LinkIndex: link}
}

// The LAN is 192.0.2.0/24 on link 2 (MTU 1500, this node 192.0.2.10), a
// second subnet 198.51.100.0/24 on link 3, and an IPv6 one on link 2.
func lan() *fakeRoutes {
	return newFakeRoutes(
		connectedNet{Prefix: netip.MustParsePrefix("192.0.2.0/24"), Addr: netip.MustParseAddr("192.0.2.10"), LinkIndex: 2, MTU: 1500},
		connectedNet{Prefix: netip.MustParsePrefix("198.51.100.0/24"), Addr: netip.MustParseAddr("198.51.100.10"), LinkIndex: 3, MTU: 9000},
		connectedNet{Prefix: netip.MustParsePrefix("2001:db8::/64"), Addr: netip.MustParseAddr("2001:db8::10"), LinkIndex: 2, MTU: 1500},
	)
}

func updateNode(t *testing.T, ta *testAgent, name string, change func(*corev1.Node)) {
	t.Helper()
	n, err := ta.client.CoreV1().Nodes().Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	change(n)
	n.ResourceVersion += "1"
	if _, err := ta.client.CoreV1().Nodes().Update(context.Background(), n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	ta.settle(t)
}

func wantRoutes(t *testing.T, f *fakeRoutes, what string, want ...nodeRoute) {
	t.Helper()
	if got := f.routes(); !slices.Equal(got, want) {
		t.Errorf("%s: routes %v, want %v", what, got, want)
	}
}

// Routes to connected nodes' pod CIDRs, through their InternalIPs on the
// right link; none to a node that is not on a connected subnet; they
// follow an InternalIP change, a new node and a node that goes.
func TestRoutesFollowNodes(t *testing.T) {
	f := lan()
	objs := []runtime.Object{
		nodeWithCIDRs(localNode, "192.0.2.10", "10.13.0.0/24"),
		nodeWithCIDRs("node-b", "192.0.2.11", "10.13.1.0/24"),
		nodeWithCIDRs("node-c", "198.51.100.12", "10.13.2.0/24"),
		nodeWithCIDRs("node-far", "203.0.113.5", "10.13.3.0/24"),
		nodeWithCIDRs("node-nocidr", "192.0.2.14"),
	}
	// Dual-stack node: the IPv6 CIDR goes through its IPv6 InternalIP.
	dual := nodeWithCIDRs("node-dual", "192.0.2.15", "10.13.5.0/24", "fd00:13:5::/64")
	dual.Status.Addresses = append(dual.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: "2001:db8::15"})
	objs = append(objs, dual)
	ta := newTestAgentWith(t, newFakeMaps(), withRoutes(f), objs...)
	wantRoutes(t, f, "at start",
		route("10.13.1.0/24", "192.0.2.11", 2), route("10.13.2.0/24", "198.51.100.12", 3),
		route("10.13.5.0/24", "192.0.2.15", 2), route("fd00:13:5::/64", "2001:db8::15", 2))
	if why := ta.routes.missing[netip.MustParsePrefix("10.13.3.0/24")]; why != "no route: node node-far's InternalIP is not on a connected subnet and --routing-mode is direct (pod CIDR 10.13.3.0/24 unreachable from this node's pods)" {
		t.Errorf("node-far: %q", why)
	}

	updateNode(t, ta, "node-b", func(n *corev1.Node) { n.Status.Addresses[0].Address = "198.51.100.11" })
	wantRoutes(t, f, "after node-b's InternalIP moved",
		route("10.13.1.0/24", "198.51.100.11", 3), route("10.13.2.0/24", "198.51.100.12", 3),
		route("10.13.5.0/24", "192.0.2.15", 2), route("fd00:13:5::/64", "2001:db8::15", 2))

	updateNode(t, ta, "node-c", func(n *corev1.Node) { n.Status.Addresses[0].Address = "203.0.113.12" })
	wantRoutes(t, f, "after node-c's InternalIP left the connected subnets",
		route("10.13.1.0/24", "198.51.100.11", 3), route("10.13.5.0/24", "192.0.2.15", 2), route("fd00:13:5::/64", "2001:db8::15", 2))

	updateNode(t, ta, "node-nocidr", func(n *corev1.Node) { n.Spec.PodCIDRs = []string{"10.13.4.0/24"} })
	wantRoutes(t, f, "after node-nocidr got a pod CIDR",
		route("10.13.1.0/24", "198.51.100.11", 3), route("10.13.4.0/24", "192.0.2.14", 2),
		route("10.13.5.0/24", "192.0.2.15", 2), route("fd00:13:5::/64", "2001:db8::15", 2))

	for _, name := range []string{"node-b", "node-dual"} {
		if err := ta.client.CoreV1().Nodes().Delete(context.Background(), name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	ta.settle(t)
	wantRoutes(t, f, "after node-b and node-dual went", route("10.13.4.0/24", "192.0.2.14", 2))

	// A resync that changes nothing touches no route.
	ops := f.ops
	ta.queue.Add(key{kind: kindNode})
	ta.settle(t)
	if f.ops != ops {
		t.Errorf("a resync made %d route changes", f.ops-ops)
	}

	// The audit puts back a route of the agent's that someone deleted.
	delete(f.owned, netip.MustParsePrefix("10.13.4.0/24"))
	ta.queue.Add(key{kind: kindAudit})
	ta.settle(t)
	wantRoutes(t, f, "after the audit", route("10.13.4.0/24", "192.0.2.14", 2))
}

// At start the agent's routes an earlier run left for nodes that are gone
// go, and a route through an old address is corrected; routes someone
// else made stay, even to a destination the agent wants.
func TestRoutesAtStartStaleGoForeignStay(t *testing.T) {
	f := lan()
	f.owned[netip.MustParsePrefix("10.13.9.0/24")] = route("10.13.9.0/24", "192.0.2.99", 2)   // node gone
	f.owned[netip.MustParsePrefix("10.13.1.0/24")] = route("10.13.1.0/24", "192.0.2.50", 2)   // old address
	f.foreign[netip.MustParsePrefix("10.13.2.0/24")] = route("10.13.2.0/24", "192.0.2.77", 2) // the admin's, to a wanted CIDR
	f.foreign[netip.MustParsePrefix("10.99.0.0/16")] = route("10.99.0.0/16", "192.0.2.1", 2)  // the admin's, elsewhere
	foreign := map[netip.Prefix]nodeRoute{}
	for k, v := range f.foreign {
		foreign[k] = v
	}
	ta := newTestAgentWith(t, newFakeMaps(), withRoutes(f),
		nodeWithCIDRs(localNode, "192.0.2.10", "10.13.0.0/24"),
		nodeWithCIDRs("node-b", "192.0.2.11", "10.13.1.0/24"),
		nodeWithCIDRs("node-c", "192.0.2.12", "10.13.2.0/24"))
	wantRoutes(t, f, "after start", route("10.13.1.0/24", "192.0.2.11", 2))
	for k, v := range foreign {
		if f.foreign[k] != v {
			t.Errorf("foreign route %s changed", v)
		}
	}
	if why := ta.routes.missing[netip.MustParsePrefix("10.13.2.0/24")]; why == "" {
		t.Error("no reason recorded for the pod CIDR a foreign route holds")
	}
	// The foreign route goes: the agent's comes on the next sync.
	delete(f.foreign, netip.MustParsePrefix("10.13.2.0/24"))
	ta.queue.Add(key{kind: kindNode})
	ta.settle(t)
	wantRoutes(t, f, "after the foreign route went", route("10.13.1.0/24", "192.0.2.11", 2), route("10.13.2.0/24", "192.0.2.12", 2))
}

func TestPlanRoutesEdges(t *testing.T) {
	connected := []connectedNet{{Prefix: netip.MustParsePrefix("192.0.2.0/24"), LinkIndex: 2}, {Prefix: netip.MustParsePrefix("192.0.2.0/28"), LinkIndex: 5}}
	peers := []peerNode{
		{name: "a", cidrs: prefixes("10.13.1.0/24"), addrs: []netip.Addr{netip.MustParseAddr("192.0.2.3")}},
		{name: "b", cidrs: prefixes("10.13.1.0/24", "fd00::/64"), addrs: []netip.Addr{netip.MustParseAddr("192.0.2.4")}},
		{name: "c", cidrs: prefixes("10.13.0.0/16")},                                                         // overlaps the local pod CIDR
		{name: "d", cidrs: prefixes("10.13.4.0/24"), addrs: []netip.Addr{netip.MustParseAddr("192.0.2.10")}}, // this node's address
	}
	p := planRoutes(peers, connected, selfNode{cidrs: prefixes("10.13.0.0/24"), addrs: []netip.Addr{netip.MustParseAddr("192.0.2.10")}}, RoutingDirect)
	want, missing, conflicts := p.want, p.missing, p.conflicts
	if got := sortedRoutes(want); !slices.Equal(got, []nodeRoute{route("10.13.1.0/24", "192.0.2.3", 5)}) {
		t.Errorf("routes %v: want node a's through the longest connected subnet", got)
	}
	if conflicts[netip.MustParsePrefix("10.13.1.0/24")] == "" {
		t.Error("10.13.1.0/24 claimed twice: no conflict reported")
	}
	for _, dst := range []string{"fd00::/64", "10.13.0.0/16", "10.13.4.0/24"} {
		if missing[netip.MustParsePrefix(dst)] == "" {
			t.Errorf("%s: no reason", dst)
		}
	}
}
