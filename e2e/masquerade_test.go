package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/idcni/idcni/e2e/internal/cnitest"
	"github.com/idcni/idcni/e2e/internal/kube"
)

// Issue 12: the agent's nftables table (inet idcni). Node A is a netns
// with the agent and the plugin's pods in it; node B a netns on A's LAN
// (a bridge in A) with an address of its pod CIDR on its lo; the outside
// host a netns behind A on a veth of its own, which A reaches as a
// directly connected subnet, standing in for the world. Every address is
// in a namespace the test made; the tables are in node A's netns, which
// goes with the test.

// mqCluster is node A, node B and the outside host.
type mqCluster struct {
	env   *cnitest.Env // node A's pod network, dual-stack: its Node's pod CIDRs
	kube  *kube.Cluster
	a     *nodeNetns
	nameA string
	agent *agentProc
	args  []string // the agent's command line after nsenter's --net
	dir   string

	lanA, lanB netip.Addr // node A's and node B's InternalIPs
	b          *lanNode
	podB       netip.Addr // an address of node B's pod CIDR, on B's lo
	nameB      string

	ext         string     // the outside host's netns
	gw4, gw6    netip.Addr // node A's addresses toward it: its ExternalIPs
	ext4, ext6  netip.Addr // the outside host's addresses: no Node's
	extSecond   netip.Addr // another of its addresses, later a Node's
	extSubnet   netip.Prefix
	podC        netip.Prefix // the pod CIDR the later Node gets
	metricsAddr string
	agentSocket string
	namespace   string
}

type mqPod struct {
	*cnitest.Pod
	ip4, ip6 netip.Addr
}

func newMQCluster(t *testing.T) *mqCluster {
	t.Helper()
	cnitest.RequireRoot(t)
	c := &mqCluster{kube: kube.Start(t, kube.Options{}), dir: t.TempDir(), namespace: "mq"}
	c.agentSocket = filepath.Join(c.dir, "agent.sock")
	c.env = cnitest.New(t, cnitest.Options{DualStack: true, Plugin: map[string]any{"agentSocket": c.agentSocket, "agentRequired": true}})
	c.a = newNodeNetns(t, strings.TrimPrefix(c.kube.URL, "https://"))
	inA := func(args ...string) { run(t, "ip", append([]string{"-n", c.a.name}, args...)...) }

	// The LAN with node B.
	lan := cnitest.PickSubnet(t, 28)
	c.lanA, c.lanB = lan.Addr().Next(), lan.Addr().Next().Next()
	br := "idbr" + cnitest.RandHex(6)
	inA("link", "add", br, "type", "bridge")
	inA("addr", "add", netip.PrefixFrom(c.lanA, lan.Bits()).String(), "dev", br)
	inA("link", "set", br, "up")
	podCIDRB := cnitest.PickSubnet(t, 24)
	c.podB = podCIDRB.Addr().Next()
	c.b = newLANNode(t, c.a, br, netip.PrefixFrom(c.lanB, lan.Bits()), c.podB)
	// Node B routes node A's pods back through A, as B's agent would.
	run(t, "ip", "-n", c.b.name, "route", "add", c.env.Subnet.String(), "via", c.lanA.String())

	// The outside host. It routes node A's pod CIDRs back to A, so that
	// without masquerade it answers the pod's own address.
	c.extSubnet = cnitest.PickSubnet(t, 29)
	c.gw4 = c.extSubnet.Addr().Next()
	c.ext4 = c.gw4.Next()
	c.extSecond = c.ext4.Next()
	ext6 := cnitest.PickSubnet6(t)
	c.gw6 = ext6.Addr().Next()
	c.ext6 = c.gw6.Next()
	c.ext = "idcn-ext-" + cnitest.RandHex(8)
	run(t, "ip", "netns", "add", c.ext)
	t.Cleanup(func() { runQuiet("ip", "netns", "del", c.ext) })
	inExt := func(args ...string) { run(t, "ip", append([]string{"-n", c.ext}, args...)...) }
	inA("link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", c.ext)
	inA("addr", "add", netip.PrefixFrom(c.gw4, c.extSubnet.Bits()).String(), "dev", "up0")
	inA("addr", "add", netip.PrefixFrom(c.gw6, 64).String(), "dev", "up0", "nodad")
	inA("link", "set", "up0", "up")
	inExt("link", "set", "lo", "up")
	inExt("addr", "add", netip.PrefixFrom(c.ext4, c.extSubnet.Bits()).String(), "dev", "eth0")
	inExt("addr", "add", netip.PrefixFrom(c.extSecond, c.extSubnet.Bits()).String(), "dev", "eth0")
	inExt("addr", "add", netip.PrefixFrom(c.ext6, 64).String(), "dev", "eth0", "nodad")
	inExt("link", "set", "eth0", "up")
	inExt("route", "add", c.env.Subnet.String(), "via", c.gw4.String())
	inExt("-6", "route", "add", c.env.Subnet6.String(), "via", c.gw6.String())
	c.podC = cnitest.PickSubnet(t, 24)
	inExt("addr", "add", netip.PrefixFrom(c.podC.Addr().Next(), 32).String(), "dev", "lo")

	c.nameA, c.nameB = "node-a-"+cnitest.RandHex(6), "node-b-"+cnitest.RandHex(6)
	c.createNode(t, &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: c.nameA},
		Spec:       corev1.NodeSpec{PodCIDR: c.env.Subnet.String(), PodCIDRs: []string{c.env.Subnet.String(), c.env.Subnet6.String()}},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: c.lanA.String()},
			{Type: corev1.NodeExternalIP, Address: c.gw4.String()}, {Type: corev1.NodeExternalIP, Address: c.gw6.String()}}},
	})
	createNode(t, c.kube, c.nameB, c.lanB.String(), podCIDRB.String())
	c.kube.CreateNamespace(t, c.namespace, nil)

	tmpl := filepath.Join(c.dir, "template.conflist")
	if err := os.WriteFile(tmpl, c.env.ConfListBytes("1.1.0", c.env.PluginConf()), 0o600); err != nil {
		t.Fatal(err)
	}
	// The metrics listener is in node A's netns: any port is free there.
	c.metricsAddr = "127.0.0.1:9965"
	c.args = []string{buildAgent(t), "--kubeconfig", c.kube.Kubeconfig, "--node-name", c.nameA, "--bpf-root", c.env.BPFRoot,
		"--state", filepath.Join(c.dir, "state.db"), "--socket", c.agentSocket, "--metrics-addr", c.metricsAddr,
		"--cni-conf-dir", filepath.Join(c.dir, "net.d"), "--cni-conf-template", tmpl}
	c.agent = &agentProc{t: t, bin: "nsenter", log: filepath.Join(c.dir, "agent.log"), socket: c.agentSocket}
	// After the Env's cleanup is registered: the agent stops before the
	// pins go.
	t.Cleanup(c.agent.stop)
	return c
}

func (c *mqCluster) createNode(t *testing.T, n *corev1.Node) {
	t.Helper()
	if _, err := c.kube.Client.CoreV1().Nodes().Create(context.Background(), n, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create Node %s: %v", n.Name, err)
	}
}

func (c *mqCluster) deleteNode(t *testing.T, name string) {
	t.Helper()
	if err := c.kube.Client.CoreV1().Nodes().Delete(context.Background(), name, metav1.DeleteOptions{}); err != nil {
		t.Fatalf("delete Node %s: %v", name, err)
	}
}

// startAgent (re)starts node A's agent with extra flags and waits until it
// is ready.
func (c *mqCluster) startAgent(t *testing.T, extra ...string) {
	t.Helper()
	c.agent.stop()
	c.agent.args = append(append([]string{"--net=" + c.a.path, "--"}, c.args...), extra...)
	c.agent.start()
}

// addPod starts a pod on node A through the plugin (which registers it
// with the agent) and reports its addresses in the Pod's status.
func (c *mqCluster) addPod(t *testing.T, name string) *mqPod {
	t.Helper()
	ctx := context.Background()
	_, err := c.kube.Client.CoreV1().Pods(c.namespace).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: c.namespace, Labels: map[string]string{"app": name}},
		Spec:       corev1.PodSpec{NodeName: c.nameA, Containers: []corev1.Container{{Name: "c", Image: "idcni/test:none"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p := &mqPod{Pod: c.env.NewPod(t)}
	p.Args = [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", c.namespace}, {"K8S_POD_NAME", name}}
	err = c.a.do(func() error {
		res, err := c.env.Add(p.Pod)
		if err != nil {
			return err
		}
		for _, ipc := range res.IPs {
			a, _ := netip.AddrFromSlice(ipc.Address.IP)
			if a = a.Unmap(); a.Is4() {
				p.ip4 = a
			} else {
				p.ip6 = a
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("ADD %s in node A: %v", name, err)
	}
	t.Cleanup(func() { _ = c.a.do(func() error { return c.env.Del(p.Pod) }) })
	if !p.ip4.IsValid() || !p.ip6.IsValid() {
		t.Fatalf("pod %s got %v and %v, want an IPv4 and an IPv6 address", name, p.ip4, p.ip6)
	}
	pod, err := c.kube.Client.CoreV1().Pods(c.namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod.Status.PodIP = p.ip4.String()
	pod.Status.PodIPs = []corev1.PodIP{{IP: p.ip4.String()}, {IP: p.ip6.String()}}
	pod.Status.Phase = corev1.PodRunning
	if _, err := c.kube.Client.CoreV1().Pods(c.namespace).UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	return p
}

// serveSeen listens on addr in a netns and answers each connection with
// the source address it came from.
func serveSeen(t *testing.T, nsPath string, addr netip.AddrPort) {
	t.Helper()
	var l net.Listener
	err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		var err error
		l, err = net.Listen("tcp", addr.String())
		return err
	})
	if err != nil {
		t.Fatalf("listen on %s in %s: %v", addr, nsPath, err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			from := conn.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
			_, _ = fmt.Fprintln(conn, from)
			conn.Close()
		}
	}()
}

// serveEcho runs a line echo server on addr in a netns.
func serveEcho(t *testing.T, nsPath string, addr netip.AddrPort) {
	t.Helper()
	var l net.Listener
	err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		var err error
		l, err = net.Listen("tcp", addr.String())
		return err
	})
	if err != nil {
		t.Fatalf("listen on %s in %s: %v", addr, nsPath, err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				sc := bufio.NewScanner(conn)
				for sc.Scan() {
					if _, err := fmt.Fprintln(conn, sc.Text()); err != nil {
						return
					}
				}
			}()
		}
	}()
}

// seenFrom connects from the pod to dst and returns the source address
// dst saw.
func seenFrom(p *mqPod, dst netip.AddrPort) (netip.Addr, error) {
	var conn net.Conn
	err := ns.WithNetNSPath(p.NSPath, func(ns.NetNS) error {
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

// waitSeen waits until dst sees the pod's connections come from want.
func waitSeen(t *testing.T, what string, p *mqPod, dst netip.AddrPort, want netip.Addr) {
	t.Helper()
	var got netip.Addr
	var err error
	deadline := time.Now().Add(15 * time.Second)
	for {
		got, err = seenFrom(p, dst)
		if err == nil && got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %s saw the pod's connection from %v (err %v), want %s", what, dst, got, err, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// metric reads an unlabelled metric of node A's agent, from inside A.
func (c *mqCluster) metric(t *testing.T, name string) float64 {
	t.Helper()
	var conn net.Conn
	err := c.a.do(func() error {
		var err error
		conn, err = net.DialTimeout("tcp", c.metricsAddr, 2*time.Second)
		return err
	})
	if err != nil {
		t.Fatalf("metrics of node A's agent: %v", err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(conn, "GET /metrics HTTP/1.0\r\nHost: node-a\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(conn)
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^` + name + ` (\S+)$`).FindSubmatch(body)
	if m == nil {
		t.Fatalf("metric %s not exported:\n%s", name, body)
	}
	v, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// nft runs nft in node A's netns.
func (c *mqCluster) nft(t *testing.T, stdin string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", c.a.name, "nft"}, args...)...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (c *mqCluster) mustNFT(t *testing.T, stdin string, args ...string) string {
	t.Helper()
	out, err := c.nft(t, stdin, args...)
	if err != nil {
		t.Fatalf("nft %v in node A: %v\n%s", args, err, out)
	}
	return out
}

// The masquerade: a pod's connection to the outside host leaves with node
// A's address, in both families; to another node's pod and to a node
// address it keeps the pod's own (node B's policy needs it to know the
// pod); the sets follow Nodes that come and go; a masqueraded connection
// outlives the agent's restart; --no-masquerade-cidr keeps a destination's
// pod address; --masquerade=false turns it off.
func TestMasqueradeOnlyLeavingTheCluster(t *testing.T) {
	c := newMQCluster(t)
	c.startAgent(t)
	p := c.addPod(t, "client")
	const port = 7000
	at := func(a netip.Addr) netip.AddrPort { return netip.AddrPortFrom(a, port) }
	extPath := "/run/netns/" + c.ext
	bPath := "/run/netns/" + c.b.name
	for _, a := range []netip.Addr{c.ext4, c.ext6, c.extSecond, c.podC.Addr().Next()} {
		serveSeen(t, extPath, at(a))
	}
	for _, a := range []netip.Addr{c.podB, c.lanB} {
		serveSeen(t, bPath, at(a))
	}

	waitSeen(t, "pod -> outside host (IPv4)", p, at(c.ext4), c.gw4)
	waitSeen(t, "pod -> outside host (IPv6)", p, at(c.ext6), c.gw6)
	waitSeen(t, "pod -> node B's pod", p, at(c.podB), p.ip4)
	waitSeen(t, "pod -> node B's InternalIP", p, at(c.lanB), p.ip4)
	if v := c.metric(t, "idcni_masquerade"); v != 1 {
		t.Errorf("idcni_masquerade = %v with masquerade on, want 1", v)
	}
	if v := c.metric(t, "idcni_masqueraded_connections_total"); v < 2 {
		t.Errorf("idcni_masqueraded_connections_total = %v after two masqueraded connections, want >= 2", v)
	}

	// A new Node whose InternalIP is the outside host's second address,
	// with a pod CIDR there: both are the cluster's now, and go with
	// the Node.
	nameC := "node-c-" + cnitest.RandHex(6)
	waitSeen(t, "pod -> the outside host's second address, no Node's yet", p, at(c.extSecond), c.gw4)
	createNode(t, c.kube, nameC, c.extSecond.String(), c.podC.String())
	waitSeen(t, "pod -> node C's InternalIP once Node C exists", p, at(c.extSecond), p.ip4)
	waitSeen(t, "pod -> node C's pod CIDR", p, at(c.podC.Addr().Next()), p.ip4)
	waitSeen(t, "pod -> outside host, with Node C there", p, at(c.ext4), c.gw4)
	c.deleteNode(t, nameC)
	waitSeen(t, "pod -> the outside host's second address once Node C is gone", p, at(c.extSecond), c.gw4)

	// A restart rebuilds the table, and a masqueraded connection that
	// was open goes on: its translation is conntrack's, not the rule's.
	serveEcho(t, extPath, netip.AddrPortFrom(c.ext4, port+1))
	var conn net.Conn
	err := ns.WithNetNSPath(p.NSPath, func(ns.NetNS) error {
		var err error
		conn, err = net.DialTimeout("tcp", netip.AddrPortFrom(c.ext4, port+1).String(), time.Second)
		return err
	})
	if err != nil {
		t.Fatalf("pod -> outside host's echo server: %v", err)
	}
	defer conn.Close()
	if !echoOK(conn) {
		t.Fatal("pod -> outside host's echo server: no echo")
	}
	c.startAgent(t)
	if !echoOK(conn) {
		t.Error("a masqueraded connection open across the agent's restart stopped carrying data")
	}
	waitSeen(t, "pod -> outside host after the restart", p, at(c.ext4), c.gw4)

	// An extra destination that keeps pods' addresses; IPv6 still
	// masqueraded.
	c.startAgent(t, "--no-masquerade-cidr", netip.PrefixFrom(c.ext4, 32).String())
	waitSeen(t, "pod -> outside host in --no-masquerade-cidr", p, at(c.ext4), p.ip4)
	waitSeen(t, "pod -> outside host (IPv6) not in --no-masquerade-cidr", p, at(c.ext6), c.gw6)

	// Off: the outside host, which routes pod CIDRs, sees pods.
	c.startAgent(t, "--masquerade=false")
	waitSeen(t, "pod -> outside host with --masquerade=false", p, at(c.ext4), p.ip4)
	waitSeen(t, "pod -> outside host (IPv6) with --masquerade=false", p, at(c.ext6), p.ip6)
	waitSeen(t, "pod -> node B's pod with --masquerade=false", p, at(c.podB), p.ip4)
	if v := c.metric(t, "idcni_masquerade"); v != 0 {
		t.Errorf("idcni_masquerade = %v with --masquerade=false, want 0", v)
	}
	if out := c.mustNFT(t, "", "list", "table", "inet", "idcni"); strings.Contains(out, "postrouting") || strings.Contains(out, "masquerade\n") {
		t.Errorf("table inet idcni with --masquerade=false still masquerades:\n%s", out)
	}
}

// counterPackets reads a named counter's packets from nft's listing.
func counterPackets(t *testing.T, listing string) int {
	t.Helper()
	m := regexp.MustCompile(`packets (\d+)`).FindStringSubmatch(listing)
	if m == nil {
		t.Fatalf("no counter in:\n%s", listing)
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// sendUDP sends n VXLAN-looking datagrams from src, an address of the
// netns at nsPath, to dst; unconnected, so an ICMP error from dst does not
// swallow the next send.
func sendUDP(t *testing.T, nsPath string, src netip.Addr, dst netip.AddrPort, n int) {
	t.Helper()
	var conn *net.UDPConn
	err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		var err error
		conn, err = net.ListenUDP("udp", &net.UDPAddr{IP: src.AsSlice()})
		return err
	})
	if err != nil {
		t.Fatalf("UDP socket on %s: %v", src, err)
	}
	defer conn.Close()
	// A VXLAN header (I flag, VNI 42) and an inner frame's worth of
	// bytes: what a forged tunnel packet looks like.
	pkt := append([]byte{0x08, 0, 0, 0, 0, 0, 42, 0}, make([]byte, 64)...)
	for range n {
		if _, err := conn.WriteToUDPAddrPort(pkt, dst); err != nil {
			t.Fatalf("send from %s to %s: %v", src, dst, err)
		}
	}
}

// The tunnel port takes packets from node addresses only: a forged VXLAN
// packet from the outside host, from a kernel vxlan device there and from
// a pod is dropped and counted, the same from node B passes, and a Node
// that comes and goes opens and closes it for its address. The table is
// rebuilt whole at a restart (what was added to it by hand is gone) and by
// the audit after someone deletes it or adds to a set; --uninstall removes
// it. The other tables in node A (one of the test's own, one of another
// family with the same name) are never touched.
func TestTunnelPortOnlyFromNodes(t *testing.T) {
	c := newMQCluster(t)
	const vxlanPort = 8472
	// The test's own tables before the agent starts: one counting, at
	// the filter priority, what passes the agent's chain, one of the ip
	// family named idcni, and a stale inet idcni an earlier run left.
	own := "idcni-e2e-" + cnitest.RandHex(6)
	c.mustNFT(t, fmt.Sprintf(`
table inet %[1]s {
	counter from-node-b {}
	counter from-outside {}
	counter from-second {}
	counter from-pod {}
	chain input {
		type filter hook input priority 0; policy accept;
		udp dport %[2]d ip saddr %[3]s counter name from-node-b
		udp dport %[2]d ip saddr %[4]s counter name from-outside
		udp dport %[2]d ip saddr %[5]s counter name from-second
		udp dport %[2]d ip saddr %[6]s counter name from-pod
	}
}
table ip idcni {
	chain keep {
		ip saddr 192.0.2.1 counter
	}
}
table inet idcni {
	set nodes4 { type ipv4_addr; flags interval; elements = { %[4]s } }
	chain stale {
		type filter hook input priority 10; policy accept;
		udp dport 9 drop
	}
}
`, own, vxlanPort, c.lanB, c.ext4, c.extSecond, c.env.Subnet.String()), "-f", "-")
	others := func() string {
		return c.mustNFT(t, "", "list", "table", "ip", "idcni") + c.mustNFT(t, "", "list", "chain", "inet", own, "input")
	}
	before := others()
	passed := func(name string) int {
		return counterPackets(t, c.mustNFT(t, "", "list", "counter", "inet", own, name))
	}

	c.startAgent(t, "--audit-interval", "1s")
	table := c.mustNFT(t, "", "list", "table", "inet", "idcni")
	if strings.Contains(table, "stale") || strings.Contains(table, "dport 9 ") {
		t.Errorf("the table an earlier run left survived the agent's start:\n%s", table)
	}
	rejected := func() float64 { return c.metric(t, "idcni_tunnel_rejected_packets_total") }

	bPath, extPath := "/run/netns/"+c.b.name, "/run/netns/"+c.ext
	sendUDP(t, bPath, c.lanB, netip.AddrPortFrom(c.lanA, vxlanPort), 5)
	sendUDP(t, extPath, c.ext4, netip.AddrPortFrom(c.gw4, vxlanPort), 5)
	sendUDP(t, extPath, c.ext6, netip.AddrPortFrom(c.gw6, vxlanPort), 3)
	waitFor(t, 5*time.Second, "node B's 5 packets pass the agent's chain", func() bool { return passed("from-node-b") == 5 })
	if n := passed("from-outside"); n != 0 {
		t.Errorf("%d of the outside host's packets to the tunnel port passed, want 0", n)
	}
	if v := rejected(); v != 8 {
		t.Errorf("idcni_tunnel_rejected_packets_total = %v after 5 IPv4 and 3 IPv6 packets from the outside host, want 8", v)
	}

	// A real vxlan device on the outside host, pointing at node A: its
	// encapsulated ARP requests are dropped too.
	inner := cnitest.PickSubnet(t, 30)
	inExt := func(args ...string) { run(t, "ip", append([]string{"-n", c.ext}, args...)...) }
	inExt("link", "add", "vx0", "type", "vxlan", "id", "42", "remote", c.gw4.String(), "local", c.ext4.String(),
		"dstport", strconv.Itoa(vxlanPort), "dev", "eth0")
	inExt("addr", "add", netip.PrefixFrom(inner.Addr().Next(), inner.Bits()).String(), "dev", "vx0")
	inExt("link", "set", "vx0", "up")
	_ = exec.Command("ip", "netns", "exec", c.ext, "ping", "-n", "-c", "2", "-W", "1", inner.Addr().Next().Next().String()).Run()
	if v := rejected(); v <= 8 {
		t.Errorf("idcni_tunnel_rejected_packets_total = %v after the outside host's vxlan device sent to node A, want > 8", v)
	}
	if n := passed("from-outside"); n != 0 {
		t.Errorf("%d packets of the outside host's vxlan device passed, want 0", n)
	}
	// It would go on sending (IPv6 solicitations) while the test lets
	// the outside host in by hand below.
	inExt("link", "del", "vx0")

	// A pod is no node either.
	p := c.addPod(t, "forger")
	base := rejected()
	sendUDP(t, p.NSPath, p.ip4, netip.AddrPortFrom(c.lanA, vxlanPort), 4)
	waitFor(t, 5*time.Second, "the pod's 4 packets are rejected", func() bool { return rejected() == base+4 })
	if n := passed("from-pod"); n != 0 {
		t.Errorf("%d of the pod's packets to the tunnel port passed, want 0", n)
	}

	// The outside host's second address becomes a Node's, then stops.
	nameC := "node-c-" + cnitest.RandHex(6)
	createNode(t, c.kube, nameC, c.extSecond.String())
	waitFor(t, 10*time.Second, "packets from Node C's InternalIP pass", func() bool {
		sendUDP(t, extPath, c.extSecond, netip.AddrPortFrom(c.gw4, vxlanPort), 1)
		return passed("from-second") > 0
	})
	c.deleteNode(t, nameC)
	waitFor(t, 10*time.Second, "packets from the address of the deleted Node C are rejected", func() bool {
		n := passed("from-second")
		base := rejected()
		sendUDP(t, extPath, c.extSecond, netip.AddrPortFrom(c.gw4, vxlanPort), 1)
		time.Sleep(50 * time.Millisecond)
		return passed("from-second") == n && rejected() == base+1
	})

	// Someone deletes the table: the audit builds it again.
	c.mustNFT(t, "", "delete", "table", "inet", "idcni")
	waitFor(t, 15*time.Second, "the audit builds the deleted table again", func() bool {
		_, err := c.nft(t, "", "list", "chain", "inet", "idcni", "input")
		return err == nil
	})

	// Someone lets the outside host in by hand: the audit takes it out.
	c.mustNFT(t, "", "add", "element", "inet", "idcni", "nodes4", "{ "+c.ext4.String()+" }")
	waitFor(t, 15*time.Second, "the audit removes the element added by hand", func() bool {
		return !strings.Contains(c.mustNFT(t, "", "list", "set", "inet", "idcni", "nodes4"), c.ext4.String())
	})

	// A restart rebuilds it: what was added by hand goes.
	c.agent.stop()
	c.mustNFT(t, "", "add", "element", "inet", "idcni", "nodes4", "{ "+c.ext4.String()+" }")
	c.mustNFT(t, "", "add", "chain", "inet", "idcni", "stale")
	c.startAgent(t)
	table = c.mustNFT(t, "", "list", "table", "inet", "idcni")
	if strings.Contains(table, "stale") {
		t.Errorf("a chain added by hand survived the agent's restart:\n%s", table)
	}
	sendUDP(t, extPath, c.ext4, netip.AddrPortFrom(c.gw4, vxlanPort), 2)
	sendUDP(t, bPath, c.lanB, netip.AddrPortFrom(c.lanA, vxlanPort), 1)
	waitFor(t, 5*time.Second, "node B's packet passes after the restart", func() bool { return passed("from-node-b") == 6 })
	if n := passed("from-outside"); n != 0 {
		t.Errorf("%d of the outside host's packets passed after the restart (an element added by hand survived?)", n)
	}
	if v := rejected(); v != 2 {
		t.Errorf("idcni_tunnel_rejected_packets_total = %v after the restart and 2 forged packets, want 2", v)
	}

	// --uninstall removes the table and nothing else.
	c.agent.stop()
	out, err := exec.Command("nsenter", "--net="+c.a.path, "--", buildAgent(t), "--uninstall", "--force",
		"--cni-conf-dir", filepath.Join(c.dir, "net.d"), "--bpf-root", c.env.BPFRoot).CombinedOutput()
	if err != nil {
		t.Fatalf("idcni-agent --uninstall: %v\n%s", err, out)
	}
	if out, err := c.nft(t, "", "list", "table", "inet", "idcni"); err == nil {
		t.Errorf("table inet idcni after --uninstall:\n%s", out)
	}
	if after := others(); stripCounters(after) != stripCounters(before) {
		t.Errorf("the other tables changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// stripCounters drops the counts from an nft listing, which traffic moves.
func stripCounters(s string) string {
	return regexp.MustCompile(`packets \d+ bytes \d+`).ReplaceAllString(s, "")
}
