package cluster_test

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/idcni/idcni/e2e/cluster"
)

// pingNS holds the pods of the multi-node checks: the default namespace
// exists from the start, with its ServiceAccount, and no policy of the
// walkthrough selects it.
const pingNS = metav1.NamespaceDefault

// crossNode starts a pod on every node and pings every pod from every
// other: each node has a /24 of its own, and the agents route the others'
// through their InternalIPs on the shared segment; in the routed topology
// the far node shares no subnet with the others, and the agents tunnel to
// it.
func crossNode(k *kctl) {
	pods := map[string]*cluster.Node{}
	for _, n := range k.c.Nodes {
		pods[k.nodePod("ping-"+n.ID, n)] = n
	}
	addrs := map[string]netip.Addr{}
	for name, n := range pods {
		a := k.podAddr(pingNS, name)
		for other, b := range addrs {
			if a == b {
				k.t.Fatalf("pods %s and %s have the same address %s", name, other, a)
			}
		}
		addrs[name] = a
		k.t.Logf("pod %s on node %s (%s): %s", name, n.Name, n.IP, a)
	}
	// kubectl exec on every node: the apiserver dials each kubelet at its
	// InternalIP, the far node's through the router.
	for name, n := range pods {
		args := []string{"-n", pingNS, "exec", name, "--", "sh", "-c", "echo " + name}
		out, err := k.c.Kubectl(k.ctx, args...)
		k.t.Logf("$ kubectl %s\n%s", shellJoin(args), indent(out))
		if err != nil || strings.TrimSpace(string(out)) != name {
			k.t.Fatalf("kubectl exec in pod %s on node %s: %v, output %q", name, n.Name, err, out)
		}
	}
	// Every node reaches every other's pods: directly on the segment, and
	// through the VXLAN tunnel to and from the far node of the routed
	// topology.
	// (The host reaches the agents' metrics on the segment only; the far
	// node's own routes show in its pings.)
	for _, n := range k.c.Nodes {
		if n.Far {
			continue
		}
		if missing := k.routesMissing(n); missing > 0 {
			k.t.Errorf("node %s has idcni_node_routes_missing %v: its agent has no way to some node's pods", n.Name, missing)
		}
	}
	for src := range pods {
		for dst := range pods {
			if src != dst {
				k.wantPingIn(pingNS, src, addrs[dst], 2)
			}
		}
	}
}

// joinAndLeave adds a node to the running cluster, checks that a pod on it
// reaches one on the first node and back (and, after crossNodePolicies,
// that the policies hold for a pod on it), then deletes the node and checks
// that nothing of it runs any more, and that the other nodes forgot it.
func joinAndLeave(k *kctl, shop *shopPods) {
	start := time.Now()
	n, err := k.c.AddNode(k.ctx)
	if err != nil {
		k.t.Fatal(err)
	}
	k.t.Logf("node %s (%s) joined and Ready in %s", n.Name, n.IP, time.Since(start).Round(100*time.Millisecond))
	removed := false
	k.t.Cleanup(func() {
		if !removed {
			if err := k.c.RemoveNode(context.Background(), n.Name); err != nil {
				k.t.Errorf("remove node %s: %v", n.Name, err)
			}
		}
	})
	first := k.c.Nodes[0]
	here, there := k.nodePod("join-"+first.ID, first), k.nodePod("join-"+n.ID, n)
	hereIP, thereIP := k.podAddr(pingNS, here), k.podAddr(pingNS, there)
	k.wantPingIn(pingNS, there, hereIP, 2)
	k.wantPingIn(pingNS, here, thereIP, 2)
	var lw mpod
	lateCIDR := k.podCIDR(n.Name)
	if shop != nil {
		lw = lateNodePolicies(k, shop, n)
	}

	start = time.Now()
	if err := k.c.RemoveNode(k.ctx, n.Name); err != nil {
		k.t.Fatal(err)
	}
	removed = true
	k.t.Logf("node %s removed in %s", n.Name, time.Since(start).Round(100*time.Millisecond))
	if _, err := k.c.Client.CoreV1().Nodes().Get(k.ctx, n.Name, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		k.t.Errorf("Node %s after RemoveNode: %v, want it gone", n.Name, err)
	}
	for _, c := range k.c.Nodes {
		if c.Name == n.Name {
			k.t.Errorf("node %s still in Cluster.Nodes", n.Name)
		}
	}
	// The kernel frees the namespaces once their last process is reaped.
	deadline := time.Now().Add(10 * time.Second)
	for {
		var left []string
		for kind, ino := range map[string]uint64{"net": n.NetNS, "mnt": n.MntNS} {
			if pids := cluster.ProcessesInNamespace(kind, ino); len(pids) > 0 {
				left = append(left, fmt.Sprintf("processes in its %s namespace: %v", kind, pids))
			}
		}
		for _, d := range cluster.CgroupDirs(n.Cgroup()) {
			left = append(left, "cgroup "+d)
		}
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			k.t.Fatalf("node %s removed, but: %s", n.Name, strings.Join(left, "; "))
		}
		time.Sleep(200 * time.Millisecond)
	}
	// The pod bound to the deleted node is the pod garbage collector's;
	// the test does not wait for it.
	zero := int64(0)
	_ = k.c.Client.CoreV1().Pods(pingNS).Delete(k.ctx, there, metav1.DeleteOptions{GracePeriodSeconds: &zero})
	if shop != nil {
		_ = k.c.Client.CoreV1().Pods(shopNS).Delete(k.ctx, lw.name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
		lateNodeForgotten(k, n, lateCIDR, lw.ip)
	}
}

// nodePod creates a sleeping pod bound to node n, deleted when the test
// ends, and returns its name.
func (k *kctl) nodePod(name string, n *cluster.Node) string {
	k.t.Helper()
	p := cluster.SleepPod(name, map[string]string{"app": "idcni-multinode"})
	p.Spec.NodeName = n.Name
	if _, err := k.c.Client.CoreV1().Pods(pingNS).Create(k.ctx, p, metav1.CreateOptions{}); err != nil {
		k.t.Fatal(err)
	}
	k.t.Cleanup(func() {
		zero := int64(0)
		_ = k.c.Client.CoreV1().Pods(pingNS).Delete(context.Background(), name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
	})
	return name
}

// podAddr waits up to two minutes for pod to run and returns its address.
func (k *kctl) podAddr(ns, name string) netip.Addr {
	k.t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		p, err := k.c.Client.CoreV1().Pods(ns).Get(k.ctx, name, metav1.GetOptions{})
		if err == nil && isReady(p) && p.Status.Phase == corev1.PodRunning {
			a, err := netip.ParseAddr(p.Status.PodIP)
			if err != nil {
				k.t.Fatalf("pod %s: address %q: %v", name, p.Status.PodIP, err)
			}
			return a
		}
		if time.Now().After(deadline) {
			ev, _ := k.c.Kubectl(k.ctx, "-n", ns, "get", "events", "--sort-by=.lastTimestamp")
			k.t.Fatalf("pod %s not Ready within 2m (%v); events:\n%s", name, err, ev)
		}
		time.Sleep(300 * time.Millisecond)
	}
}

// wantPingIn runs `ping -c 2` in pod (namespace ns) towards dst and wants
// exactly want replies.
func (k *kctl) wantPingIn(ns, pod string, dst netip.Addr, want int) {
	k.t.Helper()
	args := []string{"-n", ns, "exec", pod, "--", "ping", "-c", "2", "-W", "1", dst.String()}
	out, _ := k.c.Kubectl(k.ctx, args...)
	k.t.Logf("$ kubectl %s\n%s", shellJoin(args), indent(out))
	m := received.FindSubmatch(out)
	if m == nil {
		k.t.Fatalf("ping %s from %s: no ping statistics in the output", dst, pod)
	}
	if got, _ := strconv.Atoi(string(m[1])); got != want {
		k.t.Fatalf("ping %s from %s: %d/2 replies, want %d", dst, pod, got, want)
	}
}

// routesMissing reads the agent's idcni_node_routes_missing on node n, from
// the host (the node's agent serves its metrics on the node's address,
// which the host reaches on the segment).
func (k *kctl) routesMissing(n *cluster.Node) float64 {
	k.t.Helper()
	ctx, cancel := context.WithTimeout(k.ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+netip.AddrPortFrom(n.IP, 9965).String()+"/metrics", nil)
	if err != nil {
		k.t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		k.t.Fatalf("metrics of the agent on %s: %v", n.Name, err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) == 2 && f[0] == "idcni_node_routes_missing" {
			v, err := strconv.ParseFloat(f[1], 64)
			if err != nil {
				k.t.Fatalf("idcni_node_routes_missing %q: %v", f[1], err)
			}
			return v
		}
	}
	k.t.Fatalf("the agent on %s exports no idcni_node_routes_missing", n.Name)
	return 0
}
