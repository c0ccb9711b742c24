package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/e2e/internal/cnitest"
	"github.com/idcni/idcni/e2e/internal/kube"
	"github.com/idcni/idcni/internal/clitest"
)

// agentProc is a running idcni-agent binary.
type agentProc struct {
	t       testing.TB
	cmd     *exec.Cmd
	args    []string
	bin     string
	log     string
	socket  string
	metrics string
}

var agentBin string

// buildAgent builds cmd/idcni-agent once per test process; with
// IDCNI_E2E_BIN set (the bin/ of `make build`, as for the plugin) it is
// the idcni-agent there.
func buildAgent(t testing.TB) string {
	t.Helper()
	if d := os.Getenv("IDCNI_E2E_BIN"); d != "" {
		bin := filepath.Join(d, "idcni-agent")
		if _, err := os.Stat(bin); err != nil {
			t.Fatalf("IDCNI_E2E_BIN=%s: %v (run make build)", d, err)
		}
		return bin
	}
	if agentBin != "" {
		return agentBin
	}
	dir, err := os.MkdirTemp("", "idcni-agent-bin-")
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "idcni-agent")
	cmd := exec.Command("go", "build", "-o", bin, "github.com/idcni/idcni/cmd/idcni-agent")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build idcni-agent: %v\n%s", err, out)
	}
	agentBin = bin
	return bin
}

func removeAgentBin() {
	if agentBin != "" {
		os.RemoveAll(filepath.Dir(agentBin))
	}
}

// agentEnv is a real apiserver, a node object, a private idcni network and
// an agent serving it.
type agentEnv struct {
	*cnitest.Env
	kube  *kube.Cluster
	node  string
	agent *agentProc
	state string
}

func newAgentEnv(t testing.TB) *agentEnv {
	t.Helper()
	return newAgentEnvArgs(t)
}

// newAgentEnvArgs is newAgentEnv with extra agent flags from the first
// start (a restart to add them would load the programs again).
func newAgentEnvArgs(t testing.TB, extra ...string) *agentEnv {
	t.Helper()
	return newAgentEnvWith(t, buildAgent(t), kube.Options{}, nil, extra...)
}

// newAgentEnvBin is newAgentEnvArgs with the agent binary bin: another
// build's, for the tests of upgrades.
func newAgentEnvBin(t testing.TB, bin string, extra ...string) *agentEnv {
	t.Helper()
	return newAgentEnvWith(t, bin, kube.Options{}, nil, extra...)
}

// newAgentEnvWith is newAgentEnvBin with the apiserver's options and
// more of the plugin's configuration.
func newAgentEnvWith(t testing.TB, bin string, ko kube.Options, plugin map[string]any, extra ...string) *agentEnv {
	t.Helper()
	cnitest.RequireRoot(t)
	c := kube.Start(t, ko)
	dir := t.TempDir()
	socket := filepath.Join(dir, "agent.sock")
	conf := map[string]any{"agentSocket": socket, "agentRequired": true}
	for k, v := range plugin {
		conf[k] = v
	}
	env := cnitest.New(t, cnitest.Options{Plugin: conf})
	e := &agentEnv{Env: env, kube: c, node: "node-" + cnitest.RandHex(6), state: filepath.Join(dir, "state.db")}
	ctx := context.Background()
	_, err := c.Client.CoreV1().Nodes().Create(ctx, envNode(e.node, env), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	confDir := filepath.Join(dir, "net.d")
	tmpl := filepath.Join(dir, "template.conflist")
	if err := os.WriteFile(tmpl, env.ConfListBytes("1.1.0", env.PluginConf()), 0o600); err != nil {
		t.Fatal(err)
	}
	metrics := freeAddr(t)
	e.agent = &agentProc{t: t, bin: bin, log: filepath.Join(dir, "agent.log"), socket: socket, metrics: metrics, args: []string{
		"--kubeconfig", c.Kubeconfig, "--node-name", e.node, "--bpf-root", env.BPFRoot, "--state", e.state,
		"--socket", socket, "--metrics-addr", metrics, "--cni-conf-dir", confDir, "--cni-conf-template", tmpl,
		"--identity-grace", "1m",
		// The agent runs in the host's netns here: no nftables table
		// there (masquerade_test.go tests it in node netns).
		"--masquerade=false", "--tunnel-port=0", "--routing-mode=direct",
	}}
	e.agent.args = append(e.agent.args, extra...)
	e.agent.start()
	t.Cleanup(e.agent.stop)
	// Ready means the CNI config is written.
	waitFor(t, 60*time.Second, "agent writes the CNI config", func() bool {
		_, err := os.Stat(filepath.Join(confDir, "10-idcni.conflist"))
		return err == nil
	})
	return e
}

// envNode is the Node of an env's agent: its pod CIDRs are the env's
// subnets, the ranges its pods get addresses from.
func envNode(name string, env *cnitest.Env) *corev1.Node {
	n := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec:       corev1.NodeSpec{PodCIDR: env.Subnet.String(), PodCIDRs: []string{env.Subnet.String()}},
		Status:     corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "192.0.2.10"}}},
	}
	if env.Subnet6.IsValid() {
		n.Spec.PodCIDRs = append(n.Spec.PodCIDRs, env.Subnet6.String())
	}
	return n
}

func freeAddr(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// start starts the agent and waits until it is ready.
func (p *agentProc) start() {
	p.t.Helper()
	p.startWait("agent is ready on its socket", api.NewClient(p.socket).Running)
}

// startAnswering starts the agent and waits until it answers on its
// socket, ready or not.
func (p *agentProc) startAnswering() {
	p.t.Helper()
	p.startWait("agent answers on its socket", api.NewClient(p.socket).Answering)
}

// launch starts the agent's process, its output appended to its log.
func (p *agentProc) launch() {
	p.t.Helper()
	logf, err := os.OpenFile(p.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		p.t.Fatal(err)
	}
	p.cmd = exec.Command(p.bin, p.args...)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := p.cmd.Start(); err != nil {
		p.t.Fatal(err)
	}
	logf.Close()
}

func (p *agentProc) startWait(what string, cond func(context.Context) bool) {
	p.t.Helper()
	p.launch()
	waitFor(p.t, 60*time.Second, what, func() bool { return cond(context.Background()) })
}

// startOrExit starts the agent and waits until it is ready or has
// exited, as an earlier build's agent does when it refuses the node's
// pins; it reports whether the agent exited.
func (p *agentProc) startOrExit() bool {
	p.t.Helper()
	p.launch()
	ready := api.NewClient(p.socket).Running
	deadline := time.Now().Add(60 * time.Second)
	for {
		var ws syscall.WaitStatus
		if pid, err := syscall.Wait4(p.cmd.Process.Pid, &ws, syscall.WNOHANG, nil); err == nil && pid == p.cmd.Process.Pid {
			p.cmd = nil // reaped here: stop has nothing to wait for
			return true
		}
		if ready(context.Background()) {
			return false
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("agent %s neither ready nor exited in 60s", p.bin)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// kill9 kills the agent the hard way, as an OOM kill or a node hiccup would.
func (p *agentProc) kill9() {
	if p.cmd != nil && p.cmd.Process != nil {
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		_ = p.cmd.Wait()
		p.cmd = nil
	}
}

func (p *agentProc) stop() {
	if p.cmd == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		p.kill9()
	}
	if p.t.Failed() {
		if b, err := os.ReadFile(p.log); err == nil {
			lines := strings.Split(string(b), "\n")
			p.t.Logf("agent log tail:\n%s", strings.Join(lines[max(0, len(lines)-40):], "\n"))
		}
	}
	p.cmd = nil
}

func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting until %s", d, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// kpod is a netns pod backed by a Pod object in the API server.
type kpod struct {
	*cnitest.Pod
	ns, name string
	ip       netip.Addr
}

// newPod creates the Pod object (on the env's node, with container ports),
// plugs a netns through the plugin, which registers it with the agent, and
// reports the address in the Pod's status as a kubelet would.
func (e *agentEnv) newPod(t testing.TB, ns, name string, labels map[string]string, ports ...corev1.ContainerPort) *kpod {
	t.Helper()
	ctx := context.Background()
	_, err := e.kube.Client.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels},
		Spec: corev1.PodSpec{NodeName: e.node, Containers: []corev1.Container{{
			Name: "c", Image: "idcni/test:none", Ports: ports,
		}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p := &kpod{Pod: e.NewPod(t), ns: ns, name: name}
	// As the kubelet passes them: IgnoreUnknown lets host-local skip the K8S_ keys.
	p.Args = [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", ns}, {"K8S_POD_NAME", name}}
	res := e.MustAdd(t, p.Pod)
	t.Cleanup(func() { _ = e.Del(p.Pod) })
	p.ip, _ = netip.AddrFromSlice(res.IPs[0].Address.IP.To4())
	pod, err := e.kube.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod.Status.PodIP = p.ip.String()
	pod.Status.PodIPs = []corev1.PodIP{{IP: p.ip.String()}}
	pod.Status.Phase = corev1.PodRunning
	if _, err := e.kube.Client.CoreV1().Pods(ns).UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	return p
}

// serve runs a TCP echo server inside the pod on each port.
func (p *kpod) serve(t testing.TB, ports ...int) {
	t.Helper()
	for _, port := range ports {
		var l net.Listener
		err := ns.WithNetNSPath(p.NSPath, func(ns.NetNS) error {
			var err error
			l, err = net.Listen("tcp", fmt.Sprintf(":%d", port))
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					sc := bufio.NewScanner(c)
					for sc.Scan() {
						if _, err := fmt.Fprintln(c, sc.Text()); err != nil {
							return
						}
					}
				}()
			}
		}()
	}
}

// dial opens a TCP connection from inside the pod.
func (p *kpod) dial(dst netip.Addr, port int, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := ns.WithNetNSPath(p.NSPath, func(ns.NetNS) error {
		var err error
		c, err = net.DialTimeout("tcp", netip.AddrPortFrom(dst, uint16(port)).String(), timeout)
		return err
	})
	return c, err
}

// echoOK reports whether a line sent on c comes back.
func echoOK(c net.Conn) bool {
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := fmt.Fprintln(c, "ping"); err != nil {
		return false
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return err == nil && line == "ping\n"
}

// reach reports whether a new connection from p to dst:port carries data.
func (p *kpod) reach(dst *kpod, port int) bool {
	c, err := p.dial(dst.ip, port, time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	return echoOK(c)
}

// eventually waits until reach gives want: enforcement follows the API
// server asynchronously (informer, reconcile, map write).
func eventually(t *testing.T, what string, want bool, probe func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for probe() != want {
		if time.Now().After(deadline) {
			t.Fatalf("%s: still %v after 15s, want %v", what, !want, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func tcpPort(p int32) []networkingv1.NetworkPolicyPort {
	tcp := corev1.ProtocolTCP
	port := intstr.FromInt32(p)
	return []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &port}}
}

func (e *agentEnv) apply(t testing.TB, np *networkingv1.NetworkPolicy) {
	t.Helper()
	ctx := context.Background()
	c := e.kube.Client.NetworkingV1().NetworkPolicies(np.Namespace)
	cur, err := c.Get(ctx, np.Name, metav1.GetOptions{})
	if err == nil {
		np.ResourceVersion = cur.ResourceVersion
		_, err = c.Update(ctx, np, metav1.UpdateOptions{})
	} else {
		_, err = c.Create(ctx, np, metav1.CreateOptions{})
	}
	if err != nil {
		t.Fatal(err)
	}
}

func relabel(t testing.TB, c kubernetes.Interface, p *kpod, labels map[string]string) {
	t.Helper()
	patch := `{"metadata":{"labels":null}}`
	if _, err := c.CoreV1().Pods(p.ns).Patch(context.Background(), p.name, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	var sb strings.Builder
	sb.WriteString(`{"metadata":{"labels":{`)
	first := true
	for k, v := range labels {
		if !first {
			sb.WriteString(",")
		}
		first = false
		fmt.Fprintf(&sb, "%q:%q", k, v)
	}
	sb.WriteString(`}}}`)
	if _, err := c.CoreV1().Pods(p.ns).Patch(context.Background(), p.name, types.MergePatchType, []byte(sb.String()), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
}

func TestAgentEnforcesNetworkPolicies(t *testing.T) {
	e := newAgentEnv(t)
	e.kube.CreateNamespace(t, "shop", map[string]string{"team": "shop"})
	e.kube.CreateNamespace(t, "ops", map[string]string{"team": "ops"})
	web := e.newPod(t, "shop", "web", map[string]string{"app": "frontend"})
	db := e.newPod(t, "shop", "db", map[string]string{"app": "backend"},
		corev1.ContainerPort{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP})
	prom := e.newPod(t, "ops", "prom", map[string]string{"app": "prom"})
	db.serve(t, 80, 81, 8080)
	prom.serve(t, 80)

	// Unselected pods are open.
	if !web.reach(db, 80) || !prom.reach(db, 81) {
		t.Fatal("traffic between unselected pods is denied")
	}

	// Selected for ingress: isolated.
	e.apply(t, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "default-deny-ingress", Namespace: "shop"},
		Spec:       networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}},
	})
	eventually(t, "web -> db:80 under default deny", false, func() bool { return web.reach(db, 80) })

	// Allowed by pod label on one port.
	e.apply(t, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "allow-frontend", Namespace: "shop"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "backend"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "frontend"}}}},
				Ports: tcpPort(80),
			}},
		},
	})
	eventually(t, "web -> db:80 allowed by label", true, func() bool { return web.reach(db, 80) })
	if web.reach(db, 81) {
		t.Fatal("web -> db:81 allowed, but only port 80 is")
	}
	if prom.reach(db, 80) {
		t.Fatal("ops/prom -> db:80 allowed by a pod selector of namespace shop")
	}

	// Allowed by namespace label and named port.
	http := intstr.FromString("http")
	e.apply(t, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "allow-ops-http", Namespace: "shop"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "backend"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": "ops"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Port: &http}},
			}},
		},
	})
	eventually(t, "ops/prom -> db:http(8080) by namespace label", true, func() bool { return prom.reach(db, 8080) })
	if prom.reach(db, 80) {
		t.Fatal("ops/prom -> db:80 allowed, but only the named port is")
	}

	// Egress: web may only talk to db.
	e.apply(t, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "web-egress", Namespace: "shop"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "frontend"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
			Egress: []networkingv1.NetworkPolicyEgressRule{{
				To: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "backend"}}}},
			}},
		},
	})
	eventually(t, "web -> ops/prom:80 cut by egress policy", false, func() bool { return web.reach(prom, 80) })
	if !web.reach(db, 80) {
		t.Fatal("web -> db:80 lost under the egress policy that allows it")
	}

	// A label change moves web to another identity; its traffic follows.
	relabel(t, e.kube.Client, web, map[string]string{"app": "other"})
	eventually(t, "web relabelled app=other -> db:80", false, func() bool { return web.reach(db, 80) })
	eventually(t, "web relabelled escapes the egress policy", true, func() bool { return web.reach(prom, 80) })
	relabel(t, e.kube.Client, web, map[string]string{"app": "frontend"})
	eventually(t, "web back to app=frontend -> db:80", true, func() bool { return web.reach(db, 80) })

	// Deleting the isolating policies restores access.
	for _, name := range []string{"default-deny-ingress", "allow-frontend", "allow-ops-http"} {
		if err := e.kube.Client.NetworkingV1().NetworkPolicies("shop").Delete(context.Background(), name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "prom -> db:81 after deleting the policies", true, func() bool { return prom.reach(db, 81) })
}

func TestAgentRestartKeepsFlowsAndEnforcement(t *testing.T) {
	e := newAgentEnv(t)
	e.kube.CreateNamespace(t, "app", nil)
	client := e.newPod(t, "app", "client", map[string]string{"role": "client"})
	server := e.newPod(t, "app", "server", map[string]string{"role": "server"})
	intruder := e.newPod(t, "app", "intruder", map[string]string{"role": "intruder"})
	server.serve(t, 80)
	e.apply(t, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "server", Namespace: "app"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"role": "server"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "client"}}}},
			}},
		},
	})
	eventually(t, "intruder cut off", false, func() bool { return intruder.reach(server, 80) })
	conn, err := client.dial(server.ip, 80, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if !echoOK(conn) {
		t.Fatal("established connection does not carry data")
	}

	e.agent.kill9()
	if !echoOK(conn) {
		t.Fatal("established connection broke while the agent is down")
	}
	if intruder.reach(server, 80) {
		t.Fatal("enforcement stopped with the agent")
	}
	e.agent.start()
	waitFor(t, 30*time.Second, "restarted agent is ready", func() bool {
		return api.NewClient(e.agent.socket).Running(context.Background())
	})
	if !echoOK(conn) {
		t.Fatal("established connection broke when the agent restarted")
	}
	if intruder.reach(server, 80) {
		t.Fatal("restarted agent lost enforcement")
	}
	if !client.reach(server, 80) {
		t.Fatal("restarted agent lost the allow")
	}

	// Drops reach policyctl monitor through the agent, with pod names.
	bins, err := clitest.Bins()
	if err != nil {
		t.Fatal(err)
	}
	mon := exec.Command(filepath.Join(bins, "policyctl"), "monitor", "--agent-socket", e.agent.socket,
		"--verdict", "drop", "--namespace", "app", "-c", "1", "-o", "json")
	out := make(chan []byte, 1)
	go func() { b, _ := mon.Output(); out <- b }()
	time.Sleep(500 * time.Millisecond) // let the monitor attach
	deadline := time.After(15 * time.Second)
	var ev []byte
	for ev == nil {
		intruder.reach(server, 80)
		select {
		case ev = <-out:
		case <-deadline:
			_ = mon.Process.Kill()
			t.Fatal("policyctl monitor saw no drop through the agent")
		case <-time.After(300 * time.Millisecond):
		}
	}
	if !strings.Contains(string(ev), `"app/intruder"`) || !strings.Contains(string(ev), `"app/server"`) {
		t.Fatalf("monitor event without pod names: %s", ev)
	}

	// Metrics count the drops by reason.
	resp, err := http.Get("http://" + e.agent.metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !regexp.MustCompile(`idcni_packets_total\{direction="ingress",reason="no-rule",verdict="drop"\} [1-9]`).Match(body) {
		t.Fatalf("no ingress no-rule drops in /metrics:\n%s", grepLines(string(body), "idcni_packets_total"))
	}

	// A policy deleted while the agent is down is gone from the maps once
	// it is back: start-up reconciles to the cluster's truth.
	e.agent.kill9()
	if err := e.kube.Client.NetworkingV1().NetworkPolicies("app").Delete(context.Background(), "server", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if intruder.reach(server, 80) {
		t.Fatal("policy deleted while the agent is down stopped enforcing by itself")
	}
	e.agent.start()
	eventually(t, "stale policy removed after restart", true, func() bool { return intruder.reach(server, 80) })
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// A policy that does not fit a map entry is refused whole, with an Event
// on the policy, and what was enforced before stays.
func TestAgentRefusesPolicyThatDoesNotFit(t *testing.T) {
	e := newAgentEnv(t)
	e.kube.CreateNamespace(t, "fit", nil)
	a := e.newPod(t, "fit", "a", map[string]string{"role": "a"})
	b := e.newPod(t, "fit", "b", map[string]string{"role": "b"})
	b.serve(t, 80)
	e.apply(t, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "b-from-a", Namespace: "fit"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"role": "b"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "a"}}}},
				Ports: tcpPort(80),
			}},
		},
	})
	eventually(t, "a -> b:80 allowed", true, func() bool { return a.reach(b, 80) })

	// 17 separate ports from one peer: one more range than an entry holds.
	var ports []networkingv1.NetworkPolicyPort
	for i := int32(0); i < 17; i++ {
		ports = append(ports, tcpPort(9000+2*i)...)
	}
	e.apply(t, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "too-many-ports", Namespace: "fit"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"role": "b"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "a"}}}},
				Ports: ports,
			}},
		},
	})
	waitFor(t, 15*time.Second, "a PolicyRejected event on too-many-ports", func() bool {
		evs, err := e.kube.Client.CoreV1().Events("fit").List(context.Background(), metav1.ListOptions{})
		if err != nil {
			return false
		}
		for _, ev := range evs.Items {
			if ev.Reason == "PolicyRejected" && ev.InvolvedObject.Name == "too-many-ports" {
				return true
			}
		}
		return false
	})
	if !a.reach(b, 80) {
		t.Fatal("the earlier policy's allow was lost when the new one was refused")
	}
	d := e.Datapath(t)
	ms, err := d.Policy()
	if err != nil {
		t.Fatal(err)
	}
	for k, en := range ms.Entries {
		for _, r := range en.Allow {
			if r.Lo >= 9000 {
				t.Fatalf("refused policy half applied: %+v %+v", k, en)
			}
		}
	}

	// --uninstall removes the CNI config and every pin.
	e.agent.stop()
	confDir := ""
	for i, arg := range e.agent.args {
		if arg == "--cni-conf-dir" {
			confDir = e.agent.args[i+1]
		}
	}
	out, err := exec.Command(e.agent.bin, "--uninstall", "--force", "--cni-conf-dir", confDir, "--bpf-root", e.BPFRoot).CombinedOutput()
	if err != nil {
		t.Fatalf("uninstall: %v\n%s", err, out)
	}
	for _, path := range []string{filepath.Join(confDir, "10-idcni.conflist"), e.BPFRoot} {
		if _, err := os.Stat(path); !os.IsNotExist(err) {
			t.Fatalf("%s still there after --uninstall", path)
		}
	}
}

// endpointctl and policyctl go through a running agent: the binding wins
// over the pod's label identity, the rule is enforced, and both survive an
// agent restart (persisted in the agent's state file).
func TestAgentManualOverrides(t *testing.T) {
	e := newAgentEnv(t)
	e.kube.CreateNamespace(t, "man", nil)
	a := e.newPod(t, "man", "a", map[string]string{"role": "a"})
	b := e.newPod(t, "man", "b", map[string]string{"role": "b"})
	b.serve(t, 80)
	if !a.reach(b, 80) {
		t.Fatal("open label identities cannot talk")
	}
	run := func(tool string, args ...string) string { t.Helper(); return e.cli(t, tool, args...) }
	if out := run("endpointctl", "add", "--ip", b.ip.String(), "--identity", "1002"); !strings.Contains(out, "through idcni-agent") {
		t.Fatalf("endpointctl did not use the agent: %s", out)
	}
	d := e.Datapath(t)
	idOf := func(p *kpod) uint32 {
		id, _, _ := d.IPCacheLookup(p.ip)
		return uint32(id)
	}
	eventually(t, "b is manual identity 1002 (isolated)", false, func() bool { return a.reach(b, 80) })
	if idOf(b) != 1002 {
		t.Fatalf("ipcache says b is %d", idOf(b))
	}
	run("endpointctl", "add", "--ip", a.ip.String(), "--identity", "1001")
	run("policyctl", "allow", "--src", "1001", "--dst", "1002", "--port", "80")
	eventually(t, "a -> b:80 by a manual rule", true, func() bool { return a.reach(b, 80) })
	if b.reach(a, 80) || a.reach(b, 81) {
		t.Fatal("the manual rule allows more than 1001 -> 1002 tcp/80")
	}

	e.agent.stop()
	e.agent.start()
	if idOf(b) != 1002 || !a.reach(b, 80) {
		t.Fatal("manual overrides lost across an agent restart")
	}
	if out := run("policyctl", "list", "-o", "json"); !strings.Contains(out, `"dst":1002`) && !strings.Contains(out, `1002`) {
		t.Fatalf("policyctl list through the agent: %s", out)
	}
	run("endpointctl", "del", "--ip", b.ip.String())
	run("endpointctl", "del", "--ip", a.ip.String())
	eventually(t, "a and b back to their label identities (open)", true, func() bool { return idOf(b) != 1002 && a.reach(b, 80) })

	resp, err := http.Get("http://" + e.agent.metrics + "/readyz")
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("/readyz: %v %v", resp, err)
	}
	resp.Body.Close()
}

// cli runs endpointctl or policyctl against the env's agent and fails the
// test when it fails.
func (e *agentEnv) cli(t *testing.T, tool string, args ...string) string {
	t.Helper()
	bins, err := clitest.Bins()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(bins, tool), append(args, "--agent-socket", e.agent.socket,
		"--bpf-root", e.BPFRoot, "--state", filepath.Join(t.TempDir(), "unused.db"))...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", tool, strings.Join(args, " "), err, out)
	}
	return string(out)
}
