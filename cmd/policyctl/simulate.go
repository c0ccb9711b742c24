package main

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy/simulate"
)

// newSimulate is `policyctl simulate`: it reads manifests (simulate_load.go),
// asks package simulate, and prints (simulate_output.go).
func newSimulate() *cobra.Command {
	var (
		files    []string
		output   string
		ports    []int
		protocol string
		churn    []string
	)
	cmd := &cobra.Command{
		Use:   "simulate -f FILE_OR_DIR... [-o json] [--port N] [--protocol P]",
		Short: "What would these NetworkPolicies allow? Offline, from manifests",
		Long: `simulate reads Namespace, Pod and NetworkPolicy manifests (YAML or JSON,
multi-document files, List objects, directories searched recursively for
*.yaml, *.yml and *.json; - reads standard input), compiles them exactly as
the agent does, and prints for every ordered pair of pods and every port the
destination pod declares (or each --port) whether the traffic is allowed, and
which policy rule allowed it or which isolation denied it.

Pods need status.podIP (ipBlock peers match pod addresses). Host-network and
finished pods are skipped. Other kinds are skipped with a warning.
No cluster and no privileges are needed.`,
		Example: `  policyctl simulate -f manifests/
  kubectl get ns,pods,netpol -A -o yaml | policyctl simulate -f - -o json
  policyctl simulate -f cluster.yaml --port 8080 --protocol TCP`,
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if output != "" && output != "json" && output != "table" {
				return fmt.Errorf("unknown output format %q: want json or table", output)
			}
			cmd.SilenceUsage = true // from here on, errors are about the input
			in, err := loadManifests(append(files, args...), cmd.InOrStdin(), cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			results, err := simulate.Run(in, simulate.Options{Ports: ports, Protocol: protocol, ChurnLabels: churn}, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			if output == "json" {
				return writeSimulateJSON(cmd.OutOrStdout(), results)
			}
			return writeSimulateTable(cmd.OutOrStdout(), results)
		},
	}
	f := cmd.Flags()
	f.StringArrayVarP(&files, "filename", "f", nil, "manifest file or directory, or - for standard input (repeatable)")
	f.StringVarP(&output, "output", "o", "", "output format: json, or table (default)")
	f.IntSliceVar(&ports, "port", nil, "probe these ports instead of the ports pods declare (repeatable, or comma separated)")
	f.StringVar(&protocol, "protocol", "", "protocol of --port (TCP, UDP, SCTP; default TCP); without --port, probe only declared ports of this protocol")
	// The agent's own flag, so a cluster that changed it simulates alike.
	f.StringSliceVar(&churn, "churn-labels", nil, "pod labels left out of identities, as the agent's --churn-labels (default: "+strings.Join(identity.DefaultChurnLabels(), ",")+")")
	return cmd
}
