package main

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/internal/cli"
)

// ipcacheRow is one ipcache entry as -o json prints it.
type ipcacheRow struct {
	Prefix   netip.Prefix `json:"prefix"`
	Identity identity.ID  `json:"identity"`
	// Name is a reserved identity's name (host, world, remote-node).
	Name string `json:"name,omitempty"`
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
does not hold is world.

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
				table[i] = []string{r.Prefix.String(), strconv.FormatUint(uint64(r.Identity), 10), r.Name}
			}
			if len(table) == 0 {
				_, err := fmt.Fprintln(w, "the ipcache is empty: every address is world")
				return err
			}
			return cli.Table(w, "PREFIX\tIDENTITY\tNAME", table)
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
