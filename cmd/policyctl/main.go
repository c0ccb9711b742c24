// Command policyctl allows and denies traffic between manual security
// identities, and shows what the datapath decides.
package main

import (
	"os"

	"github.com/spf13/cobra"

	"github.com/idcni/idcni/internal/cli"
)

const tool = "policyctl"

func main() {
	os.Exit(cli.Execute(newRoot()))
}

func newRoot() *cobra.Command {
	g := &cli.Globals{}
	root := &cobra.Command{
		Use:   tool,
		Short: "Allow and deny traffic between security identities",
		Long: `policyctl allows and denies traffic between manual security identities and
shows what the datapath decides.

Manual identities (256-65535, given to pod addresses with endpointctl) are
isolated in both directions: every packet from or to them is dropped unless a
rule allows it. A packet from A to B passes when A's egress and B's ingress
allow it; 'policyctl allow --src A --dst B' allows both at once. Deny rules win
over every allow and drop replies of established flows too. Replies of an
allowed flow need no rule of their own. A policy change applies to live flows
at their next packet.

When idcni-agent answers on --agent-socket, policyctl asks it to make changes.
Otherwise it writes the pinned BPF maps itself and keeps the rules in the
state file, from which 'policyctl restore' puts them back after a reboot.`,
		Example: `  # The seed walkthrough: let 1001 and 1002 talk, then cut 1002 -> 1001
  policyctl allow --src 1001 --dst 1002 --symmetric
  policyctl deny --src 1002 --dst 1001

  # Only TCP port 8080 from 1001 to 1002 (replies pass as part of the flow)
  policyctl allow --src 1001 --dst 1002 --port 8080

  # Watch the verdicts as packets flow
  policyctl monitor --identity 1002

  # Which label set is identity 65537 on this node? (numbers are node-local)
  policyctl identity get 65537

  # What would these NetworkPolicies allow? (offline, no cluster needed)
  policyctl simulate -f manifests/`,
	}
	g.AddGlobalFlags(root)
	root.AddCommand(
		newRuleCmd(g, ruleAllow), newRuleCmd(g, ruleDeny), newRuleCmd(g, ruleDelete),
		newList(g), newMonitor(g), newDebug(g), newRestore(g), newStatus(g), newIPCache(g), newIdentity(g),
		// Offline: reads manifests, touches no map and no state file.
		newSimulate(),
	)
	return root
}
