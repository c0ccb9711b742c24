package agent

import (
	"net/netip"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// datapathMaps is everything the agent's writer loop does to the maps:
// the writes of a flush and the reads of its start and its audit.
// *bpf.Datapath implements it; unit tests run the agent against a fake.
type datapathMaps interface {
	PutIPCache(netip.Prefix, identity.ID) error
	DeleteIPCache(netip.Prefix) error
	IPCacheCapacity() int
	IPCache() (map[netip.Prefix]identity.ID, error)

	// PutEndpoint keeps the conntrack slot the plugin gave the endpoint.
	PutEndpoint(ifindex int, ep bpf.Endpoint) error
	DeleteEndpoint(ifindex int) error
	Endpoint(ifindex int) (bpf.Endpoint, bool, error)
	Endpoints() (map[int]bpf.Endpoint, error)

	WritePolicy(have int, upsert map[policy.Key]*policy.Entry, del []policy.Key, flags map[identity.ID]policy.IdentityFlags, flagDel []identity.ID) error
	PolicyCapacity() int
	Policy() (*policy.MapState, error)

	BumpRevision() error
}

var _ datapathMaps = (*bpf.Datapath)(nil)
