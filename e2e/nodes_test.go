package e2e

import (
	"context"
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

	corev1 "k8s.io/api/core/v1"
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

func startNodeAgent(t *testing.T, c *kube.Cluster, n *nodeNetns, node string, ready bool) *nodeAgent {
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
// routes nothing to a node off the LAN, removes its own stale routes at
// start and leaves the administrator's alone.
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

	a := startNodeAgent(t, c, n, self, false)
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
		return strings.Contains(string(lb), "no route: node "+nameFar+"'s InternalIP is not on a connected subnet; VXLAN is not implemented yet")
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
