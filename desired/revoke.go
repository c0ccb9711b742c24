package desired

import (
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// Established flows are checked again only when the policy revision moves
// on (DESIGN.md §3). Moving it costs every established flow on the node one
// policy lookup on its next packet, so it moves only when a change can drop
// a packet the maps allowed before: the Revokes* functions below answer
// that for each kind of change, erring towards yes. Adding an allow, a new
// endpoint, a new subject's rules or an address nobody talked to revokes
// nothing.

// EntryRevokes reports whether replacing the policy entry old by new (nil:
// no entry) can drop a packet old allowed: an allowed port no longer
// allowed, or a denied port that was not denied.
func EntryRevokes(old, new *policy.Entry) bool {
	if old == nil {
		old = &policy.Entry{}
	}
	if new == nil {
		new = &policy.Entry{}
	}
	if new.DenyAll && !old.DenyAll {
		return true
	}
	if !old.DenyAll && !rangesCover(old.Deny, new.Deny) {
		return true
	}
	if new.AllowAll {
		return false
	}
	if old.AllowAll {
		return true
	}
	return !rangesCover(new.Allow, old.Allow)
}

// rangesCover reports whether every port of inner is in outer. Both are
// sorted, disjoint and not adjacent (policy.Compile merges them), so a
// range of inner is covered only by a single range of outer.
func rangesCover(outer, inner []policy.PortRange) bool {
	i := 0
	for _, r := range inner {
		for i < len(outer) && outer[i].Hi < r.Lo {
			i++
		}
		if i == len(outer) || outer[i].Lo > r.Lo || outer[i].Hi < r.Hi {
			return false
		}
	}
	return true
}

// FlagsRevoke reports whether changing an identity's flags from old to new
// (each with its range's default when absent) can drop a packet: only a
// direction that becomes isolated can. The other flags are hints that let
// the datapath skip lookups of entries that do not exist; they follow the
// entries, whose own changes EntryRevokes judges.
func FlagsRevoke(old, new policy.IdentityFlags) bool {
	for _, dir := range []policy.Direction{policy.Ingress, policy.Egress} {
		if new.Isolated(dir) && !old.Isolated(dir) {
			return true
		}
	}
	return false
}

// Entries looks up one policy map entry (nil when there is none).
type Entries func(policy.Key) *policy.Entry

// PeerChangeRevokes reports whether an address whose identity moves from
// old to new (an ipcache entry changed, added over a shorter prefix, or
// removed) can lose a packet that policy allowed: some subject has an entry
// for old that the same entry for new does not cover, or an entry for new
// denies what the one for old did not. byPeer lists the keys whose peer is
// a given identity. Rules with any peer apply to both and change nothing.
func PeerChangeRevokes(entries Entries, byPeer func(identity.ID) []policy.Key, old, new identity.ID) bool {
	if old == new {
		return false
	}
	for _, k := range byPeer(old) {
		nk := k
		nk.Peer = new
		if EntryRevokes(entries(k), entries(nk)) {
			return true
		}
	}
	// Keys of new with no counterpart for old: their deny ranges are new
	// to the address.
	for _, k := range byPeer(new) {
		ok := k
		ok.Peer = old
		if entries(ok) == nil && EntryRevokes(nil, entries(k)) {
			return true
		}
	}
	return false
}
