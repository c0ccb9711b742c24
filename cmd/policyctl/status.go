package main

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"sort"

	"github.com/spf13/cobra"
	"github.com/vishvananda/netlink"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/internal/cli"
	"github.com/idcni/idcni/manual"
)

type statusView struct {
	Datapath datapathView `json:"datapath"`
	Agent    agentView    `json:"agent"`
	// Manual is absent with an agent running: the agent holds the file.
	Manual   *manualView       `json:"manual,omitempty"`
	Counters []counterView     `json:"counters"`
	Stats    map[string]uint64 `json:"stats"`
	// Conntrack has every endpoint's conntrack tables (the flows it
	// opened, the flows it admitted), and slot 0, the node's shared one.
	Conntrack []conntrackView `json:"conntrack"`
	// EventsNotSent counts, by reason, the verdict events the datapath
	// did not send: lost (its ring was full) or suppressed (the sending
	// endpoint's rate limit).
	EventsNotSent map[string]bpf.EventLoss `json:"eventsNotSent"`
}

type conntrackView struct {
	bpf.ConntrackUsage
	// Ifindex is the host veth of the endpoint whose table it is, 0 for
	// the shared table.
	Ifindex int `json:"ifindex,omitempty"`
}

type datapathView struct {
	Root          string `json:"root"`
	Revision      uint32 `json:"revision"`
	Debug         bool   `json:"debug"`
	Endpoints     int    `json:"endpoints"`
	IPCache       int    `json:"ipcacheEntries"`
	PolicyEntries int    `json:"policyEntries"`
	Identities    int    `json:"identityEntries"`
	Flows         int    `json:"conntrackFlows"`
	// Unattached are the endpoints whose host veth exists but does not
	// run the pinned programs: their traffic is not policed.
	Unattached []unattachedView `json:"unattached,omitempty"`
}

type unattachedView struct {
	Ifindex   int    `json:"ifindex"`
	Interface string `json:"interface"`
	Addrs     string `json:"addresses"`
}

type agentView struct {
	Socket  string `json:"socket"`
	Running bool   `json:"running"`
}

type manualView struct {
	StatePath string   `json:"statePath"`
	Endpoints int      `json:"endpoints"`
	Rules     int      `json:"rules"`
	InSync    bool     `json:"inSync"`
	Drift     []string `json:"drift,omitempty"`
}

type counterView struct {
	Verdict string `json:"verdict"`
	Reason  string `json:"reason"`
	Hook    string `json:"hook"`
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

func newStatus(g *cli.Globals) *cobra.Command {
	var out cli.Output
	var all bool
	cmd := &cobra.Command{
		Use:   "status [-o json] [--all]",
		Short: "Show the datapath's state and packet counters",
		Long: `Show the datapath's state: policy revision, debug switch, map sizes, whether
idcni-agent runs, whether the datapath holds the stored manual state, and the
packet counters by reason and hook (egress: leaving a pod; ingress: entering
one), the conntrack tables (each pod has its own; the ones that are full or
have evicted flows are listed), then the datapath's error counters, events
lost to a full ring and events held back by a pod's rate limit among them.

Counters count since the datapath was loaded. Only non-zero counters are
shown unless --all is given; -o json always has them all.`,
		Example: `  policyctl status
  policyctl status -o json | jq '.counters[] | select(.verdict == "drop")'`,
		Args: cli.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.Check(); err != nil {
				return err
			}
			if err := cli.RequireRoot(tool); err != nil {
				return err
			}
			v, err := gatherStatus(cmd, g)
			if err != nil {
				return err
			}
			if out == cli.OutputJSON {
				return cli.PrintJSON(cmd.OutOrStdout(), v)
			}
			return printStatus(cmd, v, all)
		},
	}
	cli.AddOutputFlag(cmd, &out)
	cmd.Flags().BoolVar(&all, "all", false, "show zero counters too")
	return cmd
}

func gatherStatus(cmd *cobra.Command, g *cli.Globals) (*statusView, error) {
	d, err := g.OpenDatapath()
	if err != nil {
		return nil, err
	}
	defer d.Close()
	v := &statusView{Agent: agentView{Socket: g.AgentSocket}, Stats: map[string]uint64{}}
	v.Agent.Running = g.Agent(cmd.Context()) != nil
	dp := &v.Datapath
	dp.Root = d.Root()
	if dp.Revision, err = d.Revision(); err != nil {
		return nil, err
	}
	if dp.Debug, err = d.Debug(); err != nil {
		return nil, err
	}
	eps, err := d.Endpoints()
	if err != nil {
		return nil, err
	}
	ipc, err := d.IPCache()
	if err != nil {
		return nil, err
	}
	pol, err := d.Policy()
	if err != nil {
		return nil, err
	}
	dp.Endpoints, dp.IPCache, dp.PolicyEntries, dp.Identities = len(eps), len(ipc), len(pol.Entries), len(pol.Identities)
	if dp.Unattached, err = unattached(d, eps); err != nil {
		return nil, err
	}

	if !v.Agent.Running {
		st, err := g.LoadState()
		if err != nil {
			return nil, err
		}
		drift, err := manual.Drift(d, st)
		if err != nil {
			return nil, err
		}
		v.Manual = &manualView{StatePath: g.StatePath, Endpoints: len(st.Bindings), Rules: len(st.Rules), InSync: len(drift) == 0, Drift: drift}
	}

	counters, err := d.Counters()
	if err != nil {
		return nil, err
	}
	for k, c := range counters {
		verdict := "allow"
		if k.Reason.Drop() {
			verdict = "drop"
		}
		v.Counters = append(v.Counters, counterView{Verdict: verdict, Reason: k.Reason.String(), Hook: k.Scope.String(), Packets: c.Packets, Bytes: c.Bytes})
	}
	sort.Slice(v.Counters, func(i, j int) bool {
		a, b := v.Counters[i], v.Counters[j]
		if a.Verdict != b.Verdict {
			return a.Verdict < b.Verdict
		}
		if a.Reason != b.Reason {
			return a.Reason < b.Reason
		}
		return a.Hook < b.Hook
	})
	stats, err := d.Stats()
	if err != nil {
		return nil, err
	}
	for s, n := range stats {
		v.Stats[s.String()] = n
	}
	usage, err := d.ConntrackUsage()
	if err != nil {
		return nil, err
	}
	owner := map[uint32]int{}
	for idx, ep := range eps {
		if ep.ConntrackSlot != 0 {
			owner[ep.ConntrackSlot] = idx
		}
	}
	// The flows come from the datapath's own counts: listing the pods'
	// tables needs them opened by id, which takes CAP_SYS_ADMIN, and the
	// agent's container (where operators run policyctl) has CAP_BPF.
	for _, u := range usage {
		v.Conntrack = append(v.Conntrack, conntrackView{ConntrackUsage: u, Ifindex: owner[u.Slot]})
		dp.Flows += int(u.Entries())
	}
	sort.Slice(v.Conntrack, func(i, j int) bool { return v.Conntrack[i].Slot < v.Conntrack[j].Slot })
	losses, err := d.EventLosses()
	if err != nil {
		return nil, err
	}
	v.EventsNotSent = map[string]bpf.EventLoss{}
	for r, l := range losses {
		v.EventsNotSent[r.String()] = l
	}
	return v, nil
}

func printStatus(cmd *cobra.Command, v *statusView, all bool) error {
	w := cmd.OutOrStdout()
	dp := v.Datapath
	fmt.Fprintf(w, "Datapath:     %s (policy revision %d, debug %s)\n", dp.Root, dp.Revision, onOff(dp.Debug))
	fmt.Fprintf(w, "Maps:         %d endpoints, %d ipcache entries, %d policy entries, %d identity entries, %d conntrack flows\n",
		dp.Endpoints, dp.IPCache, dp.PolicyEntries, dp.Identities, dp.Flows)
	for _, u := range dp.Unattached {
		fmt.Fprintf(w, "WARNING:      endpoint %s (ifindex %d, %s) has its programs not attached: its traffic is not policed; the agent's audit attaches them again, or re-create the pod\n", u.Interface, u.Ifindex, u.Addrs)
	}
	if v.Agent.Running {
		fmt.Fprintf(w, "Agent:        running on %s\n", v.Agent.Socket)
	} else {
		fmt.Fprintf(w, "Agent:        not running (%s); the CLIs write the maps directly\n", v.Agent.Socket)
	}
	if m := v.Manual; m != nil {
		sync := "in the datapath"
		if !m.InSync {
			sync = fmt.Sprintf("NOT in the datapath (%s): run 'policyctl restore'", cli.Summarize(m.Drift))
		}
		fmt.Fprintf(w, "Manual state: %d endpoints, %d rules in %s, %s\n", m.Endpoints, m.Rules, m.StatePath, sync)
	}
	fmt.Fprintln(w)
	var rows [][]string
	for _, c := range v.Counters {
		if all || c.Packets > 0 {
			rows = append(rows, []string{c.Verdict, c.Reason, c.Hook, fmt.Sprint(c.Packets), fmt.Sprint(c.Bytes)})
		}
	}
	if len(rows) == 0 {
		fmt.Fprintln(w, "No packets counted yet.")
	} else if err := cli.Table(w, "VERDICT\tREASON\tHOOK\tPACKETS\tBYTES", rows); err != nil {
		return err
	}
	if err := printConntrack(w, v, all); err != nil {
		return err
	}
	var srows [][]string
	names := make([]string, 0, len(v.Stats))
	for n := range v.Stats {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if all || v.Stats[n] > 0 {
			srows = append(srows, []string{n, fmt.Sprint(v.Stats[n])})
		}
	}
	for _, r := range slices.Sorted(maps.Keys(v.EventsNotSent)) {
		l := v.EventsNotSent[r]
		if l.Lost > 0 || all {
			srows = append(srows, []string{"event-lost (ring full): " + r, fmt.Sprint(l.Lost)})
		}
		if l.Suppressed > 0 || all {
			srows = append(srows, []string{"event-suppressed (rate limit): " + r, fmt.Sprint(l.Suppressed)})
		}
	}
	if len(srows) == 0 {
		return nil
	}
	fmt.Fprintln(w)
	return cli.Table(w, "DATAPATH ERROR\tCOUNT", srows)
}

// printConntrack sums up the conntrack tables and lists the ones that
// matter: full or evicting (all of them with --all). A full table
// forgets its endpoint's least recently used flows, and their later
// packets are dropped as unknown-flow.
func printConntrack(w io.Writer, v *statusView, all bool) error {
	var entries, capacity, evicted uint64
	var rows [][]string
	for _, c := range v.Conntrack {
		tables := uint64(2)
		if c.Slot == 0 {
			tables = 1 // one shared table serves both kinds of flow
		}
		entries += uint64(c.Entries())
		capacity += tables * uint64(c.Capacity)
		evicted += c.Evicted()
		full := func(u bpf.TableUsage) bool { return c.Capacity > 0 && uint64(u.Entries)*10 >= uint64(c.Capacity)*9 }
		if all || full(c.Opened) || full(c.Admitted) || c.Evicted() > 0 {
			owner := "shared"
			if c.Slot != 0 {
				owner = fmt.Sprintf("ifindex %d", c.Ifindex)
			}
			rows = append(rows, []string{fmt.Sprint(c.Slot), owner, fmt.Sprint(c.Capacity),
				fmt.Sprintf("%d/%d", c.Opened.Entries, c.Opened.Evicted), fmt.Sprintf("%d/%d", c.Admitted.Entries, c.Admitted.Evicted)})
		}
	}
	fmt.Fprintln(w)
	pods := 0
	for _, c := range v.Conntrack {
		if c.Slot != 0 {
			pods++
		}
	}
	fmt.Fprintf(w, "Conntrack:    the shared table and %d pods' own, %d of %d entries in use, %d flows evicted\n", pods, entries, capacity, evicted)
	if len(rows) == 0 {
		return nil
	}
	return cli.Table(w, "SLOT\tOWNER\tCAPACITY\tOPENED (KEPT/EVICTED)\tADMITTED (KEPT/EVICTED)", rows)
}

// unattached lists the endpoints whose host veth is there but does not run
// the pinned programs, asking the kernel: the maps alone look healthy for a
// pod whose programs went away. Endpoints whose veth is gone are GC's.
func unattached(d *bpf.Datapath, eps map[int]bpf.Endpoint) ([]unattachedView, error) {
	var out []unattachedView
	for _, ifindex := range slices.Sorted(maps.Keys(eps)) {
		l, err := netlink.LinkByIndex(ifindex)
		if err != nil {
			continue
		}
		ok, err := d.AttachedIndex(ifindex)
		if err != nil {
			return nil, fmt.Errorf("check the programs of %s: %w", l.Attrs().Name, err)
		}
		if !ok {
			out = append(out, unattachedView{Ifindex: ifindex, Interface: l.Attrs().Name, Addrs: fmt.Sprint(eps[ifindex].Addrs())})
		}
	}
	return out, nil
}
