package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/internal/cli"
)

// eventView is a verdict event as -o json prints it: words rather than the
// datapath's numbers, so that scripts need no table of reasons.
type eventView struct {
	Time        time.Time   `json:"time"`
	Verdict     string      `json:"verdict"`
	Reason      string      `json:"reason"`
	Hook        string      `json:"hook"`
	Ifindex     int         `json:"ifindex"`
	SrcIdentity identity.ID `json:"srcIdentity"`
	DstIdentity identity.ID `json:"dstIdentity"`
	SrcAddr     netip.Addr  `json:"srcAddr"`
	DstAddr     netip.Addr  `json:"dstAddr"`
	SrcPort     uint16      `json:"srcPort,omitempty"`
	DstPort     uint16      `json:"dstPort,omitempty"`
	Proto       string      `json:"proto"`
	Len         uint32      `json:"len"`
	// Pods are known to idcni-agent only ("namespace/name").
	SrcPod string `json:"srcPod,omitempty"`
	DstPod string `json:"dstPod,omitempty"`
	// The label sets of label identities and the prefixes of CIDR
	// identities: identity numbers are node-local, these compare across
	// nodes. Absent when not known (see monitor --help).
	SrcLabels map[string]string `json:"srcLabels,omitempty"`
	DstLabels map[string]string `json:"dstLabels,omitempty"`
	SrcCIDR   string            `json:"srcCIDR,omitempty"`
	DstCIDR   string            `json:"dstCIDR,omitempty"`
	// Suppressed counts this endpoint's events its rate limit held back
	// just before this one.
	Suppressed uint32 `json:"suppressed,omitempty"`
}

// gapText is a gap marker as monitor prints it.
func gapText(g *api.Gap) string {
	var parts []string
	if g.Missed > 0 {
		parts = append(parts, fmt.Sprintf("%d events dropped because this monitor fell behind", g.Missed))
	}
	for _, r := range slices.Sorted(maps.Keys(g.Lost)) {
		parts = append(parts, fmt.Sprintf("%d %s events lost (the datapath's ring was full)", g.Lost[r], r))
	}
	return "--- gap: " + strings.Join(parts, "; ") + " ---"
}

func viewOf(ae api.Event) eventView {
	e := ae.Event
	v := eventView{
		Time: e.Time, Verdict: verdictOf(e), Reason: e.Reason.String(), Hook: e.Scope.String(), Ifindex: e.Ifindex,
		SrcIdentity: e.Src, DstIdentity: e.Dst, SrcAddr: e.SrcAddr, DstAddr: e.DstAddr, Proto: e.Proto.String(), Len: e.Len,
		SrcPod: ae.SrcPod, DstPod: ae.DstPod, Suppressed: e.Suppressed,
		SrcLabels: ae.SrcLabels, DstLabels: ae.DstLabels, SrcCIDR: ae.SrcCIDR, DstCIDR: ae.DstCIDR,
	}
	if e.Proto.HasPorts() {
		v.SrcPort, v.DstPort = e.SrcPort, e.DstPort
	}
	return v
}

func verdictOf(e bpf.Event) string {
	if e.Allowed {
		return "allow"
	}
	return "drop"
}

type monitorFlags struct {
	identity       uint64
	verdict        string
	pod, namespace string
	count          int
	out            cli.Output
	// labels fills in and vouches for events' label sets.
	labels *labelSource
}

// labelSource gives events the label sets of their label identities:
// idcni-agent sends them with each event (lookup nil); reading the ring
// itself, monitor takes them from the state file (lookup). When a label
// identity has none, why says so once, so that a number shown alone is
// not taken for a number that has no labels.
type labelSource struct {
	lookup func(identity.ID) (map[string]string, bool)
	why    func(identity.ID) string
	told   bool
}

func (l *labelSource) fill(cmd *cobra.Command, e *api.Event) {
	if l == nil || e.Gap != nil {
		return
	}
	for _, side := range []struct {
		id     identity.ID
		labels *map[string]string
	}{{e.Src, &e.SrcLabels}, {e.Dst, &e.DstLabels}} {
		if !side.id.IsLabel() || *side.labels != nil {
			continue
		}
		if l.lookup != nil {
			if m, ok := l.lookup(side.id); ok {
				*side.labels = m
				continue
			}
		}
		if !l.told {
			l.told = true
			cli.Warn(cmd, "no label set for identity %d: %s; label identities without one are shown as numbers only", side.id, l.why(side.id))
		}
	}
}

// agentLabels vouches for the label sets idcni-agent sends.
func agentLabels(socket string) *labelSource {
	return &labelSource{why: func(identity.ID) string {
		return "idcni-agent on " + socket + " sent none (the identity was freed, or the agent is older than this policyctl)"
	}}
}

// stateLabels reads the label identities from the state file, read-only,
// for monitor without an agent. No agent runs, so nothing allocates new
// ones while monitor runs and one read at the start is enough. A file that
// cannot be read leaves the numbers alone, said at the first label
// identity: a node that never ran an agent has no label identities at all.
func stateLabels(g *cli.Globals) *labelSource {
	db, err := g.OpenStateReadOnly()
	var entries []identity.Entry
	if err == nil {
		entries, err = identity.ReadEntries(db)
		db.Close()
	}
	if err != nil {
		return &labelSource{why: func(identity.ID) string { return "cannot read the state file (" + err.Error() + ")" }}
	}
	m := make(map[identity.ID]map[string]string, len(entries))
	for _, e := range entries {
		m[e.ID] = api.LabelMap(e.Set)
	}
	return &labelSource{
		lookup: func(id identity.ID) (map[string]string, bool) { l, ok := m[id]; return l, ok },
		why: func(identity.ID) string {
			return "the state file " + g.StatePath + " does not have it (allocated by an idcni-agent since monitor started, or freed)"
		},
	}
}

func (f *monitorFlags) match(e bpf.Event) bool {
	if f.identity != 0 && uint64(e.Src) != f.identity && uint64(e.Dst) != f.identity {
		return false
	}
	return f.verdict == "" || verdictOf(e) == f.verdict
}

func newMonitor(g *cli.Globals) *cobra.Command {
	f := &monitorFlags{}
	cmd := &cobra.Command{
		Use:   "monitor [--identity N] [--verdict allow|drop] [--pod POD] [--namespace NS] [-o json]",
		Short: "Print verdicts of the datapath as packets flow",
		Long: `Print the datapath's verdicts live, until Ctrl-C: every dropped packet, and
the first packet of every allowed flow, with the identities, addresses, the
reason and the hook that decided (egress: leaving the source pod; ingress:
entering the destination pod).

With idcni-agent running the events come through the agent, which owns the
event stream and adds the pods' names (and filters by --pod and
--namespace); otherwise policyctl reads the datapath's ring buffer itself
(one reader at a time: two monitors share the events between them).

Identity numbers are node-local (each node's agent numbers label sets by
itself), so every label identity is shown with its label set: as
'65537 (ns=shop,app=web)' in text (the namespace, then the pod's labels),
as srcLabels and dstLabels with every label in -o json; a CIDR identity
with its prefix (srcCIDR, dstCIDR), reserved identities by name (host,
world, remote-node, unresolved). Through idcni-agent the labels come with
the events; without one they are read from the state file when it can be
read, and otherwise the numbers stand alone, which a warning says once.
'policyctl identity get N' answers for one number.`,
		Example: `  # Everything
  policyctl monitor

  # Drops from or to identity 1001, as JSON lines
  policyctl monitor --identity 1001 --verdict drop -o json

  # Stop after the first 10 events
  policyctl monitor -c 10

  # With idcni-agent: events of one pod, with pod names
  policyctl monitor --namespace shop --pod frontend-7d4b9`,
		Args: cli.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := f.out.Check(); err != nil {
				return err
			}
			if f.verdict != "" && f.verdict != "allow" && f.verdict != "drop" {
				return fmt.Errorf("bad --verdict %q: want allow or drop", f.verdict)
			}
			if f.identity != 0 && f.identity > uint64(^uint32(0)) {
				return fmt.Errorf("bad --identity %d: identities are 32-bit numbers", f.identity)
			}
			if f.count < 0 {
				return fmt.Errorf("bad --count %d: want 0 (no limit) or more", f.count)
			}
			if err := cli.RequireRoot(tool); err != nil {
				return err
			}
			ctx := cmd.Context()
			if c := g.Agent(ctx); c != nil {
				return monitorAgent(ctx, cmd, c, f)
			}
			if f.pod != "" || f.namespace != "" {
				return fmt.Errorf("--pod and --namespace need idcni-agent, which knows the pods; none answers on %s (filter with --identity instead)", g.AgentSocket)
			}
			return monitorRing(ctx, cmd, g, f)
		},
	}
	fl := cmd.Flags()
	fl.Uint64Var(&f.identity, "identity", 0, "only events from or to this `identity`")
	fl.StringVar(&f.verdict, "verdict", "", "only `allow` or drop events")
	fl.StringVar(&f.pod, "pod", "", "only events from or to this `POD` (name or namespace/name; needs idcni-agent)")
	fl.StringVar(&f.namespace, "namespace", "", "only events from or to pods in this `NAMESPACE` (needs idcni-agent)")
	fl.IntVarP(&f.count, "count", "c", 0, "exit after this many events (default: until Ctrl-C)")
	cli.AddOutputFlag(cmd, &f.out)
	return cmd
}

// emitter prints matching events and says when --count is reached.
func (f *monitorFlags) emitter(cmd *cobra.Command) func(api.Event) (done bool, err error) {
	w := cmd.OutOrStdout()
	enc := json.NewEncoder(w)
	n := 0
	return func(e api.Event) (bool, error) {
		if e.Gap != nil {
			var err error
			if f.out == cli.OutputJSON {
				err = enc.Encode(struct {
					Gap *api.Gap `json:"gap"`
				}{e.Gap})
			} else {
				_, err = fmt.Fprintln(w, gapText(e.Gap))
			}
			if err != nil {
				return true, fmt.Errorf("write gap marker: %w", err)
			}
			return false, nil
		}
		if !f.match(e.Event) {
			return false, nil
		}
		f.labels.fill(cmd, &e)
		var err error
		if f.out == cli.OutputJSON {
			err = enc.Encode(viewOf(e))
		} else {
			_, err = fmt.Fprintln(w, textOf(e))
		}
		if err != nil {
			return true, fmt.Errorf("write event: %w", err)
		}
		n++
		return f.count > 0 && n >= f.count, nil
	}
}

func monitorRing(ctx context.Context, cmd *cobra.Command, g *cli.Globals, f *monitorFlags) error {
	d, err := g.OpenDatapath()
	if err != nil {
		return err
	}
	defer d.Close()
	rd, err := d.Events()
	if err != nil {
		return err
	}
	defer rd.Close()
	f.labels = stateLabels(g)
	// Closing the reader is the only way to wake a blocked Read.
	stop := context.AfterFunc(ctx, func() { rd.Close() })
	defer stop()
	fmt.Fprintf(cmd.ErrOrStderr(), "Listening for verdicts of the datapath at %s (Ctrl-C to stop)\n", d.Root())
	emit := f.emitter(cmd)
	w, err := d.WatchLosses()
	if err != nil {
		return err
	}
	losses := lossWatch{w: w, asked: time.Now()}
	for {
		// Wake at least every second to tell ring losses.
		rd.SetDeadline(time.Now().Add(time.Second))
		e, err := rd.Read()
		if ctx.Err() != nil {
			return nil // Ctrl-C is how monitor normally ends
		}
		if g := losses.gap(); g != nil {
			if done, err := emit(api.Event{Gap: g}); done || err != nil {
				return err
			}
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			continue
		}
		if err != nil {
			return fmt.Errorf("read verdict events: %w", err)
		}
		if done, err := emit(api.Event{Event: e}); done || err != nil {
			return err
		}
	}
}

// lossWatch turns the datapath's counts of events lost to a full ring into
// gap markers, at most one a second.
type lossWatch struct {
	w     *bpf.LossWatch
	asked time.Time
}

func (l *lossWatch) gap() *api.Gap {
	if time.Since(l.asked) < time.Second {
		return nil
	}
	l.asked = time.Now()
	lost, err := l.w.Since()
	if err != nil {
		return nil
	}
	return api.LostGap(lost)
}

// textOf is the datapath's one-line form, with the pods when known.
func textOf(e api.Event) string {
	s := e.Event.Format(describeID(e.Src, e.SrcLabels, e.SrcCIDR), describeID(e.Dst, e.DstLabels, e.DstCIDR))
	if e.Suppressed > 0 {
		s += fmt.Sprintf(" (+%d earlier events of this endpoint held back by its rate limit)", e.Suppressed)
	}
	if e.SrcPod != "" || e.DstPod != "" {
		s += fmt.Sprintf(" [%s -> %s]", orDash(e.SrcPod), orDash(e.DstPod))
	}
	return s
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func monitorAgent(ctx context.Context, cmd *cobra.Command, c *api.Client, f *monitorFlags) error {
	socket := c.Socket()
	q := url.Values{}
	if f.identity != 0 {
		q.Set("identity", strconv.FormatUint(f.identity, 10))
	}
	if f.verdict != "" {
		q.Set("verdict", f.verdict)
	}
	if f.pod != "" {
		q.Set("pod", f.pod)
	}
	if f.namespace != "" {
		q.Set("namespace", f.namespace)
	}
	body, err := c.Events(ctx, q)
	if err != nil {
		return fmt.Errorf("open the verdict stream of idcni-agent: %w", err)
	}
	defer body.Close()
	fmt.Fprintf(cmd.ErrOrStderr(), "Listening for verdicts through idcni-agent on %s (Ctrl-C to stop)\n", socket)
	f.labels = agentLabels(socket)
	emit := f.emitter(cmd)
	sc := bufio.NewScanner(body)
	for sc.Scan() {
		var e api.Event
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			return fmt.Errorf("decode event from idcni-agent: %w", err)
		}
		if done, err := emit(e); done || err != nil {
			return err
		}
	}
	if ctx.Err() != nil {
		return nil
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read the verdict stream of idcni-agent: %w", err)
	}
	return fmt.Errorf("idcni-agent on %s closed the verdict stream", socket)
}
