package main

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/internal/cli"
	"github.com/idcni/idcni/manual"
	"github.com/idcni/idcni/store"
)

const identityLong = `Identity numbers are node-local. Each node's idcni-agent numbers the label
sets of pods (65536 and up) and the CIDRs of NetworkPolicy ipBlocks
(16777216 and up) by itself, so the same number on two nodes may stand for
two different label sets, and one label set has a different number on each
node. Compare label sets, not numbers: 'policyctl monitor' shows them next to
the numbers, and this command answers which label set a number is on the
node it runs on. Only the reserved identities (1 host, 2 world, 5
unresolved, 6 remote-node) mean the same everywhere; manual identities
(256-65535) are whatever people bound with endpointctl on that node.

With idcni-agent running the answer comes from it, live, with the pods
holding each label identity. Without one it comes from the state file, read
only: the label identities the agent last kept there and the pods it last
recorded; CIDR identities live in a running agent's memory only.`

func newIdentity(g *cli.Globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:     "identity",
		Aliases: []string{"identities"},
		Short:   "Show which label set an identity number stands for on this node",
		Long:    identityLong,
		Example: `  # Which label set is 65537 on this node?
  policyctl identity get 65537

  # Every identity in use, with its labels and pods
  policyctl identity list
  policyctl identity list -o json | jq '.identities[] | select(.labels.app == "web")'`,
		Args: cli.NoArgs,
	}
	cmd.AddCommand(newIdentityGet(g), newIdentityList(g))
	return cmd
}

func newIdentityGet(g *cli.Globals) *cobra.Command {
	var out cli.Output
	cmd := &cobra.Command{
		Use:   "get N [-o json]",
		Short: "Show the label set (or name, CIDR, addresses) of identity N on this node",
		Long: "Show what identity N stands for on this node: a label identity's whole label\n" +
			"set and the pods holding it, a CIDR identity's prefix, a manual identity's\n" +
			"addresses, a reserved identity's name. N is a number or a reserved name\n" +
			"(host, world, unresolved, remote-node). A number that stands for nothing\n" +
			"here is an error.\n\n" + identityLong,
		Example: `  policyctl identity get 65537
  policyctl identity get 65537 -o json | jq .labels
  policyctl identity get host`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 1 {
				return cli.UsageErrorf("%q takes one identity, got %d arguments", cmd.CommandPath(), len(args))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := out.Check(); err != nil {
				return err
			}
			id, err := identity.Parse(args[0])
			if err != nil {
				return cli.UsageErrorf("%v", err)
			}
			if err := cli.RequireRoot(tool); err != nil {
				return err
			}
			x, err := getIdentity(cmd, g, id)
			if err != nil {
				return err
			}
			if out == cli.OutputJSON {
				return cli.PrintJSON(cmd.OutOrStdout(), x)
			}
			return printIdentity(cmd.OutOrStdout(), x)
		},
	}
	cli.AddOutputFlag(cmd, &out)
	return cmd
}

func newIdentityList(g *cli.Globals) *cobra.Command {
	var out cli.Output
	cmd := &cobra.Command{
		Use:     "list [-o json]",
		Aliases: []string{"ls"},
		Short:   "List every identity in use on this node with its label set",
		Long: "List the identities in use on this node, sorted by number: the reserved\n" +
			"ones, the manual ones bound to an address or named by a rule, the label\n" +
			"ones (with their label sets and pods, or since when they are unused) and\n" +
			"the CIDR ones. Text shows a label set as monitor does (ns=NAMESPACE, then\n" +
			"the pod's labels); -o json has every label, the namespace's too.\n\n" + identityLong,
		Example: `  policyctl identity list
  policyctl identity list -o json | jq '.identities[] | select(.kind == "label") | {id, labels}'`,
		Args: cli.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.Check(); err != nil {
				return err
			}
			if err := cli.RequireRoot(tool); err != nil {
				return err
			}
			list, err := listIdentities(cmd, g)
			if err != nil {
				return err
			}
			if out == cli.OutputJSON {
				return cli.PrintJSON(cmd.OutOrStdout(), api.IdentityList{Identities: list})
			}
			return printIdentities(cmd.OutOrStdout(), list)
		},
	}
	cli.AddOutputFlag(cmd, &out)
	return cmd
}

// getIdentity asks the agent when one answers (its error says why a number
// is unknown), and reads the state file otherwise.
func getIdentity(cmd *cobra.Command, g *cli.Globals, id identity.ID) (api.Identity, error) {
	ctx := cmd.Context()
	if c := g.Agent(ctx); c != nil {
		// The agent's answer names the agent, its node and the number,
		// and the client's own errors name the socket: no more to add.
		return c.Identity(ctx, id)
	}
	list, fileErr, err := stateIdentities(g)
	if err != nil {
		return api.Identity{}, err
	}
	x, err := api.FindIdentity(list, id, false)
	if err != nil && fileErr != nil && id.IsLabel() {
		// Not an error of its own (a node that never ran an agent has
		// no file), but the reason nothing is known.
		return api.Identity{}, fmt.Errorf("%w (%v)", err, fileErr)
	}
	return x, err
}

// listIdentities lists from the agent, or from the state file without one;
// it tells on stderr where an answer without an agent comes from.
func listIdentities(cmd *cobra.Command, g *cli.Globals) ([]api.Identity, error) {
	ctx := cmd.Context()
	if c := g.Agent(ctx); c != nil {
		l, err := c.Identities(ctx)
		if err != nil {
			return nil, fmt.Errorf("ask idcni-agent for identities: %w", err)
		}
		return l.Identities, nil
	}
	list, fileErr, err := stateIdentities(g)
	if err != nil {
		return nil, err
	}
	if fileErr != nil {
		fmt.Fprintf(cmd.ErrOrStderr(), "No idcni-agent answers on %s and %v: only the reserved identities are known.\n", g.AgentSocket, fileErr)
	} else {
		fmt.Fprintf(cmd.ErrOrStderr(), "No idcni-agent answers on %s: from the state file %s, with the pods its agent last recorded; CIDR identities are known to a running agent only.\n", g.AgentSocket, g.StatePath)
	}
	return list, nil
}

// stateIdentities reads the identities from the state file, read-only. A
// missing file is no error (a node that never ran an agent, or the seed
// walkthrough's before its first change): fileErr says so, and the list
// has the reserved identities.
func stateIdentities(g *cli.Globals) (list []api.Identity, fileErr, err error) {
	db, err := g.OpenStateReadOnly()
	if errors.Is(err, store.ErrNoFile) {
		return api.NodeIdentities(nil, nil, nil, nil), err, nil
	}
	if err != nil {
		return nil, nil, err
	}
	defer db.Close()
	entries, err := identity.ReadEntries(db)
	if err != nil {
		return nil, nil, err
	}
	st, err := manual.Load(db)
	if err != nil {
		return nil, nil, fmt.Errorf("read manual state of %s: %w", g.StatePath, err)
	}
	addrs := map[identity.ID][]netip.Addr{}
	for _, b := range st.Bindings {
		addrs[b.Identity] = append(addrs[b.Identity], b.IP)
	}
	var ruled []identity.ID
	for _, r := range st.Rules {
		ruled = append(ruled, r.Src, r.Dst)
	}
	return api.NodeIdentities(entries, addrs, ruled, nil), nil, nil
}

// reservedMeaning says what each reserved identity stands for.
var reservedMeaning = map[identity.ID]string{
	identity.Host:       "this node",
	identity.World:      "addresses outside the cluster that no CIDR identity covers",
	identity.Unresolved: "pods the plugin created that no one has named yet (denied)",
	identity.RemoteNode: "the cluster's other nodes",
}

func printIdentity(w io.Writer, x api.Identity) error {
	var rows [][]string
	add := func(k string, vs ...string) {
		for i, v := range vs {
			if i > 0 {
				k = ""
			}
			rows = append(rows, []string{k, v})
		}
	}
	add("ID:", fmt.Sprint(uint32(x.ID)))
	switch x.Kind {
	case api.KindReserved:
		add("Kind:", "reserved (the same on every node)")
		add("Name:", x.Name)
		if m := reservedMeaning[x.ID]; m != "" {
			add("Means:", m)
		}
	case api.KindManual:
		add("Kind:", "manual (chosen with endpointctl on this node)")
		addrs := []string{"-"}
		if len(x.Addresses) > 0 {
			addrs = addrs[:0]
			for _, a := range x.Addresses {
				addrs = append(addrs, a.String())
			}
		}
		add("Addresses:", addrs...)
	case api.KindLabel:
		add("Kind:", "label (numbered by this node's idcni-agent: compare the labels across nodes, not the number)")
		add("Labels:", fullLabels(x.Labels)...)
		if len(x.Pods) > 0 {
			add("Pods:", x.Pods...)
		} else {
			add("Pods:", "-")
		}
		if x.IdleSince != nil {
			add("Unused since:", x.IdleSince.Format(time.RFC3339)+" (freed once the agent's grace period is over)")
		}
	case api.KindCIDR:
		add("Kind:", "cidr (numbered by this node's idcni-agent from NetworkPolicy ipBlocks)")
		add("CIDR:", x.CIDR)
	default:
		add("Kind:", x.Kind)
	}
	tw := tabwriter.NewWriter(w, 0, 8, 1, ' ', 0)
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\n", r[0], r[1])
	}
	return tw.Flush()
}

// maxPodsShown bounds the pods a row of the list names; -o json and
// 'identity get' have them all.
const maxPodsShown = 3

func printIdentities(w io.Writer, list []api.Identity) error {
	rows := make([][]string, 0, len(list))
	for _, x := range list {
		what, usedBy := "-", "-"
		switch x.Kind {
		case api.KindReserved:
			what = x.Name
		case api.KindManual:
			var addrs []string
			for _, a := range x.Addresses {
				addrs = append(addrs, a.String())
			}
			if len(addrs) > 0 {
				usedBy = strings.Join(addrs, ", ")
			}
		case api.KindLabel:
			what = shortLabels(x.Labels)
			switch {
			case len(x.Pods) > maxPodsShown:
				usedBy = fmt.Sprintf("%s, +%d more", strings.Join(x.Pods[:maxPodsShown], ", "), len(x.Pods)-maxPodsShown)
			case len(x.Pods) > 0:
				usedBy = strings.Join(x.Pods, ", ")
			case x.IdleSince != nil:
				usedBy = "unused since " + x.IdleSince.Format(time.RFC3339)
			}
		case api.KindCIDR:
			what = "cidr=" + x.CIDR
		}
		rows = append(rows, []string{fmt.Sprint(uint32(x.ID)), x.Kind, what, usedBy})
	}
	return cli.Table(w, "ID\tKIND\tLABELS\tUSED BY", rows)
}
