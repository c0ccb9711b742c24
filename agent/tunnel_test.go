package agent

import (
	"context"
	"encoding/json"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestTunnelMACAndLinkLocal(t *testing.T) {
	mac := tunnelMAC(netip.MustParseAddr("203.0.113.5"))
	if mac.String() != "0e:69:cb:00:71:05" {
		t.Errorf("IPv4 MAC %s", mac)
	}
	if ll := tunnelLinkLocal(mac); ll != netip.MustParseAddr("fe80::c69:cbff:fe00:7105") {
		t.Errorf("link-local %s", ll)
	}
	m6 := tunnelMAC(netip.MustParseAddr("2001:db8::5"))
	if m6[0] != 0x16 || slices.Equal(m6, tunnelMAC(netip.MustParseAddr("2001:db8::6"))) {
		t.Errorf("IPv6 MAC %s", m6)
	}
	// Locally administered unicast, both.
	for _, m := range []net.HardwareAddr{mac, m6} {
		if m[0]&0x02 == 0 || m[0]&0x01 != 0 {
			t.Errorf("%s is not a locally administered unicast MAC", m)
		}
	}
	for _, s := range []string{"auto", "direct", "vxlan"} {
		if m, err := ParseRoutingMode(s); err != nil || string(m) != s {
			t.Errorf("ParseRoutingMode(%q) = %q, %v", s, m, err)
		}
	}
	if _, err := ParseRoutingMode("geneve"); err == nil {
		t.Error("geneve accepted")
	}
}

func tunnelRoute(dst string, peer string) nodeRoute {
	r := nodeRoute{Dst: netip.MustParsePrefix(dst)}
	p := netip.MustParseAddr(peer)
	if r.Dst.Addr().Is4() {
		r.Via, r.Onlink = p, true
	} else {
		r.Via = tunnelLinkLocal(tunnelMAC(p))
	}
	return r
}

// entriesOf are the three entries a peer with both families' pod CIDRs
// needs (two with one family).
func entriesOf(peer string, v4, v6 bool) []tunnelEntry {
	p := netip.MustParseAddr(peer)
	mac := mac6(tunnelMAC(p))
	out := []tunnelEntry{{FDB: true, IP: p, MAC: mac}}
	if v4 {
		out = append(out, tunnelEntry{IP: p, MAC: mac})
	}
	if v6 {
		out = append(out, tunnelEntry{IP: tunnelLinkLocal(tunnelMAC(p)), MAC: mac})
	}
	return out
}

func wantTunnel(t *testing.T, f *fakeRoutes, what string, spec *tunnelSpec, routes []nodeRoute, entries ...[]tunnelEntry) {
	t.Helper()
	if (f.tunnel == nil) != (spec == nil) || (spec != nil && *f.tunnel != *spec) {
		t.Errorf("%s: device %+v, want %+v", what, f.tunnel, spec)
	}
	for i := range routes {
		if routes[i].LinkIndex == 0 {
			routes[i].LinkIndex = f.index
		}
	}
	wantRoutes(t, f, what, sortedRoutes(routeMap(routes))...)
	all := map[tunnelEntry]bool{}
	for _, es := range entries {
		for _, e := range es {
			all[e] = true
		}
	}
	if got, want := sortedEntries(f.entries), sortedEntries(all); !slices.Equal(got, want) {
		t.Errorf("%s: entries\n  %v\nwant\n  %v", what, got, want)
	}
}

func routeMap(rs []nodeRoute) map[netip.Prefix]nodeRoute {
	m := map[netip.Prefix]nodeRoute{}
	for _, r := range rs {
		m[r.Dst] = r
	}
	return m
}

// Auto mode: the LAN node directly, the far one through the tunnel with
// its three entries, both families over the IPv4 underlay; the entries
// follow an InternalIP change; the device goes with the last node that
// needs it; this node's own address moving makes the device again; the
// metrics count both ways and the tunnel's peers.
func TestRoutesThroughTunnelFollowNodes(t *testing.T) {
	f := lan()
	far := nodeWithCIDRs("node-far", "203.0.113.5", "10.13.3.0/24", "fd00:13:3::/64")
	ta := newTestAgentWith(t, newFakeMaps(), withRouting(f, RoutingAuto),
		nodeWithCIDRs(localNode, "192.0.2.10", "10.13.0.0/24"),
		nodeWithCIDRs("node-b", "192.0.2.11", "10.13.1.0/24"),
		far)
	spec := &tunnelSpec{Local: netip.MustParseAddr("192.0.2.10"), Port: 8472, MTU: 1450}
	direct := route("10.13.1.0/24", "192.0.2.11", 2)
	wantTunnel(t, f, "at start", spec,
		[]nodeRoute{direct, tunnelRoute("10.13.3.0/24", "203.0.113.5"), tunnelRoute("fd00:13:3::/64", "203.0.113.5")},
		entriesOf("203.0.113.5", true, true))
	m := ta.metrics
	if d, v, p, miss := gaugeValue(m.nodeRoutes.WithLabelValues("direct")), gaugeValue(m.nodeRoutes.WithLabelValues("vxlan")),
		gaugeValue(m.tunnelPeers), gaugeValue(m.noRoute); d != 1 || v != 2 || p != 1 || miss != 0 {
		t.Errorf("metrics: direct %v vxlan %v peers %v missing %v, want 1 2 1 0", d, v, p, miss)
	}

	updateNode(t, ta, "node-far", func(n *corev1.Node) { n.Status.Addresses[0].Address = "203.0.113.6" })
	wantTunnel(t, f, "after node-far's InternalIP changed", spec,
		[]nodeRoute{direct, tunnelRoute("10.13.3.0/24", "203.0.113.6"), tunnelRoute("fd00:13:3::/64", "203.0.113.6")},
		entriesOf("203.0.113.6", true, true))

	// A resync that changes nothing touches nothing.
	ops := f.ops
	ta.queue.Add(key{kind: kindNode})
	ta.settle(t)
	if f.ops != ops {
		t.Errorf("a resync made %d changes", f.ops-ops)
	}
	// The audit puts back an entry someone deleted, and removes one
	// someone added.
	delete(f.entries, entriesOf("203.0.113.6", true, false)[1])
	stray := entriesOf("203.0.113.99", true, false)
	for _, e := range stray {
		f.entries[e] = true
	}
	ta.queue.Add(key{kind: kindAudit})
	ta.settle(t)
	wantTunnel(t, f, "after the audit", spec,
		[]nodeRoute{direct, tunnelRoute("10.13.3.0/24", "203.0.113.6"), tunnelRoute("fd00:13:3::/64", "203.0.113.6")},
		entriesOf("203.0.113.6", true, true))

	// This node's InternalIP moves to the other subnet: the device is made
	// again with it (MTU from that link), and the routes come back.
	updateNode(t, ta, localNode, func(n *corev1.Node) { n.Status.Addresses[0].Address = "198.51.100.10" })
	spec = &tunnelSpec{Local: netip.MustParseAddr("198.51.100.10"), Port: 8472, MTU: 9000 - 50}
	wantTunnel(t, f, "after this node's InternalIP moved", spec,
		[]nodeRoute{direct, tunnelRoute("10.13.3.0/24", "203.0.113.6"), tunnelRoute("fd00:13:3::/64", "203.0.113.6")},
		entriesOf("203.0.113.6", true, true))
	if f.recreated != 1 {
		t.Errorf("device made again %d times, want 1", f.recreated)
	}

	if err := ta.client.CoreV1().Nodes().Delete(context.Background(), "node-far", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	ta.settle(t)
	wantTunnel(t, f, "after node-far went", nil, []nodeRoute{direct})
	if v, p := gaugeValue(m.nodeRoutes.WithLabelValues("vxlan")), gaugeValue(m.tunnelPeers); v != 0 || p != 0 {
		t.Errorf("metrics after node-far went: vxlan %v peers %v", v, p)
	}
}

// vxlan mode tunnels to the LAN node too; direct mode leaves the far node
// unreachable, counted; at start in direct mode a device an earlier run
// left goes.
func TestRoutingModes(t *testing.T) {
	nodes := func() []*corev1.Node {
		return []*corev1.Node{
			nodeWithCIDRs(localNode, "192.0.2.10", "10.13.0.0/24"),
			nodeWithCIDRs("node-b", "192.0.2.11", "10.13.1.0/24"),
			nodeWithCIDRs("node-far", "203.0.113.5", "10.13.3.0/24"),
		}
	}
	f := lan()
	objs := nodes()
	newTestAgentWith(t, newFakeMaps(), withRouting(f, RoutingVXLAN), objs[0], objs[1], objs[2])
	wantTunnel(t, f, "vxlan mode", &tunnelSpec{Local: netip.MustParseAddr("192.0.2.10"), Port: 8472, MTU: 1450},
		[]nodeRoute{tunnelRoute("10.13.1.0/24", "192.0.2.11"), tunnelRoute("10.13.3.0/24", "203.0.113.5")},
		entriesOf("192.0.2.11", true, false), entriesOf("203.0.113.5", true, false))

	// The same table, the agent restarted in direct mode: the tunnel and
	// its routes go, the LAN node is routed directly.
	objs = nodes()
	ta := newTestAgentWith(t, newFakeMaps(), withRouting(f, RoutingDirect), objs[0], objs[1], objs[2])
	wantTunnel(t, f, "direct mode", nil, []nodeRoute{route("10.13.1.0/24", "192.0.2.11", 2)})
	if miss := gaugeValue(ta.metrics.noRoute); miss != 1 {
		t.Errorf("missing %v, want 1", miss)
	}
	if why := ta.routes.missing[netip.MustParsePrefix("10.13.3.0/24")]; why == "" {
		t.Error("no reason for node-far")
	}
}

func TestPlanTunnelEdges(t *testing.T) {
	connected := []connectedNet{{Prefix: netip.MustParsePrefix("2001:db8::/64"), Addr: netip.MustParseAddr("2001:db8::10"), LinkIndex: 2, MTU: 1500}}
	peers := []peerNode{
		{name: "a", cidrs: prefixes("10.13.1.0/24", "fd00:13:1::/64"), addrs: []netip.Addr{netip.MustParseAddr("2001:db8:1::5")}},
		{name: "b", cidrs: prefixes("fd00:13:2::/64"), addrs: []netip.Addr{netip.MustParseAddr("192.0.2.5")}},
	}
	// An IPv6-only underlay: IPv6 pod CIDRs through it, 70 bytes less;
	// an IPv4 pod CIDR has no next hop; a peer with only an IPv4
	// InternalIP has no tunnel end.
	p := planRoutes(peers, connected, selfNode{internal: []netip.Addr{netip.MustParseAddr("2001:db8::10")}}, RoutingAuto)
	if got := sortedRoutes(p.want); !slices.Equal(got, []nodeRoute{{Dst: netip.MustParsePrefix("fd00:13:1::/64"), Via: tunnelLinkLocal(tunnelMAC(netip.MustParseAddr("2001:db8:1::5"))), LinkIndex: tunnelLink}}) {
		t.Errorf("routes %v", got)
	}
	if p.tunnel.MTU != 1430 {
		t.Errorf("MTU %d over IPv6", p.tunnel.MTU)
	}
	for _, dst := range []string{"10.13.1.0/24", "fd00:13:2::/64"} {
		if p.missing[netip.MustParsePrefix(dst)] == "" {
			t.Errorf("%s: no reason", dst)
		}
	}
	// No InternalIP, or one on no link: no tunnel, every tunnelled CIDR
	// missing, and no device.
	for _, self := range []selfNode{{}, {internal: []netip.Addr{netip.MustParseAddr("2001:db8:9::1")}}} {
		p := planRoutes(peers, connected, self, RoutingVXLAN)
		if len(p.want) != 0 || len(p.entries) != 0 || len(p.missing) != 3 {
			t.Errorf("self %v: want %v entries %v missing %v", self.internal, p.want, p.entries, p.missing)
		}
	}
}

// The CNI config carries the pods' MTU: the uplink's less the VXLAN
// overhead in auto mode, the uplink's in direct mode; a template's own
// "mtu" wins.
func TestCNIConfMTU(t *testing.T) {
	mtuOf := func(t *testing.T, dir string) any {
		t.Helper()
		raw, err := os.ReadFile(filepath.Join(dir, "10-idcni.conflist"))
		if err != nil {
			t.Fatal(err)
		}
		var c struct {
			Plugins []map[string]any `json:"plugins"`
		}
		if err := json.Unmarshal(raw, &c); err != nil {
			t.Fatal(err)
		}
		return c.Plugins[0]["mtu"]
	}
	for _, c := range []struct {
		mode RoutingMode
		want float64
	}{{RoutingAuto, 1450}, {RoutingVXLAN, 1450}, {RoutingDirect, 1500}} {
		dir := t.TempDir()
		ta := newTestAgentWith(t, newFakeMaps(), setups(withConfDir(dir), withRouting(lan(), c.mode)), nodeWithCIDRs(localNode, "192.0.2.10", "10.13.0.0/24"))
		ta.startCNIConf(t)
		if got := mtuOf(t, dir); got != c.want {
			t.Errorf("%s: mtu %v, want %v", c.mode, got, c.want)
		}
	}
	// This node's InternalIP on no link: the template's (none).
	dir := t.TempDir()
	ta := newTestAgentWith(t, newFakeMaps(), setups(withConfDir(dir), withRouting(lan(), RoutingAuto)), nodeWithCIDRs(localNode, "203.0.113.1", "10.13.0.0/24"))
	ta.startCNIConf(t)
	if got := mtuOf(t, dir); got != nil {
		t.Errorf("InternalIP on no link: mtu %v", got)
	}
	// A template with "mtu" keeps it.
	dir = t.TempDir()
	ta = newTestAgentWith(t, newFakeMaps(), setups(withConfDir(dir), withRouting(lan(), RoutingAuto)), nodeWithCIDRs(localNode, "192.0.2.10", "10.13.0.0/24"))
	ta.cfg.CNIConf = []byte(`{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"idcni","mtu":1400,"ipam":{"type":"host-local"}}]}`)
	ta.startCNIConf(t)
	if got := mtuOf(t, dir); got != float64(1400) {
		t.Errorf("template's mtu: %v", got)
	}
}

func gaugeValue(g prometheus.Gauge) float64 {
	var m dto.Metric
	if err := g.Write(&m); err != nil {
		panic(err)
	}
	return m.GetGauge().GetValue()
}

func setups(fs ...func(*Agent)) func(*Agent) {
	return func(a *Agent) {
		for _, f := range fs {
			f(a)
		}
	}
}
