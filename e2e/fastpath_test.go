package e2e

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/e2e/internal/cnitest"
	"github.com/idcni/idcni/e2e/internal/kube"
)

// Issue 12's last item: traffic between pods of two nodes skips both
// nodes' IP forwarding and netfilter (from_pod's FIB redirect on the
// sender's node, from_net on the receiver's), routed directly and through
// VXLAN. Nodes A and B and a host O that is no Node share a bridge; the
// proof that the fast path was taken is the nodes' Ip: ForwDatagrams,
// which the forwarding path counts and the fast path never touches.
func TestFastPathAcrossNodes(t *testing.T) {
	cnitest.RequireRoot(t)
	for _, mode := range []string{"direct", "vxlan"} {
		t.Run(mode, func(t *testing.T) { testFastPath(t, mode) })
	}
}

func testFastPath(t *testing.T, mode string) {
	c := kube.Start(t, kube.Options{})
	api := strings.TrimPrefix(c.URL, "https://")
	sw := newRouter(t)
	br := "idbr" + cnitest.RandHex(6)
	run(t, "ip", "-n", sw.name, "link", "add", br, "type", "bridge")
	run(t, "ip", "-n", sw.name, "link", "set", br, "up")
	lan := cnitest.PickSubnet(t, 29)
	addrA := lan.Addr().Next()
	addrB, addrO := addrA.Next(), addrA.Next().Next()
	var nodes []*nodeNetns
	for _, addr := range []netip.Addr{addrA, addrB} {
		n := newNodeNetns(t, api)
		plugInto(t, sw.name, br, n.name, netip.PrefixFrom(addr, lan.Bits()))
		nodes = append(nodes, n)
	}
	// O: outside the cluster, on the same LAN.
	outside := "idcn-out-" + cnitest.RandHex(8)
	run(t, "ip", "netns", "add", outside)
	t.Cleanup(func() { runQuiet("ip", "netns", "del", outside) })
	run(t, "ip", "-n", outside, "link", "set", "lo", "up")
	plugInto(t, sw.name, br, outside, netip.PrefixFrom(addrO, lan.Bits()))
	serveSeen(t, "/run/netns/"+outside, netip.AddrPortFrom(addrO, 9000))

	podA, podB := cnitest.PickSubnet(t, 24), cnitest.PickSubnet(t, 24)
	nameA, nameB := "node-a-"+cnitest.RandHex(6), "node-b-"+cnitest.RandHex(6)
	createNode(t, c, nameA, addrA.String(), podA.String())
	createNode(t, c, nameB, addrB.String(), podB.String())
	a := startNodeAgent(t, c, nodes[0], nameA, true, "--routing-mode="+mode)
	b := startNodeAgent(t, c, nodes[1], nameB, true, "--routing-mode="+mode)
	dev, viaA, viaB := "up0", fmt.Sprintf("%s via %s dev up0", podA, addrA), fmt.Sprintf("%s via %s dev up0", podB, addrB)
	if mode == "vxlan" {
		dev, viaA, viaB = "idcni_vxlan", fmt.Sprintf("%s via %s dev idcni_vxlan", podA, addrA), fmt.Sprintf("%s via %s dev idcni_vxlan", podB, addrB)
	}
	waitRoutes(t, nodes[0].name, "A's route to B", viaB)
	waitRoutes(t, nodes[1].name, "B's route to A", viaA)
	waitFastPath(t, a, dev, podB)
	waitFastPath(t, b, dev, podA)

	env := cnitest.New(t, cnitest.Options{})
	c.CreateNamespace(t, "fp", nil)
	a1 := newNodePod(t, c, env, a, nameA, "fp", "a1", map[string]string{"role": "client"})
	a2 := newNodePod(t, c, env, a, nameA, "fp", "a2", map[string]string{"role": "other"})
	b1 := newNodePod(t, c, env, b, nameB, "fp", "b1", map[string]string{"app": "server"})
	b1.serve(t, 8080)
	eventually(t, "a1 -> b1:8080", true, func() bool { return a1.reach(b1.kpod, 8080) })

	// TCP connections across, both directions of every packet: neither
	// node forwards one of them.
	fA, fB := forwarded(t, nodes[0].name), forwarded(t, nodes[1].name)
	for i := range 5 {
		if !a1.reach(b1.kpod, 8080) {
			t.Fatalf("a1 -> b1:8080, connection %d, failed", i+1)
		}
	}
	if dA, dB := forwarded(t, nodes[0].name)-fA, forwarded(t, nodes[1].name)-fB; dA != 0 || dB != 0 {
		t.Errorf("node A forwarded %d packets, node B %d, of 5 connections between their pods: not the fast path", dA, dB)
	}
	// ICMP both ways. The first echo request of a ping takes the
	// receiving node's stack (from_net starts no flow but with a bare
	// SYN: an unknown packet may be a Service's reply to translate back);
	// its replies and the requests after it do not.
	fA, fB = forwarded(t, nodes[0].name), forwarded(t, nodes[1].name)
	if ok, out := a1.Ping(b1.ip, 3); !ok {
		t.Fatalf("a1 -> b1 ping: %s", out)
	}
	if ok, out := b1.Ping(a1.ip, 3); !ok {
		t.Fatalf("b1 -> a1 ping: %s", out)
	}
	if dA, dB := forwarded(t, nodes[0].name)-fA, forwarded(t, nodes[1].name)-fB; dA != 1 || dB != 1 {
		t.Errorf("of two pings of 3 between their pods, node A forwarded %d packets, node B %d; want the first request each", dA, dB)
	}

	// NetworkPolicy on B holds for what from_net delivers: a2 is refused
	// without B's forwarding (and so to_pod) ever seeing its packets.
	_, err := c.Client.NetworkingV1().NetworkPolicies("fp").Create(context.Background(), &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "server-from-client", Namespace: "fp"},
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
	eventually(t, "a2 (role=other) -> b1 denied on B", false, func() bool { return a2.reach(b1.kpod, 8080) })
	fB = forwarded(t, nodes[1].name)
	if a2.reach(b1.kpod, 8080) {
		t.Error("a2 (role=other) -> b1 allowed under a policy that allows only role=client")
	}
	if !a1.reach(b1.kpod, 8080) {
		t.Error("a1 (role=client) -> b1 denied under the policy that allows it")
	}
	if d := forwarded(t, nodes[1].name) - fB; d != 0 {
		t.Errorf("node B forwarded %d packets while a2 was refused and a1 let in: from_net did not decide them", d)
	}

	// Leaving the cluster is not the fast path's: a1's connection to O
	// goes through A's forwarding and comes out masqueraded.
	fA = forwarded(t, nodes[0].name)
	waitFor(t, 15*time.Second, "O sees a1's connections from node A's address", func() bool {
		got, err := seenFromNS(a1.NSPath, netip.AddrPortFrom(addrO, 9000))
		return err == nil && got == addrA
	})
	if d := forwarded(t, nodes[0].name) - fA; d == 0 {
		t.Error("a1 -> O (outside the cluster) was not forwarded by node A: the fast path took traffic it must leave to the stack")
	}

	if mode == "vxlan" {
		// A DF packet larger than the tunnel's MTU gets the stack's
		// ICMP "fragmentation needed" with the tunnel's MTU: the FIB
		// lookup leaves it to the stack. The pod's link (both ends) is
		// raised to 1500 so the packet leaves the pod at all.
		hostIf := routeDev(t, nodes[0].name, a1.ip)
		run(t, "ip", "-n", nodes[0].name, "link", "set", hostIf, "mtu", "1500")
		run(t, "ip", "-n", a1.Name, "link", "set", "eth0", "mtu", "1500")
		if ok, out := a1.pingDF(b1.ip, 1472); ok || !strings.Contains(out, "mtu = 1450") {
			t.Errorf("DF ping of 1500 bytes into the 1450-byte tunnel: answered, or no fragmentation needed (mtu = 1450) from node A:\n%s", out)
		}
		if ok, out := a1.pingDF(b1.ip, 1422); !ok {
			t.Errorf("DF ping of 1450 bytes after the 1500-byte one: %s", out)
		}
	}

	// --fast-path=false on A: the map empties, from_net comes off, and A
	// forwards the pods' packets again (the counter above can move).
	a.stop()
	a.args = append(a.args, "--fast-path=false")
	a.start()
	waitFor(t, 20*time.Second, "A's fast path off", func() bool {
		cidrs, links := fastPathState(t, a)
		return len(cidrs) == 0 && len(links) == 0
	})
	fA = forwarded(t, nodes[0].name)
	if !a1.reach(b1.kpod, 8080) {
		t.Fatal("a1 -> b1:8080 with A's fast path off")
	}
	if d := forwarded(t, nodes[0].name) - fA; d == 0 {
		t.Error("with --fast-path=false node A forwarded none of a connection's packets")
	}
}

// plugInto connects netns to the bridge br in sw's netns with addr on its
// end, up0.
func plugInto(t *testing.T, sw, br, netns string, addr netip.Prefix) {
	t.Helper()
	rif := "idrt" + cnitest.RandHex(6)
	run(t, "ip", "-n", netns, "link", "add", "up0", "type", "veth", "peer", "name", rif, "netns", sw)
	run(t, "ip", "-n", sw, "link", "set", rif, "master", br, "up")
	run(t, "ip", "-n", netns, "addr", "add", addr.String(), "dev", "up0")
	run(t, "ip", "-n", netns, "link", "set", "up0", "up")
}

// fastPathState is the agent's datapath's remote pod ranges and the
// devices from_net is pinned on.
func fastPathState(t *testing.T, a *nodeAgent) ([]netip.Prefix, []string) {
	t.Helper()
	dp, err := bpf.Open(a.bpfRoot)
	if err != nil {
		return nil, nil
	}
	defer dp.Close()
	cidrs, err := dp.RemoteCIDRs()
	if err != nil {
		t.Fatal(err)
	}
	links, err := dp.NetLinks()
	if err != nil {
		t.Fatal(err)
	}
	return cidrs, links
}

// waitFastPath waits until the agent's datapath holds the peer's pod range
// and from_net is on dev, attached as the kernel says.
func waitFastPath(t *testing.T, a *nodeAgent, dev string, peer netip.Prefix) {
	t.Helper()
	waitFor(t, 20*time.Second, fmt.Sprintf("the fast path to %s on %s", peer, dev), func() bool {
		cidrs, links := fastPathState(t, a)
		if !slices.Equal(cidrs, []netip.Prefix{peer}) || !slices.Equal(links, []string{dev}) {
			return false
		}
		dp, err := bpf.Open(a.bpfRoot)
		if err != nil {
			return false
		}
		defer dp.Close()
		var ok bool
		err = ns.WithNetNSPath(a.ns.path, func(ns.NetNS) error {
			l, err := net.InterfaceByName(dev)
			if err != nil {
				return err
			}
			ok, err = dp.AttachedNetIndex(l.Index)
			return err
		})
		return err == nil && ok
	})
}

// forwarded is netns's Ip: ForwDatagrams, the packets its IP forwarding
// forwarded.
func forwarded(t *testing.T, netns string) int {
	t.Helper()
	out, err := exec.Command("ip", "netns", "exec", netns, "cat", "/proc/net/snmp").Output()
	if err != nil {
		t.Fatalf("read /proc/net/snmp in %s: %v", netns, err)
	}
	var names []string
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 || f[0] != "Ip:" {
			continue
		}
		if names == nil {
			names = f
			continue
		}
		if i := slices.Index(names, "ForwDatagrams"); i > 0 && i < len(f) {
			n, err := strconv.Atoi(f[i])
			if err != nil {
				t.Fatalf("ForwDatagrams in %s: %v", netns, err)
			}
			return n
		}
	}
	t.Fatalf("no Ip: ForwDatagrams in %s's /proc/net/snmp:\n%s", netns, out)
	return 0
}

// routeDev is the device netns routes dst through.
func routeDev(t *testing.T, netns string, dst netip.Addr) string {
	t.Helper()
	f := strings.Fields(ipOut(t, "-n", netns, "route", "get", dst.String()))
	if i := slices.Index(f, "dev"); i >= 0 && i+1 < len(f) {
		return f[i+1]
	}
	t.Fatalf("no device in netns %s's route to %s: %v", netns, dst, f)
	return ""
}

// seenFromNS connects from the netns at nsPath to dst (a serveSeen) and
// returns the source address dst saw.
func seenFromNS(nsPath string, dst netip.AddrPort) (netip.Addr, error) {
	var conn net.Conn
	err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		var err error
		conn, err = net.DialTimeout("tcp", dst.String(), time.Second)
		return err
	})
	if err != nil {
		return netip.Addr{}, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return netip.Addr{}, err
	}
	return netip.ParseAddr(strings.TrimSpace(line))
}
