package bpf

import (
	"fmt"
	"net/netip"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// Scope says which hook saw a packet.
type Scope uint8

const (
	// ScopeEgress is the host veth's TC ingress: the packet leaves the pod.
	ScopeEgress Scope = Scope(datapathScopeSCOPE_EGRESS)
	// ScopeIngress is the host veth's TC egress: the packet enters the pod.
	ScopeIngress Scope = Scope(datapathScopeSCOPE_INGRESS)
)

func (s Scope) String() string {
	if s == ScopeEgress {
		return "egress"
	}
	return "ingress"
}

// Reason says why a packet passed or was dropped.
type Reason uint8

const (
	ReasonAllowNonIP       = Reason(datapathReasonREASON_ALLOW_NONIP)
	ReasonAllowND          = Reason(datapathReasonREASON_ALLOW_ND)
	ReasonAllowEstablished = Reason(datapathReasonREASON_ALLOW_ESTABLISHED)
	ReasonAllowReply       = Reason(datapathReasonREASON_ALLOW_REPLY)
	ReasonAllowRule        = Reason(datapathReasonREASON_ALLOW_RULE)
	ReasonAllowOpen        = Reason(datapathReasonREASON_ALLOW_OPEN)
	ReasonAllowHost        = Reason(datapathReasonREASON_ALLOW_HOST)
	ReasonAllowRelated     = Reason(datapathReasonREASON_ALLOW_RELATED)
	ReasonDropNoRule       = Reason(datapathReasonREASON_DROP_NO_RULE)
	ReasonDropDeny         = Reason(datapathReasonREASON_DROP_DENY)
	ReasonDropSpoof        = Reason(datapathReasonREASON_DROP_SPOOF)
	ReasonDropMalformed    = Reason(datapathReasonREASON_DROP_MALFORMED)
	ReasonDropNoEndpoint   = Reason(datapathReasonREASON_DROP_NO_ENDPOINT)
	ReasonDropFrag         = Reason(datapathReasonREASON_DROP_FRAG)
	ReasonDropRevoked      = Reason(datapathReasonREASON_DROP_REVOKED)
	ReasonDropUnknownFlow  = Reason(datapathReasonREASON_DROP_UNKNOWN_FLOW)
	ReasonDropNoBackend    = Reason(datapathReasonREASON_DROP_NO_BACKEND)
	reasonMax              = Reason(datapathReasonREASON_MAX)
)

var reasonNames = map[Reason]string{
	ReasonAllowNonIP:       "non-ip",
	ReasonAllowND:          "ipv6-link-control",
	ReasonAllowEstablished: "established",
	ReasonAllowReply:       "reply",
	ReasonAllowRule:        "rule",
	ReasonAllowOpen:        "not-isolated",
	ReasonAllowHost:        "from-host",
	ReasonAllowRelated:     "related",
	ReasonDropNoRule:       "no-rule",
	ReasonDropDeny:         "deny-rule",
	ReasonDropSpoof:        "spoofed-source",
	ReasonDropMalformed:    "malformed",
	ReasonDropNoEndpoint:   "no-endpoint",
	ReasonDropFrag:         "unknown-fragment",
	ReasonDropRevoked:      "revoked",
	ReasonDropUnknownFlow:  "unknown-flow",
	ReasonDropNoBackend:    "no-service-backend",
}

func (r Reason) String() string {
	if s, ok := reasonNames[r]; ok {
		return s
	}
	return fmt.Sprintf("reason(%d)", uint8(r))
}

// Drop reports whether the reason drops the packet.
func (r Reason) Drop() bool { return r >= ReasonDropNoRule }

// Reasons lists every reason the datapath reports.
func Reasons() []Reason {
	out := make([]Reason, 0, len(reasonNames))
	for r := Reason(0); r < reasonMax; r++ {
		if _, ok := reasonNames[r]; ok {
			out = append(out, r)
		}
	}
	return out
}

// Stat is a datapath error counted apart from packets.
type Stat uint8

const (
	StatCTInsertFail   = Stat(datapathStatSTAT_CT_INSERT_FAIL)
	StatFragInsertFail = Stat(datapathStatSTAT_FRAG_INSERT_FAIL)
	StatEventLost      = Stat(datapathStatSTAT_EVENT_LOST)
	statMax            = Stat(datapathStatSTAT_MAX)
)

func (s Stat) String() string {
	switch s {
	case StatCTInsertFail:
		return "conntrack-insert-failed"
	case StatFragInsertFail:
		return "fragment-insert-failed"
	case StatEventLost:
		return "event-lost"
	}
	return fmt.Sprintf("stat(%d)", uint8(s))
}

// Endpoint is a pod as the datapath knows it, keyed by its host veth's
// ifindex: its identity, the addresses it may send from, and the slot of
// its own conntrack table (0: the node's shared one).
type Endpoint struct {
	Identity identity.ID `json:"identity"`
	IPv4     netip.Addr  `json:"ipv4,omitzero"`
	IPv6     netip.Addr  `json:"ipv6,omitzero"`
	// ConntrackSlot is set by whoever created the table (the CNI
	// plugin's ADD, with AddConntrackTable). A write that leaves it 0
	// keeps the slot the entry has: see PutEndpoint.
	ConntrackSlot uint32 `json:"conntrackSlot,omitzero"`
}

// NewEndpoint is the endpoint of a pod with identity id and these
// addresses (one of each family at most; a later one of a family wins).
func NewEndpoint(id identity.ID, addrs []netip.Addr) Endpoint {
	ep := Endpoint{Identity: id}
	for _, a := range addrs {
		if a.Is4() {
			ep.IPv4 = a
		} else {
			ep.IPv6 = a
		}
	}
	return ep
}

// Addrs lists the endpoint's valid addresses, IPv4 first.
func (e Endpoint) Addrs() []netip.Addr {
	var out []netip.Addr
	for _, a := range []netip.Addr{e.IPv4, e.IPv6} {
		if a.IsValid() {
			out = append(out, a)
		}
	}
	return out
}

// HoldsAny reports whether the endpoint carries one of addrs. It is the
// ownership test for an entry found at a remembered ifindex: the kernel
// reuses ifindexes, so whoever deletes the entry of a pod it knows by an
// old record (the plugin's DEL, the agent's unregister) deletes it only
// while it still carries one of that pod's addresses, never the entry of
// another pod whose host veth got the index since. No addresses: false.
func (e Endpoint) HoldsAny(addrs []netip.Addr) bool {
	for _, a := range addrs {
		if a.IsValid() && (a == e.IPv4 || a == e.IPv6) {
			return true
		}
	}
	return false
}

func (e Endpoint) toKernel() (datapathEndpoint, error) {
	k := datapathEndpoint{Identity: uint32(e.Identity), CtSlot: e.ConntrackSlot}
	if e.ConntrackSlot >= maxEndpoints {
		return k, fmt.Errorf("endpoint conntrack slot %d out of range (0..%d)", e.ConntrackSlot, maxEndpoints-1)
	}
	if e.IPv4.IsValid() {
		if !e.IPv4.Is4() {
			return k, fmt.Errorf("endpoint IPv4 address %s is not IPv4", e.IPv4)
		}
		k.Flags |= epHasV4
		k.Ipv4 = e.IPv4.As4()
	}
	if e.IPv6.IsValid() {
		if !e.IPv6.Is6() || e.IPv6.Is4In6() {
			return k, fmt.Errorf("endpoint IPv6 address %s is not IPv6", e.IPv6)
		}
		k.Flags |= epHasV6
		k.Ipv6 = e.IPv6.As16()
	}
	return k, nil
}

func endpointFromKernel(k datapathEndpoint) Endpoint {
	e := Endpoint{Identity: identity.ID(k.Identity), ConntrackSlot: k.CtSlot}
	if k.Flags&epHasV4 != 0 {
		e.IPv4 = netip.AddrFrom4(k.Ipv4)
	}
	if k.Flags&epHasV6 != 0 {
		e.IPv6 = netip.AddrFrom16(k.Ipv6)
	}
	return e
}

// Flags of struct endpoint (idcni.h).
const (
	epHasV4 = 1 << 0
	epHasV6 = 1 << 1
)

// addr16 stores a as the datapath does: IPv4 as IPv4-mapped IPv6.
func addr16(a netip.Addr) [16]byte {
	return netip.AddrFrom16(a.As16()).As16()
}

// addrFrom16 undoes addr16.
func addrFrom16(b [16]byte) netip.Addr {
	return netip.AddrFrom16(b).Unmap()
}

func ipcacheKey(p netip.Prefix) datapathIpcacheKey {
	bits := p.Bits()
	if p.Addr().Is4() {
		bits += 96
	}
	return datapathIpcacheKey{Prefixlen: uint32(bits), Addr: addr16(p.Masked().Addr())}
}

func prefixFromKey(k datapathIpcacheKey) netip.Prefix {
	a := addrFrom16(k.Addr)
	bits := int(k.Prefixlen)
	if a.Is4() {
		bits -= 96
	}
	return netip.PrefixFrom(a, bits)
}

func policyKey(k policy.Key) datapathPolicyKey {
	return datapathPolicyKey{Subject: uint32(k.Subject), Peer: uint32(k.Peer), Dir: uint8(k.Direction), Proto: uint8(k.Proto)}
}

func policyKeyFromKernel(k datapathPolicyKey) policy.Key {
	return policy.Key{Subject: identity.ID(k.Subject), Peer: identity.ID(k.Peer), Direction: policy.Direction(k.Dir), Proto: policy.Proto(k.Proto)}
}

func policyValue(e *policy.Entry) (datapathPolicyValue, error) {
	var v datapathPolicyValue
	if len(e.Allow) > len(v.Allow) || len(e.Deny) > len(v.Deny) {
		return v, fmt.Errorf("entry has %d allow and %d deny port ranges; the map holds %d and %d", len(e.Allow), len(e.Deny), len(v.Allow), len(v.Deny))
	}
	v.AllowAll = b2u(e.AllowAll)
	v.DenyAll = b2u(e.DenyAll)
	v.N_allow = uint8(len(e.Allow))
	v.N_deny = uint8(len(e.Deny))
	for i, r := range e.Allow {
		v.Allow[i].Lo, v.Allow[i].Hi = r.Lo, r.Hi
	}
	for i, r := range e.Deny {
		v.Deny[i].Lo, v.Deny[i].Hi = r.Lo, r.Hi
	}
	return v, nil
}

func policyEntryFromKernel(v datapathPolicyValue) *policy.Entry {
	e := &policy.Entry{AllowAll: v.AllowAll != 0, DenyAll: v.DenyAll != 0}
	for i := 0; i < int(v.N_allow) && i < len(v.Allow); i++ {
		e.Allow = append(e.Allow, policy.PortRange{Lo: v.Allow[i].Lo, Hi: v.Allow[i].Hi})
	}
	for i := 0; i < int(v.N_deny) && i < len(v.Deny); i++ {
		e.Deny = append(e.Deny, policy.PortRange{Lo: v.Deny[i].Lo, Hi: v.Deny[i].Hi})
	}
	return e
}

func b2u(b bool) uint8 {
	if b {
		return 1
	}
	return 0
}
