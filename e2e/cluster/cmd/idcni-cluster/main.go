// Command idcni-cluster runs a real multi-node Kubernetes with idcni
// installed on this machine (package e2e/cluster), for `make cluster`:
//
//	idcni-cluster up [-name dev] [-manifest FILE] [-nodes 3] [-topology flat|routed] [-kube-proxy iptables|nftables|none] [-images TAR,...]
//	                                               start it (a no-op when it runs) and print the exports
//	idcni-cluster import [-name dev] TAR...        import image tarballs into every node's containerd
//	idcni-cluster down [-name dev] [-all]          remove it (-all: every cluster) and check nothing is left
//	idcni-cluster list                             the clusters on this host
//	idcni-cluster bench [-name dev] [-pods 50] [-parallel N]  pod creation to Ready, idcni against the bridge plugin
//
// up prints shell exports (KUBECONFIG, and PATH with the matching kubectl)
// on stdout, and progress on stderr, so `eval "$(idcni-cluster up)"` works.
// Run it from inside the checkout: it builds the images from it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/idcni/idcni/e2e/cluster"
)

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "idcni-cluster:", err)
		os.Exit(1)
	}
}

func usage(w io.Writer) {
	fmt.Fprintln(w, `usage: idcni-cluster up|down|list|bench|import [flags]
  up     [-name dev] [-manifest FILE] [-nodes 3] [-topology flat|routed] [-kube-proxy iptables|nftables|none] [-images TAR,...]
                                       start the cluster (no-op if it runs); prints exports on stdout
                                       (routed: the last node behind a router, on a subnet of its own;
                                       -images: more image tarballs for every node)
  import [-name dev] TAR...            import image tarballs into every node of a running cluster
  down   [-name dev] [-all]            remove the cluster (-all: every cluster on the host)
  list                                 clusters on this host
  bench  [-name dev] [-pods 50] [-parallel N]  pod creation to Ready with idcni and with the bridge plugin
                                       (-parallel: pods at most starting at once; default all)`)
}

func run(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		usage(stderr)
		return errors.New("no command")
	}
	fl := flag.NewFlagSet(args[0], flag.ContinueOnError)
	fl.SetOutput(stderr)
	name := fl.String("name", "dev", "cluster name")
	manifest := fl.String("manifest", "", "what to install idcni from (default: manifests/idcni.yaml of the checkout)")
	all := fl.Bool("all", false, "down: every cluster on this host, including other runs' stale ones")
	nodes := fl.Int("nodes", 3, "up: kubelet nodes (the first runs the control plane too)")
	topology := fl.String("topology", cluster.TopologyFlat, "up: flat (one segment) or routed (the last node behind a router)")
	kubeProxy := fl.String("kube-proxy", cluster.KubeProxyIPTables, "up: kube-proxy's mode on every node: iptables, nftables or none")
	images := fl.String("images", "", "up: comma-separated image tarballs to import into every node too")
	pods := fl.Int("pods", 50, "bench: pods per network")
	parallel := fl.Int("parallel", 0, "bench: pods at most on their way to Ready at once (default: all, a burst; 1: one after the other)")
	if err := fl.Parse(args[1:]); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if args[0] != "import" && fl.NArg() > 0 {
		return fmt.Errorf("%s takes no arguments, got %v", args[0], fl.Args())
	}
	switch args[0] {
	case "up":
		var extra []string
		if *images != "" {
			extra = strings.Split(*images, ",")
		}
		return up(ctx, cluster.Options{Name: *name, Persistent: true, Manifest: *manifest, Log: stderr, Nodes: *nodes, Topology: *topology,
			KubeProxyMode: *kubeProxy, Images: extra}, stdout, stderr)
	case "import":
		if fl.NArg() == 0 {
			return errors.New("import: name the image tarballs")
		}
		c, err := cluster.Load(*name)
		if err != nil {
			return err
		}
		return c.ImportImages(ctx, fl.Args()...)
	case "down":
		return down(*name, *all, stderr)
	case "list":
		return list(stdout)
	case "bench":
		if *parallel == 0 {
			*parallel = *pods
		}
		return bench(ctx, *name, *pods, *parallel, stdout, stderr)
	default:
		usage(stderr)
		return fmt.Errorf("unknown command %q", args[0])
	}
}

func up(ctx context.Context, opts cluster.Options, stdout, stderr io.Writer) error {
	name := opts.Name
	if err := cluster.RemoveStale(stderr); err != nil {
		return err
	}
	if c, err := cluster.Load(name); err == nil {
		if c.Owner.PID != 0 {
			return fmt.Errorf("cluster %s belongs to process %d (a test, or an `up` still starting): not touching it", name, c.Owner.PID)
		}
		fmt.Fprintf(stderr, "cluster %s is already running (%s)\n", name, c.Dir)
		printExports(stdout, c)
		return nil
	}
	start := time.Now()
	c, err := cluster.Up(ctx, opts)
	if err != nil {
		return err
	}
	fmt.Fprintf(stderr, "cluster %s (%s) is up in %s: apiserver %s, logs in %s\n",
		name, c.Topology, time.Since(start).Round(100*time.Millisecond), c.APIServer, filepath.Join(c.Dir, "logs"))
	for _, n := range c.Nodes {
		fmt.Fprintf(stderr, "  node %s at %s\n", n.Name, n.IP)
	}
	printExports(stdout, c)
	return nil
}

func printExports(w io.Writer, c *cluster.Cluster) {
	fmt.Fprintf(w, "export KUBECONFIG=%s\n", c.State.Kubeconfig)
	fmt.Fprintf(w, "export PATH=%s:$PATH\n", filepath.Dir(c.KubectlBin))
}

func down(name string, all bool, stderr io.Writer) error {
	states, err := cluster.List()
	if err != nil {
		return err
	}
	before, _ := cluster.SavedSysctls()
	var errs []error
	found := false
	for _, s := range states {
		if !all && s.Name != name {
			continue
		}
		found = true
		c, err := cluster.Load(s.Name)
		if err != nil {
			// A run directory without a usable state: Down needs only the
			// names in it.
			c = &cluster.Cluster{State: *s}
		}
		if err := c.Down(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", s.Name, err))
			continue
		}
		if left := cluster.Leftovers(&c.State, before); len(left) > 0 {
			errs = append(errs, fmt.Errorf("%s: left on the host: %v", s.Name, left))
			continue
		}
		fmt.Fprintf(stderr, "cluster %s removed; nothing of it is left on the host\n", s.Name)
	}
	if !found && !all {
		fmt.Fprintf(stderr, "no cluster %s on this host\n", name)
	}
	if err := cluster.RemoveStale(stderr); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func list(stdout io.Writer) error {
	states, err := cluster.List()
	if err != nil {
		return err
	}
	for _, s := range states {
		status := "running"
		if !s.Holder.Alive() {
			status = "stale"
		}
		fmt.Fprintf(stdout, "%s\t%s\t%d nodes\t%s\t%s\n", s.Name, status, len(s.Nodes), s.APIServer, s.Dir)
	}
	return nil
}

func bench(ctx context.Context, name string, pods, parallel int, stdout, stderr io.Writer) error {
	c, err := cluster.Load(name)
	if err != nil {
		return fmt.Errorf("cluster %s: %w (start it with `idcni-cluster up -name %s`)", name, err, name)
	}
	c.SetLog(stderr)
	for _, network := range []string{cluster.NetworkIdcni, cluster.NetworkBridge} {
		r, err := c.MeasurePodStartup(ctx, network, pods, parallel)
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, r)
	}
	return nil
}
