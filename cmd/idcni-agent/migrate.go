package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/internal/kernel"
)

// mapFlags are the flags that say where the datapath is pinned and how big
// its maps are: the agent and `migrate` must agree on them, or the agent
// would find the maps `migrate` left of another size and refuse them.
type mapFlags struct {
	root                  string
	policySize, ipcacheSz uint32
}

func (m *mapFlags) register(f *pflag.FlagSet) {
	f.StringVar(&m.root, "bpf-root", bpf.RootFromEnv(), "bpffs directory the datapath is pinned under (env IDCNI_BPF_ROOT)")
	f.Uint32Var(&m.policySize, "policy-map-size", 0, "entries of the policy map (0: the datapath's default, 65536); only this node's pods' identities have entries. A NetworkPolicy that does not fit is refused alone, with a PolicyRefused Event. Maps pinned with another size are refused: remove the pins (--uninstall) to resize")
	f.Uint32Var(&m.ipcacheSz, "ipcache-size", 0, "entries of the ipcache (0: the datapath's default); it holds every pod and node address of the cluster and the ipBlock prefixes. Maps pinned with another size are refused: remove the pins (--uninstall) to resize")
}

// migrateCommand is `idcni-agent migrate`, the DaemonSet's second init
// container. Carrying the pods' conntrack tables into a new layout opens
// them by id (BPF_MAP_GET_FD_BY_ID: they are installed in a map of maps,
// not pinned), which the kernel allows only with CAP_SYS_ADMIN. That
// capability is held by this short-lived container alone, for the seconds
// a migration takes; the agent, which runs for the node's lifetime, keeps
// CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, and its own start then finds
// the pins in this build's layout and has nothing to carry.
func migrateCommand() *cobra.Command {
	var m mapFlags
	var logLevel string
	var logJSON bool
	cmd := &cobra.Command{
		Use:   "migrate",
		Short: "Bring the pinned datapath to this build: maps in its layout, its programs attached to every pod",
		Long: `migrate does what the agent does first when it starts: it loads this build's
programs and, when the pins under --bpf-root are of another layout (an
upgrade or a rollback), carries every map into this build's layout, conntrack
and every pod's own conntrack table included, moves every pod's attachment to
the new programs and only then removes the old pins. While it runs the old
pins and programs stay in force; if any step fails nothing is changed and it
exits non-zero saying what happened. Pins already in this build's layout are
kept as they are; pins that do not exist yet are created.

It needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON as the agent does, and
CAP_SYS_ADMIN when pods' conntrack tables change layout (the kernel opens a
map that is not pinned by its id only for CAP_SYS_ADMIN). Use the agent's own
--bpf-root, --policy-map-size and --ipcache-size.`,
		Example: `  # the DaemonSet's init container, before the agent starts
  idcni-agent migrate`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if os.Geteuid() != 0 {
				return fmt.Errorf("must run as root: it loads BPF programs and writes pinned maps under %s", m.root)
			}
			if err := kernel.Check(); err != nil {
				return err
			}
			log, err := newLogger(logLevel, logJSON)
			if err != nil {
				return err
			}
			dp, err := bpf.Load(bpf.Options{Root: m.root, Replace: true, PolicyEntries: m.policySize, IPCacheEntries: m.ipcacheSz, Logger: log})
			if err != nil {
				return fmt.Errorf("migrate the pins under %s: %w", m.root, err)
			}
			dp.Close()
			// The load logged what it migrated, if anything.
			log.Info("datapath is this build's", "root", m.root, "layout", bpf.LayoutVersion)
			return nil
		},
	}
	f := cmd.Flags()
	m.register(f)
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	f.BoolVar(&logJSON, "log-json", false, "log JSON lines instead of text")
	return cmd
}
