// Package manual holds the overrides people set by hand with endpointctl and
// policyctl: addresses bound to manual identities (256-65535) and rules
// between manual identities. It keeps them in the node's state file and
// writes them to the datapath's maps.
//
// Nothing here knows about flags or terminals, so idcni-agent can reuse it:
// the agent merges State.PolicyRules with its compiled NetworkPolicies and
// calls SyncBindings itself, while the CLIs, when no agent runs, call Update
// (or Apply, for a restore after a reboot).
package manual

import (
	"fmt"
	"net/netip"
	"slices"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// Binding gives every packet from or to IP the manual identity Identity.
type Binding struct {
	IP       netip.Addr  `json:"ip"`
	Identity identity.ID `json:"identity"`
}

// State is every manual override of a node. Bindings are sorted by address
// and hold each address once; Rules keep the order they were added in, with
// no two equal rules.
type State struct {
	Bindings []Binding           `json:"bindings"`
	Rules    []policy.ManualRule `json:"rules"`
}

// Clone returns a deep copy, so a change can be tried on the copy and
// dropped if it fails.
func (s State) Clone() State {
	return State{Bindings: slices.Clone(s.Bindings), Rules: slices.Clone(s.Rules)}
}

// ParseIP parses a host address as endpointctl takes it: one unicast IPv4 or
// IPv6 address, with no prefix length or zone. IPv4-mapped IPv6 addresses
// are turned into IPv4 so that one pod has one spelling.
func ParseIP(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("bad IP address %q: want one IPv4 or IPv6 address such as 10.13.0.2 (no prefix length)", s)
	}
	return checkIP(a.Unmap())
}

func checkIP(a netip.Addr) (netip.Addr, error) {
	switch {
	case !a.IsValid():
		return a, fmt.Errorf("no IP address given")
	case a.Zone() != "":
		return a, fmt.Errorf("bad IP address %s: zones are not supported", a)
	case a.IsUnspecified(), a.IsMulticast(), a.IsLoopback(), a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return a, fmt.Errorf("bad IP address %s: a pod address must be a unicast address", a)
	}
	return a, nil
}

// CheckIdentity returns an error unless id may be used in a manual override.
func CheckIdentity(id identity.ID) error {
	return identity.ValidateManual(uint64(id))
}

// Binding returns the binding of ip.
func (s *State) Binding(ip netip.Addr) (Binding, bool) {
	i, ok := s.bindingIndex(ip.Unmap())
	if !ok {
		return Binding{}, false
	}
	return s.Bindings[i], true
}

func (s *State) bindingIndex(ip netip.Addr) (int, bool) {
	return slices.BinarySearchFunc(s.Bindings, ip, func(b Binding, a netip.Addr) int { return b.IP.Compare(a) })
}

// Bind binds ip to id, replacing an earlier binding of ip. It returns the
// identity ip had before (0 when it had none).
func (s *State) Bind(ip netip.Addr, id identity.ID) (previous identity.ID, err error) {
	ip, err = checkIP(ip.Unmap())
	if err != nil {
		return 0, err
	}
	if err := CheckIdentity(id); err != nil {
		return 0, err
	}
	i, ok := s.bindingIndex(ip)
	if ok {
		previous = s.Bindings[i].Identity
		s.Bindings[i].Identity = id
		return previous, nil
	}
	s.Bindings = slices.Insert(s.Bindings, i, Binding{IP: ip, Identity: id})
	return 0, nil
}

// Unbind removes the binding of ip and returns it. An address with no
// binding is an error: the caller most likely mistyped it.
func (s *State) Unbind(ip netip.Addr) (Binding, error) {
	i, ok := s.bindingIndex(ip.Unmap())
	if !ok {
		return Binding{}, fmt.Errorf("no manual endpoint has IP %s (see endpointctl list)", ip)
	}
	b := s.Bindings[i]
	s.Bindings = slices.Delete(s.Bindings, i, i+1)
	return b, nil
}

// ValidateRule checks that r is a complete manual rule that the datapath can
// hold: from or to a manual identity, the other side manual too or one of
// the reserved identities no pod has (host, world, remote-node).
func ValidateRule(r policy.ManualRule) error {
	if r.Action != policy.Allow && r.Action != policy.Deny {
		return fmt.Errorf("rule has no action: want allow or deny")
	}
	return validateSelector(r)
}

// validateSelector checks everything of r but its action, which a delete
// may leave open.
func validateSelector(r policy.ManualRule) error {
	if err := identity.ValidateRulePeer(uint64(r.Src)); err != nil {
		return fmt.Errorf("source: %w", err)
	}
	if err := identity.ValidateRulePeer(uint64(r.Dst)); err != nil {
		return fmt.Errorf("destination: %w", err)
	}
	// Manual identities are the only ones these rules isolate and
	// police: between two reserved identities a rule would stand in the
	// maps and decide nothing.
	if !r.Src.IsManual() && !r.Dst.IsManual() {
		return fmt.Errorf("a rule from %s to %s names no manual identity: one side must be %d-%d", r.Src, r.Dst, identity.MinManual, identity.MaxManual)
	}
	if r.Action == 0 {
		r.Action = policy.Allow
	}
	if err := r.Validate(); err != nil {
		return err
	}
	return nil
}

// normal puts a symmetric rule's identities in ascending order: allowing
// 1001<->1002 and 1002<->1001 is the same rule.
func normal(r policy.ManualRule) policy.ManualRule {
	if r.Symmetric && r.Src > r.Dst {
		r.Src, r.Dst = r.Dst, r.Src
	}
	return r
}

// SameRule reports whether a and b are the same rule.
func SameRule(a, b policy.ManualRule) bool {
	return normal(a) == normal(b)
}

// AddRule adds r. It reports false, changing nothing, when an equal rule is
// already there.
func (s *State) AddRule(r policy.ManualRule) (added bool, err error) {
	if err := ValidateRule(r); err != nil {
		return false, err
	}
	if slices.ContainsFunc(s.Rules, func(o policy.ManualRule) bool { return SameRule(o, r) }) {
		return false, nil
	}
	s.Rules = append(s.Rules, r)
	return true, nil
}

// DeleteRules removes the rules that match sel: same identities, direction
// (one-way or symmetric), protocol and ports, and the same action unless
// sel.Action is 0, which matches allow and deny rules alike. It returns what
// it removed and fails, removing nothing, when no rule matches.
func (s *State) DeleteRules(sel policy.ManualRule) ([]policy.ManualRule, error) {
	if err := validateSelector(sel); err != nil {
		return nil, err
	}
	match := func(r policy.ManualRule) bool {
		if sel.Action != 0 && r.Action != sel.Action {
			return false
		}
		a := normal(r)
		b := normal(sel)
		a.Action, b.Action = 0, 0
		return a == b
	}
	var removed []policy.ManualRule
	kept := s.Rules[:0:0]
	for _, r := range s.Rules {
		if match(r) {
			removed = append(removed, r)
		} else {
			kept = append(kept, r)
		}
	}
	if len(removed) == 0 {
		what := "rule"
		if sel.Action != 0 {
			what = sel.Action.String() + " rule"
		}
		sel.Action = 0
		return nil, fmt.Errorf("no manual %s matches %s (see policyctl list)", what, describeSelector(sel))
	}
	s.Rules = kept
	return removed, nil
}

// describeSelector spells a rule as its policyctl flags, without the action.
func describeSelector(r policy.ManualRule) string {
	r.Action = policy.Allow
	s := r.String()
	return s[len("allow "):]
}

// PolicyRules expands the manual rules into per-identity rules: an egress
// rule of the source and an ingress rule of the destination per direction.
// The agent merges these with its NetworkPolicy rules.
func (s State) PolicyRules() []policy.Rule {
	var out []policy.Rule
	for _, r := range s.Rules {
		out = append(out, r.Expand()...)
	}
	return out
}

// PolicySet is the policy of a node with manual rules only. Manual
// identities need no isolation entries: their range is isolated both ways by
// default.
func (s State) PolicySet() *policy.Set {
	return &policy.Set{Rules: s.PolicyRules()}
}

// Compile turns the manual rules into policy and identity map contents.
func (s State) Compile() (*policy.MapState, error) {
	ms, err := s.PolicySet().Compile()
	if err != nil {
		return nil, fmt.Errorf("compile manual rules: %w", err)
	}
	return ms, nil
}

// Validate checks every binding and rule, and that the rules fit the policy
// map. A state that passes can be applied.
func (s State) Validate() error {
	for i, b := range s.Bindings {
		if _, err := checkIP(b.IP); err != nil {
			return err
		}
		if err := CheckIdentity(b.Identity); err != nil {
			return fmt.Errorf("binding of %s: %w", b.IP, err)
		}
		if i > 0 && s.Bindings[i-1].IP.Compare(b.IP) >= 0 {
			return fmt.Errorf("bindings are not sorted or hold %s twice", b.IP)
		}
	}
	for _, r := range s.Rules {
		if err := ValidateRule(r); err != nil {
			return fmt.Errorf("rule %s: %w", r, err)
		}
	}
	_, err := s.Compile()
	return err
}

// sortBindings restores the order Bindings must have; used on data read
// from disk, where the order is the file's.
func (s *State) sortBindings() {
	slices.SortFunc(s.Bindings, func(a, b Binding) int { return a.IP.Compare(b.IP) })
}
