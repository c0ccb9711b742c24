package cluster_test

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/idcni/idcni/e2e/cluster"
)

// Issue 12 on the real cluster: pods on different nodes, NetworkPolicy
// across them both ways (egress is decided on the source node, ingress on
// the destination node, each from its own ipcache), a relabel on one node
// changing what another node admits, a node that joins late, a node that
// goes, and agents restarted under an open cross-node connection.

const (
	shopNS  = "mn-shop"
	guestNS = "mn-guest"
)

// echoPod runs a TCP echo server on port 80 from its start, pinned to node.
func echoPod(name, node string, labels map[string]string) *corev1.Pod {
	p := cluster.SleepPod(name, labels)
	p.Spec.NodeName = node
	p.Spec.Containers[0].Command = []string{"sh", "-c", "nc -ll -p 80 -e cat"}
	return p
}

// mpod is a pod of the multi-node story.
type mpod struct {
	ns, name, node string
	ip             netip.Addr
}

func (p mpod) String() string { return fmt.Sprintf("%s/%s (on %s)", p.ns, p.name, p.node) }

func (k *kctl) createPod(ns string, pod *corev1.Pod) mpod {
	k.t.Helper()
	if _, err := k.c.Client.CoreV1().Pods(ns).Create(k.ctx, pod, metav1.CreateOptions{}); err != nil {
		k.t.Fatalf("create pod %s/%s: %v", ns, pod.Name, err)
	}
	return mpod{ns: ns, name: pod.Name, node: pod.Spec.NodeName}
}

// reach connects from one pod to another's port 80 and wants the echo, or
// (want false) no connection.
func (k *kctl) reach(from, to mpod, want bool) {
	k.t.Helper()
	const probe = "idcni-probe"
	args := []string{"-n", from.ns, "exec", from.name, "--", "sh", "-c", fmt.Sprintf("echo %s | nc -w 2 %s 80", probe, to.ip)}
	verdict := map[bool]string{true: "connects", false: "does not connect"}
	k.check(fmt.Sprintf("TCP %s -> %s %s:80 %s", from, to, to.ip, verdict[want]), func() (bool, string) {
		out, _ := k.c.Kubectl(k.ctx, args...)
		got := strings.Contains(string(out), probe)
		k.t.Logf("$ kubectl %s\n%s", shellJoin(args), indent(out))
		return got == want, "it " + verdict[got]
	})
}

// agentOn runs a command in the agent's container on node.
func (k *kctl) agentOn(node string, argv ...string) string {
	k.t.Helper()
	return k.run(append([]string{"-n", "idcni-system", "exec", k.agentPodOn(node), "-c", "agent", "--"}, argv...)...)
}

// identityOf is what node's datapath resolves addr to: a number, or a
// reserved name (world, remote-node).
func (k *kctl) identityOf(node string, addr netip.Addr) string {
	k.t.Helper()
	out := k.agentOn(node, "policyctl", "ipcache", "--ip", addr.String(), "-o", "json")
	var row struct {
		Identity uint32 `json:"identity"`
		Name     string `json:"name"`
	}
	if err := json.Unmarshal([]byte(out), &row); err != nil {
		k.t.Fatalf("policyctl ipcache --ip %s on %s: %v: %q", addr, node, err, out)
	}
	if row.Name != "" {
		return row.Name
	}
	return fmt.Sprint(row.Identity)
}

func (k *kctl) podCIDR(node string) netip.Prefix {
	k.t.Helper()
	n, err := k.c.Client.CoreV1().Nodes().Get(k.ctx, node, metav1.GetOptions{})
	if err != nil {
		k.t.Fatal(err)
	}
	p, err := netip.ParsePrefix(n.Spec.PodCIDR)
	if err != nil {
		k.t.Fatalf("node %s: pod CIDR %q: %v", node, n.Spec.PodCIDR, err)
	}
	return p
}

func (k *kctl) ns(name string, labels map[string]string) {
	k.t.Helper()
	if _, err := k.c.Client.CoreV1().Namespaces().Create(k.ctx, &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
	}, metav1.CreateOptions{}); err != nil {
		k.t.Fatal(err)
	}
	if err := k.waitServiceAccount(name); err != nil {
		k.t.Fatal(err)
	}
}

func (k *kctl) waitServiceAccount(ns string) error {
	deadline := time.Now().Add(time.Minute)
	for {
		_, err := k.c.Client.CoreV1().ServiceAccounts(ns).Get(k.ctx, "default", metav1.GetOptions{})
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// shopPods are the pods of crossNodePolicies, which joinAndLeave uses
// against a node that joins later; nil when that step did not run.
type shopPods struct{ web, db, other mpod }

// crossNodePolicies: NetworkPolicy across nodes in both directions, with
// pod and namespace selectors; a relabel on one node changing what another
// admits; agents restarted under an open cross-node connection. It needs
// three nodes.
func crossNodePolicies(k *kctl) *shopPods {
	// Two nodes on the shared segment, and a third: the far one in the
	// routed topology, so that the policies also hold through the tunnel.
	var near, far []*cluster.Node
	for _, n := range k.c.Nodes {
		if n.Far {
			far = append(far, n)
		} else {
			near = append(near, n)
		}
	}
	third := append(far, near[min(2, len(near)):]...)
	if len(near) < 2 || len(third) == 0 {
		k.t.Skipf("%d nodes: this step needs 3 (NODES=3)", len(k.c.Nodes))
	}
	n0, n1, n2 := near[0].Name, near[1].Name, third[0].Name
	k.t.Logf("web on %s, db on %s, other and guest on %s", n0, n1, n2)
	k.ns(shopNS, map[string]string{"team": "shop"})
	k.ns(guestNS, map[string]string{"team": "guest"})

	web := k.createPod(shopNS, echoPod("web", n0, map[string]string{"app": "web"}))
	db := k.createPod(shopNS, echoPod("db", n1, map[string]string{"app": "db"}))
	other := k.createPod(shopNS, echoPod("other", n2, map[string]string{"app": "other"}))
	guest := k.createPod(guestNS, echoPod("web", n2, map[string]string{"app": "web"}))
	for _, p := range []*mpod{&web, &db, &other, &guest} {
		p.ip = k.podAddr(p.ns, p.name)
	}

	// No policy: every pod reaches every other, across nodes both ways.
	k.reach(web, db, true)
	k.reach(db, web, true)
	k.reach(other, db, true)
	k.reach(guest, web, true)
	// Each node knows the others' pods by identity, and the other nodes
	// as remote-node.
	if id := k.identityOf(n0, db.ip); id == "world" {
		k.t.Errorf("%s resolves %s's address %s to world", n0, db, db.ip)
	}
	if id := k.identityOf(n0, near[1].IP); id != "remote-node" {
		k.t.Errorf("%s resolves node %s's address %s to %s, want remote-node", n0, n1, near[1].IP, id)
	}

	// Ingress on db's node, from web's node, with pod and namespace
	// selectors.
	k.apply(fmt.Sprintf(`apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: db-ingress
  namespace: %s
spec:
  podSelector:
    matchLabels: {app: db}
  policyTypes: [Ingress]
  ingress:
    - from:
        - podSelector:
            matchLabels: {app: web}
        - namespaceSelector:
            matchLabels: {team: partner}
          podSelector:
            matchLabels: {app: web}
      ports:
        - {protocol: TCP, port: 80}
`, shopNS))
	k.changed()
	k.reach(other, db, false)
	k.reach(web, db, true)
	k.reach(guest, db, false)
	// A namespace label makes another node's pod a partner.
	k.run("label", "namespace", guestNS, "team=partner", "--overwrite")
	k.changed()
	k.reach(guest, db, true)

	// Egress on web's node: only db.
	k.apply(fmt.Sprintf(`apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web-egress
  namespace: %s
spec:
  podSelector:
    matchLabels: {app: web}
  policyTypes: [Egress]
  egress:
    - to:
        - podSelector:
            matchLabels: {app: db}
      ports:
        - {protocol: TCP, port: 80}
`, shopNS))
	k.changed()
	k.reach(web, other, false)
	k.reach(web, db, true)
	// Ingress to web is not isolated: other still reaches it.
	k.reach(other, web, true)

	// A relabel on n2 changes what n1 admits.
	k.run("-n", shopNS, "label", "pod", "other", "app=web", "--overwrite")
	k.changed()
	k.reach(other, db, true)
	k.run("-n", shopNS, "label", "pod", "other", "app=other", "--overwrite")
	k.changed()
	k.reach(other, db, false)

	// Agents restart under an open cross-node connection: first the
	// server's node's, then the client's.
	sess := k.sessionIn(shopNS, "web", "nc", db.ip.String(), "80")
	defer sess.close()
	sess.roundTrip("before the restarts")
	for _, node := range []string{n1, n0} {
		old := k.agentPodOn(node)
		k.run("-n", "idcni-system", "delete", "pod", old, "--wait=true")
		sess.roundTrip("with the agent of " + node + " gone")
		if err := k.c.WaitAgentRollout(k.ctx); err != nil {
			k.t.Fatal(err)
		}
		sess.roundTrip("with a new agent on " + node)
	}
	k.reach(web, other, false)
	k.reach(other, db, false)
	sess.roundTrip("at the end")
	return &shopPods{web: web, db: db, other: other}
}

// lateNodePolicies is what a node that joins later must do with the
// policies of crossNodePolicies: its pod gets its own range, the other
// nodes learn it, and its agent enforces egress from the start.
func lateNodePolicies(k *kctl, shop *shopPods, late *cluster.Node) mpod {
	lw := k.createPod(shopNS, echoPod("late-web", late.Name, map[string]string{"app": "web"}))
	lw.ip = k.podAddr(lw.ns, lw.name)
	if cidr := k.podCIDR(late.Name); !cidr.Contains(lw.ip) {
		k.t.Fatalf("pod %s has %s, outside the late node's pod CIDR %s", lw, lw.ip, cidr)
	}
	k.changed()
	k.reach(lw, shop.db, true)
	k.reach(lw, shop.other, false) // web-egress, decided on the late node
	k.reach(shop.web, lw, false)   // web-egress on the first node: late-web is not db
	k.reach(shop.other, lw, true)
	return lw
}

// lateNodeForgotten: once a node is deleted, the other nodes have no route
// to its pod CIDR, and neither its address nor its pod's resolve to
// anything but world.
func lateNodeForgotten(k *kctl, late *cluster.Node, lateCIDR netip.Prefix, pod netip.Addr) {
	first, second := k.c.Nodes[0], k.c.Nodes[1]
	k.changed()
	k.check(fmt.Sprintf("no route to the removed node's pod CIDR %s on %s", lateCIDR, first.Name), func() (bool, string) {
		out, err := first.Exec("ip", "route", "show", "proto", "157")
		if err != nil {
			return false, err.Error()
		}
		return !strings.Contains(string(out), lateCIDR.String()), string(out)
	})
	k.changed()
	k.check(fmt.Sprintf("%s forgets the removed node's address %s and its pod's %s", second.Name, late.IP, pod), func() (bool, string) {
		a, b := k.identityOf(second.Name, pod), k.identityOf(second.Name, late.IP)
		return a == "world" && b == "world", fmt.Sprintf("pod: %s, node: %s", a, b)
	})
}
