// Package desired decides what idcni's maps must hold. It is pure: given
// what is known about an address, an endpoint or a subject identity, it
// answers with the map entry that must be there. The agent asks it for the
// keys a change touched; the CLI without an agent (manual.Apply), the
// plugin's DEL and GC ask it with what they know. Each of them writes, none
// of them decides on its own, so the four paths cannot drift apart.
//
// It also says which changes can revoke something an established flow
// relies on (Revokes*): only those need the policy revision to move on,
// which makes every established flow on the node be checked again.
package desired

import (
	"net/netip"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// HostPrefix is the ipcache key of one address.
func HostPrefix(a netip.Addr) netip.Prefix { return netip.PrefixFrom(a, a.BitLen()) }

// EndpointIdentity is the identity a local endpoint is enforced under. A
// manual binding of any of its addresses wins (the seed binds addresses,
// not pods, and `endpointctl add` keeps working on a pod the agent also
// resolves); otherwise its own identity, which is its pod's label identity,
// or identity.Unresolved while none is known.
func EndpointIdentity(own identity.ID, addrs []netip.Addr, bound func(netip.Addr) (identity.ID, bool)) identity.ID {
	for _, a := range addrs {
		if id, ok := bound(a); ok {
			return id
		}
	}
	if own == identity.Unknown {
		return identity.Unresolved
	}
	return own
}

// Claims are what wants an ipcache prefix, from strongest to weakest.
// Unknown (0) means no claim.
type Claims struct {
	// Binding is a manual binding of the address (`endpointctl add`).
	Binding identity.ID
	// Local is the identity of the local endpoint holding the address
	// (EndpointIdentity), so a local pod's peers see it as its own
	// endpoint entry says, even before the API server reports its IP.
	Local identity.ID
	// Pod is the identity of a pod of the cluster the API server reports
	// at the address.
	Pod identity.ID
	// Node is identity.Host for the local node's addresses,
	// identity.RemoteNode for other nodes'.
	Node identity.ID
	// CIDR is the identity of an ipBlock prefix.
	CIDR identity.ID
}

// Identity returns what the ipcache must map the prefix to, and false when
// it must hold no entry (the address then resolves through a shorter
// prefix, or to world).
func (c Claims) Identity() (identity.ID, bool) {
	for _, id := range [...]identity.ID{c.Binding, c.Local, c.Pod, c.Node, c.CIDR} {
		if id != identity.Unknown {
			return id, true
		}
	}
	return identity.Unknown, false
}

// IsSubject reports whether id's rules belong in the maps of a node whose
// local endpoints are enforced under the identities counted in local: a
// node checks egress and ingress only for its own endpoints, so rules of
// identities that have none there are never read. Manual identities always
// keep their rules: the seed writes them before any pod has the identity.
func IsSubject(id identity.ID, local func(identity.ID) bool) bool {
	return id.IsManual() || local(id)
}

// Subject compiles the map entries and identity flags of one subject from
// its rules (every rule's Subject must be id) and its isolation.
func Subject(id identity.ID, rules []policy.Rule, iso policy.Isolation) (*policy.MapState, error) {
	set := &policy.Set{Rules: rules}
	if iso != set.IsolationOf(id) {
		set.Isolation = map[identity.ID]policy.Isolation{id: iso}
	}
	return set.Compile()
}
