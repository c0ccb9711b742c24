package main

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/internal/cli"
)

// ipcacheRow is one ipcache entry as -o json prints it.
type ipcacheRow struct {
	Prefix   netip.Prefix `json:"prefix"`
	Identity identity.ID  `json:"identity"`
	// Name is a reserved identity's name (host, world, remote-node).
	Name string `json:"name,omitempty"`
	// Labels is a label identity's label set, and CIDR a CIDR
	// identity's prefix, as this node's agent (or its state file) knows
	// them: the numbers are node-local, these are not.
	Labels map[string]string `json:"labels,omitempty"`
	CIDR   string            `json:"cidr,omitempty"`
}

func newIPCache(g *cli.Globals) *cobra.Command {
	var out cli.Output
	var addr string
	cmd := &cobra.Command{
		Use:   "ipcache [--ip ADDR] [-o json]",
		Short: "Show which identity the datapath gives each address",
		Long: `Show the ipcache: every prefix the datapath knows and the identity a packet
from or to it gets. It holds every pod and node address of the cluster (this
node's pods, other nodes' pods, node addresses as host or remote-node), the
ipBlock prefixes of NetworkPolicies and the manual bindings. An address it
does not hold is world. Each identity is shown with what it stands for on
this node: a label identity's labels (the namespace's own labels left out;
'policyctl identity get N' has them all), a CIDR identity's prefix, a
reserved identity's name.

With --ip, the one lookup the datapath makes for that address (longest
prefix). Identity numbers are this node's: the same pod may have another
number on another node.`,
		Example: `  policyctl ipcache
  policyctl ipcache --ip 10.13.2.7
  policyctl ipcache -o json | jq '.entries[] | select(.identity == 6)'`,
		Args: cli.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.Check(); err != nil {
				return err
			}
			var one netip.Addr
			if addr != "" {
				a, err := netip.ParseAddr(addr)
				if err != nil {
					return cli.UsageErrorf("bad --ip %q: %v", addr, err)
				}
				one = a.Unmap()
			}
			if err := cli.RequireRoot(tool); err != nil {
				return err
			}
			d, err := g.OpenDatapath()
			if err != nil {
				return err
			}
			defer d.Close()
			var rows []ipcacheRow
			if one.IsValid() {
				id, ok, err := d.IPCacheLookup(one)
				if err != nil {
					return err
				}
				if !ok {
					id = identity.World
				}
				rows = append(rows, ipcacheRow{Prefix: netip.PrefixFrom(one, one.BitLen()), Identity: id, Name: reservedName(id)})
			} else {
				all, err := d.IPCache()
				if err != nil {
					return err
				}
				for p, id := range all {
					rows = append(rows, ipcacheRow{Prefix: p, Identity: id, Name: reservedName(id)})
				}
				slices.SortFunc(rows, func(a, b ipcacheRow) int {
					if c := a.Prefix.Addr().Compare(b.Prefix.Addr()); c != 0 {
						return c
					}
					return a.Prefix.Bits() - b.Prefix.Bits()
				})
			}
			// What the numbers stand for; without an agent or state file
			// the numbers alone (listIdentities says why on stderr).
			if ids, err := listIdentities(cmd, g); err == nil {
				known := map[identity.ID]api.Identity{}
				for _, x := range ids {
					known[x.ID] = x
				}
				for i := range rows {
					x := known[rows[i].Identity]
					rows[i].Labels, rows[i].CIDR = x.Labels, x.CIDR
				}
			} else {
				cli.Warn(cmd, "no label sets: %v", err)
			}
			w := cmd.OutOrStdout()
			if out == cli.OutputJSON {
				if one.IsValid() {
					return cli.PrintJSON(w, rows[0])
				}
				return cli.PrintJSON(w, struct {
					Entries []ipcacheRow `json:"entries"`
				}{rows})
			}
			table := make([][]string, len(rows))
			for i, r := range rows {
				what := r.Name
				switch {
				case r.Labels != nil:
					what = shortLabels(r.Labels)
				case r.CIDR != "":
					what = "cidr=" + r.CIDR
				}
				table[i] = []string{r.Prefix.String(), strconv.FormatUint(uint64(r.Identity), 10), what}
			}
			if len(table) == 0 {
				_, err := fmt.Fprintln(w, "the ipcache is empty: every address is world")
				return err
			}
			return cli.Table(w, "PREFIX\tIDENTITY\tSTANDS FOR", table)
		},
	}
	cli.AddOutputFlag(cmd, &out)
	cmd.Flags().StringVar(&addr, "ip", "", "look up one address, as the datapath does")
	return cmd
}

func reservedName(id identity.ID) string {
	if id.IsReserved() {
		return id.String()
	}
	return ""
}
