package e2e

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/idcni/idcni/e2e/internal/cnitest"
	"github.com/idcni/idcni/identity"
)

// remoteNode is a network namespace standing in for another node of the
// cluster: a veth to this node's root namespace, on a private /29 that
// only this test routes, with two addresses. node is the one a Node
// object names as its InternalIP; stranger is not a node address, the
// control: an outside address that must fare as before.
type remoteNode struct {
	name           string // netns name under /run/netns
	nsPath         string
	node, stranger netip.Addr
}

// newRemoteNode plugs a namespace into this node's root namespace and
// routes the env's pod subnet to it through that veth alone: nothing of
// the test's addresses is routed through the machine's real interfaces.
func newRemoteNode(t *testing.T, e *agentEnv) *remoteNode {
	t.Helper()
	sub := cnitest.PickSubnet(t, 29)
	base := sub.Addr()
	gw := base.Next()
	r := &remoteNode{name: "idrn-" + cnitest.RandHex(10), node: gw.Next()}
	r.stranger = r.node.Next()
	r.nsPath = "/run/netns/" + r.name
	hostIf := "idrn" + cnitest.RandHex(8)
	run(t, "ip", "netns", "add", r.name)
	t.Cleanup(func() { runQuiet("ip", "netns", "del", r.name) })
	run(t, "ip", "link", "add", hostIf, "type", "veth", "peer", "name", "eth0", "netns", r.name)
	// Deleting the namespace takes the veth with it; this covers a test
	// that dies between the two steps above and below.
	t.Cleanup(func() { runQuiet("ip", "link", "del", hostIf) })
	run(t, "ip", "addr", "add", netip.PrefixFrom(gw, sub.Bits()).String(), "dev", hostIf)
	run(t, "ip", "link", "set", hostIf, "up")
	in := func(args ...string) { run(t, "ip", append([]string{"-n", r.name}, args...)...) }
	in("link", "set", "lo", "up")
	in("addr", "add", netip.PrefixFrom(r.node, sub.Bits()).String(), "dev", "eth0")
	in("addr", "add", netip.PrefixFrom(r.stranger, sub.Bits()).String(), "dev", "eth0")
	in("link", "set", "eth0", "up")
	in("route", "add", e.Subnet.String(), "via", gw.String(), "dev", "eth0")
	return r
}

// reach reports whether a TCP connection from src, an address of the
// remote node, to dst:port carries data.
func (r *remoteNode) reach(src netip.Addr, dst *kpod, port int) bool {
	var c net.Conn
	err := ns.WithNetNSPath(r.nsPath, func(ns.NetNS) error {
		d := net.Dialer{Timeout: time.Second, LocalAddr: &net.TCPAddr{IP: src.AsSlice()}}
		var err error
		c, err = d.Dial("tcp", netip.AddrPortFrom(dst.ip, uint16(port)).String())
		return err
	})
	if err != nil {
		return false
	}
	defer c.Close()
	return echoOK(c)
}

// ping reports whether an echo request from src to dst is answered.
func (r *remoteNode) ping(src netip.Addr, dst *kpod) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return exec.CommandContext(ctx, "ip", "netns", "exec", r.name, "ping", "-n", "-c", "1", "-W", "1",
		"-I", src.String(), dst.ip.String()).Run() == nil
}

// hostReach reports whether a TCP connection from this node's own stack
// (the test runs in the root namespace), as a kubelet probe makes it,
// carries data.
func hostReach(dst *kpod, port int) bool {
	c, err := net.DialTimeout("tcp", netip.AddrPortFrom(dst.ip, uint16(port)).String(), time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	return echoOK(c)
}

// registerNode creates a Node object with addr as its InternalIP and waits
// until the agent has put addr in the ipcache, so that what follows tests
// the agent's idea of that node, not a node it has not heard of yet.
func (e *agentEnv) registerNode(t *testing.T, name string, addr netip.Addr) identity.ID {
	t.Helper()
	_, err := e.kube.Client.CoreV1().Nodes().Create(context.Background(), &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Status:     corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: addr.String()}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create Node %s: %v", name, err)
	}
	d := e.Datapath(t)
	var id identity.ID
	waitFor(t, 15*time.Second, "the agent puts node "+name+"'s address in the ipcache", func() bool {
		got, ok, err := d.IPCacheLookup(addr)
		if err != nil {
			t.Fatalf("ipcache lookup %s: %v", addr, err)
		}
		id = got
		return ok && got != identity.World
	})
	return id
}

func defaultDenyIngress(ns string) *networkingv1.NetworkPolicy {
	return &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "default-deny-ingress", Namespace: ns},
		Spec:       networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}},
	}
}

// Issue 10, item 2: every node address used to be host, and host is never
// policed, so a packet from another node's address reached a pod under
// default-deny while the same packet from any other outside address did
// not. Only this node is host; other nodes are remote-node, which
// NetworkPolicy treats as any address outside the cluster.
func TestRemoteNodeMeetsIngressPolicy(t *testing.T) {
	e := newAgentEnv(t)
	e.kube.CreateNamespace(t, "rn", nil)
	web := e.newPod(t, "rn", "web", map[string]string{"app": "web"})
	client := e.newPod(t, "rn", "client", map[string]string{"app": "client"})
	web.serve(t, 80)
	e.apply(t, defaultDenyIngress("rn"))
	eventually(t, "client -> web under default deny", false, func() bool { return client.reach(web, 80) })

	other := newRemoteNode(t, e)
	if id := e.registerNode(t, "other-"+cnitest.RandHex(6), other.node); id != identity.RemoteNode {
		t.Errorf("the other node's address %s is identity %s in the ipcache, want remote-node", other.node, id)
	}

	// The attack: the other node's address opens a connection to, and
	// pings, a pod no rule admits it to.
	if other.reach(other.node, web, 80) {
		t.Errorf("other node %s -> web:80 connected through default-deny ingress", other.node)
	}
	if other.ping(other.node, web) {
		t.Errorf("other node %s -> web: ping answered through default-deny ingress", other.node)
	}
	// The control: an address no Node has, on the same wire.
	if other.reach(other.stranger, web, 80) {
		t.Errorf("non-node address %s -> web:80 connected through default-deny ingress", other.stranger)
	}
	// This node's own stack (kubelet probes) still reaches its pods.
	if !hostReach(web, 80) {
		t.Errorf("this node -> web:80 refused under default deny; kubelet probes would fail")
	}

	// An ipBlock holding the other node's address admits it, and only it.
	e.apply(t, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "from-other-node", Namespace: "rn"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: netip.PrefixFrom(other.node, 32).String()}}},
				Ports: tcpPort(80),
			}},
		},
	})
	eventually(t, "other node -> web:80 allowed by an ipBlock with its address", true, func() bool { return other.reach(other.node, web, 80) })
	if other.reach(other.stranger, web, 80) {
		t.Errorf("non-node address %s -> web:80 allowed by an ipBlock that does not hold it", other.stranger)
	}
	if client.reach(web, 80) {
		t.Errorf("client -> web:80 allowed by an ipBlock holding a node address")
	}
	if other.ping(other.node, web) {
		t.Errorf("other node -> web: ping answered, but the ipBlock allows tcp/80 only")
	}

	// A selector that matches every pod of every namespace is no way in
	// for a node.
	e.apply(t, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "from-other-node", Namespace: "rn"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: &metav1.LabelSelector{}}},
			}},
		},
	})
	eventually(t, "client -> web:80 allowed by an all-pods selector", true, func() bool { return client.reach(web, 80) })
	if other.reach(other.node, web, 80) {
		t.Errorf("other node -> web:80 allowed by a pod selector")
	}
}

// Manual rules name remote-node like any identity: an allow admits the
// other nodes to a manual identity, a deny shuts them out again.
func TestRemoteNodeManualRules(t *testing.T) {
	e := newAgentEnv(t)
	e.kube.CreateNamespace(t, "rnm", nil)
	web := e.newPod(t, "rnm", "web", map[string]string{"app": "web"})
	web.serve(t, 80)
	other := newRemoteNode(t, e)
	e.registerNode(t, "other-"+cnitest.RandHex(6), other.node)

	run := func(tool string, args ...string) string { t.Helper(); return e.cli(t, tool, args...) }
	run("endpointctl", "add", "--ip", web.ip.String(), "--identity", "1001")
	eventually(t, "other node -> web:80 once web is manual identity 1001 (isolated)", false, func() bool { return other.reach(other.node, web, 80) })

	run("policyctl", "allow", "--src", fmt.Sprint(uint32(identity.RemoteNode)), "--dst", "1001", "--port", "80")
	eventually(t, "other node -> web:80 by allow --src 6", true, func() bool { return other.reach(other.node, web, 80) })
	if other.reach(other.stranger, web, 80) {
		t.Errorf("non-node address %s -> web:80 allowed by a rule for remote-node", other.stranger)
	}
	if out := run("policyctl", "list"); !strings.Contains(out, "remote-node") {
		t.Errorf("policyctl list does not name remote-node:\n%s", out)
	}

	run("policyctl", "deny", "--src", fmt.Sprint(uint32(identity.RemoteNode)), "--dst", "1001")
	eventually(t, "other node -> web:80 after deny --src 6", false, func() bool { return other.reach(other.node, web, 80) })
	if !hostReach(web, 80) {
		t.Errorf("this node -> web:80 refused by a deny rule for remote-node")
	}
}
