package api

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/idcni/idcni/identity"
)

// Kinds of identity, by the range the number is in (DESIGN.md section 2).
const (
	KindReserved = "reserved"
	KindManual   = "manual"
	KindLabel    = "label"
	KindCIDR     = "cidr"
)

// Identity is what one identity number stands for on this node (GET
// PathIdentities). Only the reserved numbers mean the same on every node;
// label and CIDR numbers are allocated by each node's agent, and manual
// ones are whatever people chose on that node. Labels and CIDR are what
// compares across nodes.
type Identity struct {
	ID   identity.ID `json:"id"`
	Kind string      `json:"kind"`
	// Name is a reserved identity's name (host, world, ...).
	Name string `json:"name,omitempty"`
	// Labels is a label identity's canonical label set: the pod's labels
	// minus churn labels, its namespace, and its namespace's labels.
	Labels map[string]string `json:"labels,omitempty"`
	// CIDR is a CIDR identity's prefix (a NetworkPolicy ipBlock).
	CIDR string `json:"cidr,omitempty"`
	// Pods hold a label identity ("namespace/name"), as the agent
	// recorded them: live with an agent, as of its last run without.
	Pods []string `json:"pods,omitempty"`
	// Addresses are bound to a manual identity (endpointctl).
	Addresses []netip.Addr `json:"addresses,omitempty"`
	// IdleSince is when the last pod of a label identity went; the
	// number keeps its label set for the agent's grace period, then is
	// freed.
	IdleSince *time.Time `json:"idleSince,omitempty"`
}

// IdentityList is the answer of GET PathIdentities.
type IdentityList struct {
	Identities []Identity `json:"identities"`
}

// reservedInUse are the reserved numbers idcni gives meaning to.
var reservedInUse = []identity.ID{identity.Host, identity.World, identity.Unresolved, identity.RemoteNode}

// LabelMap turns a label set into the map the API carries.
func LabelMap(s identity.LabelSet) map[string]string {
	m := make(map[string]string, s.Len())
	for _, l := range s.Labels() {
		m[l.Key] = l.Value
	}
	return m
}

// podUserPrefix starts the allocator user key of a pod (netpol.PodUser,
// which this package cannot import: it would pull in client-go).
const podUserPrefix = "pod/"

// LabelIdentity is the API's view of an allocated label identity.
func LabelIdentity(e identity.Entry) Identity {
	id := Identity{ID: e.ID, Kind: KindLabel, Labels: LabelMap(e.Set)}
	for _, u := range e.Users {
		// Pods are the only users the agent has; another kind of user
		// is shown as its key rather than dropped.
		id.Pods = append(id.Pods, strings.TrimPrefix(u, podUserPrefix))
	}
	if !e.IdleSince.IsZero() {
		t := e.IdleSince
		id.IdleSince = &t
	}
	return id
}

// NodeIdentities assembles a node's identities, sorted by number: the
// reserved ones idcni uses, the manual ones bound to an address or named
// by a rule, the allocated label ones and the CIDR ones.
func NodeIdentities(labels []identity.Entry, manualAddrs map[identity.ID][]netip.Addr, manualRuled []identity.ID, cidrs map[identity.ID]netip.Prefix) []Identity {
	var out []Identity
	for _, id := range reservedInUse {
		out = append(out, Identity{ID: id, Kind: KindReserved, Name: id.String()})
	}
	manual := map[identity.ID]bool{}
	for id := range manualAddrs {
		manual[id] = true
	}
	for _, id := range manualRuled {
		if id.IsManual() {
			manual[id] = true
		}
	}
	for id := range manual {
		addrs := slices.Clone(manualAddrs[id])
		slices.SortFunc(addrs, netip.Addr.Compare)
		out = append(out, Identity{ID: id, Kind: KindManual, Addresses: addrs})
	}
	for _, e := range labels {
		out = append(out, LabelIdentity(e))
	}
	for id, pf := range cidrs {
		out = append(out, Identity{ID: id, Kind: KindCIDR, CIDR: pf.String()})
	}
	slices.SortFunc(out, func(a, b Identity) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// FindIdentity returns id's entry in list, or an error that says why the
// number means nothing here: numbers are node-local, so the likely cause
// is a number read on another node.
func FindIdentity(list []Identity, id identity.ID, cidrsKnown bool) (Identity, error) {
	for _, x := range list {
		if x.ID == id {
			return x, nil
		}
	}
	return Identity{}, UnknownIdentity(id, cidrsKnown)
}

// UnknownIdentity is the error for a number that means nothing on this
// node. cidrsKnown says whether CIDR identities were asked for (only an
// agent numbers them, in memory).
func UnknownIdentity(id identity.ID, cidrsKnown bool) error {
	const local = "identity numbers are node-local: a number seen on another node may stand for another label set here, or for none; ask that node ('policyctl identity get' there)"
	switch {
	case id == identity.Unknown:
		return errors.New("0 is not an identity: in rules and maps it means any identity")
	case id.IsReserved():
		return fmt.Errorf("identity %d is reserved but unused by idcni (the reserved ones are %s)", id, reservedNames())
	case id.IsManual():
		return fmt.Errorf("manual identity %d is not bound to any address (endpointctl list) nor named by any rule (policyctl list) on this node", id)
	case id.IsLabel():
		return fmt.Errorf("label identity %d is not allocated on this node; %s", id, local)
	case !cidrsKnown:
		return fmt.Errorf("identity %d is a CIDR identity: idcni-agent numbers those in memory from NetworkPolicy ipBlocks, and no agent answers to ask", id)
	default:
		return fmt.Errorf("CIDR identity %d is not in use on this node; %s", id, local)
	}
}

func reservedNames() string {
	var s []string
	for _, id := range reservedInUse {
		s = append(s, fmt.Sprintf("%d %s", id, id))
	}
	return strings.Join(s, ", ")
}
