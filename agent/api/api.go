// Package api is the agent's local API: JSON over HTTP on a root-only unix
// socket. The plugin registers endpoints through it, and endpointctl and
// policyctl send manual overrides through it when an agent runs. Both sides
// share these types so the protocol has one definition.
package api

import (
	"net/netip"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// DefaultSocket is where the agent listens unless told otherwise
// (IDCNI_AGENT_SOCKET or a flag).
const DefaultSocket = "/run/idcni/agent.sock"

// Paths of the API. Version the prefix, not the types: a new field is
// backwards compatible, a new meaning gets a new path.
const (
	PathHealth          = "/v1/health"
	PathEndpoints       = "/v1/endpoints/"          // + container ID; PUT registers, DELETE removes
	PathManualEndpoints = "/v1/manual/endpoints"    // GET lists, PUT adds, DELETE ?ip= removes
	PathManualRules     = "/v1/manual/rules"        // GET lists, POST adds
	PathManualRulesDel  = "/v1/manual/rules/delete" // POST removes matching rules
	PathDebug           = "/v1/debug"               // PUT {"on":bool}
	PathEvents          = "/v1/events"              // GET streams NDJSON verdict events
	PathIdentities      = "/v1/identities"          // GET lists; GET PathIdentities/{id} gets one, 404 when unknown
)

// EndpointRequest is what the plugin knows about a pod at ADD time.
type EndpointRequest struct {
	ContainerID  string       `json:"containerID"`
	Netns        string       `json:"netns"`
	IfName       string       `json:"ifName"`
	HostIfName   string       `json:"hostIfName"`
	HostIfIndex  int          `json:"hostIfIndex"`
	Addresses    []netip.Addr `json:"addresses"`
	PodNamespace string       `json:"podNamespace,omitempty"`
	PodName      string       `json:"podName,omitempty"`
	// PodUID (K8S_POD_UID) lets the agent publish the addresses in the
	// pod's status, for that pod only; older plugins leave it out.
	PodUID string `json:"podUID,omitempty"`
}

// EndpointResponse is sent once the endpoint's identity, ipcache entry and
// policy are in the maps.
type EndpointResponse struct {
	Identity identity.ID `json:"identity"`
}

// ManualEndpoint binds an address to a manual identity.
type ManualEndpoint struct {
	IP       netip.Addr  `json:"ip"`
	Identity identity.ID `json:"identity"`
}

// Debug switches the kernel trace lines.
type Debug struct {
	On bool `json:"on"`
}

// Error is the body of every non-2xx answer.
type Error struct {
	Message string `json:"message"`
}

// RuleList is the answer of GET PathManualRules.
type RuleList struct {
	Rules []policy.ManualRule `json:"rules"`
}

// RuleRequest carries one policyctl allow/deny/delete.
type RuleRequest struct {
	Rule policy.ManualRule `json:"rule"`
}

// Event is a line of the event stream (PathEvents): a datapath verdict
// with the pods behind its addresses, or, when Gap is set, the news that
// events are missing before the next one.
type Event struct {
	bpf.Event
	SrcPod string `json:"srcPod,omitempty"`
	DstPod string `json:"dstPod,omitempty"`
	// SrcLabels and DstLabels are the label sets of label identities,
	// SrcCIDR and DstCIDR the prefixes of CIDR identities, as the agent
	// knew them when it sent the event: identity numbers are node-local,
	// these are what compares across nodes.
	SrcLabels map[string]string `json:"srcLabels,omitempty"`
	DstLabels map[string]string `json:"dstLabels,omitempty"`
	SrcCIDR   string            `json:"srcCIDR,omitempty"`
	DstCIDR   string            `json:"dstCIDR,omitempty"`
	Gap       *Gap              `json:"gap,omitempty"`
}

// Gap says events are missing from a stream: the datapath's ring was full
// (Lost, by reason), or this reader fell behind and the agent dropped
// events for it (Missed). Events the datapath's per-endpoint rate limit
// held back are told by the endpoint's next event (Suppressed) instead.
type Gap struct {
	Lost   map[string]uint64 `json:"lost,omitempty"`
	Missed uint64            `json:"missed,omitempty"`
}

// LostGap is the gap marker for events the datapath lost to a full ring
// (bpf.LossWatch), nil when none were.
func LostGap(lost map[bpf.Reason]uint64) *Gap {
	if len(lost) == 0 {
		return nil
	}
	g := &Gap{Lost: make(map[string]uint64, len(lost))}
	for r, n := range lost {
		g.Lost[r.String()] = n
	}
	return g
}
