package cluster_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/idcni/idcni/e2e/cluster"
)

// TestCluster is the story on a real multi-node Kubernetes, with
// idcni installed from manifests/idcni.yaml: a pod on every node reaching
// every other, the seed walkthrough word for word through kubectl (its pods
// on the first node, whose agent kubectl exec reaches), then the same rules
// as NetworkPolicy objects, a label change, a pod re-created, the agent's
// pod deleted under an open TCP connection, and a node that joins late and
// is deleted. Finally the cluster is removed and the host checked for
// anything it left.
//
// Long (about two minutes on a warm machine, plus the Kubernetes build on a
// cold one); alone: go test -run TestCluster -v ./e2e/cluster/
// NODES=N sets the number of nodes (default 3), TOPOLOGY=routed puts the
// last one behind a router. IDCNI_CLUSTER_LOGS=DIR keeps the daemons' logs
// in DIR/<cluster name>.
func TestCluster(t *testing.T) {
	c := up(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	k := &kctl{t: t, c: c, ctx: ctx}
	if out, err := c.NodeExec("iptables-save"); err == nil {
		// The kubelet's chains exist, in the node's namespace only.
		t.Logf("iptables chains the kubelet made on the node: %s", strings.Join(regexp.MustCompile(`(?m)^:(KUBE-\S+)`).FindAllString(string(out), -1), " "))
	}

	step(t, "pods on every node reach each other", func(t *testing.T) {
		k.t = t
		crossNode(k)
	})
	if t.Failed() {
		return
	}
	var fe netip.Addr
	step(t, "seed walkthrough", func(t *testing.T) {
		k.t = t
		fe, _ = seedWalkthrough(k)
	})
	if t.Failed() {
		return
	}
	step(t, "network policies", func(t *testing.T) {
		k.t = t
		networkPolicies(k, fe)
	})
	if t.Failed() {
		return
	}
	step(t, "agent restart keeps connections", func(t *testing.T) {
		k.t = t
		agentRestart(k)
	})
	var shop *shopPods
	step(t, "network policies across nodes", func(t *testing.T) {
		k.t = t
		shop = crossNodePolicies(k)
	})
	step(t, "a node joins late and is deleted", func(t *testing.T) {
		k.t = t
		joinAndLeave(k, shop)
	})
}

// options are the cluster's from the environment: NODES (default 3),
// TOPOLOGY (flat or routed) and KUBE_PROXY_MODE (iptables, nftables, none).
func options(t testing.TB) cluster.Options {
	t.Helper()
	opts := cluster.Options{Log: logWriter{t}, Topology: os.Getenv("TOPOLOGY"), KubeProxyMode: os.Getenv("KUBE_PROXY_MODE")}
	if v := os.Getenv("NODES"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("NODES=%q: want a number of nodes", v)
		}
		opts.Nodes = n
	}
	return opts
}

// up brings up a cluster of this test's own and registers its removal,
// which is checked for leftovers and timed.
func up(t testing.TB) *cluster.Cluster {
	t.Helper()
	return upWith(t, options(t))
}

// upWith is up with options of the caller's.
func upWith(t testing.TB, opts cluster.Options) *cluster.Cluster {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: a real Kubernetes cluster takes minutes")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: the cluster's node is a mount and network namespace with a kubelet and containerd in it (run: sudo go test ./e2e/cluster/)")
	}
	before, err := cluster.ReadSysctls()
	if err != nil {
		t.Fatal(err)
	}
	if saved, err := cluster.SavedSysctls(); err == nil {
		// Another cluster runs (or one died): its record holds the host's
		// own values.
		before = saved
	}
	// The kubelet's chains go to the node's network namespace; the host's
	// tables must not change.
	chainsBefore := kubeChains(t)
	start := time.Now()
	c, err := cluster.Up(context.Background(), opts)
	if err != nil {
		if errors.Is(err, cluster.ErrNotRoot) {
			t.Skip(err)
		}
		t.Fatal(err)
	}
	t.Logf("cluster %s up in %s: %d nodes, %s (kubeconfig %s)", c.Name, time.Since(start).Round(100*time.Millisecond), len(c.Nodes), c.Topology, c.State.Kubeconfig)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("logs of the failed cluster:%s", c.LogTails())
		}
		// Teardown removes the logs with the run directory; a CI job
		// that wants them names a directory to copy them to.
		if dir := os.Getenv("IDCNI_CLUSTER_LOGS"); dir != "" {
			if dst, err := c.SaveLogs(dir); err != nil {
				t.Errorf("save logs: %v", err)
			} else {
				t.Logf("daemon logs saved in %s", dst)
			}
		}
		start := time.Now()
		if err := c.Down(); err != nil {
			t.Errorf("teardown: %v", err)
		}
		t.Logf("teardown in %s", time.Since(start).Round(10*time.Millisecond))
		// Killed processes leave their namespaces when the kernel has torn
		// them down, which can take a moment after Down returns: give it
		// a few seconds before calling anything a leftover.
		left := cluster.Leftovers(&c.State, before)
		for deadline := time.Now().Add(15 * time.Second); len(left) > 0 && time.Now().Before(deadline); {
			time.Sleep(250 * time.Millisecond)
			left = cluster.Leftovers(&c.State, before)
		}
		if after := kubeChains(t); after != chainsBefore {
			left = append(left, fmt.Sprintf("the host's KUBE-* iptables chains changed:\nbefore:\n%s\nafter:\n%s", chainsBefore, after))
		}
		if len(left) > 0 {
			t.Errorf("left on the host after teardown:\n  %s", strings.Join(left, "\n  "))
		}
	})
	return c
}

// kubeChains lists the host's iptables and ip6tables chains named KUBE-*.
func kubeChains(t testing.TB) string {
	t.Helper()
	var b strings.Builder
	for _, tool := range []string{"iptables-save", "ip6tables-save"} {
		out, err := exec.Command(tool).Output()
		if err != nil {
			t.Logf("%s: %v (not checked)", tool, err)
			continue
		}
		for _, l := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(l, ":KUBE-") {
				b.WriteString(tool + " " + strings.Fields(l)[0] + "\n")
			}
		}
	}
	return b.String()
}

// step runs f as a subtest and logs how long it took.
func step(t *testing.T, name string, f func(t *testing.T)) {
	start := time.Now()
	t.Run(name, f)
	t.Logf("%s: %s", name, time.Since(start).Round(100*time.Millisecond))
}

// demoNS is where manifests/examples puts the seed's pods.
const demoNS = "idcni-demo"

// seedWalkthrough is the README's walkthrough on Kubernetes: the pods from
// the manifests, their addresses in the seed's subnet, endpointctl and
// policyctl in the agent's pod, and ping between the pods.
func seedWalkthrough(k *kctl) (fe, be netip.Addr) {
	ex := filepath.Join(k.c.Root, "manifests", "examples")
	k.run("apply", "-f", filepath.Join(ex, "00-namespace.yaml"))
	k.applyPods()
	k.waitReady("frontend", "backend")
	wide := k.run("-n", demoNS, "get", "pods", "-o", "wide")
	fe, be = k.podIP("frontend"), k.podIP("backend")
	subnet := netip.MustParsePrefix("10.13.0.0/24")
	// The controller-manager gave the first node that range, each other
	// node another /24 of the cluster's, and the agent wrote it into the
	// CNI config (issue 12).
	cidrs := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(k.run("get", "nodes", "-o", `jsonpath={range .items[*]}{.metadata.name} {.spec.podCIDRs[*]}{"\n"}{end}`)), "\n") {
		if f := strings.Fields(l); len(f) == 2 {
			cidrs[f[0]] = f[1]
		}
	}
	if cidrs[k.c.NodeName] != subnet.String() {
		k.t.Fatalf("the first node's spec.podCIDRs is %q, want %s (kube-controller-manager --allocate-node-cidrs)", cidrs[k.c.NodeName], subnet)
	}
	seen := map[string]bool{}
	for _, n := range k.c.Nodes {
		p, err := netip.ParsePrefix(cidrs[n.Name])
		if err != nil || p.Bits() != 24 || !netip.MustParsePrefix("10.13.0.0/16").Contains(p.Addr()) || seen[p.String()] {
			k.t.Fatalf("node %s's spec.podCIDRs %q: want a /24 of 10.13.0.0/16 of its own; all: %v", n.Name, cidrs[n.Name], cidrs)
		}
		seen[p.String()] = true
	}
	for _, a := range []netip.Addr{fe, be} {
		if !subnet.Contains(a) || !strings.Contains(wide, a.String()) {
			k.t.Fatalf("kubectl get pods -o wide does not show pods on %s:\n%s", subnet, wide)
		}
	}

	// Before any rule: no policy selects the pods, so nothing is denied.
	k.wantPing("frontend", be, 3)

	// Step 2 of the seed: manual identities start isolated both ways.
	k.agent("endpointctl", "add", "--ip", fe.String(), "--identity", "1001")
	k.agent("endpointctl", "add", "--ip", be.String(), "--identity", "1002")
	k.wantPing("frontend", be, 0)

	// Step 3: allow both ways.
	k.agent("policyctl", "allow", "--src", "1001", "--dst", "1002", "--symmetric")
	k.wantPing("frontend", be, 3)
	k.agent("endpointctl", "list")
	k.agent("policyctl", "list")

	// Step 5: deny the way back; the replies are dropped.
	k.agent("policyctl", "deny", "--src", "1002", "--dst", "1001")
	k.wantPing("frontend", be, 0)

	// Undo the manual state: the pods fall back to their label identities,
	// which no policy isolates yet.
	k.agent("policyctl", "delete", "--src", "1002", "--dst", "1001")
	k.agent("policyctl", "delete", "--src", "1001", "--dst", "1002", "--symmetric")
	k.agent("endpointctl", "del", "--ip", fe.String())
	k.agent("endpointctl", "del", "--ip", be.String())
	k.wantPing("frontend", be, 3)
	return fe, be
}

// networkPolicies tells the same story with NetworkPolicy objects only:
// default deny, then frontend to backend on TCP 80, a label change and a
// re-created pod.
func networkPolicies(k *kctl, fe netip.Addr) {
	policies := filepath.Join(k.c.Root, "manifests", "examples", "20-policies.yaml")
	k.serveEcho("backend")
	k.serveEcho("frontend")
	be := k.podIP("backend")
	k.wantTCP("frontend", be, true)

	k.apply(document(k.t, policies, "default-deny-ingress"))
	k.changed()
	k.wantTCP("frontend", be, false)
	k.wantPing("frontend", be, 0)

	k.apply(document(k.t, policies, "allow-frontend-to-backend"))
	k.changed()
	k.wantTCP("frontend", be, true)
	// Only TCP 80 is allowed: ICMP is not, nor the other way round.
	k.wantPing("frontend", be, 0)
	k.wantTCP("backend", fe, false)

	// The identity follows the labels.
	k.run("-n", demoNS, "label", "pod", "frontend", "app=intruder", "--overwrite")
	k.changed()
	k.wantTCP("frontend", be, false)
	k.run("-n", demoNS, "label", "pod", "frontend", "app=frontend", "--overwrite")
	k.changed()
	k.wantTCP("frontend", be, true)

	// A re-created backend (a new sandbox, maybe a new address) is under
	// the same policies from its first packet: no settling time here.
	k.run("-n", demoNS, "delete", "pod", "backend", "--wait=true")
	k.applyPods()
	k.waitReady("backend")
	be = k.podIP("backend")
	k.serveEcho("backend")
	k.wantTCP("frontend", be, true)
	k.wantPing("frontend", be, 0)
	k.wantTCP("backend", fe, false)
}

// agentRestart deletes the agent's pod under an established TCP connection
// from frontend to backend: the DaemonSet brings a new agent, the pinned
// maps and programs outlive the old one, and the connection carries data
// before, during and after, while policy is still enforced.
func agentRestart(k *kctl) {
	be := k.podIP("backend")
	fe := k.podIP("frontend")
	sess := k.session("frontend", "nc", be.String(), "80")
	defer sess.close()
	sess.roundTrip("before the restart")

	old := k.agentPod()
	k.run("-n", "idcni-system", "delete", "pod", old, "--wait=true")
	sess.roundTrip("once the old agent is gone")
	if err := k.c.WaitAgentRollout(k.ctx); err != nil {
		k.t.Fatal(err)
	}
	if now := k.agentPod(); now == old {
		k.t.Fatalf("agent pod %s still the same after its deletion", now)
	}
	k.t.Logf("agent pod %s replaced by %s", old, k.agentPod())
	sess.roundTrip("after the restart")

	// And the new agent enforces the same rules, at once: the maps outlived
	// the old one.
	k.wantTCP("frontend", be, true)
	k.wantTCP("backend", fe, false)
	k.wantPing("frontend", be, 0)
	sess.roundTrip("at the end")
}

// kctl runs kubectl against the test's cluster and logs each command as a
// reader of the walkthrough would type it.
type kctl struct {
	t   *testing.T
	c   *cluster.Cluster
	ctx context.Context
	// settling is set by a change the agent applies asynchronously (a
	// NetworkPolicy, a label): the next check may retry until the
	// datapath agrees, within settleTime.
	settling bool
}

// settleTime bounds how long a NetworkPolicy or label change may take to
// reach the datapath: informer, identity, compile, map writes, on a
// loaded 2-core machine.
const settleTime = 30 * time.Second

// changed marks an asynchronous change (see settling).
func (k *kctl) changed() { k.settling = true }

// check runs attempt until it reports success; more than once only while
// settling, which it ends.
func (k *kctl) check(what string, attempt func() (ok bool, got string)) {
	k.t.Helper()
	start := time.Now()
	settling := k.settling
	k.settling = false
	for {
		ok, got := attempt()
		if ok {
			if d := time.Since(start); settling && d > time.Second {
				k.t.Logf("  (%s after %s: the change took that long to reach the datapath)", what, d.Round(100*time.Millisecond))
			}
			return
		}
		if !settling || time.Since(start) > settleTime {
			k.t.Fatalf("want: %s; got: %s", what, got)
		}
		time.Sleep(time.Second)
	}
}

func (k *kctl) run(args ...string) string {
	k.t.Helper()
	out, err := k.c.Kubectl(k.ctx, args...)
	k.t.Logf("$ kubectl %s\n%s", shellJoin(args), indent(out))
	if err != nil {
		k.t.Fatal(err)
	}
	return string(out)
}

// apply applies a manifest given as text.
func (k *kctl) apply(doc string) {
	k.t.Helper()
	cmd := exec.CommandContext(k.ctx, k.c.KubectlBin, "--kubeconfig", k.c.State.Kubeconfig, "apply", "-f", "-")
	cmd.Stdin = strings.NewReader(doc)
	out, err := cmd.CombinedOutput()
	k.t.Logf("$ kubectl apply -f - <<EOF\n%sEOF\n%s", doc, indent(out))
	if err != nil {
		k.t.Fatalf("kubectl apply: %v", err)
	}
}

// applyPods applies manifests/examples/10-pods.yaml with every pod bound to
// the first node: the walkthrough's manual identities and policies go into
// one agent's maps, which govern only the pods of that agent's node.
func (k *kctl) applyPods() {
	k.t.Helper()
	b, err := os.ReadFile(filepath.Join(k.c.Root, "manifests", "examples", "10-pods.yaml"))
	if err != nil {
		k.t.Fatal(err)
	}
	doc := regexp.MustCompile(`(?m)^spec:\n`).ReplaceAllString(string(b), "spec:\n  nodeName: "+k.c.NodeName+"\n")
	if !strings.Contains(doc, "nodeName: ") {
		k.t.Fatal("10-pods.yaml has no spec to bind to a node")
	}
	k.apply(doc)
}

// agent runs endpointctl or policyctl in the container of the first node's
// agent (the walkthrough's pods are there), as an operator does on the node.
func (k *kctl) agent(argv ...string) string {
	k.t.Helper()
	return k.run(append([]string{"-n", "idcni-system", "exec", k.agentPod(), "-c", "agent", "--"}, argv...)...)
}

// agentPod is the name of the first node's agent pod.
func (k *kctl) agentPod() string {
	k.t.Helper()
	return k.agentPodOn(k.c.NodeName)
}

// agentPodOn is the name of node's agent pod.
func (k *kctl) agentPodOn(node string) string {
	k.t.Helper()
	l, err := k.c.Client.CoreV1().Pods("idcni-system").List(k.ctx, metav1.ListOptions{
		LabelSelector: "app.kubernetes.io/name=idcni-agent", FieldSelector: "spec.nodeName=" + node})
	if err != nil {
		k.t.Fatal(err)
	}
	for _, p := range l.Items {
		if p.DeletionTimestamp == nil {
			return p.Name
		}
	}
	k.t.Fatalf("no agent pod on node %s", node)
	return ""
}

// waitReady waits for demo pods to be Ready. A pod whose sandbox keeps
// failing (the CNI ADD, usually) fails the test at its third failure, with
// the events, instead of after the timeout.
func (k *kctl) waitReady(pods ...string) {
	k.t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		notReady := 0
		for _, name := range pods {
			p, err := k.c.Client.CoreV1().Pods(demoNS).Get(k.ctx, name, metav1.GetOptions{})
			if err != nil || !isReady(p) {
				notReady++
			}
		}
		if notReady == 0 {
			return
		}
		evs, err := k.c.Client.CoreV1().Events(demoNS).List(k.ctx, metav1.ListOptions{FieldSelector: "reason=FailedCreatePodSandBox"})
		failed := false
		if err == nil {
			// Each failure is an event of its own (the sandbox id in the
			// message differs), or a count once the kubelet aggregates.
			perPod := map[string]int32{}
			for _, e := range evs.Items {
				perPod[e.InvolvedObject.Name] += max(e.Count, 1)
				failed = failed || perPod[e.InvolvedObject.Name] >= 3
			}
		}
		if failed || time.Now().After(deadline) {
			ev, _ := k.c.Kubectl(k.ctx, "-n", demoNS, "get", "events", "--sort-by=.lastTimestamp")
			hint := ""
			if strings.Contains(string(ev), "unsupported CNI result version") {
				// Seen with Debian 12's containerd 1.6, whose CNI library
				// knows spec versions up to 1.0.0.
				hint = "\nthe container runtime's CNI library does not know the cniVersion of manifests/cni/10-idcni.conflist"
			}
			k.t.Fatalf("pods %v not Ready; events:\n%s%s", pods, ev, hint)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func isReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func (k *kctl) podIP(name string) netip.Addr {
	k.t.Helper()
	p, err := k.c.Client.CoreV1().Pods(demoNS).Get(k.ctx, name, metav1.GetOptions{})
	if err != nil {
		k.t.Fatal(err)
	}
	a, err := netip.ParseAddr(p.Status.PodIP)
	if err != nil || p.Status.Phase != corev1.PodRunning {
		k.t.Fatalf("pod %s: phase %s, address %q", name, p.Status.Phase, p.Status.PodIP)
	}
	return a
}

var received = regexp.MustCompile(`(\d+) packets received`)

// wantPing runs `ping -c 3` in pod towards dst and wants exactly want
// replies.
func (k *kctl) wantPing(pod string, dst netip.Addr, want int) {
	k.t.Helper()
	args := []string{"-n", demoNS, "exec", pod, "--", "ping", "-c", "3", "-W", "1", dst.String()}
	k.check(fmt.Sprintf("ping %s from %s gets %d/3 replies", dst, pod, want), func() (bool, string) {
		// ping exits 1 when replies are missing: that is an answer, not a
		// failure of kubectl.
		out, _ := k.c.Kubectl(k.ctx, args...)
		k.t.Logf("$ kubectl %s\n%s", shellJoin(args), indent(out))
		m := received.FindSubmatch(out)
		if m == nil {
			return false, "no ping statistics in the output"
		}
		got, _ := strconv.Atoi(string(m[1]))
		return got == want, fmt.Sprintf("%d/3 replies", got)
	})
}

// serveEcho starts a persistent echo server on TCP 80 in pod, detached from
// the exec session.
func (k *kctl) serveEcho(pod string) {
	k.t.Helper()
	k.run("-n", demoNS, "exec", pod, "--", "sh", "-c", "nc -ll -p 80 -e cat </dev/null >/dev/null 2>&1 &")
}

// wantTCP connects from pod to dst:80 with nc and wants the echo server's
// answer, or (want false) no connection within the timeout.
func (k *kctl) wantTCP(pod string, dst netip.Addr, want bool) {
	k.t.Helper()
	const probe = "idcni-probe"
	args := []string{"-n", demoNS, "exec", pod, "--", "sh", "-c", fmt.Sprintf("echo %s | nc -w 2 %s 80", probe, dst)}
	verdict := map[bool]string{true: "connects", false: "does not connect"}
	k.check(fmt.Sprintf("TCP %s -> %s:80 %s", pod, dst, verdict[want]), func() (bool, string) {
		out, _ := k.c.Kubectl(k.ctx, args...)
		k.t.Logf("$ kubectl %s\n%s", shellJoin(args), indent(out))
		got := strings.Contains(string(out), probe)
		return got == want, "it " + verdict[got]
	})
}

// session is a long-lived `kubectl exec -i` whose stdin and stdout are the
// test's: with nc, one TCP connection held open across steps.
type session struct {
	k     *kctl
	cmd   *exec.Cmd
	in    io.WriteCloser
	lines chan string
}

func (k *kctl) session(pod string, argv ...string) *session {
	k.t.Helper()
	return k.sessionIn(demoNS, pod, argv...)
}

// sessionIn is session for a pod of namespace ns.
func (k *kctl) sessionIn(ns, pod string, argv ...string) *session {
	k.t.Helper()
	args := append([]string{"--kubeconfig", k.c.State.Kubeconfig, "-n", ns, "exec", "-i", pod, "--"}, argv...)
	cmd := exec.Command(k.c.KubectlBin, args...)
	in, err := cmd.StdinPipe()
	if err != nil {
		k.t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		k.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		k.t.Fatal(err)
	}
	k.t.Logf("$ kubectl %s   (kept open)", shellJoin(args[2:]))
	s := &session{k: k, cmd: cmd, in: in, lines: make(chan string, 16)}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			s.lines <- sc.Text()
		}
		close(s.lines)
	}()
	return s
}

// roundTrip sends a line over the session and wants it echoed back.
func (s *session) roundTrip(msg string) {
	s.k.t.Helper()
	if _, err := io.WriteString(s.in, msg+"\n"); err != nil {
		s.k.t.Fatalf("session: write %q: %v", msg, err)
	}
	select {
	case got, ok := <-s.lines:
		if !ok {
			s.k.t.Fatalf("session: the connection closed instead of echoing %q", msg)
		}
		if got != msg {
			s.k.t.Fatalf("session: echoed %q, want %q", got, msg)
		}
		s.k.t.Logf("  same TCP connection, %s: sent and received %q", msg, got)
	case <-time.After(10 * time.Second):
		s.k.t.Fatalf("session: no echo of %q within 10s", msg)
	}
}

func (s *session) close() {
	s.in.Close()
	done := make(chan struct{})
	go func() { _ = s.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = s.cmd.Process.Kill()
		<-done
	}
}

// document returns the YAML document of file that defines name.
func document(t *testing.T, file, name string) string {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range regexp.MustCompile(`(?m)^---\s*$`).Split(string(b), -1) {
		if regexp.MustCompile(`(?m)^  name: ` + regexp.QuoteMeta(name) + `\s*$`).MatchString(d) {
			return strings.TrimLeft(d, "\n")
		}
	}
	t.Fatalf("%s defines no %s", file, name)
	return ""
}

// shellJoin quotes the words a shell would split or expand, so the logged
// commands can be pasted.
func shellJoin(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		if a == "" || strings.ContainsAny(a, " \t\n|&;<>()$`\\\"'*?[]#~=%{}!") && !safeWord.MatchString(a) {
			q[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		} else {
			q[i] = a
		}
	}
	return strings.Join(q, " ")
}

// safeWord matches words with = or other characters that need no quotes
// in the commands logged here (app=frontend, --timeout=120s).
var safeWord = regexp.MustCompile(`^[A-Za-z0-9_./:=,@+-]+$`)

func indent(out []byte) string {
	s := strings.TrimRight(string(out), "\n")
	if s == "" {
		return ""
	}
	return "    " + strings.ReplaceAll(s, "\n", "\n    ")
}

// logWriter sends the cluster's progress lines to the test log.
type logWriter struct{ t testing.TB }

func (w logWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
