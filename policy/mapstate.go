package policy

import (
	"fmt"
	"slices"

	"github.com/idcni/idcni/identity"
)

// Limits of one policy map entry; bpf/kernel/idcni.h has the same numbers
// and bpf.TestDefinesMatchGo keeps them equal.
const (
	MaxAllowRanges = 16
	MaxDenyRanges  = 8
)

// Key addresses one policy map entry: every rule of one subject, direction,
// peer (or any) and protocol (or any) shares it, so a packet costs four
// lookups however many rules exist.
type Key struct {
	Subject   identity.ID
	Peer      identity.ID
	Direction Direction
	Proto     Proto
}

// Entry is the value of a policy map entry. Ranges are sorted, disjoint and
// not adjacent.
type Entry struct {
	AllowAll bool
	DenyAll  bool
	Allow    []PortRange
	Deny     []PortRange
}

// Equal reports whether e and o would be written as the same map value.
func (e *Entry) Equal(o *Entry) bool {
	return e.AllowAll == o.AllowAll && e.DenyAll == o.DenyAll &&
		slices.Equal(e.Allow, o.Allow) && slices.Equal(e.Deny, o.Deny)
}

// IdentityFlags are the per-identity switches the datapath reads first.
type IdentityFlags uint8

const (
	FlagIsolatedIngress IdentityFlags = 1 << 0
	FlagIsolatedEgress  IdentityFlags = 1 << 1
	// FlagRulesIngress/Egress say the identity has rules in that direction,
	// so the datapath may skip the policy lookups of an open identity with
	// no deny rules.
	FlagRulesIngress IdentityFlags = 1 << 2
	FlagRulesEgress  IdentityFlags = 1 << 3
	// FlagAnyPeer* and FlagAnyProto* say rules with a wildcard peer or
	// protocol exist in that direction; without them the datapath skips the
	// lookups of wildcard entries.
	FlagAnyPeerIngress  IdentityFlags = 1 << 4
	FlagAnyPeerEgress   IdentityFlags = 1 << 5
	FlagAnyProtoIngress IdentityFlags = 1 << 6
	FlagAnyProtoEgress  IdentityFlags = 1 << 7
)

// dirFlag picks the ingress or egress variant of a flag pair.
func dirFlag(dir Direction, ingress, egress IdentityFlags) IdentityFlags {
	if dir == Ingress {
		return ingress
	}
	return egress
}

// Isolated reports whether dir is isolated.
func (f IdentityFlags) Isolated(dir Direction) bool {
	if dir == Ingress {
		return f&FlagIsolatedIngress != 0
	}
	return f&FlagIsolatedEgress != 0
}

// HasRules reports whether rules exist for dir.
func (f IdentityFlags) HasRules(dir Direction) bool {
	return f&dirFlag(dir, FlagRulesIngress, FlagRulesEgress) != 0
}

// HasAnyPeer reports whether rules with a wildcard peer exist for dir.
func (f IdentityFlags) HasAnyPeer(dir Direction) bool {
	return f&dirFlag(dir, FlagAnyPeerIngress, FlagAnyPeerEgress) != 0
}

// HasAnyProto reports whether rules with a wildcard protocol exist for dir.
func (f IdentityFlags) HasAnyProto(dir Direction) bool {
	return f&dirFlag(dir, FlagAnyProtoIngress, FlagAnyProtoEgress) != 0
}

// DefaultFlags are what the datapath assumes for an identity with no entry:
// its range's isolation, and rules possibly present.
func DefaultFlags(id identity.ID) IdentityFlags {
	f := FlagRulesIngress | FlagRulesEgress | FlagAnyPeerIngress | FlagAnyPeerEgress | FlagAnyProtoIngress | FlagAnyProtoEgress
	if id.IsolatedByDefault() {
		f |= FlagIsolatedIngress | FlagIsolatedEgress
	}
	return f
}

// MapState is a Set compiled to the contents of the datapath's policy and
// identity maps.
type MapState struct {
	Entries    map[Key]*Entry
	Identities map[identity.ID]IdentityFlags
}

// Compile turns s into map contents. It fails, writing nothing, when an
// entry would need more port ranges than a map value holds.
func (s *Set) Compile() (*MapState, error) {
	ms := &MapState{Entries: map[Key]*Entry{}, Identities: map[identity.ID]IdentityFlags{}}
	flags := func(id identity.ID) IdentityFlags {
		if f, ok := ms.Identities[id]; ok {
			return f
		}
		iso := s.IsolationOf(id)
		var f IdentityFlags
		if iso.Ingress {
			f |= FlagIsolatedIngress
		}
		if iso.Egress {
			f |= FlagIsolatedEgress
		}
		return f
	}
	for id := range s.Isolation {
		ms.Identities[id] = flags(id)
	}
	for _, r := range s.Rules {
		if err := r.Validate(); err != nil {
			return nil, fmt.Errorf("rule %s: %w", r, err)
		}
		f := flags(r.Subject) | dirFlag(r.Direction, FlagRulesIngress, FlagRulesEgress)
		if r.Peer == identity.Any {
			f |= dirFlag(r.Direction, FlagAnyPeerIngress, FlagAnyPeerEgress)
		}
		if r.Proto == ProtoAny {
			f |= dirFlag(r.Direction, FlagAnyProtoIngress, FlagAnyProtoEgress)
		}
		ms.Identities[r.Subject] = f

		k := Key{Subject: r.Subject, Peer: r.Peer, Direction: r.Direction, Proto: r.Proto}
		e := ms.Entries[k]
		if e == nil {
			e = &Entry{}
			ms.Entries[k] = e
		}
		switch {
		case r.Ports.IsAny() && r.Action == Allow:
			e.AllowAll = true
		case r.Ports.IsAny():
			e.DenyAll = true
		case r.Action == Allow:
			e.Allow = append(e.Allow, r.Ports)
		default:
			e.Deny = append(e.Deny, r.Ports)
		}
	}
	for k, e := range ms.Entries {
		e.Allow = mergeRanges(e.Allow)
		e.Deny = mergeRanges(e.Deny)
		if e.AllowAll {
			e.Allow = nil
		}
		if e.DenyAll {
			e.Deny = nil
		}
		if len(e.Allow) > MaxAllowRanges || len(e.Deny) > MaxDenyRanges {
			return nil, fmt.Errorf("identity %s %s peer %s proto %s needs %d allow and %d deny port ranges; a map entry holds %d and %d",
				k.Subject, k.Direction, k.Peer, k.Proto, len(e.Allow), len(e.Deny), MaxAllowRanges, MaxDenyRanges)
		}
	}
	return ms, nil
}

// mergeRanges sorts rs and joins overlapping and adjacent ranges.
func mergeRanges(rs []PortRange) []PortRange {
	if len(rs) < 2 {
		return rs
	}
	slices.SortFunc(rs, func(a, b PortRange) int { return int(a.Lo) - int(b.Lo) })
	out := rs[:1]
	for _, r := range rs[1:] {
		last := &out[len(out)-1]
		if uint32(r.Lo) <= uint32(last.Hi)+1 {
			last.Hi = max(last.Hi, r.Hi)
			continue
		}
		out = append(out, r)
	}
	return out
}

// FlagsOf returns the identity flags the datapath would read for id.
func (m *MapState) FlagsOf(id identity.ID) IdentityFlags {
	if f, ok := m.Identities[id]; ok {
		return f
	}
	return DefaultFlags(id)
}

// Decide mirrors the datapath's lookup sequence over the compiled entries. It
// must agree with Set.Decide on allowed/denied; tests hold it to that.
func (m *MapState) Decide(subject identity.ID, dir Direction, peer identity.ID, proto Proto, dport uint16) (allowed bool, reason Reason) {
	f := m.FlagsOf(subject)
	if !f.HasRules(dir) {
		if f.Isolated(dir) {
			return false, ReasonNoRule
		}
		return true, ReasonNotIsolated
	}
	var allow, deny bool
	for i, k := range []Key{
		{subject, peer, dir, proto},
		{subject, peer, dir, ProtoAny},
		{subject, identity.Any, dir, proto},
		{subject, identity.Any, dir, ProtoAny},
	} {
		if (i >= 2 && !f.HasAnyPeer(dir)) || (i%2 == 1 && !f.HasAnyProto(dir)) {
			continue
		}
		e := m.Entries[k]
		if e == nil {
			continue
		}
		a, d := e.match(proto, dport)
		allow, deny = allow || a, deny || d
	}
	switch {
	case deny:
		return false, ReasonDenyRule
	case !f.Isolated(dir):
		return true, ReasonNotIsolated
	case allow:
		return true, ReasonAllowRule
	}
	return false, ReasonNoRule
}

func (e *Entry) match(proto Proto, dport uint16) (allow, deny bool) {
	allow, deny = e.AllowAll, e.DenyAll
	if !proto.HasPorts() {
		return
	}
	for _, r := range e.Allow {
		allow = allow || r.Contains(dport)
	}
	for _, r := range e.Deny {
		deny = deny || r.Contains(dport)
	}
	return
}

// Diff returns the entries to write and to delete to turn old into new. Write
// the upserts before the deletes so a still-valid allow is never missing.
func Diff(old, new *MapState) (upsert map[Key]*Entry, del []Key) {
	upsert = map[Key]*Entry{}
	for k, e := range new.Entries {
		if o, ok := old.Entries[k]; !ok || !o.Equal(e) {
			upsert[k] = e
		}
	}
	for k := range old.Entries {
		if _, ok := new.Entries[k]; !ok {
			del = append(del, k)
		}
	}
	return upsert, del
}
