package policy

import (
	"github.com/idcni/idcni/identity"
)

// Isolation says in which directions an identity is isolated: an isolated
// direction allows only what a rule allows.
type Isolation struct {
	Ingress bool `json:"ingress"`
	Egress  bool `json:"egress"`
}

// In reports whether dir is isolated.
func (i Isolation) In(dir Direction) bool {
	if dir == Ingress {
		return i.Ingress
	}
	return i.Egress
}

// Set is the policy of a node: every rule, and the isolation of every
// identity that does not follow its range's default.
type Set struct {
	Rules     []Rule                    `json:"rules"`
	Isolation map[identity.ID]Isolation `json:"isolation,omitempty"`
}

// IsolationOf returns the isolation of id: the explicit entry if there is
// one, else the default of its range (manual and unresolved identities are
// isolated both ways, everything else is open).
func (s *Set) IsolationOf(id identity.ID) Isolation {
	if iso, ok := s.Isolation[id]; ok {
		return iso
	}
	d := id.IsolatedByDefault()
	return Isolation{Ingress: d, Egress: d}
}

// Reason says why a direction check decided as it did.
type Reason uint8

const (
	ReasonNone        Reason = iota
	ReasonNotIsolated        // allowed: the subject is not isolated in this direction
	ReasonAllowRule          // allowed by a rule
	ReasonDenyRule           // dropped by a deny rule
	ReasonNoRule             // dropped: isolated and no rule allows it
)

func (r Reason) String() string {
	switch r {
	case ReasonNotIsolated:
		return "not isolated"
	case ReasonAllowRule:
		return "allowed by rule"
	case ReasonDenyRule:
		return "deny rule"
	case ReasonNoRule:
		return "no rule"
	}
	return "none"
}

// Decision is the outcome of checking one direction of one subject.
type Decision struct {
	Allowed bool
	Reason  Reason
	// Rule is the rule that decided, for ReasonAllowRule and ReasonDenyRule.
	Rule *Rule
}

// Decide checks one side of a packet: whether subject may send to
// (dir=Egress) or receive from (dir=Ingress) peer with this protocol and
// destination port. Deny rules win over everything; then an isolated subject
// needs an allow rule.
func (s *Set) Decide(subject identity.ID, dir Direction, peer identity.ID, proto Proto, dport uint16) Decision {
	var allow *Rule
	for i := range s.Rules {
		r := &s.Rules[i]
		if !r.Matches(subject, dir, peer, proto, dport) {
			continue
		}
		if r.Action == Deny {
			return Decision{Allowed: false, Reason: ReasonDenyRule, Rule: r}
		}
		if allow == nil {
			allow = r
		}
	}
	if !s.IsolationOf(subject).In(dir) {
		return Decision{Allowed: true, Reason: ReasonNotIsolated}
	}
	if allow != nil {
		return Decision{Allowed: true, Reason: ReasonAllowRule, Rule: allow}
	}
	return Decision{Allowed: false, Reason: ReasonNoRule}
}

// Allowed reports whether a packet from src to dst passes both src's egress
// and dst's ingress. Host and world are never isolated and carry no rules.
func (s *Set) Allowed(src, dst identity.ID, proto Proto, dport uint16) bool {
	if isSubject(src) && !s.Decide(src, Egress, dst, proto, dport).Allowed {
		return false
	}
	if isSubject(dst) && !s.Decide(dst, Ingress, src, proto, dport).Allowed {
		return false
	}
	return true
}
