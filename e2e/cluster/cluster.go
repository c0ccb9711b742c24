// Package cluster brings up a real multi-node Kubernetes on this machine
// (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, and on
// every node containerd with runc and a kubelet) and installs idcni on it
// the way an operator does: the images imported into each containerd,
// `kubectl apply -f manifests/idcni.yaml`, and the kubelets calling the
// plugin for every pod.
//
// Each node is a pair of namespaces (see node.go) with a cgroup of its own;
// the control plane runs in the first node's namespaces. The nodes are
// plugged into a switch, a network namespace of bridges (see nodes.go),
// and, in the routed topology, the last one sits behind a router. Every
// process of the cluster is in one cgroup, and the only things outside it
// are one veth on the host (to reach the apiserver), the cgroup directories
// and the kernel tunables the kubelet rewrites: Down kills the cgroup, which
// frees every namespace with everything in them, removes the directories and
// the link, restores the tunables, and Leftovers checks that nothing is
// left.
//
// Up is shared by the end-to-end test (cluster_test.go, which owns and
// removes its cluster) and `make cluster` (scripts/cluster.sh and
// ./e2e/cluster/cmd/idcni-cluster, whose cluster outlives the command until
// `make cluster-down`).
package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// ErrNotRoot is returned by Up when not run as root: namespaces, mounts,
// cgroups and a kubelet all need it.
var ErrNotRoot = errors.New("a cluster needs root (namespaces, mounts, cgroups, kubelet)")

// Options tune Up. The zero value makes a test cluster with a unique name.
type Options struct {
	// Name names the cluster (its run directory, node, link alias). Empty:
	// e2e-<pid>-<random>, unique per run.
	Name string
	// Persistent makes the cluster outlive the calling process, until Down
	// (make cluster). Otherwise its daemons die with the caller, and the
	// next Up on the host removes what is left.
	Persistent bool
	// Manifest is what `kubectl apply -f` installs idcni from. Empty:
	// manifests/idcni.yaml of the checkout.
	Manifest string
	// Log receives progress lines. Nil: discarded.
	Log io.Writer
	// Timeout bounds the start once the binaries exist. Default 10 minutes.
	Timeout time.Duration
	// Nodes is how many kubelet nodes to start, the first of which runs
	// the control plane too. Zero: 3.
	Nodes int
	// Topology is TopologyFlat (empty: every node on one segment) or
	// TopologyRouted (the last node behind a router; needs two nodes).
	Topology string
	// KubeProxyMode is how every node's kube-proxy runs: KubeProxyIPTables
	// (empty), KubeProxyNFTables, or KubeProxyNone for none at all.
	KubeProxyMode string
	// Images are more image tarballs to import into every node before
	// idcni is installed (agnhost for the conformance specs, another
	// build's agent for the upgrade test): no registry exists to pull
	// them from.
	Images []string
}

// Cluster is a running cluster.
type Cluster struct {
	State
	// Config and Client are an admin client of the apiserver, from the
	// host.
	Config *rest.Config
	Client kubernetes.Interface
	// Root is the idcni checkout.
	Root string
	// Timings are the durations of Up's phases, in order.
	Timings []Timing

	persistent bool
	// mu guards procs, State.Nodes and saving the state: nodes join and
	// leave while daemons are polled.
	mu     sync.Mutex
	images []string // the image tarballs, imported into joining nodes
	// kubeProxyMode is Options.KubeProxyMode, for nodes that join later.
	kubeProxyMode string
	bins          *binaries
	pki           *certs
	procs         []*daemon
	log           io.Writer
	phase         time.Time
}

// Timing is how long one phase of Up took.
type Timing struct {
	Phase    string
	Duration time.Duration
}

// Up brings a cluster up and returns once idcni's agent is ready and every
// node is Ready. On failure everything it made is removed again and the
// error carries the tails of the logs.
func Up(ctx context.Context, opts Options) (*Cluster, error) {
	if os.Geteuid() != 0 {
		return nil, ErrNotRoot
	}
	if opts.Log == nil {
		opts.Log = io.Discard
	}
	if opts.Timeout == 0 {
		opts.Timeout = 10 * time.Minute
	}
	if opts.Name == "" {
		opts.Name = fmt.Sprintf("e2e-%d-%s", os.Getpid(), randomSuffix())
	}
	if err := checkName(opts.Name); err != nil {
		return nil, err
	}
	if opts.Nodes == 0 {
		opts.Nodes = 3
	}
	if opts.Topology == "" {
		opts.Topology = TopologyFlat
	}
	if opts.KubeProxyMode == "" {
		opts.KubeProxyMode = KubeProxyIPTables
	}
	if err := checkKubeProxyMode(opts.KubeProxyMode); err != nil {
		return nil, err
	}
	for _, p := range opts.Images {
		if !isFile(p) {
			return nil, fmt.Errorf("image tarball %s: not a file", p)
		}
	}
	switch {
	case opts.Nodes < 1 || opts.Nodes > 16:
		return nil, fmt.Errorf("%d nodes: want 1 to 16", opts.Nodes)
	case opts.Topology != TopologyFlat && opts.Topology != TopologyRouted:
		return nil, fmt.Errorf("topology %q: want %s or %s", opts.Topology, TopologyFlat, TopologyRouted)
	case opts.Topology == TopologyRouted && opts.Nodes < 2:
		return nil, fmt.Errorf("the %s topology needs two nodes at least", TopologyRouted)
	}
	root, err := repoRoot()
	if err != nil {
		return nil, err
	}
	if opts.Manifest == "" {
		opts.Manifest = filepath.Join(root, "manifests", "idcni.yaml")
	}
	if _, err := os.Stat(opts.Manifest); err != nil {
		return nil, fmt.Errorf("idcni manifest: %w", err)
	}
	c := &Cluster{Root: root, persistent: opts.Persistent, log: opts.Log, phase: time.Now(), kubeProxyMode: opts.KubeProxyMode}

	// Binaries first, outside the timeout: a cold build takes minutes and
	// is not the cluster's start-up.
	if c.bins, err = findBinaries(root, opts.Log); err != nil {
		return nil, err
	}
	if err := kubeProxyTools(opts.KubeProxyMode, opts.Log); err != nil {
		return nil, err
	}
	c.mark("binaries")

	if err := c.register(opts); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()
	if err := c.start(ctx, opts); err != nil {
		err = fmt.Errorf("cluster %s: %w%s", c.Name, err, c.logTails())
		// Stops the image build too, which writes into the run directory.
		cancel()
		if derr := c.Down(); derr != nil {
			err = errors.Join(err, fmt.Errorf("and removing it again: %w", derr))
		}
		return nil, err
	}
	return c, nil
}

// register creates the run directory and state, under the global lock,
// after removing stale clusters.
func (c *Cluster) register(opts Options) error {
	unlock, err := globalLock()
	if err != nil {
		return err
	}
	defer unlock()
	if err := removeStale(c.log); err != nil {
		return err
	}
	others, err := List()
	if err != nil {
		return err
	}
	dir := filepath.Join(BaseDir(), opts.Name)
	for _, o := range others {
		if o.Name == opts.Name {
			return fmt.Errorf("cluster %s exists (%s): take it down first", opts.Name, dir)
		}
	}
	for _, sub := range []string{"logs", "nodes", "etcd", "images", "bin"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o755); err != nil {
			return err
		}
	}
	// The holder of the namespaces is recorded once it runs; until then
	// the creator is the owner, so a crash in between leaves a stale
	// cluster that the next Up removes.
	owner, err := procOf(os.Getpid())
	if err != nil {
		return err
	}
	c.State = State{
		Name: opts.Name, Dir: dir, Owner: owner,
		Cgroup:     "idcni-cluster-" + opts.Name,
		HostVeth:   vethName(opts.Name),
		KubectlBin: c.bins.Kubectl,
		Topology:   opts.Topology,
		Created:    time.Now(),
	}
	if c.Segment, c.FarSubnet, err = pickAddresses(others, opts.Topology == TopologyRouted); err != nil {
		return err
	}
	// The host first, the router last on the segment; the nodes between.
	c.HostIP = nthAddr(c.Segment, 1)
	if c.FarSubnet.IsValid() {
		c.RouterIP = lastAddr(c.Segment).Prev()
		c.RouterFarIP = nthAddr(c.FarSubnet, 1)
	}
	for i := range opts.Nodes {
		n, err := c.newNode(opts.Topology == TopologyRouted && i == opts.Nodes-1)
		if err != nil {
			return err
		}
		c.Nodes = append(c.Nodes, n)
	}
	c.NodeName, c.NodeIP = c.Nodes[0].Name, c.Nodes[0].IP
	if err := c.save(); err != nil {
		return err
	}
	// Before the first kubelet on the host rewrites them.
	return saveSysctls()
}

// save writes the state; c.mu is held, or nothing else runs yet.
func (c *Cluster) save() error { return c.State.save() }

func (c *Cluster) start(ctx context.Context, opts Options) error {
	// The images build while the control plane starts: both take a while
	// on two cores, and they meet only at the import.
	images := make(chan []string, 1)
	imagesErr := make(chan error, 1)
	go func() {
		paths, err := c.buildImages(ctx)
		images <- paths
		imagesErr <- err
	}()

	if err := createCgroups(c.Cgroup); err != nil {
		return err
	}
	if err := c.setupSwitch(); err != nil {
		return err
	}
	if c.FarSubnet.IsValid() {
		if err := c.setupRouter(); err != nil {
			return err
		}
	}
	for _, n := range c.Nodes {
		if err := c.startNodeNamespaces(n); err != nil {
			return err
		}
	}
	n0 := c.Nodes[0]
	c.Holder, c.NetNS, c.MntNS = n0.Holder, n0.NetNS, n0.MntNS
	if err := c.save(); err != nil {
		return err
	}
	c.mark("namespaces, network")
	if err := c.makePKI(); err != nil {
		return err
	}
	if err := c.save(); err != nil {
		return err
	}
	// Every node's containerd starts now: the nodes wait for nothing of
	// the control plane until their kubelets start.
	for _, n := range c.Nodes {
		if err := c.startContainerd(n); err != nil {
			return err
		}
	}
	if err := c.startEtcd(); err != nil {
		return err
	}
	if err := c.startAPIServer(); err != nil {
		return err
	}
	if err := c.connect(); err != nil {
		return err
	}
	if err := c.poll(ctx, "the apiserver's /readyz", func(ctx context.Context) error {
		body, err := c.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err != nil {
			return fmt.Errorf("%w: %s", err, body)
		}
		return nil
	}); err != nil {
		return err
	}
	c.mark("etcd and apiserver")
	if err := c.startControllerManager(); err != nil {
		return err
	}
	if err := c.startScheduler(); err != nil {
		return err
	}
	c.images = append(<-images, opts.Images...)
	if err := <-imagesErr; err != nil {
		return err
	}
	c.mark("controllers, images built")
	if err := forNodes(c.Nodes, func(n *Node) error {
		if err := c.waitContainerd(ctx, n); err != nil {
			return err
		}
		return c.importImages(ctx, n, c.images)
	}); err != nil {
		return err
	}
	c.mark("containerd, images imported")
	// The first kubelet alone, until its node's pod CIDR is allocated: the
	// allocator hands out the ranges in the order the nodes register, and
	// the first node's is then 10.13.0.0/24, the seed's subnet that the
	// walkthrough and the manifests' examples show.
	if err := c.startKubelet(n0); err != nil {
		return err
	}
	if err := c.poll(ctx, "the first node's pod CIDR", func(ctx context.Context) error {
		n, err := c.Client.CoreV1().Nodes().Get(ctx, n0.Name, metav1.GetOptions{})
		if err == nil && n.Spec.PodCIDR == "" {
			err = errors.New("no spec.podCIDR yet")
		}
		return err
	}); err != nil {
		return err
	}
	c.mark("first node registered")
	for _, n := range c.Nodes[1:] {
		if err := c.startKubelet(n); err != nil {
			return err
		}
	}
	for _, n := range c.Nodes[1:] {
		if err := c.poll(ctx, "node "+n.Name+" to register", func(ctx context.Context) error {
			_, err := c.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			return err
		}); err != nil {
			return err
		}
	}
	c.mark("other nodes registered")
	// Services work once the kube-proxies run; CoreDNS needs them (its
	// client reaches the apiserver through the kubernetes Service).
	for _, n := range c.Nodes {
		if err := c.startKubeProxy(n); err != nil {
			return err
		}
	}
	if err := c.installIdcni(ctx, opts.Manifest); err != nil {
		return err
	}
	if err := c.WaitNodesReady(ctx, c.Nodes...); err != nil {
		return err
	}
	// The controller-manager creates it; pods are refused until it exists.
	if err := c.poll(ctx, "the default ServiceAccount", func(ctx context.Context) error {
		_, err := c.Client.CoreV1().ServiceAccounts(metav1.NamespaceDefault).Get(ctx, "default", metav1.GetOptions{})
		return err
	}); err != nil {
		return err
	}
	c.mark("idcni installed, nodes Ready")
	if err := c.installDNS(ctx); err != nil {
		return err
	}
	c.mark("kube-proxy, CoreDNS ready")
	// The launcher of a lasting cluster is only its creator: from now on
	// the namespace holder alone says whether it lives.
	if c.persistent {
		c.Owner = Proc{}
	}
	return c.save()
}

// connect builds the admin client from the host's kubeconfig.
func (c *Cluster) connect() error {
	cfg, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
	if err != nil {
		return err
	}
	// Tests create pods in bursts; client-go's default 5 QPS would make
	// the client, not the cluster, the bottleneck.
	cfg.QPS, cfg.Burst = 100, 200
	c.Config = cfg
	c.Client, err = kubernetes.NewForConfig(cfg)
	return err
}

// mark records the time since the previous mark as phase.
func (c *Cluster) mark(phase string) {
	now := time.Now()
	d := now.Sub(c.phase)
	c.phase = now
	c.Timings = append(c.Timings, Timing{phase, d})
	fmt.Fprintf(c.log, "cluster: %-28s %6.1fs\n", phase, d.Seconds())
}

// Load returns the running cluster called name, for `down` and for tools
// that work on a `make cluster`.
func Load(name string) (*Cluster, error) {
	s, err := loadState(filepath.Join(BaseDir(), name))
	if err != nil {
		return nil, err
	}
	c := &Cluster{State: *s, log: io.Discard, persistent: true}
	for _, n := range c.Nodes {
		n.c = c
	}
	if c.Root, err = repoRoot(); err != nil {
		c.Root = ""
	}
	if nsenter, err := lookPath("nsenter"); err == nil {
		c.bins = &binaries{Kubectl: s.KubectlBin, nsenter: nsenter}
	}
	if s.Kubeconfig != "" {
		if err := c.connect(); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// Down removes the cluster and everything it added to the host. It is safe
// to call more than once, and on a half-started cluster.
func (c *Cluster) Down() error {
	unlock, err := globalLock()
	if err != nil {
		return err
	}
	defer unlock()
	if c.log == nil {
		c.log = io.Discard
	}
	err = teardown(&c.State, c.log)
	// The reapers of a test's daemons end with the kill.
	for _, d := range c.procs {
		select {
		case <-d.done:
		case <-time.After(10 * time.Second):
		}
	}
	return err
}

// teardown removes one cluster; the caller holds the global lock.
func teardown(s *State, log io.Writer) error {
	start := time.Now()
	var errs []error
	if s.Cgroup != "" {
		// Everything of the cluster is in its cgroup: killing it frees the
		// node's namespaces, and with them every mount, pin, netns, link,
		// route and iptables chain made on the node.
		if err := killCgroup(s.Cgroup, time.Minute); err != nil {
			errs = append(errs, err)
		}
	}
	if s.HostVeth != "" {
		// The kernel deletes the pair with the switch's namespace, in a
		// deferred work item; wait for that, then delete it by hand.
		if err := waitLinkGone(s.HostVeth, 10*time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	for _, p := range []netip.Prefix{s.Segment, s.FarSubnet} {
		if err := flushConntrack(p); err != nil {
			errs = append(errs, err)
		}
	}
	if s.HostIP.IsValid() && !s.Segment.IsValid() {
		// A cluster of the older layout: a /30 to its one node.
		if err := flushConntrack(netip.PrefixFrom(s.HostIP, 30)); err != nil {
			errs = append(errs, err)
		}
	}
	if s.Dir != "" {
		if err := os.RemoveAll(s.Dir); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", s.Dir, err))
		}
	}
	others, err := List()
	if err != nil {
		errs = append(errs, err)
	}
	live := 0
	for _, o := range others {
		if o.Name != s.Name && !o.stale() {
			live++
		}
	}
	if live == 0 {
		// The last cluster: the kernel tunables go back to the host's
		// values.
		if err := restoreSysctls(); err != nil {
			errs = append(errs, err)
		}
	}
	fmt.Fprintf(log, "cluster: %s removed in %.1fs\n", s.Name, time.Since(start).Seconds())
	return errors.Join(errs...)
}

// removeStale tears down every cluster whose owner or holder died; the
// caller holds the global lock.
func removeStale(log io.Writer) error {
	all, err := List()
	if err != nil {
		return err
	}
	var errs []error
	for _, s := range all {
		if s.stale() {
			fmt.Fprintf(log, "cluster: removing stale cluster %s\n", s.Name)
			if err := teardown(s, log); err != nil {
				errs = append(errs, fmt.Errorf("stale cluster %s: %w", s.Name, err))
			}
		}
	}
	return errors.Join(errs...)
}

// RemoveStale removes every stale cluster (see State) from the host.
func RemoveStale(log io.Writer) error {
	unlock, err := globalLock()
	if err != nil {
		return err
	}
	defer unlock()
	return removeStale(log)
}

// Kubectl runs the cluster's kubectl as an admin from the host, and returns
// its combined output.
func (c *Cluster) Kubectl(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, c.KubectlBin, append([]string{"--kubeconfig", c.State.Kubeconfig}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("kubectl %s: %w\n%s", strings.Join(args, " "), err, tail(out, 30))
	}
	return out, nil
}

// WaitNodeReady waits until the first node reports Ready.
func (c *Cluster) WaitNodeReady(ctx context.Context) error {
	return c.WaitNodesReady(ctx, c.Nodes[0])
}

// WaitNodesReady waits until every node given reports Ready.
func (c *Cluster) WaitNodesReady(ctx context.Context, nodes ...*Node) error {
	for _, node := range nodes {
		if err := c.poll(ctx, "node "+node.Name+" to be Ready", func(ctx context.Context) error {
			n, err := c.Client.CoreV1().Nodes().Get(ctx, node.Name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			for _, cond := range n.Status.Conditions {
				if cond.Type == corev1.NodeReady {
					if cond.Status == corev1.ConditionTrue {
						return nil
					}
					return fmt.Errorf("node %s: %s", cond.Reason, cond.Message)
				}
			}
			return errors.New("no Ready condition yet")
		}); err != nil {
			return err
		}
	}
	return nil
}

// logTails is the end of every daemon's log, for an error message.
func (c *Cluster) logTails() string {
	if c.Dir == "" {
		return ""
	}
	var b strings.Builder
	// The control plane's first, then the nodes' (named -n0, -n1, ...).
	paths, _ := filepath.Glob(filepath.Join(c.Dir, "logs", "*.log"))
	sort.SliceStable(paths, func(i, j int) bool {
		return !strings.Contains(filepath.Base(paths[i]), "-n") && strings.Contains(filepath.Base(paths[j]), "-n")
	})
	for _, p := range paths {
		fmt.Fprintf(&b, "\n--- last lines of %s:\n%s", p, tailFile(p, 15))
	}
	return b.String()
}

// LogTails is logTails for callers outside the package (a failed test).
func (c *Cluster) LogTails() string { return c.logTails() }

// SaveLogs copies the daemons' logs into dir/<name>, for a CI job to keep:
// teardown removes the run directory with them.
func (c *Cluster) SaveLogs(dir string) (string, error) {
	dst := filepath.Join(dir, c.Name)
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return "", err
	}
	src := filepath.Join(c.Dir, "logs")
	entries, err := os.ReadDir(src)
	if err != nil {
		return "", err
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			return "", err
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o644); err != nil {
			return "", err
		}
	}
	return dst, nil
}
