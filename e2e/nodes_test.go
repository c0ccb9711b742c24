package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	current "github.com/containernetworking/cni/pkg/types/100"
	cns "github.com/containernetworking/plugins/pkg/ns"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	agentapi "github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/e2e/internal/cnitest"
	"github.com/idcni/idcni/e2e/internal/kube"
)

// Issue 12, several nodes: IPAM from the Node's spec.podCIDRs, and routes
// to the other nodes' pod CIDRs. Each agent runs in a network namespace
// standing in for its node (nodeNetns, with a proxy to the apiserver), so
// the routes it makes are that namespace's and go with it.

// nodeAgent is an agent running in a node netns with the built-in
// conflist template, as the DaemonSet runs it.
type nodeAgent struct {
	*agentProc
	ns      *nodeNetns
	conf    string // the conflist it writes
	bpfRoot string
}

func startNodeAgent(t *testing.T, c *kube.Cluster, n *nodeNetns, node string, ready bool, extra ...string) *nodeAgent {
	t.Helper()
	dir := t.TempDir()
	bpfRoot := "/sys/fs/bpf/idcni-test-" + cnitest.RandHex(8)
	t.Cleanup(func() {
		if err := bpf.Unpin(bpfRoot); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	a := &nodeAgent{ns: n, conf: filepath.Join(dir, "net.d", "10-idcni.conflist"), bpfRoot: bpfRoot}
	a.agentProc = &agentProc{t: t, bin: "nsenter", log: filepath.Join(dir, "agent.log"), socket: filepath.Join(dir, "agent.sock"), args: []string{
		"--net=" + n.path, "--", buildAgent(t),
		"--kubeconfig", c.Kubeconfig, "--node-name", node, "--bpf-root", bpfRoot, "--state", filepath.Join(dir, "state.db"),
		"--socket", filepath.Join(dir, "agent.sock"), "--metrics-addr", "", "--cni-conf-dir", filepath.Join(dir, "net.d"),
	}}
	a.args = append(a.args, extra...)
	// Registered before the agent starts: cleanups run last first, so the
	// agent stops before its pins go.
	t.Cleanup(a.stop)
	if ready {
		a.start()
	} else {
		a.startAnswering()
	}
	return a
}

// ranges returns the subnets host-local hands out under the agent's
// conflist, one entry per range set; ok is false while there is no file.
func (a *nodeAgent) ranges(t *testing.T) (out []string, ok bool) {
	t.Helper()
	raw, err := os.ReadFile(a.conf)
	if os.IsNotExist(err) {
		return nil, false
	}
	if err != nil {
		t.Fatal(err)
	}
	var conf struct {
		Plugins []struct {
			Type string `json:"type"`
			IPAM struct {
				Ranges [][]struct {
					Subnet string `json:"subnet"`
				} `json:"ranges"`
			} `json:"ipam"`
		} `json:"plugins"`
	}
	if err := json.Unmarshal(raw, &conf); err != nil {
		// Caught between the truncation and the write.
		return nil, false
	}
	for _, p := range conf.Plugins {
		if p.Type != "idcni" {
			continue
		}
		for _, set := range p.IPAM.Ranges {
			var subs []string
			for _, r := range set {
				subs = append(subs, r.Subnet)
			}
			out = append(out, strings.Join(subs, ","))
		}
	}
	return out, true
}

func (a *nodeAgent) waitRanges(t *testing.T, what string, want ...string) {
	t.Helper()
	var got []string
	deadline := time.Now().Add(30 * time.Second)
	for {
		var ok bool
		got, ok = a.ranges(t)
		if ok && slices.Equal(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: the conflist hands out %v (file there: %v), want %v", what, got, ok, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func createNode(t *testing.T, c *kube.Cluster, name, internalIP string, podCIDRs ...string) {
	t.Helper()
	n := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec:       corev1.NodeSpec{PodCIDRs: podCIDRs},
		Status:     corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: internalIP}}},
	}
	if len(podCIDRs) > 0 {
		n.Spec.PodCIDR = podCIDRs[0]
	}
	if _, err := c.Client.CoreV1().Nodes().Create(context.Background(), n, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create Node %s: %v", name, err)
	}
}

// Issue 12's defect: every node handed out 10.13.0.0/24, the range fixed in
// the shipped conflist, so two nodes gave their pods the same addresses.
// Each agent must write its own Node's ranges. On 45c6ced (its binaries
// through IDCNI_E2E_BIN): "node A's conflist hands out [10.13.0.0/24],
// want its Node's [10.13.1.0/24]; node B's hands out [10.13.0.0/24], want
// [10.13.2.0/24 fd00:13:2::/64]".
func TestNodesHandOutTheirOwnPodCIDRs(t *testing.T) {
	cnitest.RequireRoot(t)
	c := kube.Start(t, kube.Options{})
	api := strings.TrimPrefix(c.URL, "https://")
	nameA, nameB := "node-a-"+cnitest.RandHex(6), "node-b-"+cnitest.RandHex(6)
	createNode(t, c, nameA, "192.0.2.21", "10.13.1.0/24")
	createNode(t, c, nameB, "192.0.2.22", "10.13.2.0/24", "fd00:13:2::/64")
	a := startNodeAgent(t, c, newNodeNetns(t, api), nameA, false)
	b := startNodeAgent(t, c, newNodeNetns(t, api), nameB, false)
	wantA, wantB := []string{"10.13.1.0/24"}, []string{"10.13.2.0/24", "fd00:13:2::/64"}
	var gotA, gotB []string
	deadline := time.Now().Add(30 * time.Second)
	for {
		gotA, _ = a.ranges(t)
		gotB, _ = b.ranges(t)
		if slices.Equal(gotA, wantA) && slices.Equal(gotB, wantB) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("node A's conflist hands out %v, want its Node's %v; node B's hands out %v, want %v", gotA, wantA, gotB, wantB)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// lanNode is a netns standing in for another node on this node's LAN.
type lanNode struct {
	name string
}

// newLANNode plugs a netns into the bridge br in node n's netns, with addr
// on the LAN and podAddr (an address of its pod CIDR) on its lo, so that a
// ping from n to podAddr is answered only through a route to the pod CIDR.
func newLANNode(t *testing.T, n *nodeNetns, br string, addr netip.Prefix, podAddr netip.Addr) *lanNode {
	t.Helper()
	l := &lanNode{name: "idcn-lan-" + cnitest.RandHex(8)}
	run(t, "ip", "netns", "add", l.name)
	t.Cleanup(func() { runQuiet("ip", "netns", "del", l.name) })
	peer := "idl" + cnitest.RandHex(6)
	run(t, "ip", "-n", n.name, "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", l.name)
	run(t, "ip", "-n", n.name, "link", "set", peer, "master", br, "up")
	in := func(args ...string) { run(t, "ip", append([]string{"-n", l.name}, args...)...) }
	in("link", "set", "lo", "up")
	in("addr", "add", podAddr.String()+"/32", "dev", "lo")
	in("addr", "add", addr.String(), "dev", "eth0")
	in("link", "set", "eth0", "up")
	return l
}

// nodeRoutes are the routes of idcni's protocol in a netns, as
// "dst via gw dev dev".
func nodeRoutes(t *testing.T, netns string) []string {
	t.Helper()
	var out []string
	for _, fam := range []string{"-4", "-6"} {
		b, err := exec.Command("ip", fam, "-j", "-n", netns, "route", "show", "proto", "157").Output()
		if err != nil {
			t.Fatalf("ip route show in %s: %v", netns, err)
		}
		var rs []struct {
			Dst, Gateway, Dev string
		}
		if err := json.Unmarshal(b, &rs); err != nil {
			t.Fatalf("ip route show in %s: %v: %s", netns, err, b)
		}
		for _, r := range rs {
			out = append(out, fmt.Sprintf("%s via %s dev %s", r.Dst, r.Gateway, r.Dev))
		}
	}
	slices.Sort(out)
	return out
}

func waitRoutes(t *testing.T, netns, what string, want ...string) {
	t.Helper()
	slices.Sort(want)
	var got []string
	deadline := time.Now().Add(20 * time.Second)
	for {
		got = nodeRoutes(t, netns)
		if slices.Equal(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: routes of protocol 157 in the node netns:\n  %s\nwant:\n  %s", what, strings.Join(got, "\n  "), strings.Join(want, "\n  "))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// pingFrom reports whether dst answers a ping from netns.
func pingFrom(netns string, dst netip.Addr) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return exec.CommandContext(ctx, "ip", "netns", "exec", netns, "ping", "-n", "-c", "1", "-W", "1", dst.String()).Run() == nil
}

// routeShow is `ip route show exact dst` in netns, all protocols.
func routeShow(t *testing.T, netns string, dst netip.Prefix) string {
	t.Helper()
	b, err := exec.Command("ip", "-n", netns, "route", "show", "exact", dst.String()).CombinedOutput()
	if err != nil {
		t.Fatalf("ip route show: %v: %s", err, b)
	}
	return strings.TrimSpace(string(b))
}

// A node whose Node has no pod CIDR gets no CNI config and a NoPodCIDR
// Event, and is not ready, until the pod CIDR comes; meanwhile, and after,
// the agent routes the other nodes' pod CIDRs through their InternalIPs on
// the node's LAN, follows an InternalIP that changes and a Node that goes,
// routes nothing to a node off the LAN (--routing-mode=direct: the tunnel
// is TestNodesVXLAN's), removes its own stale routes at start and leaves
// the administrator's alone.
func TestNodePodCIDRAndRoutes(t *testing.T) {
	cnitest.RequireRoot(t)
	c := kube.Start(t, kube.Options{})
	n := newNodeNetns(t, strings.TrimPrefix(c.URL, "https://"))
	lan := cnitest.PickSubnet(t, 28)
	at := func(i int) netip.Addr {
		a := lan.Addr()
		for range i {
			a = a.Next()
		}
		return a
	}
	br := "idbr" + cnitest.RandHex(6)
	run(t, "ip", "-n", n.name, "link", "add", br, "type", "bridge")
	run(t, "ip", "-n", n.name, "addr", "add", netip.PrefixFrom(at(1), lan.Bits()).String(), "dev", br)
	run(t, "ip", "-n", n.name, "link", "set", br, "up")

	podA, podB, podC, podFar := cnitest.PickSubnet(t, 24), cnitest.PickSubnet(t, 24), cnitest.PickSubnet(t, 24), cnitest.PickSubnet(t, 24)
	stale, foreign := cnitest.PickSubnet(t, 24), cnitest.PickSubnet(t, 24)
	// What an earlier run left, and the administrator's own route.
	run(t, "ip", "-n", n.name, "route", "add", stale.String(), "via", at(9).String(), "proto", "157")
	run(t, "ip", "-n", n.name, "route", "add", foreign.String(), "via", at(10).String(), "proto", "static")

	b := newLANNode(t, n, br, netip.PrefixFrom(at(2), lan.Bits()), podB.Addr().Next())
	newLANNode(t, n, br, netip.PrefixFrom(at(3), lan.Bits()), podC.Addr().Next())

	self, nameB, nameC, nameFar := "node-"+cnitest.RandHex(6), "node-b-"+cnitest.RandHex(6), "node-c-"+cnitest.RandHex(6), "node-far-"+cnitest.RandHex(6)
	createNode(t, c, self, at(1).String())
	createNode(t, c, nameB, at(2).String(), podB.String())
	createNode(t, c, nameC, at(3).String(), podC.String())
	createNode(t, c, nameFar, "192.0.2.99", podFar.String())

	a := startNodeAgent(t, c, n, self, false, "--routing-mode=direct")
	ctx := context.Background()

	// No pod CIDR: no config, an Event, not ready.
	waitFor(t, 20*time.Second, "a NoPodCIDR Event on the Node", func() bool {
		evs, err := c.Client.CoreV1().Events("default").List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + self})
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range evs.Items {
			if e.Reason == "NoPodCIDR" && e.Type == corev1.EventTypeWarning && strings.Contains(e.Message, "--pod-cidr") {
				return true
			}
		}
		return false
	})
	lb, _ := os.ReadFile(a.log)
	if !strings.Contains(string(lb), "has no pod CIDR") {
		t.Errorf("agent log does not say the node has no pod CIDR:\n%s", lb)
	}
	if _, ok := a.ranges(t); ok {
		t.Fatal("CNI config written for a Node with no pod CIDR")
	}
	if runningAgent(a.socket) {
		t.Fatal("agent ready with no pod CIDR")
	}

	// The routes do not wait for this node's pod CIDR.
	viaB := fmt.Sprintf("%s via %s dev %s", podB, at(2), br)
	viaC := fmt.Sprintf("%s via %s dev %s", podC, at(3), br)
	waitRoutes(t, n.name, "at start", viaB, viaC)
	if got := routeShow(t, n.name, foreign); !strings.Contains(got, "proto static") {
		t.Errorf("the administrator's route to %s: %q", foreign, got)
	}
	if !pingFrom(n.name, podB.Addr().Next()) {
		t.Errorf("ping from the node to %s in node B's pod CIDR not answered", podB.Addr().Next())
	}
	waitFor(t, 10*time.Second, "the agent logs the node it cannot route to", func() bool {
		lb, _ := os.ReadFile(a.log)
		return strings.Contains(string(lb), "no route: node "+nameFar+"'s InternalIP is not on a connected subnet and --routing-mode is direct")
	})

	// The pod CIDR comes: the config holds it, the agent is ready.
	node, err := c.Client.CoreV1().Nodes().Get(ctx, self, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	node.Spec.PodCIDR, node.Spec.PodCIDRs = podA.String(), []string{podA.String()}
	if _, err := c.Client.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	a.waitRanges(t, "after the Node got its pod CIDR", podA.String())
	waitFor(t, 10*time.Second, "the agent is ready", func() bool { return runningAgent(a.socket) })

	// Node B moves to another address on the LAN.
	// (The old address first: deleting a primary address takes its
	// secondaries with it.)
	run(t, "ip", "-n", b.name, "addr", "del", netip.PrefixFrom(at(2), lan.Bits()).String(), "dev", "eth0")
	run(t, "ip", "-n", b.name, "addr", "add", netip.PrefixFrom(at(4), lan.Bits()).String(), "dev", "eth0")
	nb, err := c.Client.CoreV1().Nodes().Get(ctx, nameB, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	nb.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: at(4).String()}}
	if _, err := c.Client.CoreV1().Nodes().UpdateStatus(ctx, nb, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	viaB = fmt.Sprintf("%s via %s dev %s", podB, at(4), br)
	waitRoutes(t, n.name, "after node B's InternalIP changed", viaB, viaC)
	if !pingFrom(n.name, podB.Addr().Next()) {
		t.Errorf("ping to %s in node B's pod CIDR not answered after its InternalIP changed", podB.Addr().Next())
	}

	// Node C goes.
	if err := c.Client.CoreV1().Nodes().Delete(ctx, nameC, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitRoutes(t, n.name, "after Node C was deleted", viaB)

	// Stopping the agent leaves the routes (pods keep their paths), and
	// never the administrator's.
	a.stop()
	if got := routeShow(t, n.name, foreign); !strings.Contains(got, "proto static") {
		t.Errorf("the administrator's route to %s after the agent stopped: %q", foreign, got)
	}
	waitRoutes(t, n.name, "after the agent stopped", viaB)

	// --uninstall takes the agent's routes too, and only those.
	out, err := exec.Command("nsenter", "--net="+n.path, "--", buildAgent(t), "--uninstall", "--force",
		"--cni-conf-dir", filepath.Dir(a.conf), "--bpf-root", a.bpfRoot).CombinedOutput()
	if err != nil {
		t.Fatalf("idcni-agent --uninstall: %v\n%s", err, out)
	}
	waitRoutes(t, n.name, "after --uninstall")
	if got := routeShow(t, n.name, foreign); !strings.Contains(got, "proto static") {
		t.Errorf("the administrator's route to %s after --uninstall: %q", foreign, got)
	}
	if _, ok := a.ranges(t); ok {
		t.Error("--uninstall left the CNI config")
	}
}

func runningAgent(socket string) bool {
	return agentapi.NewClient(socket).Running(context.Background())
}

// routedNode is a node netns behind a router netns: its uplink up0 is on a
// /29 of its own, whose first address is the router's, and it reaches the
// other routed nodes' subnets only through the router, which routes no pod
// CIDR: pod traffic between them gets across only encapsulated.
type routedNode struct {
	*nodeNetns
	sub  netip.Prefix
	addr netip.Addr // its InternalIP
}

// router is a netns forwarding between routed nodes, with an nftables
// counter of the VXLAN datagrams it forwards.
type router struct {
	name  string
	nodes []*routedNode
}

func newRouter(t *testing.T) *router {
	t.Helper()
	r := &router{name: "idcn-rt-" + cnitest.RandHex(8)}
	run(t, "ip", "netns", "add", r.name)
	t.Cleanup(func() { runQuiet("ip", "netns", "del", r.name) })
	run(t, "ip", "-n", r.name, "link", "set", "lo", "up")
	run(t, "ip", "netns", "exec", r.name, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	run(t, "ip", "netns", "exec", r.name, "nft", "add table ip idcnt; add chain ip idcnt cnt { type filter hook forward priority 0; }; add rule ip idcnt cnt udp dport 8472 counter")
	return r
}

// vxlanPackets is how many VXLAN datagrams (UDP 8472) the router forwarded.
func (r *router) vxlanPackets(t *testing.T) int {
	t.Helper()
	b, err := exec.Command("ip", "netns", "exec", r.name, "nft", "-j", "list", "chain", "ip", "idcnt", "cnt").Output()
	if err != nil {
		t.Fatalf("nft list: %v", err)
	}
	var out struct {
		Nftables []struct {
			Rule *struct {
				Expr []struct {
					Counter *struct{ Packets int } `json:"counter"`
				} `json:"expr"`
			} `json:"rule"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatalf("nft list: %v: %s", err, b)
	}
	for _, o := range out.Nftables {
		if o.Rule == nil {
			continue
		}
		for _, e := range o.Rule.Expr {
			if e.Counter != nil {
				return e.Counter.Packets
			}
		}
	}
	t.Fatalf("no counter in %s", b)
	return 0
}

// addNode plugs a new node netns into the router on a /29 of its own.
func (r *router) addNode(t *testing.T, apiAddr string) *routedNode {
	t.Helper()
	n := &routedNode{nodeNetns: newNodeNetns(t, apiAddr), sub: cnitest.PickSubnet(t, 29)}
	gw := n.sub.Addr().Next()
	n.addr = gw.Next()
	rif := "idrt" + cnitest.RandHex(6)
	run(t, "ip", "-n", n.name, "link", "add", "up0", "type", "veth", "peer", "name", rif, "netns", r.name)
	run(t, "ip", "-n", r.name, "addr", "add", netip.PrefixFrom(gw, n.sub.Bits()).String(), "dev", rif)
	run(t, "ip", "-n", r.name, "link", "set", rif, "up")
	run(t, "ip", "-n", n.name, "addr", "add", netip.PrefixFrom(n.addr, n.sub.Bits()).String(), "dev", "up0")
	run(t, "ip", "-n", n.name, "link", "set", "up0", "up")
	for _, o := range r.nodes {
		run(t, "ip", "-n", n.name, "route", "add", o.sub.String(), "via", gw.String())
		run(t, "ip", "-n", o.name, "route", "add", n.sub.String(), "via", o.sub.Addr().Next().String())
	}
	r.nodes = append(r.nodes, n)
	return n
}

// tunnelMAC is the vxlan device MAC of the node with IPv4 InternalIP a,
// as the agent derives it (agent/tunnel.go), and tunnelLL the IPv6 next
// hop EUI-64 makes of it.
func tunnelMAC(a netip.Addr) string {
	b := a.As4()
	return fmt.Sprintf("0e:69:%02x:%02x:%02x:%02x", b[0], b[1], b[2], b[3])
}

func tunnelLL(a netip.Addr) string {
	b := a.As4()
	return netip.AddrFrom16([16]byte{0xfe, 0x80, 8: 0x0c, 9: 0x69, 10: b[0], 11: 0xff, 12: 0xfe, 13: b[1], 14: b[2], 15: b[3]}).String()
}

// tunnelState is the vxlan device's permanent neighbours and FDB entries
// in netns, as "neigh IP MAC" and "fdb MAC IP"; nil without the device.
func tunnelState(t *testing.T, netns string) []string {
	t.Helper()
	if exec.Command("ip", "-n", netns, "link", "show", "idcni_vxlan").Run() != nil {
		return nil
	}
	out := []string{}
	b, err := exec.Command("ip", "-j", "-n", netns, "neigh", "show", "dev", "idcni_vxlan", "nud", "permanent").Output()
	if err != nil {
		t.Fatalf("ip neigh: %v", err)
	}
	var ns []struct{ Dst, Lladdr string }
	if err := json.Unmarshal(b, &ns); err != nil {
		t.Fatalf("ip neigh: %v: %s", err, b)
	}
	for _, n := range ns {
		out = append(out, "neigh "+n.Dst+" "+n.Lladdr)
	}
	b, err = exec.Command("bridge", "-j", "-n", netns, "fdb", "show", "dev", "idcni_vxlan").Output()
	if err != nil {
		t.Fatalf("bridge fdb: %v", err)
	}
	var fs []struct {
		Mac, Dst string
		State    string
	}
	if err := json.Unmarshal(b, &fs); err != nil {
		t.Fatalf("bridge fdb: %v: %s", err, b)
	}
	for _, f := range fs {
		if f.Dst != "" {
			out = append(out, "fdb "+f.Mac+" "+f.Dst)
		}
	}
	slices.Sort(out)
	return out
}

func peerEntries(peers ...netip.Addr) []string {
	var out []string
	for _, p := range peers {
		out = append(out, "neigh "+p.String()+" "+tunnelMAC(p), "neigh "+tunnelLL(p)+" "+tunnelMAC(p), "fdb "+tunnelMAC(p)+" "+p.String())
	}
	slices.Sort(out)
	return out
}

func waitTunnel(t *testing.T, netns, what string, want []string) {
	t.Helper()
	var got []string
	deadline := time.Now().Add(20 * time.Second)
	for {
		got = tunnelState(t, netns)
		if slices.Equal(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: idcni_vxlan's entries in %s:\n  %s\nwant:\n  %s", what, netns, strings.Join(got, "\n  "), strings.Join(want, "\n  "))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// nodePod is a pod of a node netns: the plugin run there, under the
// conflist its agent wrote (ranges, mtu, socket), with its Pod object.
type nodePod struct {
	*kpod
	ip6 netip.Addr
}

func newNodePod(t *testing.T, c *kube.Cluster, env *cnitest.Env, a *nodeAgent, node, ns, name string, labels map[string]string) *nodePod {
	t.Helper()
	ctx := context.Background()
	_, err := c.Client.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels},
		Spec:       corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "c", Image: "idcni/test:none"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(a.conf)
	if err != nil {
		t.Fatal(err)
	}
	var conf map[string]any
	if err := json.Unmarshal(raw, &conf); err != nil {
		t.Fatal(err)
	}
	// The plugin's records and host-local's reservations in the agent's
	// test directory (one per node), not the host's.
	dir := filepath.Dir(filepath.Dir(a.conf))
	for _, p := range conf["plugins"].([]any) {
		pm := p.(map[string]any)
		if pm["type"] == "idcni" {
			pm["dataDir"] = filepath.Join(dir, "records")
			pm["ipam"].(map[string]any)["dataDir"] = filepath.Join(dir, "ipam")
		}
	}
	raw, _ = json.Marshal(conf)
	list, err := libcni.ConfListFromBytes(raw)
	if err != nil {
		t.Fatal(err)
	}
	p := &nodePod{kpod: &kpod{Pod: env.NewPod(t), ns: ns, name: name}}
	p.Args = [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", ns}, {"K8S_POD_NAME", name}}
	var res *current.Result
	err = cns.WithNetNSPath(a.ns.path, func(cns.NetNS) error {
		var err error
		res, err = env.AddWith(list, p.Pod)
		return err
	})
	if err != nil {
		t.Fatalf("ADD of pod %s on %s: %v", name, node, err)
	}
	t.Cleanup(func() { _ = cns.WithNetNSPath(a.ns.path, func(cns.NetNS) error { return env.DelWith(list, p.Pod) }) })
	pod, err := c.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, ipc := range res.IPs {
		ip, _ := netip.AddrFromSlice(ipc.Address.IP)
		ip = ip.Unmap()
		if ip.Is4() {
			p.ip = ip
		} else {
			p.ip6 = ip
		}
		pod.Status.PodIPs = append(pod.Status.PodIPs, corev1.PodIP{IP: ip.String()})
	}
	pod.Status.PodIP, pod.Status.Phase = pod.Status.PodIPs[0].IP, corev1.PodRunning
	if _, err := c.Client.CoreV1().Pods(ns).UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	return p
}

// pingDF sends one echo request of size bytes of payload with DF set and
// returns ping's output and whether it was answered.
func (p *nodePod) pingDF(dst netip.Addr, size int) (bool, string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := p.Exec(ctx, "ping", "-n", "-c", "1", "-W", "2", "-M", "do", "-s", fmt.Sprint(size), dst.String())
	return err == nil, string(out)
}

// Issue 12: nodes that are not on one subnet reach each other's pods
// through the VXLAN tunnel. Nodes A and C sit behind a router that routes
// no pod CIDR; their agents (auto mode) make idcni_vxlan with a route,
// a neighbour and an FDB entry per peer and pod family; pods on A reach
// pods on C over IPv4 and IPv6, the router forwarding UDP 8472 only; the
// pods' MTU is the uplink's less 50, and a DF ping of that size passes
// while one byte more is refused; ingress policy on C applies to tunnelled
// packets; the entries follow C's InternalIP, go with the Node, come back
// with it; --routing-mode=direct leaves C unreachable and takes the
// device away; --uninstall removes it.
func TestNodesVXLAN(t *testing.T) {
	cnitest.RequireRoot(t)
	c := kube.Start(t, kube.Options{})
	api := strings.TrimPrefix(c.URL, "https://")
	rt := newRouter(t)
	na, nc := rt.addNode(t, api), rt.addNode(t, api)
	podA, podC := cnitest.PickSubnet(t, 24), cnitest.PickSubnet(t, 24)
	podA6, podC6 := cnitest.PickSubnet6(t), cnitest.PickSubnet6(t)
	nameA, nameC := "node-a-"+cnitest.RandHex(6), "node-c-"+cnitest.RandHex(6)
	createNode(t, c, nameA, na.addr.String(), podA.String(), podA6.String())
	createNode(t, c, nameC, nc.addr.String(), podC.String(), podC6.String())
	// Metrics on the node netns' own loopback.
	a := startNodeAgent(t, c, na.nodeNetns, nameA, true, "--metrics-addr=127.0.0.1:9965")
	ac := startNodeAgent(t, c, nc.nodeNetns, nameC, true)

	viaC := func(addr netip.Addr) []string {
		return []string{fmt.Sprintf("%s via %s dev idcni_vxlan", podC, addr), fmt.Sprintf("%s via %s dev idcni_vxlan", podC6, tunnelLL(addr))}
	}
	waitRoutes(t, na.name, "A's routes to C", viaC(nc.addr)...)
	waitRoutes(t, nc.name, "C's routes to A", fmt.Sprintf("%s via %s dev idcni_vxlan", podA, na.addr), fmt.Sprintf("%s via %s dev idcni_vxlan", podA6, tunnelLL(na.addr)))
	waitTunnel(t, na.name, "A's tunnel entries", peerEntries(nc.addr))
	if got := ipOut(t, "-n", na.name, "-d", "link", "show", "idcni_vxlan"); !strings.Contains(got, "vxlan id 157") || !strings.Contains(got, "local "+na.addr.String()) ||
		!strings.Contains(got, "dstport 8472") || !strings.Contains(got, "nolearning") || !strings.Contains(got, "mtu 1450") || !strings.Contains(got, tunnelMAC(na.addr)) {
		t.Errorf("A's idcni_vxlan:\n%s", got)
	}
	if got := ipOut(t, "-n", na.name, "route", "show", podC.String()); !strings.Contains(got, "onlink") || !strings.Contains(got, "proto 157") {
		t.Errorf("A's route to %s: %s", podC, got)
	}

	waitFor(t, 10*time.Second, "A's metrics count the tunnelled routes", func() bool {
		m := nodeMetrics(t, na.name)
		return strings.Contains(m, `idcni_node_routes{via="vxlan"} 2`) && strings.Contains(m, `idcni_node_routes{via="direct"} 0`) &&
			strings.Contains(m, "idcni_tunnel_peers 1") && strings.Contains(m, "idcni_node_routes_missing 0")
	})
	// A Node change that moves nothing changes nothing: the routes read
	// back equal to what the agent wants (onlink included), no churn.
	logLines := func(sub string) int {
		lb, _ := os.ReadFile(a.log)
		return strings.Count(string(lb), sub)
	}
	routesAdded, entriesAdded := logLines("route to another node's pod CIDR"), logLines("VXLAN entry added")
	nodeC, err := c.Client.CoreV1().Nodes().Get(context.Background(), nameC, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	nodeC.Labels = map[string]string{"touched": "yes"}
	if _, err := c.Client.CoreV1().Nodes().Update(context.Background(), nodeC, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	if r, e := logLines("route to another node's pod CIDR"), logLines("VXLAN entry added"); r != routesAdded || e != entriesAdded {
		t.Errorf("a Node label change rewrote %d routes and %d tunnel entries", r-routesAdded, e-entriesAdded)
	}

	// The pods' MTU: 1500 on the uplink, less 50.
	a.waitRanges(t, "A's conflist", podA.String(), podA6.String())
	if raw, _ := os.ReadFile(a.conf); !strings.Contains(string(raw), `"mtu": 1450`) {
		t.Errorf("A's conflist has no mtu 1450:\n%s", raw)
	}

	env := cnitest.New(t, cnitest.Options{})
	c.CreateNamespace(t, "vx", nil)
	a1 := newNodePod(t, c, env, a, nameA, "vx", "a1", map[string]string{"role": "client"})
	a2 := newNodePod(t, c, env, a, nameA, "vx", "a2", map[string]string{"role": "other"})
	c1 := newNodePod(t, c, env, ac, nameC, "vx", "c1", map[string]string{"app": "server"})
	c1.serve(t, 8080)
	before := rt.vxlanPackets(t)
	eventually(t, "a1 -> c1:8080 (TCP) across the tunnel", true, func() bool { return a1.reach(c1.kpod, 8080) })
	if ok, out := a1.Ping(c1.ip, 2); !ok {
		t.Errorf("a1 -> c1 %s ping: %s", c1.ip, out)
	}
	if ok, out := a1.Ping(c1.ip6, 2); !ok {
		t.Errorf("a1 -> c1 %s ping (IPv6 over the IPv4 tunnel): %s", c1.ip6, out)
	}
	after := rt.vxlanPackets(t)
	if after-before < 8 {
		t.Errorf("the router forwarded %d VXLAN datagrams for a TCP exchange and 4 pings", after-before)
	}
	t.Logf("router forwarded %d VXLAN datagrams (UDP 8472)", after-before)

	// The plugin gave the pods the conflist's MTU.
	for _, p := range []*nodePod{a1, c1} {
		if got := ipOut(t, "-n", p.Name, "link", "show", "eth0"); !strings.Contains(got, "mtu 1450 ") {
			t.Errorf("pod %s's eth0: %s", p.name, got)
		}
	}
	// MTU-sized pings with DF pass; one byte more is refused.
	if ok, out := a1.pingDF(c1.ip, 1450-28); !ok {
		t.Errorf("DF ping of 1450 bytes: %s", out)
	}
	if ok, out := a1.pingDF(c1.ip, 1450-28+1); ok || !strings.Contains(out, "message too long") {
		t.Errorf("DF ping of 1451 bytes answered or not refused as too long: %s", out)
	}
	if ok, out := a1.pingDF(c1.ip6, 1450-48); !ok {
		t.Errorf("IPv6 ping of 1450 bytes: %s", out)
	}
	if ok, out := a1.pingDF(c1.ip6, 1450-48+1); ok || !strings.Contains(out, "message too long") {
		t.Errorf("IPv6 ping of 1451 bytes answered or not refused as too long: %s", out)
	}
	// The tunnel itself: from node A's netns (not a pod) a datagram of
	// 1451 bytes does not fit idcni_vxlan.
	if out, err := exec.Command("ip", "netns", "exec", na.name, "ping", "-n", "-c", "1", "-W", "2", "-M", "do", "-s", "1423", c1.ip.String()).CombinedOutput(); err == nil ||
		!strings.Contains(string(out), "message too long") {
		t.Errorf("DF ping of 1451 bytes from node A through the tunnel: %v: %s", err, out)
	}

	// Ingress policy on C applies to tunnelled packets: only role=client.
	_, err = c.Client.NetworkingV1().NetworkPolicies("vx").Create(context.Background(), &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "server-from-client", Namespace: "vx"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "server"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "client"}}}},
			}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "a2 (role=other) -> c1 denied on C", false, func() bool { return a2.reach(c1.kpod, 8080) })
	if !a1.reach(c1.kpod, 8080) {
		t.Error("a1 (role=client) -> c1 denied under the policy that allows it")
	}

	// C's InternalIP changes: both ends follow.
	newC := nc.addr.Next()
	run(t, "ip", "-n", nc.name, "addr", "add", netip.PrefixFrom(newC, nc.sub.Bits()).String(), "dev", "up0")
	setInternalIP(t, c, nameC, newC)
	waitRoutes(t, na.name, "A's routes after C's InternalIP changed", viaC(newC)...)
	waitTunnel(t, na.name, "A's entries after C's InternalIP changed", peerEntries(newC))
	waitFor(t, 20*time.Second, "C's device with its new local address", func() bool {
		// Made again: absent for a moment.
		out, _ := exec.Command("ip", "-n", nc.name, "-d", "link", "show", "idcni_vxlan").Output()
		return strings.Contains(string(out), "local "+newC.String())
	})
	eventually(t, "a1 -> c1 after C's InternalIP changed", true, func() bool { return a1.reach(c1.kpod, 8080) })

	// Node C goes: its route, neighbours and FDB entry go, and the device
	// with them (no other node needs it). It comes back: so do they.
	if err := c.Client.CoreV1().Nodes().Delete(context.Background(), nameC, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitRoutes(t, na.name, "A's routes after Node C was deleted")
	waitTunnel(t, na.name, "A's tunnel after Node C was deleted", nil)
	createNode(t, c, nameC, newC.String(), podC.String(), podC6.String())
	waitRoutes(t, na.name, "A's routes after Node C came back", viaC(newC)...)
	waitTunnel(t, na.name, "A's entries after Node C came back", peerEntries(newC))
	eventually(t, "a1 -> c1 after Node C came back", true, func() bool { return a1.reach(c1.kpod, 8080) })

	// Direct mode: C is unreachable, said so; the device goes.
	a.stop()
	a.args = append(a.args, "--routing-mode=direct")
	a.start()
	waitRoutes(t, na.name, "A's routes in direct mode")
	waitTunnel(t, na.name, "A's tunnel in direct mode", nil)
	waitFor(t, 10*time.Second, "A logs C unreachable in direct mode", func() bool {
		lb, _ := os.ReadFile(a.log)
		return strings.Contains(string(lb), "no route: node "+nameC+"'s InternalIP is not on a connected subnet and --routing-mode is direct")
	})
	if a1.reach(c1.kpod, 8080) {
		t.Error("a1 -> c1 in direct mode: the router routes no pod CIDR, this must fail")
	}
	waitFor(t, 10*time.Second, "A's metrics count C's pod CIDRs missing in direct mode", func() bool {
		m := nodeMetrics(t, na.name)
		return strings.Contains(m, "idcni_node_routes_missing 2") && strings.Contains(m, `idcni_node_routes{via="vxlan"} 0`)
	})

	// Auto again, then --uninstall takes the device.
	a.stop()
	a.args = a.args[:len(a.args)-1]
	a.start()
	waitTunnel(t, na.name, "A's entries in auto mode again", peerEntries(newC))
	a.stop()
	out, err := exec.Command("nsenter", "--net="+na.path, "--", buildAgent(t), "--uninstall", "--force",
		"--cni-conf-dir", filepath.Dir(a.conf), "--bpf-root", a.bpfRoot).CombinedOutput()
	if err != nil {
		t.Fatalf("idcni-agent --uninstall: %v\n%s", err, out)
	}
	if tunnelState(t, na.name) != nil {
		t.Error("--uninstall left idcni_vxlan")
	}
	waitRoutes(t, na.name, "after --uninstall")
}

// nodeMetrics is the metrics page of the agent in netns (listening on
// 127.0.0.1:9965 there).
func nodeMetrics(t *testing.T, netns string) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "exec", netns, "curl", "-sf", "--max-time", "2", "http://127.0.0.1:9965/metrics").Output()
	if err != nil {
		return ""
	}
	return string(out)
}

func setInternalIP(t *testing.T, c *kube.Cluster, name string, addr netip.Addr) {
	t.Helper()
	n, err := c.Client.CoreV1().Nodes().Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: addr.String()}}
	if _, err := c.Client.CoreV1().Nodes().UpdateStatus(context.Background(), n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// --routing-mode=vxlan tunnels even between nodes on one LAN: nodes A and
// B on a bridge, both agents in vxlan mode, route each other's pod CIDRs
// through idcni_vxlan, and a pod on A reaches a pod on B through the
// nodes' idcni_vxlan (their packet counters).
func TestNodesVXLANModeOnLAN(t *testing.T) {
	cnitest.RequireRoot(t)
	c := kube.Start(t, kube.Options{})
	api := strings.TrimPrefix(c.URL, "https://")
	// The router here is a bridge: A and B share its subnet.
	rt := newRouter(t)
	br := "idbr" + cnitest.RandHex(6)
	run(t, "ip", "-n", rt.name, "link", "add", br, "type", "bridge")
	run(t, "ip", "-n", rt.name, "link", "set", br, "up")
	lan := cnitest.PickSubnet(t, 29)
	addrA, addrB := lan.Addr().Next(), lan.Addr().Next().Next()
	var nodes []*nodeNetns
	for _, addr := range []netip.Addr{addrA, addrB} {
		n := newNodeNetns(t, api)
		rif := "idrt" + cnitest.RandHex(6)
		run(t, "ip", "-n", n.name, "link", "add", "up0", "type", "veth", "peer", "name", rif, "netns", rt.name)
		run(t, "ip", "-n", rt.name, "link", "set", rif, "master", br, "up")
		run(t, "ip", "-n", n.name, "addr", "add", netip.PrefixFrom(addr, lan.Bits()).String(), "dev", "up0")
		run(t, "ip", "-n", n.name, "link", "set", "up0", "up")
		nodes = append(nodes, n)
	}
	podA, podB := cnitest.PickSubnet(t, 24), cnitest.PickSubnet(t, 24)
	nameA, nameB := "node-a-"+cnitest.RandHex(6), "node-b-"+cnitest.RandHex(6)
	createNode(t, c, nameA, addrA.String(), podA.String())
	createNode(t, c, nameB, addrB.String(), podB.String())
	a := startNodeAgent(t, c, nodes[0], nameA, true, "--routing-mode=vxlan")
	b := startNodeAgent(t, c, nodes[1], nameB, true, "--routing-mode=vxlan")
	waitRoutes(t, nodes[0].name, "A's route to B", fmt.Sprintf("%s via %s dev idcni_vxlan", podB, addrB))
	waitRoutes(t, nodes[1].name, "B's route to A", fmt.Sprintf("%s via %s dev idcni_vxlan", podA, addrA))

	env := cnitest.New(t, cnitest.Options{})
	c.CreateNamespace(t, "vx", nil)
	pa := newNodePod(t, c, env, a, nameA, "vx", "pa", nil)
	pb := newNodePod(t, c, env, b, nameB, "vx", "pb", nil)
	pb.serve(t, 8080)
	// Packets A's and B's idcni_vxlan sent: encapsulated, onto the
	// bridge, the only way between them.
	count := func() int {
		n := 0
		for _, ns := range []string{nodes[0].name, nodes[1].name} {
			out, err := exec.Command("ip", "-j", "-s", "-n", ns, "link", "show", "idcni_vxlan").Output()
			if err != nil {
				t.Fatalf("ip link show idcni_vxlan in %s: %v", ns, err)
			}
			var ls []struct {
				Stats64 struct {
					Tx struct{ Packets int } `json:"tx"`
				} `json:"stats64"`
			}
			if err := json.Unmarshal(out, &ls); err != nil || len(ls) != 1 {
				t.Fatalf("ip link show idcni_vxlan: %v: %s", err, out)
			}
			n += ls[0].Stats64.Tx.Packets
		}
		return n
	}
	before := count()
	eventually(t, "pa -> pb:8080 through the tunnel on the LAN", true, func() bool { return pa.reach(pb.kpod, 8080) })
	if ok, out := pa.Ping(pb.ip, 2); !ok {
		t.Errorf("pa -> pb ping: %s", out)
	}
	if n := count() - before; n < 6 {
		t.Errorf("the nodes' idcni_vxlan sent %d packets", n)
	} else {
		t.Logf("the nodes' idcni_vxlan sent %d packets", n)
	}
}

// An IPv6 underlay: nodes A and B with only IPv6 InternalIPs, on one LAN,
// in vxlan mode. The device's local address is the IPv6 InternalIP, its
// MAC the hashed one, the pods' MTU 1500 less 70; IPv6 pods reach each
// other through it (DF pings of exactly the MTU pass, one byte more is
// refused), and the IPv4 pod CIDRs, with no IPv4 next hop over IPv6, are
// counted missing.
func TestNodesVXLANOverIPv6(t *testing.T) {
	cnitest.RequireRoot(t)
	c := kube.Start(t, kube.Options{})
	api := strings.TrimPrefix(c.URL, "https://")
	sw := newRouter(t)
	br := "idbr" + cnitest.RandHex(6)
	run(t, "ip", "-n", sw.name, "link", "add", br, "type", "bridge")
	run(t, "ip", "-n", sw.name, "link", "set", br, "up")
	lan := cnitest.PickSubnet6(t)
	addrA, addrB := lan.Addr().Next(), lan.Addr().Next().Next()
	var nodes []*nodeNetns
	for _, addr := range []netip.Addr{addrA, addrB} {
		n := newNodeNetns(t, api)
		rif := "idrt" + cnitest.RandHex(6)
		run(t, "ip", "-n", n.name, "link", "add", "up0", "type", "veth", "peer", "name", rif, "netns", sw.name)
		run(t, "ip", "-n", sw.name, "link", "set", rif, "master", br, "up")
		run(t, "ip", "-n", n.name, "addr", "add", netip.PrefixFrom(addr, 64).String(), "dev", "up0", "nodad")
		run(t, "ip", "-n", n.name, "link", "set", "up0", "up")
		nodes = append(nodes, n)
	}
	podA4, podB4, podA6, podB6 := cnitest.PickSubnet(t, 24), cnitest.PickSubnet(t, 24), cnitest.PickSubnet6(t), cnitest.PickSubnet6(t)
	nameA, nameB := "node-a-"+cnitest.RandHex(6), "node-b-"+cnitest.RandHex(6)
	createNode(t, c, nameA, addrA.String(), podA4.String(), podA6.String())
	createNode(t, c, nameB, addrB.String(), podB4.String(), podB6.String())
	a := startNodeAgent(t, c, nodes[0], nameA, true, "--routing-mode=vxlan")
	b := startNodeAgent(t, c, nodes[1], nameB, true, "--routing-mode=vxlan")
	// The next hop: the link-local address of B's MAC, 16: and five
	// bytes of the SHA-256 of B's InternalIP.
	h := sha256.Sum256(addrB.AsSlice())
	ll := netip.AddrFrom16([16]byte{0xfe, 0x80, 8: 0x16 ^ 0x02, 9: h[0], 10: h[1], 11: 0xff, 12: 0xfe, 13: h[2], 14: h[3], 15: h[4]})
	waitRoutes(t, nodes[0].name, "A's IPv6 route to B through the tunnel", fmt.Sprintf("%s via %s dev idcni_vxlan", podB6, ll))
	if got := ipOut(t, "-n", nodes[0].name, "-d", "link", "show", "idcni_vxlan"); !strings.Contains(got, "local "+addrA.String()) || !strings.Contains(got, "mtu 1430") ||
		!strings.Contains(got, "link/ether 16:") {
		t.Errorf("A's idcni_vxlan over IPv6:\n%s", got)
	}
	if raw, _ := os.ReadFile(a.conf); !strings.Contains(string(raw), `"mtu": 1430`) {
		t.Errorf("A's conflist has no mtu 1430:\n%s", raw)
	}
	waitFor(t, 10*time.Second, "A logs B's IPv4 pod CIDR as missing", func() bool {
		lb, _ := os.ReadFile(a.log)
		return strings.Contains(string(lb), "no IPv4 next hop over this node's IPv6 InternalIP")
	})
	env := cnitest.New(t, cnitest.Options{})
	c.CreateNamespace(t, "vx", nil)
	pa := newNodePod(t, c, env, a, nameA, "vx", "pa", nil)
	pb := newNodePod(t, c, env, b, nameB, "vx", "pb", nil)
	if ok, out := pa.Ping(pb.ip6, 3); !ok {
		t.Fatalf("pa -> pb %s over the IPv6 tunnel: %s", pb.ip6, out)
	}
	if ok, out := pa.pingDF(pb.ip6, 1430-48); !ok {
		t.Errorf("IPv6 ping of 1430 bytes: %s", out)
	}
	if ok, out := pa.pingDF(pb.ip6, 1430-48+1); ok || !strings.Contains(out, "message too long") {
		t.Errorf("IPv6 ping of 1431 bytes answered or not refused as too long: %s", out)
	}
}
