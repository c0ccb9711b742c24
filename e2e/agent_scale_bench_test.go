package e2e

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/e2e/internal/cnitest"
	"github.com/idcni/idcni/e2e/internal/kube"
	"github.com/idcni/idcni/policy"
)

// BenchmarkAgentScale is issue 11's scale benchmark: the same scenario, in
// one run, against two agent builds, each with its own plugin, datapath,
// etcd and kube-apiserver:
//
//   - old: the binaries in IDCNI_BENCH_OLD_BIN (idcni-agent, idcni,
//     host-local, loopback), skipped when it is unset; `make
//     bench-agent-scale` builds them from a ref (scripts/bench-agent-scale.sh);
//   - new: the checkout under test (IDCNI_E2E_BIN, as the other e2e tests,
//     or built from the tree).
//
// The scenario (sizes from the environment, see scaleConfig): 100
// namespaces, 100 Nodes with InternalIPs (one of them the agent's own),
// 10,000 pods over them with about 1,000 distinct label sets, 100 of them
// local and plugged for real through the plugin (a netns, a host veth, a
// registration), 1,000 NetworkPolicies. Metrics, per build:
//
//   - ready-s: agent start to its health endpoint answering ready, with
//     every object above but the local pods' addresses in the API server
//     (a cold start: empty pins and state); restart-ready-s: the same after
//     a SIGTERM, with everything in place (pins, state, local endpoints);
//   - np-p50-ms, np-p99-ms: NetworkPolicy create call to its rule, keyed
//     on a local pod's identity, in the pinned policy map, over policies
//     created one after another;
//   - ipcache-watch-p50/p99-ms, ipcache-create-p50/p99-ms: under 100 pods/s
//     of remote pod churn (create, status with the IP, delete), a new pod's
//     /32 in the pinned ipcache, counted from the event of a watch of our
//     own that carries its IP, and from the return of its create call;
//     ipcache-status-p50/p99-ms: the same from the return of the status
//     update that set the address (the server has stored it; its watch
//     event follows), a reference that needs no watch; watch-restarts: how
//     often the server ended our watch (it resumes where it was, but the
//     events it then replays arrive late, which shortens, even turns
//     negative, the watch figures);
//   - cpu-ms/pod-event: the agent's user+system CPU from the churn's start
//     until every churned IP is in the ipcache (plus one second), divided
//     by the pod events the churn caused (creates, status updates,
//     deletes);
//   - rss-MiB: the agent's VmRSS once the churn is absorbed;
//   - quiet-cpu-ms/min: the agent's CPU over a quiet interval (nothing
//     changes in the API server), per minute;
//   - churn-pods/s: the creates the churn issued per second (it issues
//     ChurnRate a second, but no more than 512 calls in flight: an API
//     server that falls behind slows it down).
//
// ns/op means nothing here (the timer is stopped); progress goes to stderr
// as it happens.
//
// No figure is held to a threshold; the benchmark fails only when
// something does not happen at all within a generous bound.
//
//	make bench-agent-scale
//	IDCNI_BENCH_OLD_BIN=/path/bin IDCNI_E2E_BIN=$PWD/bin \
//	  go test -run '^$' -bench AgentScale -benchtime 1x -timeout 60m ./e2e/
func BenchmarkAgentScale(b *testing.B) {
	cnitest.RequireRoot(b)
	cfg := scaleConfigFromEnv(b)
	type build struct{ name, plugins, agent string }
	var builds []build
	if d := os.Getenv("IDCNI_BENCH_OLD_BIN"); d != "" {
		for _, f := range []string{"idcni-agent", "idcni", "host-local", "loopback"} {
			if _, err := os.Stat(filepath.Join(d, f)); err != nil {
				b.Fatalf("IDCNI_BENCH_OLD_BIN=%s: %v", d, err)
			}
		}
		builds = append(builds, build{"old", d, filepath.Join(d, "idcni-agent")})
	} else {
		b.Log("IDCNI_BENCH_OLD_BIN unset: the new build only")
	}
	plugins, err := cnitest.BinDir()
	if err != nil {
		b.Fatal(err)
	}
	agent := filepath.Join(plugins, "idcni-agent")
	if _, err := os.Stat(agent); err != nil {
		agent = buildAgent(b)
	}
	builds = append(builds, build{"new", plugins, agent})
	fmt.Fprintf(os.Stderr, "agent-scale: %+v\n", cfg)
	for _, bl := range builds {
		b.Run(bl.name, func(b *testing.B) {
			for range b.N {
				runScale(b, cfg, bl.name, bl.plugins, bl.agent)
			}
		})
	}
}

// scaleConfig sizes the scenario; IDCNI_BENCH_<FIELD> overrides each (e.g.
// IDCNI_BENCH_PODS=2000 for a quick run).
type scaleConfig struct {
	Pods, Nodes, Namespaces, Policies, LabelSets, Local int
	NPSamples                                           int           // policies measured, one after another
	ChurnRate                                           int           // pods created (and as many deleted) per second
	Churn, Quiet                                        time.Duration // churn window; quiet window
}

func scaleConfigFromEnv(b *testing.B) scaleConfig {
	c := scaleConfig{Pods: 10000, Nodes: 100, Namespaces: 100, Policies: 1000, LabelSets: 1000, Local: 100,
		NPSamples: 100, ChurnRate: 100, Churn: 30 * time.Second, Quiet: 60 * time.Second}
	for name, p := range map[string]*int{"PODS": &c.Pods, "NODES": &c.Nodes, "NAMESPACES": &c.Namespaces,
		"POLICIES": &c.Policies, "LABELSETS": &c.LabelSets, "LOCAL": &c.Local, "NP_SAMPLES": &c.NPSamples, "CHURN_RATE": &c.ChurnRate} {
		if v := os.Getenv("IDCNI_BENCH_" + name); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n <= 0 {
				b.Fatalf("IDCNI_BENCH_%s=%q: want a positive integer", name, v)
			}
			*p = n
		}
	}
	for name, p := range map[string]*time.Duration{"CHURN": &c.Churn, "QUIET": &c.Quiet} {
		if v := os.Getenv("IDCNI_BENCH_" + name); v != "" {
			d, err := time.ParseDuration(v)
			if err != nil || d <= 0 {
				b.Fatalf("IDCNI_BENCH_%s=%q: want a positive duration", name, v)
			}
			*p = d
		}
	}
	// Label set k lives in namespace k%Namespaces; a measured policy's peer
	// is label set k+Namespaces in the same namespace, which must exist and
	// have remote pods.
	switch {
	case c.Nodes < 2:
		b.Fatal("IDCNI_BENCH_NODES: want at least 2 (the local node and a remote one)")
	case c.LabelSets%c.Namespaces != 0 || c.LabelSets < 2*c.Namespaces:
		b.Fatal("IDCNI_BENCH_LABELSETS: want a multiple of IDCNI_BENCH_NAMESPACES, at least twice it")
	case c.Local > c.Namespaces || c.Local+c.LabelSets > c.Pods:
		b.Fatal("IDCNI_BENCH_LOCAL: want at most IDCNI_BENCH_NAMESPACES, and PODS >= LOCAL+LABELSETS")
	}
	return c
}

// The scenario's objects. Pod i (0 <= i < Pods) has label set i%LabelSets
// and lives in that set's namespace; pods 0..Local-1 are local, the rest
// spread over the remote nodes.
func (c scaleConfig) labelSet(i int) int  { return i % c.LabelSets }
func (c scaleConfig) nsOf(k int) string   { return fmt.Sprintf("scale-%d", k%c.Namespaces) }
func (c scaleConfig) roleOf(k int) string { return "r" + strconv.Itoa(k/c.Namespaces%5) }
func (c scaleConfig) appOf(k int) string  { return "app-" + strconv.Itoa(k) }
func (c scaleConfig) labels(k int) map[string]string {
	return map[string]string{"app": c.appOf(k), "role": c.roleOf(k)}
}

// remoteIP is pod i's address (remote pods), churnIP the c-th churned
// pod's: outside the plugin's 10.128.0.0/9 and never routed.
func remoteIP(i int) netip.Addr {
	v := uint32(172)<<24 | 16<<16 + uint32(i) + 1
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

func churnIP(c int) netip.Addr {
	v := uint32(172)<<24 | 24<<16 + uint32(c) + 1
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// scaleEnv is one build's run.
type scaleEnv struct {
	cfg    scaleConfig
	env    *cnitest.Env
	kube   *kube.Cluster
	client kubernetes.Interface // high QPS, for the bulk
	node   string
	nodes  []string // remote nodes
	agent  *agentProc
	maps   *rawMaps
	name   string // the build
}

// logf reports progress on stderr as it happens: a benchmark's own log is
// cut to 10 lines and printed only at its end.
func (s *scaleEnv) logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s agent-scale/%s: %s\n", time.Now().UTC().Format("15:04:05"), s.name, fmt.Sprintf(format, args...))
}

func runScale(b *testing.B, cfg scaleConfig, name, plugins, agentBin string) {
	b.StopTimer()
	began := time.Now()
	phase := time.Now()
	s := &scaleEnv{cfg: cfg, name: name}
	logPhase := func(what string) {
		s.logf("%s: %s", what, time.Since(phase).Round(time.Millisecond))
		phase = time.Now()
	}
	s.kube = kube.Start(b, kube.Options{APIServerArgs: []string{
		// The bulk goes through many concurrent calls.
		"--max-requests-inflight=2000", "--max-mutating-requests-inflight=1000",
	}})
	fast := rest.CopyConfig(s.kube.Config)
	fast.QPS, fast.Burst = 100000, 100000
	var err error
	if s.client, err = kubernetes.NewForConfig(fast); err != nil {
		b.Fatal(err)
	}
	dir := b.TempDir()
	socket := filepath.Join(dir, "agent.sock")
	s.env = cnitest.New(b, cnitest.Options{Plugin: map[string]any{"agentSocket": socket, "agentRequired": true}})
	// This build's plugin, not the tree's.
	s.env.BinDir = plugins
	s.env.CNI = cnitest.NewCNIConfig(plugins, s.env.CacheDir)
	suffix := cnitest.RandHex(6)
	s.node = "node-" + suffix
	confDir := filepath.Join(dir, "net.d")
	tmpl := filepath.Join(dir, "template.conflist")
	if err := os.WriteFile(tmpl, s.env.ConfListBytes("1.1.0", s.env.PluginConf()), 0o600); err != nil {
		b.Fatal(err)
	}
	s.agent = &agentProc{t: b, bin: agentBin, log: filepath.Join(dir, "agent.log"), socket: socket, metrics: freeAddr(b), args: []string{
		"--kubeconfig", s.kube.Kubeconfig, "--node-name", s.node, "--bpf-root", s.env.BPFRoot, "--state", filepath.Join(dir, "state.db"),
		"--socket", socket, "--cni-conf-dir", confDir, "--cni-conf-template", tmpl, "--identity-grace", "1m",
	}}
	s.agent.args = append(s.agent.args, "--metrics-addr", s.agent.metrics)
	if name != "old" {
		// The host's netns: no nftables table (an old build has
		// neither the table nor the flags).
		s.agent.args = append(s.agent.args, "--masquerade=false", "--tunnel-port=0", "--routing-mode=direct")
	}
	b.Cleanup(s.agent.stop)
	s.logf("agent %s, plugins %s, node %s, bpf root %s", agentBin, plugins, s.node, s.env.BPFRoot)

	s.populate(b)
	logPhase("populate the API server")

	ready := s.startAgent(b)
	b.ReportMetric(ready.Seconds(), "ready-s")
	s.logf("agent ready (cold) after %s", ready.Round(time.Millisecond))
	if s.maps, err = openRawMaps(s.env.BPFRoot); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(s.maps.close)
	// Lookups are longest-prefix: a covering prefix would fake arrivals.
	if id, ok := s.maps.ipcache(netip.MustParseAddr("172.31.255.254")); ok {
		b.Fatalf("the ipcache maps an address no pod has (to %d): a covering prefix", id)
	}
	waitFor(b, 5*time.Minute, "every remote pod in the ipcache", func() bool {
		for i := cfg.Local; i < cfg.Pods; i++ {
			if _, ok := s.maps.ipcache(remoteIP(i)); !ok {
				return false
			}
		}
		return true
	})
	logPhase("agent start and remote pods in the ipcache")

	locals := s.plugLocal(b)
	logPhase(fmt.Sprintf("plug %d local pods", len(locals)))

	np := s.measurePolicies(b, locals)
	b.ReportMetric(pct(np, 50), "np-p50-ms")
	b.ReportMetric(pct(np, 99), "np-p99-ms")
	logPhase(fmt.Sprintf("%d policies measured", len(np)))

	s.churn(b)
	logPhase("churn")

	time.Sleep(5 * time.Second)
	cpu0 := cpuTime(b, s.agent.cmd.Process.Pid)
	t0 := time.Now()
	time.Sleep(cfg.Quiet)
	quiet := cpuTime(b, s.agent.cmd.Process.Pid) - cpu0
	b.ReportMetric(float64(quiet.Microseconds())/1000*float64(time.Minute)/float64(time.Since(t0)), "quiet-cpu-ms/min")
	logPhase("quiet interval")

	s.agent.stop()
	restart := s.startAgent(b)
	b.ReportMetric(restart.Seconds(), "restart-ready-s")
	s.logf("agent ready (restart) after %s", restart.Round(time.Millisecond))
	s.logf("%s in all (before teardown)", time.Since(began).Round(time.Second))
}

// parallel runs f(0..n-1) on workers goroutines and returns the first error.
func parallel(n, workers int, f func(i int) error) error {
	var next atomic.Int64
	var mu sync.Mutex
	var first error
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := f(i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
					return
				}
			}
		})
	}
	wg.Wait()
	return first
}

// populate creates the namespaces, nodes, pods (the local ones without an
// address yet) and policies.
func (s *scaleEnv) populate(b *testing.B) {
	ctx := context.Background()
	c, cfg := s.client, s.cfg
	const workers = 48
	err := parallel(cfg.Namespaces, workers, func(i int) error {
		name := cfg.nsOf(i)
		if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{
			Name: name, Labels: map[string]string{"team": "t" + strconv.Itoa(i%10)},
		}}, metav1.CreateOptions{}); err != nil {
			return err
		}
		_, err := c.CoreV1().ServiceAccounts(name).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			err = nil
		}
		return err
	})
	if err != nil {
		b.Fatalf("namespaces: %v", err)
	}
	for i := 1; i < cfg.Nodes; i++ {
		s.nodes = append(s.nodes, fmt.Sprintf("%s-r%d", s.node, i))
	}
	err = parallel(cfg.Nodes, workers, func(i int) error {
		name := s.node
		if i > 0 {
			name = s.nodes[i-1]
		}
		node := &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP,
				Address: netip.AddrFrom4([4]byte{198, 18, byte(i / 250), byte(1 + i%250)}).String()}}},
		}
		if i == 0 {
			// The agent hands out its Node's pod CIDR: the plugin env's.
			node.Spec.PodCIDR, node.Spec.PodCIDRs = s.env.Subnet.String(), []string{s.env.Subnet.String()}
		}
		_, err := c.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
		return err
	})
	if err != nil {
		b.Fatalf("nodes: %v", err)
	}
	err = parallel(cfg.Pods, workers, func(i int) error {
		k := cfg.labelSet(i)
		if i < cfg.Local {
			_, err := c.CoreV1().Pods(cfg.nsOf(k)).Create(ctx, s.podObject(fmt.Sprintf("local-%d", i), k, s.node), metav1.CreateOptions{})
			return err
		}
		return s.createRemotePod(ctx, fmt.Sprintf("pod-%d", i), k, s.nodes[i%len(s.nodes)], remoteIP(i), nil)
	})
	if err != nil {
		b.Fatalf("pods: %v", err)
	}
	err = parallel(cfg.Policies, workers, func(j int) error {
		n := j % cfg.Namespaces
		k := n + cfg.Namespaces*(j/cfg.Namespaces%(cfg.LabelSets/cfg.Namespaces))
		peer := networkingv1.NetworkPolicyPeer{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "r" + strconv.Itoa(j%5)}}}
		if j%10 == 0 {
			// One in ten admits the role from every namespace.
			peer.NamespaceSelector = &metav1.LabelSelector{}
		}
		_, err := c.NetworkingV1().NetworkPolicies(cfg.nsOf(n)).Create(ctx, &networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("np-%d", j)},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": cfg.appOf(k)}},
				Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{peer}, Ports: tcpPort(int32(2000 + j%1000))}},
			},
		}, metav1.CreateOptions{})
		return err
	})
	if err != nil {
		b.Fatalf("policies: %v", err)
	}
}

func (s *scaleEnv) podObject(name string, k int, node string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: s.cfg.nsOf(k), Labels: s.cfg.labels(k)},
		Spec:       corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "c", Image: "idcni/test:none"}}},
	}
}

// createRemotePod creates the pod, then reports its address in its status
// as the other node's kubelet would; created, when set, runs between the
// two calls.
func (s *scaleEnv) createRemotePod(ctx context.Context, name string, k int, node string, ip netip.Addr, created func()) error {
	p, err := s.client.CoreV1().Pods(s.cfg.nsOf(k)).Create(ctx, s.podObject(name, k, node), metav1.CreateOptions{})
	if err != nil {
		return err
	}
	if created != nil {
		created()
	}
	p.Status.PodIP, p.Status.PodIPs, p.Status.Phase = ip.String(), []corev1.PodIP{{IP: ip.String()}}, corev1.PodRunning
	_, err = s.client.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, p, metav1.UpdateOptions{})
	return err
}

// startAgent starts the agent and returns how long it took to answer ready
// on its health endpoint.
func (s *scaleEnv) startAgent(b *testing.B) time.Duration {
	p := s.agent
	logf, err := os.OpenFile(p.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	p.cmd = exec.Command(p.bin, p.args...)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	start := time.Now()
	if err := p.cmd.Start(); err != nil {
		b.Fatal(err)
	}
	logf.Close()
	pid := p.cmd.Process.Pid
	c := api.NewClient(p.socket)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		ok := c.Running(ctx)
		cancel()
		if ok {
			return time.Since(start)
		}
		// Not reaped until stop: a dead agent is a zombie.
		if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err != nil || strings.Contains(string(st), ") Z ") {
			b.Fatal("agent exited before it was ready")
		}
		if time.Since(start) > 10*time.Minute {
			b.Fatal("agent not ready after 10 minutes")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// localPod is a pod plugged through the plugin.
type localPod struct {
	pod *cnitest.Pod
	k   int
	ip  netip.Addr
}

// plugLocal plugs the local pods through this build's plugin (a few at a
// time, as a kubelet starting pods would), reports their addresses in their
// status and waits for them in the ipcache.
func (s *scaleEnv) plugLocal(b *testing.B) []*localPod {
	ctx := context.Background()
	cfg := s.cfg
	pods := make([]*localPod, cfg.Local)
	for i := range pods {
		k := cfg.labelSet(i)
		p := &localPod{pod: s.env.NewPod(b), k: k}
		p.pod.Args = [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", cfg.nsOf(k)}, {"K8S_POD_NAME", fmt.Sprintf("local-%d", i)}}
		b.Cleanup(func() { _ = s.env.Del(p.pod) })
		pods[i] = p
	}
	err := parallel(len(pods), 4, func(i int) error {
		p := pods[i]
		res, err := s.env.Add(p.pod)
		if err != nil {
			return fmt.Errorf("ADD local-%d: %w", i, err)
		}
		p.ip, _ = netip.AddrFromSlice(res.IPs[0].Address.IP.To4())
		pod, err := s.client.CoreV1().Pods(cfg.nsOf(p.k)).Get(ctx, fmt.Sprintf("local-%d", i), metav1.GetOptions{})
		if err != nil {
			return err
		}
		pod.Status.PodIP, pod.Status.PodIPs, pod.Status.Phase = p.ip.String(), []corev1.PodIP{{IP: p.ip.String()}}, corev1.PodRunning
		_, err = s.client.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, pod, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
	waitFor(b, 2*time.Minute, "every local pod in the ipcache", func() bool {
		for _, p := range pods {
			if _, ok := s.maps.ipcache(p.ip); !ok {
				return false
			}
		}
		return true
	})
	return pods
}

// measurePolicies creates NPSamples policies one after another, each
// giving a local pod's identity an egress rule to a remote label set of its
// namespace, and times each from its create call to its key in the policy
// map. No setup policy has egress rules, so the key is new.
func (s *scaleEnv) measurePolicies(b *testing.B, locals []*localPod) []float64 {
	ctx := context.Background()
	cfg := s.cfg
	var lat []float64
	for i := range cfg.NPSamples {
		l := locals[i%len(locals)]
		subject, ok := s.maps.ipcache(l.ip)
		if !ok {
			b.Fatalf("local pod %s not in the ipcache", l.ip)
		}
		pk := l.k + cfg.Namespaces // same namespace, a remote label set
		r := pk
		for r < cfg.Local {
			r += cfg.LabelSets
		}
		peer, ok := s.maps.ipcache(remoteIP(r))
		if !ok {
			b.Fatalf("remote pod %d (%s) not in the ipcache", r, remoteIP(r))
		}
		port := int32(5000 + i)
		key := rawPolicyKey{Subject: subject, Peer: peer, Dir: uint8(policy.Egress), Proto: uint8(policy.ProtoTCP)}
		if s.maps.hasPolicy(key) && i < len(locals) {
			b.Fatalf("policy key %+v present before its policy", key)
		}
		// A second round over the same pod adds a port to an existing
		// key: wait for the entry to change instead.
		before := s.maps.policyValue(key)
		start := time.Now()
		_, err := s.client.NetworkingV1().NetworkPolicies(cfg.nsOf(l.k)).Create(ctx, &networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("bench-egress-%d", i)},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": cfg.appOf(l.k)}},
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
				Egress: []networkingv1.NetworkPolicyEgressRule{{
					To:    []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": cfg.appOf(pk)}}}},
					Ports: tcpPort(port),
				}},
			},
		}, metav1.CreateOptions{})
		if err != nil {
			b.Fatal(err)
		}
		for {
			if v := s.maps.policyValue(key); v != nil && string(v) != string(before) {
				break
			}
			if time.Since(start) > time.Minute {
				b.Fatalf("policy %d (%d -> %d, tcp/%d) not in the map after a minute", i, subject, peer, port)
			}
			time.Sleep(200 * time.Microsecond)
		}
		lat = append(lat, float64(time.Since(start).Microseconds())/1000)
	}
	return lat
}

// churn creates ChurnRate remote pods a second (each: create, then its
// status with the address) and deletes as many of the oldest ones (once
// their address has reached the ipcache) for the Churn window, and reports
// the ipcache latencies, the agent's CPU per pod event and its RSS.
func (s *scaleEnv) churn(b *testing.B) {
	cfg := s.cfg
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	n := int(cfg.Churn.Seconds() * float64(cfg.ChurnRate))
	created := make([]time.Time, n)  // create call returned
	watched := make([]time.Time, n)  // our watch delivered the address
	cached := make([]time.Time, n)   // the /32 was in the ipcache
	statused := make([]time.Time, n) // the status update call returned
	var mu sync.Mutex                // guards the three and pending
	pending := map[int]netip.Addr{}

	// Our own watch, from now on, of the churned pods: they all go to one
	// remote node, so the watch can select them by field (a label would
	// give them identities of their own) and carries nothing else.
	churnNode := s.nodes[0]
	// A connection of its own: on the bulk client's HTTP/2 connection,
	// behind hundreds of calls in flight, the stream fell behind and the
	// server closed it as unresponsive. (DisableCompression differs from
	// the bulk config, so client-go's transport cache makes a new one.)
	wcfg := rest.CopyConfig(s.kube.Config)
	wcfg.DisableCompression = true
	wc, err := kubernetes.NewForConfig(wcfg)
	if err != nil {
		b.Fatal(err)
	}
	// From the watch cache ("0"), so the watch starts where the cache is.
	list, err := wc.CoreV1().Pods("").List(ctx, metav1.ListOptions{ResourceVersion: "0", Limit: 1})
	if err != nil {
		b.Fatal(err)
	}
	// The watch resumes from the last event it saw whenever the server
	// ends it (timeout, error), so it misses nothing.
	var rewatches atomic.Int64
	var lastWatchErr atomic.Value
	// The churn starts once the watch has delivered a pod created after
	// it started: a watch still catching up would date events late.
	sentinel, sentinelOnce := make(chan struct{}), sync.Once{}
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		rv := list.ResourceVersion
		for ctx.Err() == nil {
			w, err := wc.CoreV1().Pods("").Watch(ctx, metav1.ListOptions{ResourceVersion: rv, AllowWatchBookmarks: true, FieldSelector: "spec.nodeName=" + churnNode})
			if err != nil {
				if ctx.Err() == nil {
					lastWatchErr.Store(err.Error())
					rewatches.Add(1)
				}
				time.Sleep(50 * time.Millisecond)
				continue
			}
			for ev := range w.ResultChan() {
				now := time.Now()
				if ev.Type == watch.Error {
					if ctx.Err() == nil {
						lastWatchErr.Store(fmt.Sprint(apierrors.FromObject(ev.Object)))
					}
					break
				}
				p, ok := ev.Object.(*corev1.Pod)
				if !ok {
					continue
				}
				rv = p.ResourceVersion
				if p.Name == "watch-sentinel" {
					sentinelOnce.Do(func() { close(sentinel) })
				}
				if (ev.Type != watch.Added && ev.Type != watch.Modified) || p.Status.PodIP == "" || !strings.HasPrefix(p.Name, "churn-") {
					continue
				}
				c, err := strconv.Atoi(strings.TrimPrefix(p.Name, "churn-"))
				if err != nil || c >= n {
					continue
				}
				mu.Lock()
				if watched[c].IsZero() {
					watched[c] = now
				}
				mu.Unlock()
			}
			w.Stop()
			if ctx.Err() == nil {
				rewatches.Add(1)
				if lastWatchErr.Load() == nil {
					lastWatchErr.Store("closed by the server")
				}
			}
		}
	}()

	if _, err := s.client.CoreV1().Pods(cfg.nsOf(0)).Create(ctx, s.podObject("watch-sentinel", 0, churnNode), metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	select {
	case <-sentinel:
	case <-time.After(time.Minute):
		b.Fatalf("our pod watch delivered nothing in a minute (last error: %v)", lastWatchErr.Load())
	}

	// The poller: every pending address, looked up one by one, over and
	// over. It shares the machine with the agent: its busy time is logged.
	pollDone := make(chan struct{})
	var pollBusy atomic.Int64 // ns
	go func() {
		defer close(pollDone)
		var batch []int
		for ctx.Err() == nil {
			pass := time.Now()
			mu.Lock()
			batch = batch[:0]
			for c := range pending {
				batch = append(batch, c)
			}
			mu.Unlock()
			for _, c := range batch {
				if _, ok := s.maps.ipcache(churnIP(c)); ok {
					now := time.Now()
					mu.Lock()
					cached[c] = now
					delete(pending, c)
					mu.Unlock()
				}
			}
			// At most a fifth of a CPU (a pass over hundreds of pending
			// addresses takes milliseconds), at least a millisecond apart.
			took := time.Since(pass)
			pollBusy.Add(int64(took))
			time.Sleep(max(time.Millisecond, 4*took))
		}
	}()

	var creates, updates, deletes atomic.Int64
	var errMu sync.Mutex
	var firstErr error
	fail := func(err error) {
		errMu.Lock()
		if firstErr == nil {
			firstErr = err
		}
		errMu.Unlock()
		cancel()
	}
	sem := make(chan struct{}, 512)
	var wg sync.WaitGroup
	pid := s.agent.cmd.Process.Pid
	cpu0 := cpuTime(b, pid)
	churnStart := time.Now()
	tick := time.NewTicker(time.Second / time.Duration(cfg.ChurnRate))
	deleted := 0 // the next pod to delete
	for c := 0; c < n && ctx.Err() == nil; c++ {
		<-tick.C
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			k := (c * 7) % cfg.LabelSets
			err := s.createRemotePod(ctx, fmt.Sprintf("churn-%d", c), k, churnNode, churnIP(c), func() {
				now := time.Now()
				creates.Add(1)
				mu.Lock()
				created[c] = now
				pending[c] = churnIP(c)
				mu.Unlock()
			})
			if err != nil {
				fail(fmt.Errorf("churn pod %d: %w", c, err))
				return
			}
			now := time.Now()
			mu.Lock()
			statused[c] = now
			mu.Unlock()
			updates.Add(1)
		})
		// Delete the oldest pods whose address has landed, keeping the
		// last second's alive: as many deletes as creates once the first
		// second has passed (two a tick to catch up).
		for range 2 {
			if deleted > c-cfg.ChurnRate {
				break
			}
			mu.Lock()
			ok := !cached[deleted].IsZero()
			mu.Unlock()
			if !ok {
				break
			}
			{
				d := deleted
				deleted++
				sem <- struct{}{}
				wg.Go(func() {
					defer func() { <-sem }()
					zero := int64(0)
					err := s.client.CoreV1().Pods(cfg.nsOf((d*7)%cfg.LabelSets)).Delete(ctx, fmt.Sprintf("churn-%d", d), metav1.DeleteOptions{GracePeriodSeconds: &zero})
					if err != nil {
						fail(fmt.Errorf("delete churn pod %d: %w", d, err))
						return
					}
					deletes.Add(1)
				})
			}
		}
	}
	tick.Stop()
	window := time.Since(churnStart) // the calls' issue window
	wg.Wait()
	if firstErr != nil {
		b.Fatal(firstErr)
	}
	// Every address must land, and our watch must have seen each.
	deadline := time.Now().Add(2 * time.Minute)
	for {
		mu.Lock()
		left, unseen := len(pending), 0
		for c := range n {
			if watched[c].IsZero() {
				unseen++
			}
		}
		mu.Unlock()
		if left == 0 && unseen == 0 {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("2 minutes after the churn: %d of %d addresses not in the ipcache, %d not seen by the watch", left, n, unseen)
		}
		time.Sleep(10 * time.Millisecond)
	}
	absorbed := time.Since(churnStart)
	time.Sleep(time.Second) // the last deletes
	cpu := cpuTime(b, pid) - cpu0
	rss := rssMiB(b, pid)
	cancel()
	<-pollDone
	<-watchDone
	if r := rewatches.Load(); r > 0 {
		s.logf("our watch was restarted %d times (last: %v)", r, lastWatchErr.Load())
	}

	var fromWatch, fromCreate, fromStatus []float64
	for c := range n {
		fromWatch = append(fromWatch, float64(cached[c].Sub(watched[c]).Microseconds())/1000)
		fromCreate = append(fromCreate, float64(cached[c].Sub(created[c]).Microseconds())/1000)
		fromStatus = append(fromStatus, float64(cached[c].Sub(statused[c]).Microseconds())/1000)
	}
	events := creates.Load() + updates.Load() + deletes.Load()
	s.logf("churn: %d creates, %d status updates, %d deletes issued over %s (%.0f pods/s), absorbed after %s; agent CPU %s; our ipcache poller busy %.0f%% of the time",
		creates.Load(), updates.Load(), deletes.Load(), window.Round(time.Millisecond), float64(creates.Load())/window.Seconds(),
		absorbed.Round(time.Millisecond), cpu, float64(pollBusy.Load())/float64(absorbed)*100)
	b.ReportMetric(pct(fromWatch, 50), "ipcache-watch-p50-ms")
	b.ReportMetric(pct(fromWatch, 99), "ipcache-watch-p99-ms")
	b.ReportMetric(pct(fromStatus, 50), "ipcache-status-p50-ms")
	b.ReportMetric(pct(fromStatus, 99), "ipcache-status-p99-ms")
	b.ReportMetric(float64(rewatches.Load()), "watch-restarts")
	b.ReportMetric(pct(fromCreate, 50), "ipcache-create-p50-ms")
	b.ReportMetric(pct(fromCreate, 99), "ipcache-create-p99-ms")
	b.ReportMetric(float64(cpu.Microseconds())/1000/float64(events), "cpu-ms/pod-event")
	b.ReportMetric(rss, "rss-MiB")
	b.ReportMetric(float64(creates.Load())/window.Seconds(), "churn-pods/s")
}

// cpuTime is a process's user plus system CPU time.
func cpuTime(b testing.TB, pid int) time.Duration {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// The fields after the command name, which may hold spaces: state is
	// field 3, utime 14 and stime 15.
	f := strings.Fields(string(raw[strings.LastIndexByte(string(raw), ')')+2:]))
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		b.Fatal(err)
	}
	const hz = 100 // USER_HZ: the unit of utime and stime on Linux
	return time.Duration(ut+st) * time.Second / hz
}

// rawMaps reads the pinned ipcache and policy maps by key, with the layouts
// of bpf/kernel/idcni.h (the same at 45c6ced and since), so the benchmark
// reads an older build's pins without that build's bpf package.
type rawMaps struct {
	ipc, pol       *ebpf.Map
	ipcVal, polVal int
}

type rawIPCacheKey struct {
	Prefixlen uint32
	Addr      [16]byte
}

type rawPolicyKey struct {
	Subject, Peer uint32
	Dir, Proto    uint8
	Pad           uint16
}

func openRawMaps(root string) (*rawMaps, error) {
	ipc, err := ebpf.LoadPinnedMap(filepath.Join(root, "ipcache"), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return nil, err
	}
	pol, err := ebpf.LoadPinnedMap(filepath.Join(root, "policy"), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		ipc.Close()
		return nil, err
	}
	if ipc.KeySize() != 20 || ipc.ValueSize() < 4 || pol.KeySize() != 12 {
		ipc.Close()
		pol.Close()
		return nil, fmt.Errorf("pinned maps under %s: unexpected key sizes (ipcache %d, policy %d)", root, ipc.KeySize(), pol.KeySize())
	}
	return &rawMaps{ipc: ipc, pol: pol, ipcVal: int(ipc.ValueSize()), polVal: int(pol.ValueSize())}, nil
}

func (m *rawMaps) close() { m.ipc.Close(); m.pol.Close() }

// ipcache returns the identity the /32 (or /128) of a maps to.
func (m *rawMaps) ipcache(a netip.Addr) (uint32, bool) {
	bits := a.BitLen()
	if a.Is4() {
		bits += 96
	}
	k := rawIPCacheKey{Prefixlen: uint32(bits), Addr: netip.AddrFrom16(a.As16()).As16()}
	v := make([]byte, m.ipcVal)
	if err := m.ipc.Lookup(&k, v); err != nil {
		return 0, false
	}
	return binary.LittleEndian.Uint32(v), true
}

func (m *rawMaps) policyValue(k rawPolicyKey) []byte {
	v := make([]byte, m.polVal)
	if err := m.pol.Lookup(&k, v); err != nil {
		return nil
	}
	return v
}

func (m *rawMaps) hasPolicy(k rawPolicyKey) bool { return m.policyValue(k) != nil }
