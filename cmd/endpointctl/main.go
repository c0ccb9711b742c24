// Command endpointctl binds pod addresses to manual security identities.
package main

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sort"

	"github.com/spf13/cobra"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/internal/cli"
	"github.com/idcni/idcni/manual"
)

const tool = "endpointctl"

func main() {
	os.Exit(cli.Execute(newRoot()))
}

func newRoot() *cobra.Command {
	g := &cli.Globals{}
	root := &cobra.Command{
		Use:   tool,
		Short: "Bind pod IP addresses to manual security identities",
		Long: `endpointctl binds pod IP addresses to manual security identities.

idcni decides every packet by the security identity of its source and
destination. A pod the idcni CNI plugin creates starts as the unresolved
identity (5), which may not send or receive anything. endpointctl gives an
address a manual identity (256-65535); policyctl then allows or denies traffic
between identities. A manual identity with no rules is denied everything in
both directions.

When idcni-agent answers on --agent-socket, endpointctl asks it to make the
change. Otherwise it writes the pinned BPF maps itself and keeps the bindings
in the state file, from which 'policyctl restore' puts them back after a
reboot.`,
		Example: `  # Give the pod at 10.13.0.2 identity 1001 and the one at 10.13.0.3 identity 1002
  endpointctl add --ip 10.13.0.2 --identity 1001
  endpointctl add --ip 10.13.0.3 --identity 1002

  # Show the bindings and which local pod has each address
  endpointctl list

  # Remove a binding: the pod goes back to the unresolved identity
  endpointctl del --ip 10.13.0.3`,
	}
	g.AddGlobalFlags(root)
	root.AddCommand(newAdd(g), newDel(g), newList(g))
	return root
}

// localOf returns the local pod that has ip, if the datapath knows one.
func localOf(d *bpf.Datapath, ip netip.Addr) (cli.Local, bool) {
	locals, err := cli.LocalEndpoints(d)
	if err != nil {
		return cli.Local{}, false
	}
	l, ok := locals[ip]
	return l, ok
}

// localLine describes where an address lives, for the confirmation line.
func localLine(d *bpf.Datapath, ip netip.Addr) string {
	l, ok := localOf(d, ip)
	switch {
	case !ok:
		return " (no local pod has this address)"
	case l.Interface == "":
		return fmt.Sprintf(" (local pod, ifindex %d)", l.Ifindex)
	}
	return fmt.Sprintf(" (local pod on %s, ifindex %d)", l.Interface, l.Ifindex)
}

func newAdd(g *cli.Globals) *cobra.Command {
	var ipFlag string
	var id uint64
	cmd := &cobra.Command{
		Use:   "add --ip IP --identity N",
		Short: "Bind an IP address to a manual identity",
		Long: `Bind an IP address to a manual identity (256-65535).

Packets from and to the address are judged as that identity from now on,
established flows included. When a local pod has the address, the pod itself
becomes the identity. An address that is already bound moves to the new
identity. The identity starts with no rules, so it is denied everything until
'policyctl allow' says otherwise.

A binding belongs to the address, not to a pod: a pod the CNI plugin creates
later with a bound address starts as the bound identity, and the binding
stays when that pod is deleted, until 'endpointctl del' removes it.`,
		Example: `  # The seed walkthrough: frontend is 1001, backend is 1002
  endpointctl add --ip 10.13.0.2 --identity 1001
  endpointctl add --ip 10.13.0.3 --identity 1002

  # An IPv6 address
  endpointctl add --ip fd00:13::2 --identity 1001`,
		Args: cli.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := cli.RequireFlags(cmd, "ip", "identity"); err != nil {
				return err
			}
			ip, err := manual.ParseIP(ipFlag)
			if err != nil {
				return err
			}
			if err := identity.ValidateManual(id); err != nil {
				return err
			}
			ident := identity.ID(id)
			if err := cli.RequireRoot(tool); err != nil {
				return err
			}
			ctx := cmd.Context()
			if c := g.Agent(ctx); c != nil {
				if err := c.AddManualEndpoint(ctx, api.ManualEndpoint{IP: ip, Identity: ident}); err != nil {
					return fmt.Errorf("idcni-agent refused endpoint %s: %w", ip, err)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "endpoint %s bound to identity %s (through idcni-agent)\n", ip, ident)
				return nil
			}
			var prev identity.ID
			bind := func(st *manual.State) error {
				var err error
				prev, err = st.Bind(ip, ident)
				return err
			}
			report := func(d *bpf.Datapath) {
				out := cmd.OutOrStdout()
				switch prev {
				case ident:
					fmt.Fprintf(out, "endpoint %s unchanged: already identity %s%s\n", ip, ident, localLine(d, ip))
				case identity.Unknown:
					fmt.Fprintf(out, "endpoint %s bound to identity %s%s\n", ip, ident, localLine(d, ip))
				default:
					fmt.Fprintf(out, "endpoint %s moved from identity %s to %s%s\n", ip, prev, ident, localLine(d, ip))
				}
			}
			if err := g.UpdateManual(bind, report); err != nil {
				return fmt.Errorf("bind %s to identity %s: %w", ip, ident, err)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&ipFlag, "ip", "", "IPv4 or IPv6 address `IP` of the pod (required)")
	cmd.Flags().Uint64Var(&id, "identity", 0, "manual identity `N`, 256-65535 (required)")
	return cmd
}

func newDel(g *cli.Globals) *cobra.Command {
	var ipFlag string
	cmd := &cobra.Command{
		Use:     "del --ip IP",
		Aliases: []string{"delete", "rm"},
		Short:   "Remove the manual identity of an IP address",
		Long: `Remove the manual identity of an IP address.

The address stops resolving to the identity. A local pod with the address goes
back to the unresolved identity (5), which is denied everything, as when the
CNI plugin created it. Rules that name the identity stay: they apply again as
soon as an address is bound to it.`,
		Example: `  endpointctl del --ip 10.13.0.3`,
		Args:    cli.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := cli.RequireFlags(cmd, "ip"); err != nil {
				return err
			}
			ip, err := manual.ParseIP(ipFlag)
			if err != nil {
				return err
			}
			if err := cli.RequireRoot(tool); err != nil {
				return err
			}
			ctx := cmd.Context()
			if c := g.Agent(ctx); c != nil {
				if err := c.DeleteManualEndpoint(ctx, ip.String()); err != nil {
					return fmt.Errorf("idcni-agent refused to remove endpoint %s: %w", ip, err)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "endpoint %s removed (through idcni-agent)\n", ip)
				return nil
			}
			var gone manual.Binding
			unbind := func(st *manual.State) error {
				var err error
				gone, err = st.Unbind(ip)
				return err
			}
			return g.UpdateManual(unbind, func(d *bpf.Datapath) {
				suffix := ""
				if _, ok := localOf(d, ip); ok {
					suffix = "; the local pod is unresolved (5) again"
				}
				fmt.Fprintf(cmd.OutOrStdout(), "endpoint %s removed (was identity %s)%s\n", ip, gone.Identity, suffix)
			})
		},
	}
	cmd.Flags().StringVar(&ipFlag, "ip", "", "address `IP` whose binding to remove (required)")
	return cmd
}

// listedEndpoint is one row of endpointctl list.
type listedEndpoint struct {
	IP        netip.Addr  `json:"ip"`
	Identity  identity.ID `json:"identity"`
	Interface string      `json:"interface,omitempty"`
	Ifindex   int         `json:"ifindex,omitempty"`
}

func newList(g *cli.Globals) *cobra.Command {
	var out cli.Output
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List manual endpoints",
		Long: `List the addresses bound to manual identities, with the host veth and its
ifindex when a pod on this node has the address.

Without idcni-agent the list comes from the state file; a warning says when
the datapath does not hold it (after a reboot: run 'policyctl restore').`,
		Example: `  endpointctl list
  endpointctl list -o json | jq '.endpoints[] | select(.identity == 1001) | .ip'`,
		Args: cli.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.Check(); err != nil {
				return err
			}
			if err := cli.RequireRoot(tool); err != nil {
				return err
			}
			bindings, d, err := loadBindings(cmd, g)
			if err != nil {
				return err
			}
			var locals map[netip.Addr]cli.Local
			if d != nil {
				defer d.Close()
				if locals, err = cli.LocalEndpoints(d); err != nil {
					return err
				}
			}
			rows := make([]listedEndpoint, 0, len(bindings))
			for _, b := range bindings {
				r := listedEndpoint{IP: b.IP, Identity: b.Identity}
				if l, ok := locals[b.IP]; ok {
					r.Interface, r.Ifindex = l.Interface, l.Ifindex
				}
				rows = append(rows, r)
			}
			sort.Slice(rows, func(i, j int) bool { return rows[i].IP.Less(rows[j].IP) })
			w := cmd.OutOrStdout()
			if out == cli.OutputJSON {
				return cli.PrintJSON(w, struct {
					Endpoints []listedEndpoint `json:"endpoints"`
				}{rows})
			}
			if len(rows) == 0 {
				fmt.Fprintln(cmd.ErrOrStderr(), "No manual endpoints.")
				return nil
			}
			table := make([][]string, 0, len(rows))
			for _, r := range rows {
				ifname, idx := "-", "-"
				if r.Ifindex != 0 {
					idx = fmt.Sprint(r.Ifindex)
					ifname = r.Interface
					if ifname == "" {
						ifname = "?"
					}
				}
				table = append(table, []string{r.IP.String(), r.Identity.String(), ifname, idx})
			}
			return cli.Table(w, "IP\tIDENTITY\tINTERFACE\tIFINDEX", table)
		},
	}
	cli.AddOutputFlag(cmd, &out)
	return cmd
}

// loadBindings reads the bindings from the agent or the state file, and
// opens the datapath when it can for the local columns. Without an agent it
// warns when the datapath does not hold the stored state.
func loadBindings(cmd *cobra.Command, g *cli.Globals) ([]manual.Binding, *bpf.Datapath, error) {
	ctx := cmd.Context()
	d, derr := g.OpenDatapath()
	if derr != nil && !errors.Is(derr, bpf.ErrNotLoaded) {
		return nil, nil, derr
	}
	if c := g.Agent(ctx); c != nil {
		eps, err := c.ManualEndpoints(ctx)
		if err != nil {
			closeIf(d)
			return nil, nil, fmt.Errorf("ask idcni-agent for manual endpoints: %w", err)
		}
		out := make([]manual.Binding, 0, len(eps))
		for _, e := range eps {
			out = append(out, manual.Binding{IP: e.IP, Identity: e.Identity})
		}
		return out, d, nil
	}
	st, err := g.LoadState()
	if err != nil {
		closeIf(d)
		return nil, nil, err
	}
	if d == nil {
		if len(st.Bindings) > 0 {
			cli.Warn(cmd, "%v: the bindings below are stored but not in effect", derr)
		}
		return st.Bindings, nil, nil
	}
	if drift, err := manual.Drift(d, st); err == nil && len(drift) > 0 {
		cli.Warn(cmd, "the datapath does not hold the stored manual state (%s); run 'policyctl restore'", cli.Summarize(drift))
	}
	return st.Bindings, d, nil
}

func closeIf(d *bpf.Datapath) {
	if d != nil {
		d.Close()
	}
}
