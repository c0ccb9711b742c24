package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/idcni/idcni/cni"
	"github.com/idcni/idcni/e2e/internal/cnitest"
	"github.com/idcni/idcni/e2e/internal/kube"
	"github.com/idcni/idcni/identity"
)

// Issue 11, defects 3 and 4: the agent's endpoint registry after a DEL it
// missed, a reboot that hands a dead pod's ifindex to a new pod, a late DEL
// of the dead pod's container, and a lost state file.

// nodeNetns is a network namespace standing in for a node, with its own
// links and its own ifindex counter. Deleting it and making a new one is a
// reboot as far as links go: ifindexes start over at 2 (lo is 1), so the
// first host veth after the "reboot" gets the ifindex the first one before
// it had, while the pins, the agent's state file and the plugin's records
// persist. The kernel never reuses an ifindex within a netns short of
// wrapping 2^31, so this is the one reliable way to a reused ifindex. The
// apiserver listens on 127.0.0.1 of the host's netns: a proxy listens on the
// same address in the node's netns for the agent.
type nodeNetns struct {
	t     testing.TB
	name  string
	path  string
	l     net.Listener
	mu    sync.Mutex
	conns []net.Conn
}

func newNodeNetns(t testing.TB, apiAddr string) *nodeNetns {
	t.Helper()
	n := &nodeNetns{t: t, name: "idcn-node-" + cnitest.RandHex(8)}
	n.path = "/run/netns/" + n.name
	if out, err := exec.Command("ip", "netns", "add", n.name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", n.name, err, out)
	}
	t.Cleanup(n.delete)
	if out, err := exec.Command("ip", "-n", n.name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("set lo up in %s: %v: %s", n.name, err, out)
	}
	err := ns.WithNetNSPath(n.path, func(ns.NetNS) error {
		var err error
		n.l, err = net.Listen("tcp", apiAddr)
		return err
	})
	if err != nil {
		t.Fatalf("apiserver proxy in %s: %v", n.name, err)
	}
	go n.proxy(apiAddr)
	return n
}

// proxy forwards connections made in the node's netns to the apiserver.
func (n *nodeNetns) proxy(apiAddr string) {
	for {
		c, err := n.l.Accept()
		if err != nil {
			return
		}
		u, err := net.Dial("tcp", apiAddr)
		if err != nil {
			c.Close()
			continue
		}
		n.mu.Lock()
		n.conns = append(n.conns, c, u)
		n.mu.Unlock()
		go func() { _, _ = io.Copy(u, c); u.Close() }()
		go func() { _, _ = io.Copy(c, u); c.Close() }()
	}
}

// delete removes the namespace, and every link in it; idempotent.
func (n *nodeNetns) delete() {
	if n.l != nil {
		n.l.Close()
	}
	n.mu.Lock()
	for _, c := range n.conns {
		c.Close()
	}
	n.conns = nil
	n.mu.Unlock()
	if _, err := os.Stat(n.path); err == nil {
		if out, err := exec.Command("ip", "netns", "del", n.name).CombinedOutput(); err != nil {
			n.t.Errorf("ip netns del %s: %v: %s", n.name, err, out)
		}
	}
}

// do runs f with the calling thread in the node's netns: processes it
// starts (the plugin, through libcni) run there. f must not call t.Fatal.
func (n *nodeNetns) do(f func() error) error {
	return ns.WithNetNSPath(n.path, func(ns.NetNS) error { return f() })
}

// rebootEnv is an agentEnv whose agent and plugin run in a node netns that
// can be rebooted.
type rebootEnv struct {
	*cnitest.Env
	kube    *kube.Cluster
	node    string
	nodeNS  *nodeNetns
	agent   *agentProc
	agentFn []string // the agent's command line after nsenter's
	state   string
}

func newRebootEnv(t *testing.T, agentRequired bool) *rebootEnv {
	t.Helper()
	cnitest.RequireRoot(t)
	c := kube.Start(t, kube.Options{})
	dir := t.TempDir()
	socket := filepath.Join(dir, "agent.sock")
	env := cnitest.New(t, cnitest.Options{Plugin: map[string]any{"agentSocket": socket, "agentRequired": agentRequired}})
	e := &rebootEnv{Env: env, kube: c, node: "node-" + cnitest.RandHex(6), state: filepath.Join(dir, "state.db")}
	_, err := c.Client.CoreV1().Nodes().Create(context.Background(), envNode(e.node, env), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	tmpl := filepath.Join(dir, "template.conflist")
	if err := os.WriteFile(tmpl, env.ConfListBytes("1.1.0", env.PluginConf()), 0o600); err != nil {
		t.Fatal(err)
	}
	e.agentFn = []string{buildAgent(t),
		"--kubeconfig", c.Kubeconfig, "--node-name", e.node, "--bpf-root", env.BPFRoot, "--state", e.state,
		"--socket", socket, "--metrics-addr", freeAddr(t), "--cni-conf-dir", filepath.Join(dir, "net.d"),
		"--cni-conf-template", tmpl, "--identity-grace", "1m",
	}
	e.agent = &agentProc{t: t, bin: "nsenter", log: filepath.Join(dir, "agent.log"), socket: socket}
	t.Cleanup(e.agent.stop)
	e.boot(t)
	return e
}

// boot makes a fresh node netns, the previous one gone: a reboot.
func (e *rebootEnv) boot(t *testing.T) {
	t.Helper()
	if e.nodeNS != nil {
		e.nodeNS.delete()
	}
	e.nodeNS = newNodeNetns(t, strings.TrimPrefix(e.kube.URL, "https://"))
}

func (e *rebootEnv) startAgent(t *testing.T) {
	t.Helper()
	e.agent.args = append([]string{"--net=" + e.nodeNS.path}, e.agentFn...)
	e.agent.start()
}

// addPod creates the Pod object and runs ADD in the node netns for a
// container of the given ID; with the agent down (and agentRequired false)
// the pod starts unregistered, as the plugin allows.
func (e *rebootEnv) addPod(t *testing.T, namespace, name, containerID string, labels map[string]string) (*kpod, int) {
	t.Helper()
	ctx := context.Background()
	_, err := e.kube.Client.CoreV1().Pods(namespace).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace, Labels: labels},
		Spec:       corev1.PodSpec{NodeName: e.node, Containers: []corev1.Container{{Name: "c", Image: "idcni/test:none"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p := &kpod{Pod: e.NewPod(t), ns: namespace, name: name}
	p.ContainerID = containerID
	p.Args = [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", namespace}, {"K8S_POD_NAME", name}}
	var ifindex int
	var addr netip.Addr
	err = e.nodeNS.do(func() error {
		res, err := e.Add(p.Pod)
		if err != nil {
			return err
		}
		addr, _ = netip.AddrFromSlice(res.IPs[0].Address.IP.To4())
		l, err := netlinksafe.LinkByName(cni.HostVethName(p.ContainerID, p.IfName))
		if err != nil {
			return err
		}
		ifindex = l.Attrs().Index
		return nil
	})
	if err != nil {
		t.Fatalf("ADD %s/%s in node netns: %v", namespace, name, err)
	}
	t.Cleanup(func() { _ = e.del(p) })
	p.ip = addr
	pod, err := e.kube.Client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod.Status.PodIP = addr.String()
	pod.Status.PodIPs = []corev1.PodIP{{IP: addr.String()}}
	pod.Status.Phase = corev1.PodRunning
	if _, err := e.kube.Client.CoreV1().Pods(namespace).UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	return p, ifindex
}

// del runs the runtime's DEL of the pod's container in the node netns.
func (e *rebootEnv) del(p *kpod) error {
	return e.nodeNS.do(func() error { return e.Del(p.Pod) })
}

func (e *rebootEnv) deletePodObject(t *testing.T, p *kpod) {
	t.Helper()
	zero := int64(0)
	err := e.kube.Client.CoreV1().Pods(p.ns).Delete(context.Background(), p.name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
	if err != nil {
		t.Fatal(err)
	}
}

// endpointMatches reports whether the endpoint entry at ifindex is p's:
// its address, and the identity the ipcache gives that address, which is
// a resolved one.
func endpointMatches(t *testing.T, env *cnitest.Env, ifindex int, p *kpod) (bool, string) {
	t.Helper()
	dp := env.Datapath(t)
	defer dp.Close()
	eps, err := dp.Endpoints()
	if err != nil {
		t.Fatal(err)
	}
	ep, ok := eps[ifindex]
	if !ok {
		return false, fmt.Sprintf("no endpoint entry at ifindex %d", ifindex)
	}
	id, ok, err := dp.IPCacheLookup(p.ip)
	if err != nil {
		t.Fatal(err)
	}
	desc := fmt.Sprintf("endpoint at ifindex %d: address %s identity %d; ipcache %s: identity %d (found %v)", ifindex, ep.IPv4, ep.Identity, p.ip, id, ok)
	return ep.IPv4 == p.ip && ok && ep.Identity == id && id != identity.Unresolved, desc
}

// waitEndpoint waits until the endpoint entry at ifindex is p's.
func waitEndpoint(t *testing.T, env *cnitest.Env, ifindex int, p *kpod, what string) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		ok, desc := endpointMatches(t, env, ifindex, p)
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %s/%s: %s", what, p.ns, p.name, desc)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Defect 3: a DEL while the agent is down, then a reboot, and a new pod
// whose host veth got the dead pod's ifindex starts while the agent is
// still down. The agent's registry still holds the dead pod at that
// ifindex: it must not write the dead pod's address and identity over the
// new pod's entry (the pod was cut off as spoofed), and must register the
// new pod from its veth and the plugin's record.
func TestAgentRegistryIfindexReusedWhileDown(t *testing.T) {
	e := newRebootEnv(t, false)
	e.kube.CreateNamespace(t, "reuse", nil)
	e.startAgent(t)
	a, ifA := e.addPod(t, "reuse", "dead", "ff"+cnitest.RandHex(62), map[string]string{"app": "dead"})
	waitEndpoint(t, e.Env, ifA, a, "pod A registered")

	e.agent.stop()
	if err := e.del(a); err != nil {
		t.Fatalf("DEL of pod A while the agent is down: %v", err)
	}
	e.deletePodObject(t, a)
	e.boot(t)
	b, ifB := e.addPod(t, "reuse", "new", "00"+cnitest.RandHex(62), map[string]string{"app": "new"})
	if ifB != ifA {
		t.Fatalf("pod B's host veth has ifindex %d, pod A's had %d: the reboot did not reuse it", ifB, ifA)
	}
	e.startAgent(t)
	peer, ifPeer := e.addPod(t, "reuse", "peer", "55"+cnitest.RandHex(62), map[string]string{"app": "peer"})
	peer.serve(t, 80)
	b.serve(t, 80)
	waitEndpoint(t, e.Env, ifPeer, peer, "peer registered")
	waitEndpoint(t, e.Env, ifB, b, "pod B, on pod A's ifindex, after the agent's restart")
	eventually(t, "pod B -> peer:80", true, func() bool { return b.reach(peer, 80) })
	eventually(t, "peer -> pod B:80", true, func() bool { return peer.reach(b, 80) })
}

// Defect 3: a late DEL of a dead container whose ifindex went to a new
// pod (after a reboot) must leave the new pod's endpoint entry alone.
func TestAgentRegistryLateDelKeepsNewPod(t *testing.T) {
	e := newRebootEnv(t, true)
	e.kube.CreateNamespace(t, "late", nil)
	e.startAgent(t)
	// A sorts before B: an agent that keeps A's entry writes B's over it.
	a, ifA := e.addPod(t, "late", "dead", "00"+cnitest.RandHex(62), map[string]string{"app": "dead"})
	waitEndpoint(t, e.Env, ifA, a, "pod A registered")

	e.agent.stop()
	e.deletePodObject(t, a)
	e.boot(t) // pod A's veth goes with the node; its DEL has not come yet
	e.startAgent(t)
	b, ifB := e.addPod(t, "late", "new", "ff"+cnitest.RandHex(62), map[string]string{"app": "new"})
	if ifB != ifA {
		t.Fatalf("pod B's host veth has ifindex %d, pod A's had %d: the reboot did not reuse it", ifB, ifA)
	}
	peer, ifPeer := e.addPod(t, "late", "peer", "55"+cnitest.RandHex(62), map[string]string{"app": "peer"})
	peer.serve(t, 80)
	waitEndpoint(t, e.Env, ifPeer, peer, "peer registered")
	waitEndpoint(t, e.Env, ifB, b, "pod B registered on pod A's ifindex")
	eventually(t, "pod B -> peer:80 before the late DEL", true, func() bool { return b.reach(peer, 80) })

	if err := e.del(a); err != nil {
		t.Fatalf("late DEL of pod A's container: %v", err)
	}
	if ok, desc := endpointMatches(t, e.Env, ifB, b); !ok {
		t.Fatalf("after the late DEL of pod A's container: %s", desc)
	}
	if !b.reach(peer, 80) {
		t.Fatal("pod B -> peer:80 cut by the late DEL of pod A's container")
	}
}

// Defect 4: with state.db lost, identities are renumbered; every running
// pod's endpoint entry must carry its ipcache identity again, and policy
// must keep allowing and denying what it did.
func TestAgentStateLossKeepsEndpointsAndPolicy(t *testing.T) {
	e := newAgentEnv(t)
	e.kube.CreateNamespace(t, "lost", map[string]string{"team": "lost"})
	// The first identity goes to a pod that is gone before the state is
	// lost: the renumbering cannot give every pod its old number back.
	filler := e.newPod(t, "lost", "filler", map[string]string{"app": "filler"})
	web := e.newPod(t, "lost", "web", map[string]string{"app": "web"})
	db := e.newPod(t, "lost", "db", map[string]string{"app": "db"})
	intruder := e.newPod(t, "lost", "intruder", map[string]string{"app": "intruder"})
	db.serve(t, 80)
	e.apply(t, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "db-from-web", Namespace: "lost"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "db"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}}}},
				Ports: tcpPort(80),
			}},
		},
	})
	eventually(t, "web -> db:80", true, func() bool { return web.reach(db, 80) })
	eventually(t, "intruder -> db:80", false, func() bool { return intruder.reach(db, 80) })
	if err := e.Del(filler.Pod); err != nil {
		t.Fatal(err)
	}
	zero := int64(0)
	if err := e.kube.Client.CoreV1().Pods("lost").Delete(context.Background(), "filler", metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}

	e.agent.stop()
	if err := os.Remove(e.state); err != nil {
		t.Fatal(err)
	}
	e.agent.start()
	for _, p := range []*kpod{web, db, intruder} {
		waitEndpoint(t, e.Env, hostIfindex(t, p), p, "after state.db was lost")
	}
	eventually(t, "web -> db:80 after state.db was lost", true, func() bool { return web.reach(db, 80) })
	eventually(t, "intruder -> db:80 after state.db was lost", false, func() bool { return intruder.reach(db, 80) })
}

// hostIfindex is the ifindex of a pod's host veth in the host's netns.
func hostIfindex(t *testing.T, p *kpod) int {
	t.Helper()
	l, err := netlinksafe.LinkByName(cni.HostVethName(p.ContainerID, p.IfName))
	if err != nil {
		t.Fatalf("host veth of %s/%s: %v", p.ns, p.name, err)
	}
	return l.Attrs().Index
}
