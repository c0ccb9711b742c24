// Package policy holds the rule model every path of idcni shares: manual rules
// from policyctl and compiled NetworkPolicies become the same per-identity
// rules, which compile to the entries the datapath looks up. Set.Decide is
// the rule book: bpf/reference (the datapath's Go model the datapath tests
// hold the kernel to) and policyctl simulate decide by it. It never touches
// the kernel.
package policy

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/idcni/idcni/identity"
)

// Direction is the side of a subject a rule guards.
type Direction uint8

const (
	Ingress Direction = 1 // traffic entering the subject's pod
	Egress  Direction = 2 // traffic leaving the subject's pod
)

func (d Direction) String() string {
	switch d {
	case Ingress:
		return "ingress"
	case Egress:
		return "egress"
	}
	return fmt.Sprintf("direction(%d)", uint8(d))
}

// Opposite returns the other direction.
func (d Direction) Opposite() Direction {
	if d == Ingress {
		return Egress
	}
	return Ingress
}

// Action is what a matching rule does.
type Action uint8

const (
	Allow Action = 1
	Deny  Action = 2
)

func (a Action) String() string {
	switch a {
	case Allow:
		return "allow"
	case Deny:
		return "deny"
	}
	return fmt.Sprintf("action(%d)", uint8(a))
}

// Proto is an IP protocol number; ProtoAny matches every protocol.
type Proto uint8

const (
	ProtoAny    Proto = 0
	ProtoICMP   Proto = 1
	ProtoTCP    Proto = 6
	ProtoUDP    Proto = 17
	ProtoICMPv6 Proto = 58
	ProtoSCTP   Proto = 132
)

// HasPorts reports whether rules of this protocol may name ports.
func (p Proto) HasPorts() bool { return p == ProtoTCP || p == ProtoUDP || p == ProtoSCTP }

func (p Proto) String() string {
	switch p {
	case ProtoAny:
		return "any"
	case ProtoICMP:
		return "icmp"
	case ProtoTCP:
		return "tcp"
	case ProtoUDP:
		return "udp"
	case ProtoICMPv6:
		return "icmpv6"
	case ProtoSCTP:
		return "sctp"
	}
	return strconv.Itoa(int(p))
}

// ParseProto accepts a protocol name (tcp, udp, sctp, icmp, icmpv6, any) or
// number.
func ParseProto(s string) (Proto, error) {
	switch strings.ToLower(s) {
	case "", "any":
		return ProtoAny, nil
	case "icmp":
		return ProtoICMP, nil
	case "tcp":
		return ProtoTCP, nil
	case "udp":
		return ProtoUDP, nil
	case "icmpv6", "ipv6-icmp":
		return ProtoICMPv6, nil
	case "sctp":
		return ProtoSCTP, nil
	}
	n, err := strconv.ParseUint(s, 10, 8)
	if err != nil {
		return 0, fmt.Errorf("unknown protocol %q: want tcp, udp, sctp, icmp, icmpv6, any or a number 0-255", s)
	}
	return Proto(n), nil
}

// PortRange is an inclusive range of destination ports. The zero value
// matches every port.
type PortRange struct {
	Lo, Hi uint16
}

// AnyPort matches every port.
var AnyPort = PortRange{}

// IsAny reports whether r matches every port.
func (r PortRange) IsAny() bool { return r.Lo == 0 && r.Hi == 0 }

// Contains reports whether port is in r.
func (r PortRange) Contains(port uint16) bool {
	return r.IsAny() || (port >= r.Lo && port <= r.Hi)
}

func (r PortRange) String() string {
	switch {
	case r.IsAny():
		return "any"
	case r.Lo == r.Hi:
		return strconv.Itoa(int(r.Lo))
	}
	return fmt.Sprintf("%d-%d", r.Lo, r.Hi)
}

// ParsePortRange accepts "", "any", "X" or "X-Y" with 1 <= X <= Y <= 65535.
func ParsePortRange(s string) (PortRange, error) {
	if s == "" || s == "any" {
		return AnyPort, nil
	}
	lo, hi, isRange := strings.Cut(s, "-")
	if !isRange {
		hi = lo
	}
	l, err1 := strconv.ParseUint(lo, 10, 16)
	h, err2 := strconv.ParseUint(hi, 10, 16)
	if err1 != nil || err2 != nil || l == 0 || h < l {
		return AnyPort, fmt.Errorf("bad port %q: want a port 1-65535 or a range X-Y with X <= Y", s)
	}
	return PortRange{Lo: uint16(l), Hi: uint16(h)}, nil
}

// Rule lets (or forbids) traffic between a subject identity and a peer in one
// direction of the subject. Peer identity.Any matches every peer; Proto
// ProtoAny matches every protocol (ICMP included) and then Ports must be any.
type Rule struct {
	Subject   identity.ID `json:"subject"`
	Direction Direction   `json:"direction"`
	Peer      identity.ID `json:"peer"`
	Proto     Proto       `json:"proto"`
	Ports     PortRange   `json:"ports"`
	Action    Action      `json:"action"`
	// Origin names where the rule came from ("manual", or a NetworkPolicy
	// and its rule index) so verdicts can say why.
	Origin string `json:"origin,omitempty"`
}

// Validate returns an error describing the first thing wrong with r.
func (r Rule) Validate() error {
	if r.Subject == identity.Any {
		return fmt.Errorf("rule has no subject identity")
	}
	if r.Direction != Ingress && r.Direction != Egress {
		return fmt.Errorf("rule has no direction")
	}
	if r.Action != Allow && r.Action != Deny {
		return fmt.Errorf("rule has no action")
	}
	if !r.Ports.IsAny() {
		if !r.Proto.HasPorts() {
			return fmt.Errorf("ports %s need protocol tcp, udp or sctp, not %s", r.Ports, r.Proto)
		}
		if r.Ports.Lo == 0 || r.Ports.Hi < r.Ports.Lo {
			return fmt.Errorf("bad port range %d-%d", r.Ports.Lo, r.Ports.Hi)
		}
	}
	return nil
}

// Matches reports whether r applies to a packet of the given subject,
// direction, peer, protocol and destination port.
func (r Rule) Matches(subject identity.ID, dir Direction, peer identity.ID, proto Proto, dport uint16) bool {
	if r.Subject != subject || r.Direction != dir {
		return false
	}
	if r.Peer != identity.Any && r.Peer != peer {
		return false
	}
	if r.Proto != ProtoAny && r.Proto != proto {
		return false
	}
	if r.Ports.IsAny() {
		return true
	}
	return proto.HasPorts() && r.Ports.Contains(dport)
}

func (r Rule) String() string {
	s := fmt.Sprintf("%s %s of %s peer %s proto %s port %s", r.Action, r.Direction, r.Subject, r.Peer, r.Proto, r.Ports)
	if r.Origin != "" {
		s += " (" + r.Origin + ")"
	}
	return s
}

// ManualRule is a rule as people write it with policyctl: traffic from Src to
// Dst. It stands for an egress rule of Src and an ingress rule of Dst (and the
// reverse pair when Symmetric).
type ManualRule struct {
	Action    Action      `json:"action"`
	Src       identity.ID `json:"src"`
	Dst       identity.ID `json:"dst"`
	Symmetric bool        `json:"symmetric,omitempty"`
	Proto     Proto       `json:"proto"`
	Ports     PortRange   `json:"ports"`
}

// Validate checks that m can be expanded into valid rules.
func (m ManualRule) Validate() error {
	if m.Src == identity.Any && m.Dst == identity.Any {
		return fmt.Errorf("a rule needs a source or a destination identity")
	}
	for _, r := range m.Expand() {
		if err := r.Validate(); err != nil {
			return err
		}
	}
	return nil
}

// Expand turns m into per-identity rules. A side that is identity.Any (or a
// reserved identity such as host or world) gets no rule: only endpoints are
// subjects.
func (m ManualRule) Expand() []Rule {
	var out []Rule
	add := func(src, dst identity.ID) {
		if isSubject(src) {
			out = append(out, Rule{Subject: src, Direction: Egress, Peer: dst, Proto: m.Proto, Ports: m.Ports, Action: m.Action, Origin: "manual"})
		}
		if isSubject(dst) {
			out = append(out, Rule{Subject: dst, Direction: Ingress, Peer: src, Proto: m.Proto, Ports: m.Ports, Action: m.Action, Origin: "manual"})
		}
	}
	add(m.Src, m.Dst)
	if m.Symmetric && m.Src != m.Dst {
		add(m.Dst, m.Src)
	}
	return out
}

// isSubject reports whether an identity can own rules: host, world and
// remote-node have no endpoint on this node, so no hook would read them.
func isSubject(id identity.ID) bool {
	return id != identity.Any && id != identity.Host && id != identity.World && id != identity.RemoteNode
}

func (m ManualRule) String() string {
	s := fmt.Sprintf("%s --src %s --dst %s", m.Action, m.Src, m.Dst)
	if m.Symmetric {
		s += " --symmetric"
	}
	if m.Proto != ProtoAny {
		s += " --proto " + m.Proto.String()
	}
	if !m.Ports.IsAny() {
		s += " --port " + m.Ports.String()
	}
	return s
}
