// Command idcni-agent is idcni's node agent: it turns Pods, Namespaces and
// NetworkPolicies into identities and rules in the datapath's maps, serves
// the plugin and the tools on a unix socket, and exports metrics.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/idcni/idcni/agent"
	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/internal/kernel"
	"github.com/idcni/idcni/internal/version"
	"github.com/idcni/idcni/manifests"
	"github.com/idcni/idcni/store"
)

func main() {
	if err := command().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "idcni-agent:", err)
		os.Exit(1)
	}
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func command() *cobra.Command {
	var (
		cfg        agent.Config
		kubeconfig string
		confFile   string
		uninstall  bool
		force      bool
		logLevel   string
		logJSON    bool
		podCIDRs   []string
		noMasq     []string
		mode       string
		maps       mapFlags
	)
	cmd := &cobra.Command{
		Use:   "idcni-agent",
		Short: "idcni's node agent: Kubernetes NetworkPolicy to identity-based BPF maps",
		Long: `idcni-agent runs on every node (a DaemonSet). It watches Pods, Namespaces,
NetworkPolicies and Nodes, gives every pod an identity derived from its labels
(kept in the state file, stable across restarts), and keeps the datapath's
maps under the BPF root equal to the cluster's policy. The idcni CNI plugin
registers each new pod with it over the local socket and returns only once the
pod's policy is enforced; endpointctl and policyctl send manual overrides the
same way.

Once its caches are synced and the maps written, the agent writes the CNI
config into --cni-conf-dir, so the node only takes pods it can enforce.
The agent owns one nftables table, inet idcni: it masquerades pod traffic
leaving the cluster (--masquerade) and drops packets to the tunnel port from
addresses that are no Node's (--tunnel-port). It never touches other tables.

--uninstall removes that config, every pin (programs detach from all veths),
the nftables table and, unless --node-routes=false, the routes to other
nodes' pod CIDRs and the VXLAN device. While pods are attached it refuses:
their programs would detach and they would run with no policy until
re-created. --force does it anyway.`,
		Example: `  # on a node, as the DaemonSet does
  idcni-agent --node-name "$NODE_NAME"

  # outside a cluster, for tests
  idcni-agent --kubeconfig ~/.kube/config --node-name node1 --cni-conf-dir ""`,
		SilenceUsage:  true,
		SilenceErrors: true,
		Args:          cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg.BPFRoot, cfg.PolicyEntries, cfg.IPCacheEntries = maps.root, maps.policySize, maps.ipcacheSz
			if os.Geteuid() != 0 {
				return fmt.Errorf("must run as root: it loads BPF programs and writes pinned maps under %s", cfg.BPFRoot)
			}
			if uninstall {
				// No kernel check: removing what an earlier run left
				// must work on any kernel.
				if err := checkUninstall(cfg.BPFRoot, force, cmd.ErrOrStderr()); err != nil {
					return err
				}
				err := agent.Uninstall(cfg.CNIConfDir, cfg.CNIConfName, cfg.BPFRoot)
				if cfg.NodeRoutes {
					err = errors.Join(err, agent.RemoveRoutes())
				}
				// Whatever the flags: a table left masquerading
				// after idcni is gone would be worse than none.
				return errors.Join(err, agent.RemoveNFTable())
			}
			// Before anything is loaded: on an older kernel the first
			// sign would otherwise be a verifier log or an EPERM.
			if err := kernel.Check(); err != nil {
				return err
			}
			log, err := newLogger(logLevel, logJSON)
			if err != nil {
				return err
			}
			if cfg.PodCIDRs, err = parsePodCIDRs(podCIDRs); err != nil {
				return err
			}
			if cfg.NoMasqueradeCIDRs, err = parseCIDRs("--no-masquerade-cidr", noMasq); err != nil {
				return err
			}
			if cfg.RoutingMode, err = agent.ParseRoutingMode(mode); err != nil {
				return fmt.Errorf("--routing-mode: %w", err)
			}
			if cfg.TunnelPort == 0 && cfg.RoutingMode != agent.RoutingDirect {
				return errors.New("--tunnel-port 0 (no tunnel, no tunnel filter) needs --routing-mode=direct: the VXLAN tunnel needs a UDP port, the same on every node (default 8472)")
			}
			cfg.Logger = log
			cfg.CNIConf = manifests.CNIConflist
			if confFile != "" {
				if cfg.CNIConf, err = os.ReadFile(confFile); err != nil {
					return fmt.Errorf("read --cni-conf-template: %w", err)
				}
			}
			restCfg, err := kubeConfig(kubeconfig)
			if err != nil {
				return err
			}
			client, err := kubernetes.NewForConfig(restCfg)
			if err != nil {
				return fmt.Errorf("kubernetes client: %w", err)
			}
			a, err := agent.New(cfg, client)
			if err != nil {
				return err
			}
			defer a.Close()
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			return a.Run(ctx)
		},
	}
	f := cmd.Flags()
	f.StringVar(&kubeconfig, "kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig file; empty means in-cluster config")
	f.StringVar(&cfg.NodeName, "node-name", os.Getenv("NODE_NAME"), "this node's name (env NODE_NAME)")
	maps.register(f)
	f.StringVar(&cfg.StatePath, "state", envOr("IDCNI_STATE", store.DefaultPath), "state file: identities, manual overrides, local endpoints (env IDCNI_STATE)")
	f.StringVar(&cfg.Socket, "socket", envOr("IDCNI_AGENT_SOCKET", api.DefaultSocket), "unix socket of the local API (env IDCNI_AGENT_SOCKET)")
	f.StringVar(&cfg.MetricsAddr, "metrics-addr", ":9965", "address of /metrics, /healthz and /readyz; empty disables")
	f.StringVar(&cfg.CNIConfDir, "cni-conf-dir", "/etc/cni/net.d", "where to write the CNI config once ready; empty disables")
	f.StringVar(&cfg.CNIConfName, "cni-conf-name", "10-idcni.conflist", "file name of the CNI config")
	f.StringVar(&confFile, "cni-conf-template", "", "conflist to install instead of the built-in manifests/cni/10-idcni.conflist")
	f.DurationVar(&cfg.IdentityGrace, "identity-grace", identity.DefaultGrace, "how long an identity no pod uses keeps its number")
	f.StringSliceVar(&cfg.ChurnLabels, "churn-labels", nil, "pod labels left out of identities, churn and placement labels alike; the list replaces the default, so to extend it repeat the default and add (default: "+strings.Join(identity.DefaultChurnLabels(), ",")+")")
	f.DurationVar(&cfg.Resync, "resync", 10*time.Minute, "informer resync period (a resync that changes nothing writes nothing)")
	f.DurationVar(&cfg.AuditInterval, "audit-interval", 5*time.Minute, "how often to compare the maps with what the agent wrote, repairing and counting drift (idcni_audit_drift_total); 0 disables")
	f.StringSliceVar(&podCIDRs, "pod-cidr", nil, "this node's pod ranges, repeated or comma-separated, at most one per family, instead of its Node's spec.podCIDRs (for clusters whose kube-controller-manager does not run with --allocate-node-cidrs). Without either the agent writes no CNI config")
	f.BoolVar(&cfg.NodeRoutes, "node-routes", true, "route every other node's pod CIDRs (routes of protocol 157), directly or through the VXLAN tunnel as --routing-mode says; off when something else routes pod CIDRs (the CNI config then keeps the template's MTU)")
	f.StringVar(&mode, "routing-mode", string(agent.RoutingAuto), "how other nodes' pod CIDRs are reached: auto (directly through the node's InternalIP when it is on a connected subnet, through the VXLAN tunnel otherwise), direct (directly only: nodes elsewhere stay unreachable, counted in idcni_node_routes_missing) or vxlan (every other node through the tunnel). The pods' MTU in the CNI config is the uplink's less the tunnel overhead (50 bytes over IPv4, 70 over IPv6) in auto and vxlan, the uplink's in direct")
	f.Uint16Var(&cfg.TunnelPort, "tunnel-port", agent.DefaultTunnelPort, "UDP port of the VXLAN tunnel (device "+agent.TunnelDevice+", VNI 157), the same on every node; the agent drops packets to it from any address that is not a Node's InternalIP or ExternalIP (idcni_tunnel_rejected_packets_total). 0: no tunnel and no filter, with --routing-mode=direct only")
	f.BoolVar(&cfg.AnnouncePods, "announce-pods", true, "announce a new pod's addresses to the other nodes when its veth is set up, hundreds of milliseconds before the kubelet writes them into its status, so they know its identity before its first packet (a ConfigMap idcni-announce-<node> in --announce-namespace)")
	f.StringVar(&cfg.AnnounceNamespace, "announce-namespace", envOr("POD_NAMESPACE", "idcni-system"), "the agents' namespace, where each node's announcement of new pods is (env POD_NAMESPACE); empty: neither announce nor read announcements")
	f.BoolVar(&cfg.FastPath, "fast-path", true, "let traffic between this node's pods and other nodes' pods skip the node's IP forwarding and netfilter (both directions, on the routes --node-routes makes): the other nodes' pod CIDRs go into the datapath's remote_cidrs map and its from_net program onto the devices those routes use (uplink, "+agent.TunnelDevice+"). Masqueraded traffic, NodePorts and the node's own traffic never take it. false: everything goes through the node's forwarding, as without the fast path")
	f.BoolVar(&cfg.Masquerade, "masquerade", true, "masquerade pod traffic to destinations outside the cluster (not a pod CIDR or an address of any Node) to the node's address (nftables table inet idcni); off when the network routes pod CIDRs")
	f.StringSliceVar(&noMasq, "no-masquerade-cidr", nil, "destinations outside the cluster that see pods' own addresses, not the node's (a peered network that routes pod CIDRs back); repeated or comma-separated")
	f.BoolVar(&uninstall, "uninstall", false, "remove the CNI config, every pin, the nftables table inet idcni, the routes to other nodes' pod CIDRs and the VXLAN device (with --node-routes), then exit; refused while pods are attached unless --force")
	f.BoolVar(&force, "force", false, "with --uninstall: remove the pins even while pods are attached (they run unenforced until they are re-created)")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	f.BoolVar(&logJSON, "log-json", false, "log JSON lines instead of text")
	addInstallCNI(cmd)
	cmd.AddCommand(migrateCommand())
	// --version: the build and the pin layout it reads and writes.
	cmd.Version = version.Build
	cmd.SetVersionTemplate(version.String("idcni-agent") + "\n")
	return cmd
}

// checkUninstall refuses --uninstall while pods are attached, unless
// force: removing the pins detaches every pod's programs, and nothing
// attaches them again, so those pods run with no policy and no
// anti-spoofing until they are re-created. With force it says so and lets
// it happen.
func checkUninstall(root string, force bool, w io.Writer) error {
	attached, err := bpf.AttachedLinks(root)
	if err != nil {
		if !force {
			return fmt.Errorf("cannot tell whether pods are attached (%w); pass --force to uninstall anyway", err)
		}
		fmt.Fprintf(w, "idcni-agent: warning: cannot tell whether pods are attached: %v\n", err)
		return nil
	}
	if len(attached) == 0 {
		return nil
	}
	shown := attached
	if len(shown) > 10 {
		shown = shown[:10]
	}
	msg := fmt.Sprintf("%d pods have idcni's programs attached (host veths %s%s): removing the pins under %s detaches them, "+
		"and those pods lose enforcement (no NetworkPolicy, no anti-spoofing) until they are re-created",
		len(attached), strings.Join(shown, ", "), map[bool]string{true: ", ...", false: ""}[len(attached) > len(shown)], root)
	if !force {
		return fmt.Errorf("refusing to uninstall: %s; drain the node first, or pass --force", msg)
	}
	fmt.Fprintf(w, "idcni-agent: warning: %s\n", msg)
	return nil
}

// parsePodCIDRs reads --pod-cidr: network prefixes, at most one IPv4 and
// one IPv6, as a Node's spec.podCIDRs has them.
func parsePodCIDRs(in []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range in {
		p, err := netip.ParsePrefix(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("bad --pod-cidr %q: %w", s, err)
		}
		if p != p.Masked() {
			return nil, fmt.Errorf("bad --pod-cidr %q: not a network address (did you mean %s?)", s, p.Masked())
		}
		for _, q := range out {
			if q.Addr().Is4() == p.Addr().Is4() {
				return nil, fmt.Errorf("bad --pod-cidr: %s and %s are of one family; a node has at most one IPv4 and one IPv6 pod CIDR", q, p)
			}
		}
		out = append(out, p)
	}
	return out, nil
}

// parseCIDRs reads a list of network prefixes given to flag.
func parseCIDRs(flag string, in []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range in {
		p, err := netip.ParsePrefix(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("bad %s %q: %w", flag, s, err)
		}
		if p != p.Masked() {
			return nil, fmt.Errorf("bad %s %q: not a network address (did you mean %s?)", flag, s, p.Masked())
		}
		out = append(out, p)
	}
	return out, nil
}

func kubeConfig(path string) (*rest.Config, error) {
	if path == "" {
		c, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("no --kubeconfig and not in a cluster: %w", err)
		}
		return c, nil
	}
	c, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", path, err)
	}
	return c, nil
}

func newLogger(level string, json bool) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("bad --log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: l}
	if json {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
}
