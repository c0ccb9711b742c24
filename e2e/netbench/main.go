// Command netbench measures what idcni costs on the wire, against the same
// pods with no programs (bare) and against the same allow-list written as
// iptables rules, in one run on this node.
//
// It creates two pods (network namespaces plugged through the real idcni
// plugin binary by libcni), names them with manual identities, and runs three
// TCP workloads between them for every configuration: request/response on
// one connection, connect/request/response/close, and a bulk stream. Then it
// measures CNI ADD and DEL latency over many pods. Everything it creates is
// private to the run (bpffs root, IPAM and record directories, subnet,
// netns, link and chain names) and removed on exit, on error and on SIGINT.
//
//	sudo go run ./e2e/netbench -json /tmp/netbench.json
//
// See docs/netbench.md for the method and results.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

type options struct {
	duration   time.Duration
	warmup     time.Duration
	count      int
	rules      []int
	port       int
	cniPods    int
	jsonPath   string
	binDir     string
	skipCNI    bool
	skipTraf   bool
	metricsArg string
	metrics    []metric
	sched      string
	pin        string
	profile    bool
	configs    map[string]bool
	nodes      bool
	stackPath  bool
	floor      bool
	cross      []string        // with -nodes and -configs: the configurations to measure, in order
	services   []int           // -services: Service counts
	svcConfigs map[string]bool // the -services configurations to run
}

func main() {
	o, err := parseFlags(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "netbench:", err)
		os.Exit(2)
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "netbench: must run as root: it creates network namespaces, veth pairs, BPF pins and iptables rules.\n"+
			"  run it as: sudo go run ./e2e/netbench [flags]")
		os.Exit(2)
	}
	ctx, stop := interruptible()
	defer stop()
	err = run(ctx, o)
	if ctx.Err() != nil {
		fmt.Fprintln(os.Stderr, "netbench: interrupted; no results")
		os.Exit(130)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "netbench:", err)
		os.Exit(1)
	}
}

func parseFlags(args []string) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("netbench", flag.ContinueOnError)
	fs.DurationVar(&o.duration, "duration", 5*time.Second, "measured time of each run of each workload")
	fs.DurationVar(&o.warmup, "warmup", time.Second, "traffic before each measured window, not counted")
	fs.IntVar(&o.count, "count", 3, "runs of every configuration and workload; the median is reported")
	rules := fs.String("rules", "10,10000", "comma-separated rule counts for the idcni and iptables configurations")
	fs.IntVar(&o.port, "port", 5001, "TCP port the server pod listens on")
	fs.IntVar(&o.cniPods, "cni-pods", 100, "pods to ADD (then DEL) one after another for the CNI latency figures")
	fs.StringVar(&o.jsonPath, "json", "", "write every sample and the summary as JSON to `FILE`")
	fs.StringVar(&o.binDir, "bin", "", "directory with idcni, host-local and loopback (default: build them from this tree into a temporary directory)")
	fs.BoolVar(&o.skipCNI, "skip-cni", false, "skip the CNI ADD/DEL latency part")
	fs.BoolVar(&o.skipTraf, "skip-traffic", false, "skip the traffic part")
	fs.StringVar(&o.sched, "sched", "fifo", "scheduling of the client and server threads (only those): fifo (SCHED_FIFO priority 1: other load on their CPU cannot delay a wake-up), nice (nice -20) or none")
	fs.StringVar(&o.pin, "pin", "same", "where the client and server threads run: same (both on CPU 0), split (client on CPU 0, server on CPU 1) or none")
	fs.BoolVar(&o.profile, "profile", true, "after the rounds, run each workload once more per idcni configuration with BPF run-time statistics on (reported apart, not in the medians)")
	fs.BoolVar(&o.nodes, "nodes", false, "instead: two pods on two nodes (network namespaces joined by a veth), bare, idcni and iptables, routed directly and through VXLAN (bare-direct, idcni-direct, iptables-direct, bare-vxlan, idcni-vxlan, iptables-vxlan); no CNI latency part")
	fs.BoolVar(&o.stackPath, "stack", false, "with -nodes: also idcni-direct-stack and idcni-vxlan-stack, the idcni configurations without the fast path (both nodes forward the pods' packets)")
	fs.BoolVar(&o.floor, "floor", false, "with -nodes: also floor-direct and floor-vxlan, the floor of a stateful datapath on this machine (bpf/kernel/floor.c: a conntrack lookup per packet and an insert per connection on each node, idcni's forwarding past the stack, no policy)")
	services := fs.String("services", "", "instead: `N,N,...` Services (e.g. 10,1000,10000): for each count, idcni to the pod IP, idcni through a ClusterIP, and kube-proxy's iptables and nftables rules through the ClusterIP (idcni-podip, idcni-clusterip, kube-proxy-iptables, kube-proxy-nftables); no CNI latency part")
	configs := fs.String("configs", "bare,idcni,idcni-routed,iptables", "comma-separated configurations to measure (ratios need bare; with -nodes, some of "+strings.Join(crossConfigs, ", ")+")")
	fs.StringVar(&o.metricsArg, "metrics", "rr,crr,stream", "comma-separated workloads: rr, crr, stream")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: go run ./e2e/netbench [flags]   (as root)\n\n"+
			"Measures TCP request/response, connect/request/response/close and stream\n"+
			"throughput between two pods with no programs (bare), with idcni and with\n"+
			"iptables rules, and CNI ADD/DEL latency. See docs/netbench.md.\n\nflags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if o.duration <= 0 || o.warmup < 0 {
		return nil, errors.New("-duration must be positive and -warmup not negative")
	}
	if o.count < 1 {
		return nil, errors.New("-count must be at least 1")
	}
	if o.port < 1 || o.port > 65534 {
		return nil, errors.New("-port must be 1-65534 (the port above it is the one policy must block)")
	}
	if o.cniPods < 1 || o.cniPods > 250 {
		return nil, errors.New("-cni-pods must be 1-250 (the private subnet is a /24)")
	}
	if o.pin != "same" && o.pin != "split" && o.pin != "none" {
		return nil, fmt.Errorf("-pin: %q is not same, split or none", o.pin)
	}
	if o.sched != "fifo" && o.sched != "nice" && o.sched != "none" {
		return nil, fmt.Errorf("-sched: %q is not fifo, nice or none", o.sched)
	}
	seen := map[int]bool{}
	for s := range strings.SplitSeq(*rules, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 || n > maxRules {
			return nil, fmt.Errorf("-rules: %q is not a rule count 1-%d", s, maxRules)
		}
		if !seen[n] {
			seen[n] = true
			o.rules = append(o.rules, n)
		}
	}
	configsSet := false
	fs.Visit(func(f *flag.Flag) { configsSet = configsSet || f.Name == "configs" })
	if o.nodes && configsSet {
		for s := range strings.SplitSeq(*configs, ",") {
			s = strings.TrimSpace(s)
			if !slices.Contains(crossConfigs, s) {
				return nil, fmt.Errorf("-configs: with -nodes, want some of %s, not %q", strings.Join(crossConfigs, ", "), s)
			}
			o.cross = append(o.cross, s)
		}
		*configs = "bare"
	}
	if *services != "" {
		if o.nodes {
			return nil, errors.New("-services and -nodes are two different runs: pick one")
		}
		svcs, err := parseServices(*services)
		if err != nil {
			return nil, err
		}
		o.services = svcs
		o.svcConfigs = map[string]bool{}
		for _, n := range svcConfigs {
			o.svcConfigs[n] = !configsSet
		}
		if configsSet {
			for s := range strings.SplitSeq(*configs, ",") {
				s = strings.TrimSpace(s)
				if _, ok := o.svcConfigs[s]; !ok {
					return nil, fmt.Errorf("-configs: with -services, want some of %s, not %q", strings.Join(svcConfigs, ", "), s)
				}
				o.svcConfigs[s] = true
			}
		}
		if o.port > 65533 {
			return nil, errors.New("-port must be 1-65533 with -services (idcni-podip dials the port 2 above it)")
		}
		o.skipCNI = true
		*configs = "bare"
	}
	o.configs = map[string]bool{}
	for s := range strings.SplitSeq(*configs, ",") {
		s = strings.TrimSpace(s)
		if s != "bare" && s != "idcni" && s != "idcni-routed" && s != "iptables" {
			return nil, fmt.Errorf("-configs: unknown configuration %q: want bare, idcni, idcni-routed or iptables", s)
		}
		o.configs[s] = true
	}
	for s := range strings.SplitSeq(o.metricsArg, ",") {
		m, ok := metricByName(strings.TrimSpace(s))
		if !ok {
			return nil, fmt.Errorf("-metrics: unknown workload %q: want rr, crr or stream", s)
		}
		o.metrics = append(o.metrics, m)
	}
	return o, nil
}

// parseServices reads -services: distinct Service counts, in the order
// given.
func parseServices(arg string) ([]int, error) {
	var out []int
	seen := map[int]bool{}
	for s := range strings.SplitSeq(arg, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 || n > maxServices {
			return nil, fmt.Errorf("-services: %q is not a Service count 1-%d", s, maxServices)
		}
		if !seen[n] {
			seen[n] = true
			out = append(out, n)
		}
	}
	return out, nil
}

// interruptible returns a context cancelled by the first SIGINT or SIGTERM.
// Later signals only say that cleanup is under way: a second Ctrl-C must not
// leave namespaces, pins or iptables rules behind.
func interruptible() (context.Context, func()) {
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan os.Signal, 4)
	signal.Notify(ch, os.Interrupt, syscall.SIGTERM)
	go func() {
		first := true
		for range ch {
			if first {
				fmt.Fprintln(os.Stderr, "\nnetbench: interrupted; stopping traffic and cleaning up")
				cancel()
				first = false
				continue
			}
			fmt.Fprintln(os.Stderr, "netbench: still cleaning up, please wait")
		}
	}()
	return ctx, func() { signal.Stop(ch); cancel() }
}

// cleanups runs registered undo steps in reverse order, once.
type cleanups struct {
	mu    sync.Mutex
	steps []cleanupStep
}

type cleanupStep struct {
	what string
	fn   func() error
}

func (c *cleanups) push(what string, fn func() error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.steps = append(c.steps, cleanupStep{what, fn})
}

// run undoes everything, newest first, and reports what failed.
func (c *cleanups) run() error {
	c.mu.Lock()
	steps := c.steps
	c.steps = nil
	c.mu.Unlock()
	var errs []error
	for i := len(steps) - 1; i >= 0; i-- {
		if err := steps[i].fn(); err != nil {
			errs = append(errs, fmt.Errorf("cleanup of %s: %w", steps[i].what, err))
		}
	}
	return errors.Join(errs...)
}
