package main

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/internal/cli"
	"github.com/idcni/idcni/manual"
	"github.com/idcni/idcni/policy"
)

type ruleVerb int

const (
	ruleAllow ruleVerb = iota
	ruleDeny
	ruleDelete
)

// ruleFlags are the flags that spell a manual rule.
type ruleFlags struct {
	src, dst  uint64
	symmetric bool
	proto     string
	port      string
	action    string // delete only
}

func (f *ruleFlags) register(cmd *cobra.Command, verb ruleVerb) {
	fl := cmd.Flags()
	fl.Var(idFlag{&f.src}, "src", "source identity `N`: 256-65535, or host (1), world (2), remote-node (6) (required)")
	fl.Var(idFlag{&f.dst}, "dst", "destination identity `N`: 256-65535, or host (1), world (2), remote-node (6) (required)")
	fl.BoolVar(&f.symmetric, "symmetric", false, "the rule holds in both directions: dst -> src as well as src -> dst")
	fl.StringVar(&f.proto, "proto", "", "IP protocol `P`: tcp, udp, sctp, icmp, icmpv6, any or a number (default any; tcp when --port is given)")
	fl.StringVar(&f.port, "port", "", "destination port or range `X[-Y]`; tcp unless --proto says udp or sctp, as in Kubernetes (default every port)")
	if verb == ruleDelete {
		fl.StringVar(&f.action, "action", "", "delete only rules with this `ACTION`, allow or deny (default both)")
	}
}

// idFlag is an identity flag: a number, or a reserved identity's name, as
// policyctl list prints it.
type idFlag struct{ v *uint64 }

func (f idFlag) String() string {
	if f.v == nil {
		return "0"
	}
	return strconv.FormatUint(*f.v, 10)
}

func (f idFlag) Set(s string) error {
	id, err := identity.Parse(s)
	if err != nil {
		return err
	}
	*f.v = uint64(id)
	return nil
}

func (idFlag) Type() string { return "identity" }

// rule turns the flags into a rule, checking every value before anything
// is written.
func (f *ruleFlags) rule(cmd *cobra.Command, action policy.Action) (policy.ManualRule, error) {
	if err := cli.RequireFlags(cmd, "src", "dst"); err != nil {
		return policy.ManualRule{}, err
	}
	if err := identity.ValidateRulePeer(f.src); err != nil {
		return policy.ManualRule{}, fmt.Errorf("bad --src: %w", err)
	}
	if err := identity.ValidateRulePeer(f.dst); err != nil {
		return policy.ManualRule{}, fmt.Errorf("bad --dst: %w", err)
	}
	r := policy.ManualRule{Action: action, Src: identity.ID(f.src), Dst: identity.ID(f.dst), Symmetric: f.symmetric}
	var err error
	if r.Ports, err = policy.ParsePortRange(f.port); err != nil {
		return r, fmt.Errorf("bad --port: %w", err)
	}
	proto := f.proto
	if proto == "" && !r.Ports.IsAny() {
		proto = "tcp" // Kubernetes' default protocol for a port
	}
	if r.Proto, err = policy.ParseProto(proto); err != nil {
		return r, fmt.Errorf("bad --proto: %w", err)
	}
	if !r.Ports.IsAny() && !r.Proto.HasPorts() {
		return r, fmt.Errorf("bad --port: protocol %s has no ports; --port needs --proto tcp, udp or sctp", r.Proto)
	}
	check := manual.ValidateRule
	if action == 0 {
		check = func(r policy.ManualRule) error { r.Action = policy.Allow; return manual.ValidateRule(r) }
	}
	if err := check(r); err != nil {
		return r, err
	}
	return r, nil
}

// flagsOf spells a rule as policyctl flags, without the action.
func flagsOf(r policy.ManualRule) string {
	s := policy.ManualRule{Action: policy.Allow, Src: r.Src, Dst: r.Dst, Symmetric: r.Symmetric, Proto: r.Proto, Ports: r.Ports}.String()
	return strings.TrimPrefix(s, "allow ")
}

func newRuleCmd(g *cli.Globals, verb ruleVerb) *cobra.Command {
	f := &ruleFlags{}
	cmd := &cobra.Command{Args: cli.NoArgs}
	var action policy.Action
	switch verb {
	case ruleAllow:
		action = policy.Allow
		cmd.Use = "allow --src N --dst N [--symmetric] [--proto P] [--port X[-Y]]"
		cmd.Short = "Allow traffic from one manual identity to another"
		cmd.Long = `Allow traffic from the source identity to the destination identity: the
source's egress and the destination's ingress.

Without --proto and --port every protocol passes, ICMP included. --port
names a destination port or range; without --proto it means TCP, as in a
Kubernetes NetworkPolicy. Replies of an allowed connection pass without a rule
of their own, so a one-way allow lets the source open connections to the
destination but not the reverse. --symmetric allows both directions. Adding a
rule that exists already changes nothing. Deny rules win over allow rules.

One side may instead be an address no pod has: host (1, this node's own
stack), world (2, outside the cluster) or remote-node (6, the cluster's other
nodes).`
		cmd.Example = `  # Let 1001 and 1002 talk to each other, any protocol (seed step 4)
  policyctl allow --src 1001 --dst 1002 --symmetric

  # 1001 may open connections to 1002, not the reverse
  policyctl allow --src 1001 --dst 1002

  # Only TCP 8080-8089 and UDP 53 from 1001 to 1002
  policyctl allow --src 1001 --dst 1002 --port 8080-8089
  policyctl allow --src 1001 --dst 1002 --proto udp --port 53

  # The other nodes may reach 1002 on TCP 80
  policyctl allow --src remote-node --dst 1002 --port 80`
	case ruleDeny:
		action = policy.Deny
		cmd.Use = "deny --src N --dst N [--symmetric] [--proto P] [--port X[-Y]]"
		cmd.Short = "Deny traffic from one manual identity to another"
		cmd.Long = `Deny traffic from the source identity to the destination identity.

A deny rule wins over every allow rule, and drops every packet from the
source to the destination, replies of established connections included: after
'policyctl deny --src 1002 --dst 1001', 1001 gets no answer from 1002 even
where 1001 -> 1002 is allowed. --proto and --port narrow the deny as they
narrow an allow (--port alone means TCP).`
		cmd.Example = `  # Cut 1002 -> 1001, replies included (seed step 5)
  policyctl deny --src 1002 --dst 1001

  # Deny only UDP from 1001 to 1002 in both directions
  policyctl deny --src 1001 --dst 1002 --symmetric --proto udp

  # Nothing from the other nodes reaches 1001
  policyctl deny --src remote-node --dst 1001`
	case ruleDelete:
		cmd.Use = "delete --src N --dst N [--symmetric] [--proto P] [--port X[-Y]] [--action allow|deny]"
		cmd.Aliases = []string{"del", "rm"}
		cmd.Short = "Delete manual rules"
		cmd.Long = `Delete the manual rules spelled by the flags: the same --src, --dst,
--symmetric, --proto and --port as when the rule was added (see 'policyctl
list'). Both an allow and a deny rule with those flags are deleted unless
--action narrows it. A symmetric rule matches with --src and --dst either way
round. It is an error when no rule matches; nothing changes then.`
		cmd.Example = `  # Undo 'policyctl deny --src 1002 --dst 1001'
  policyctl delete --src 1002 --dst 1001 --action deny

  # Undo 'policyctl allow --src 1001 --dst 1002 --port 8080'
  policyctl delete --src 1001 --dst 1002 --port 8080`
	}
	f.register(cmd, verb)
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		a := action
		if verb == ruleDelete {
			switch f.action {
			case "":
			case "allow":
				a = policy.Allow
			case "deny":
				a = policy.Deny
			default:
				return fmt.Errorf("bad --action %q: want allow or deny", f.action)
			}
		}
		r, err := f.rule(cmd, a)
		if err != nil {
			return err
		}
		if err := cli.RequireRoot(tool); err != nil {
			return err
		}
		if verb == ruleDelete {
			return deleteRule(cmd, g, r)
		}
		return addRule(cmd, g, r)
	}
	return cmd
}

func addRule(cmd *cobra.Command, g *cli.Globals, r policy.ManualRule) error {
	ctx := cmd.Context()
	out := cmd.OutOrStdout()
	if c := g.Agent(ctx); c != nil {
		if err := c.AddManualRule(ctx, api.RuleRequest{Rule: r}); err != nil {
			return fmt.Errorf("idcni-agent refused rule %s: %w", r, err)
		}
		fmt.Fprintf(out, "rule added (through idcni-agent): %s\n", r)
		return nil
	}
	var added bool
	err := g.UpdateManual(func(st *manual.State) error {
		var err error
		added, err = st.AddRule(r)
		return err
	}, nil)
	if err != nil {
		return fmt.Errorf("add rule %s: %w", r, err)
	}
	if added {
		fmt.Fprintf(out, "rule added: %s\n", r)
	} else {
		fmt.Fprintf(out, "rule unchanged (already present): %s\n", r)
	}
	return nil
}

func deleteRule(cmd *cobra.Command, g *cli.Globals, sel policy.ManualRule) error {
	ctx := cmd.Context()
	out := cmd.OutOrStdout()
	if c := g.Agent(ctx); c != nil {
		if err := c.DeleteManualRule(ctx, api.RuleRequest{Rule: sel}); err != nil {
			return fmt.Errorf("idcni-agent: %w", err)
		}
		fmt.Fprintf(out, "rules deleted (through idcni-agent): %s\n", flagsOf(sel))
		return nil
	}
	var removed []policy.ManualRule
	err := g.UpdateManual(func(st *manual.State) error {
		var err error
		removed, err = st.DeleteRules(sel)
		return err
	}, nil)
	if err != nil {
		return err
	}
	for _, r := range removed {
		fmt.Fprintf(out, "rule deleted: %s\n", r)
	}
	return nil
}

// listedRule is one row of policyctl list, spelled as the flags that made it.
type listedRule struct {
	Action    string      `json:"action"`
	Src       identity.ID `json:"src"`
	Dst       identity.ID `json:"dst"`
	Symmetric bool        `json:"symmetric"`
	Proto     string      `json:"proto"`
	Port      string      `json:"port"`
}

func newList(g *cli.Globals) *cobra.Command {
	var out cli.Output
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List manual rules",
		Long: `List the manual rules in the order they were added, as the flags that
made them.

Without idcni-agent the list comes from the state file; a warning says when
the datapath does not hold it (after a reboot: run 'policyctl restore').`,
		Example: `  policyctl list
  policyctl list -o json | jq '.rules[] | select(.action == "deny")'`,
		Args: cli.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.Check(); err != nil {
				return err
			}
			if err := cli.RequireRoot(tool); err != nil {
				return err
			}
			rules, err := loadRules(cmd, g)
			if err != nil {
				return err
			}
			rows := make([]listedRule, 0, len(rules))
			for _, r := range rules {
				rows = append(rows, listedRule{Action: r.Action.String(), Src: r.Src, Dst: r.Dst, Symmetric: r.Symmetric, Proto: r.Proto.String(), Port: r.Ports.String()})
			}
			w := cmd.OutOrStdout()
			if out == cli.OutputJSON {
				return cli.PrintJSON(w, struct {
					Rules []listedRule `json:"rules"`
				}{rows})
			}
			if len(rows) == 0 {
				fmt.Fprintln(cmd.ErrOrStderr(), "No manual rules: every manual identity is denied everything.")
				return nil
			}
			table := make([][]string, 0, len(rows))
			for _, r := range rows {
				dir := "->"
				if r.Symmetric {
					dir = "<->"
				}
				table = append(table, []string{r.Action, fmt.Sprintf("%s %s %s", r.Src, dir, r.Dst), r.Proto, r.Port})
			}
			return cli.Table(w, "ACTION\tSRC -> DST\tPROTO\tPORT", table)
		},
	}
	cli.AddOutputFlag(cmd, &out)
	return cmd
}

// loadRules reads the rules from the agent or the state file; without an
// agent it warns when the datapath does not hold the stored state.
func loadRules(cmd *cobra.Command, g *cli.Globals) ([]policy.ManualRule, error) {
	ctx := cmd.Context()
	if c := g.Agent(ctx); c != nil {
		l, err := c.ManualRules(ctx)
		if err != nil {
			return nil, fmt.Errorf("ask idcni-agent for manual rules: %w", err)
		}
		return l.Rules, nil
	}
	st, err := g.LoadState()
	if err != nil {
		return nil, err
	}
	d, err := g.OpenDatapath()
	switch {
	case errors.Is(err, bpf.ErrNotLoaded):
		if len(st.Rules) > 0 {
			cli.Warn(cmd, "%v: the rules below are stored but not in effect", err)
		}
		return st.Rules, nil
	case err != nil:
		return nil, err
	}
	defer d.Close()
	if drift, err := manual.Drift(d, st); err == nil && len(drift) > 0 {
		cli.Warn(cmd, "the datapath does not hold the stored manual state (%s); run 'policyctl restore'", cli.Summarize(drift))
	}
	return st.Rules, nil
}
