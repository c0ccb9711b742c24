package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/internal/cli"
	"github.com/idcni/idcni/manual"
)

func newRestore(g *cli.Globals) *cobra.Command {
	var wait time.Duration
	var dryRun bool
	cmd := &cobra.Command{
		Use:   "restore [--wait DURATION] [--dry-run]",
		Short: "Write the stored manual endpoints and rules back into the datapath",
		Long: `Write the manual endpoints and rules kept in the state file back into the
pinned BPF maps, so that the datapath holds exactly them.

The pinned maps live in memory (bpffs) and are gone after a reboot, while the
state file (/var/lib/idcni/state.db, --state) stays. After a reboot, once the
datapath is loaded again (by the idcni CNI plugin on the first pod, or by
idcni-agent), run 'policyctl restore' to put the bindings and rules back.
Until then the pods are the unresolved identity and denied everything, never
allowed too much. --wait waits for the datapath to be loaded, for a boot
script that runs before the first pod. Restoring twice is harmless.

Pods get new addresses when they are recreated: check 'endpointctl list'
after a restore and rebind addresses that moved.

With idcni-agent running there is nothing to do: the agent restores manual
state itself when it starts.`,
		Example: `  # After a reboot, once pods run again
  policyctl restore

  # From a boot script: wait up to 10 minutes for the first pod
  policyctl restore --wait 10m

  # Show what a restore would change
  policyctl restore --dry-run`,
		Args: cli.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if wait < 0 {
				return fmt.Errorf("bad --wait %s: want a duration such as 30s or 10m", wait)
			}
			if err := cli.RequireRoot(tool); err != nil {
				return err
			}
			ctx := cmd.Context()
			if c := g.Agent(ctx); c != nil {
				return fmt.Errorf("idcni-agent runs on %s and owns the datapath: it restores manual state when it starts (restart it to restore again)", c.Socket())
			}
			d, err := waitDatapath(ctx, cmd, g, wait)
			if err != nil {
				return err
			}
			defer d.Close()
			// The file stays open until the maps are written, so no
			// endpointctl or policyctl changes it in between.
			db, err := g.OpenStateIfExists()
			if err != nil {
				return err
			}
			if db == nil {
				fmt.Fprintf(cmd.OutOrStdout(), "no state file at %s: nothing to restore\n", g.StatePath)
				return nil
			}
			defer db.Close()
			st, err := manual.Load(db)
			if err != nil {
				return err
			}
			drift, err := manual.Drift(d, st)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if dryRun {
				if len(drift) == 0 {
					fmt.Fprintln(out, "the datapath holds the stored manual state: nothing to restore")
				}
				for _, l := range drift {
					fmt.Fprintf(out, "would fix: %s\n", l)
				}
				return nil
			}
			if err := manual.Apply(d, st); err != nil {
				return fmt.Errorf("restore manual state from %s: %w", g.StatePath, err)
			}
			what := "restored"
			if len(drift) == 0 {
				what = "checked"
			}
			fmt.Fprintf(out, "%s %d manual endpoints and %d rules in the datapath at %s\n", what, len(st.Bindings), len(st.Rules), d.Root())
			return nil
		},
	}
	cmd.Flags().DurationVar(&wait, "wait", 0, "wait up to this long for the datapath to be loaded (default: fail at once)")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "only print what differs between the state file and the datapath")
	return cmd
}

// waitDatapath opens the datapath, polling for up to wait while nothing is
// pinned yet.
func waitDatapath(ctx context.Context, cmd *cobra.Command, g *cli.Globals, wait time.Duration) (*bpf.Datapath, error) {
	deadline := time.Now().Add(wait)
	said := false
	for {
		d, err := g.OpenDatapath()
		if err == nil || !errors.Is(err, bpf.ErrNotLoaded) || time.Now().After(deadline) {
			return d, err
		}
		if !said {
			fmt.Fprintf(cmd.ErrOrStderr(), "Waiting up to %s for the datapath to be loaded at %s...\n", wait, g.BPFRoot)
			said = true
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("interrupted while waiting for the datapath: %w", err)
		case <-time.After(500 * time.Millisecond):
		}
	}
}
