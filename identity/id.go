// Package identity holds security identities: the numeric names the datapath
// decides by, the canonical label sets they stand for, and the allocator that
// keeps the mapping between the two stable across restarts.
package identity

import (
	"fmt"
	"strconv"
)

// ID is a security identity. Its value space is split into ranges (see
// DESIGN.md section 2); the range tells who owns a number.
type ID uint32

// Reserved identities. 0 doubles as "any identity" in policy rules.
const (
	Unknown    ID = 0
	Host       ID = 1
	World      ID = 2
	Unresolved ID = 5 // an endpoint the plugin created before anyone named it
	// RemoteNode is every address of the cluster's other nodes. It is not
	// Host, which is the local node alone: another node's packets are
	// policed like any address outside the cluster.
	RemoteNode ID = 6
)

// Range bounds. Bounds are inclusive.
const (
	MinReserved ID = 1
	MaxReserved ID = 255
	MinManual   ID = 256
	MaxManual   ID = 65535
	MinLabel    ID = 65536
	MaxLabel    ID = 16777215
	MinCIDR     ID = 16777216
)

// Any is the wildcard peer in a rule.
const Any = Unknown

// IsReserved reports whether id is one of the numbers fixed by idcni itself.
func (id ID) IsReserved() bool { return id >= MinReserved && id <= MaxReserved }

// IsManual reports whether id is in the range people pick with endpointctl.
func (id ID) IsManual() bool { return id >= MinManual && id <= MaxManual }

// IsLabel reports whether id is in the range the agent allocates from labels.
func (id ID) IsLabel() bool { return id >= MinLabel && id <= MaxLabel }

// IsCIDR reports whether id names a node-local CIDR (NetworkPolicy ipBlock).
func (id ID) IsCIDR() bool { return id >= MinCIDR }

// IsolatedByDefault reports whether an identity with no explicit isolation
// entry is isolated in both directions. Manual identities keep the seed's
// behaviour ("by default, all traffic is denied"), and an endpoint that no one
// has named yet must not talk at all.
func (id ID) IsolatedByDefault() bool { return id.IsManual() || id == Unresolved }

func (id ID) String() string {
	switch id {
	case Unknown:
		return "any"
	case Host:
		return "host"
	case World:
		return "world"
	case Unresolved:
		return "unresolved"
	case RemoteNode:
		return "remote-node"
	}
	return fmt.Sprintf("%d", uint32(id))
}

// IsRulePeer reports whether a manual rule may name id: a manual identity,
// or a reserved one that stands for addresses no pod has (host, world,
// remote-node), so that people can allow or deny those sources and
// destinations for their manual identities.
func (id ID) IsRulePeer() bool {
	return id.IsManual() || id == Host || id == World || id == RemoteNode
}

// ValidateManual returns a clear error unless id may be chosen by a person.
func ValidateManual(id uint64) error {
	if id < uint64(MinManual) || id > uint64(MaxManual) {
		return fmt.Errorf("identity %d is outside the manual range %d-%d (0-255 are reserved, %d and above are allocated by the agent from labels)",
			id, MinManual, MaxManual, MinLabel)
	}
	return nil
}

// ValidateRulePeer returns a clear error unless a manual rule may name id
// (see IsRulePeer).
func ValidateRulePeer(id uint64) error {
	if id > uint64(MaxManual) || !ID(id).IsRulePeer() {
		return fmt.Errorf("identity %d cannot be named in a rule: want a manual identity %d-%d, or %d (host), %d (world) or %d (remote-node)",
			id, MinManual, MaxManual, Host, World, RemoteNode)
	}
	return nil
}

// Parse reads an identity as people write it: a decimal number, or the
// name String gives a reserved identity ("host", "world", "remote-node",
// "unresolved"), so that what a listing prints can be typed back.
func Parse(s string) (ID, error) {
	for _, id := range []ID{Host, World, Unresolved, RemoteNode} {
		if s == id.String() {
			return id, nil
		}
	}
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("bad identity %q: want a number or one of host, world, remote-node, unresolved", s)
	}
	return ID(n), nil
}
