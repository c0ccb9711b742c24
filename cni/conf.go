package cni

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/bpf"
)

// Defaults for the fields a network configuration may leave out.
const (
	DefaultBPFRoot = "/sys/fs/bpf/idcni"
	DefaultDataDir = "/var/lib/cni/idcni"
	// DefaultMTU is what the kernel gives a new veth; pods on a node with
	// jumbo frames or an overlay set "mtu" explicitly.
	DefaultMTU = 1500
)

// MTU bounds: 68 is the smallest MTU IPv4 allows (RFC 791), 65535 the largest
// a veth takes. IPv6 pods need at least 1280, checked once IPAM has answered.
const (
	minMTU     = 68
	minMTUIPv6 = 1280
	maxMTU     = 65535
	// A pod's table below this forgets flows a busy pod still uses; above
	// it, 110 pods would pin gigabytes of kernel memory.
	minConntrackPerPod = 256
	maxConntrackPerPod = 1 << 20
)

// Versions are the CNI spec versions the plugin speaks.
var Versions = version.PluginSupports("0.3.1", "0.4.0", "1.0.0", "1.1.0")

// NetConf is the plugin's network configuration. The embedded PluginConf
// carries name, type, cniVersion, ipam, prevResult and, for GC,
// cni.dev/valid-attachments.
type NetConf struct {
	types.PluginConf

	// BPFRoot is the bpffs directory the datapath is pinned under.
	BPFRoot string `json:"bpfRoot,omitempty"`
	// DataDir holds one record per attachment, so DEL and GC know what to
	// remove when the container's netns is already gone.
	DataDir string `json:"dataDir,omitempty"`
	// AgentSocket is where idcni-agent listens. When an agent answers there,
	// ADD waits for it to resolve the pod's identity.
	AgentSocket string `json:"agentSocket,omitempty"`
	// AgentRequired makes ADD (and STATUS) fail while no agent answers,
	// instead of starting the pod with the unresolved identity.
	AgentRequired bool `json:"agentRequired,omitempty"`
	// MTU of both ends of the veth pair; 0 means DefaultMTU.
	MTU int `json:"mtu,omitempty"`
	// LocalDelivery says how packets between two pods of this node travel:
	// "direct" (the default) has the sender's program check the receiver's
	// ingress too and hand the packet over, past the node's routing and
	// netfilter; "routed" sends them through the node's routing, where
	// iptables FORWARD rules and the receiver's own program see them.
	LocalDelivery string `json:"localDelivery,omitempty"`
	// ConntrackPerPod is the size of each of a pod's two conntrack tables
	// (the flows it opens, the flows its ingress admits): how many flows
	// of each kind a pod keeps before its oldest idle one is forgotten.
	// Tables are per pod so that one pod's flood of new flows evicts only
	// its own. 0 means bpf.DefaultConntrackPerEndpoint.
	ConntrackPerPod uint32 `json:"conntrackPerPod,omitempty"`
}

// Values of NetConf.LocalDelivery.
const (
	LocalDirect = "direct"
	LocalRouted = "routed"
)

// LoadNetConf parses and validates stdin of any command, and fills in
// defaults. Its errors are *types.Error with the spec's codes, so skel prints
// them as they are.
func LoadNetConf(stdin []byte) (*NetConf, error) {
	conf := &NetConf{}
	if err := json.Unmarshal(stdin, conf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "idcni: cannot parse the network configuration", err.Error())
	}
	if err := conf.validate(); err != nil {
		return nil, err
	}
	if conf.BPFRoot == "" {
		conf.BPFRoot = DefaultBPFRoot
	}
	if conf.DataDir == "" {
		conf.DataDir = DefaultDataDir
	}
	if conf.AgentSocket == "" {
		conf.AgentSocket = api.DefaultSocket
	}
	if conf.LocalDelivery == "" {
		conf.LocalDelivery = LocalDirect
	}
	if conf.MTU == 0 {
		conf.MTU = DefaultMTU
	}
	if conf.ConntrackPerPod == 0 {
		conf.ConntrackPerPod = bpf.DefaultConntrackPerEndpoint
	}
	return conf, nil
}

func (c *NetConf) validate() *types.Error {
	invalid := func(format string, a ...any) *types.Error {
		return types.NewError(types.ErrInvalidNetworkConfig, "idcni: "+fmt.Sprintf(format, a...), "")
	}
	if c.Name == "" {
		return invalid(`the network configuration has no "name"`)
	}
	if c.IPAM.Type == "" {
		return invalid(`"ipam" has no "type": idcni needs an IPAM plugin to assign pod addresses, e.g. "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.13.0.0/24"}]]}`)
	}
	for _, p := range []struct{ field, value string }{
		{"bpfRoot", c.BPFRoot},
		{"dataDir", c.DataDir},
		{"agentSocket", c.AgentSocket},
	} {
		if p.value == "" {
			continue
		}
		if !filepath.IsAbs(p.value) {
			return invalid("%q must be an absolute path, got %q", p.field, p.value)
		}
		// A cleaned path keeps two spellings of one directory from
		// looking like two datapaths or two record stores.
		if filepath.Clean(p.value) != p.value {
			return invalid("%q must be a clean path (no trailing slash, '.', '..' or '//'): got %q, use %q", p.field, p.value, filepath.Clean(p.value))
		}
	}
	if c.BPFRoot == "/sys/fs/bpf" {
		return invalid(`"bpfRoot" must be a directory of its own under the bpffs mount, e.g. %q, not the mount itself`, DefaultBPFRoot)
	}
	if c.LocalDelivery != "" && c.LocalDelivery != LocalDirect && c.LocalDelivery != LocalRouted {
		return invalid(`"localDelivery" must be %q or %q, got %q`, LocalDirect, LocalRouted, c.LocalDelivery)
	}
	if c.ConntrackPerPod != 0 && (c.ConntrackPerPod < minConntrackPerPod || c.ConntrackPerPod > maxConntrackPerPod) {
		return invalid(`"conntrackPerPod" %d is out of range: use %d-%d flows, or leave it out for %d`, c.ConntrackPerPod, minConntrackPerPod, maxConntrackPerPod, bpf.DefaultConntrackPerEndpoint)
	}
	if c.MTU != 0 && (c.MTU < minMTU || c.MTU > maxMTU) {
		return invalid(`"mtu" %d is out of range: use %d-%d (at least %d for IPv6 pods), or leave it out for %d`, c.MTU, minMTU, maxMTU, minMTUIPv6, DefaultMTU)
	}
	return nil
}

// PodArgs are the Kubernetes keys a runtime passes in CNI_ARGS.
type PodArgs struct {
	Namespace  string
	Name       string
	InfraID    string
	UID        string
	RawCNIArgs string
}

// ParsePodArgs reads CNI_ARGS ("K1=V1;K2=V2"). Unknown keys are ignored
// whether or not the runtime set IgnoreUnknown: runtimes pass keys meant for
// other plugins in a chain, and failing a pod over them helps no one.
func ParsePodArgs(cniArgs string) (PodArgs, error) {
	out := PodArgs{RawCNIArgs: cniArgs}
	if cniArgs == "" {
		return out, nil
	}
	for _, pair := range strings.Split(cniArgs, ";") {
		if pair == "" {
			continue
		}
		k, v, ok := strings.Cut(pair, "=")
		if !ok || k == "" {
			return PodArgs{}, types.NewError(types.ErrInvalidEnvironmentVariables,
				fmt.Sprintf("idcni: CNI_ARGS entry %q is not KEY=VALUE", pair), "CNI_ARGS="+cniArgs)
		}
		switch k {
		case "K8S_POD_NAMESPACE":
			out.Namespace = v
		case "K8S_POD_NAME":
			out.Name = v
		case "K8S_POD_INFRA_CONTAINER_ID":
			out.InfraID = v
		case "K8S_POD_UID":
			out.UID = v
		}
	}
	// The agent resolves a pod by namespace/name; one without the other
	// names nothing and would only fail later with a vaguer message.
	if (out.Namespace == "") != (out.Name == "") {
		return PodArgs{}, types.NewError(types.ErrInvalidEnvironmentVariables,
			"idcni: CNI_ARGS must carry both K8S_POD_NAMESPACE and K8S_POD_NAME, or neither", "CNI_ARGS="+cniArgs)
	}
	return out, nil
}

// HostVethPrefix starts the name of every host-side veth idcni creates.
const HostVethPrefix = "idc"

// HostVethName is the host-side veth name of an attachment. It is derived
// from the attachment alone so that DEL finds the link even without a
// record, and a retried ADD collides with its own leftovers instead of
// leaking a second link. 3+11 characters stay under IFNAMSIZ (15).
func HostVethName(containerID, ifName string) string {
	sum := sha256.Sum256([]byte(containerID + ifName))
	return HostVethPrefix + hex.EncodeToString(sum[:])[:11]
}

// linkAlias tags a host veth with the attachment that owns it, so GC can
// tell this network's links from another network's, and from links that are
// not idcni's at all. None of the parts may contain '/', which the CNI
// name checks guarantee.
func linkAlias(network, containerID, ifName string) string {
	return "idcni/" + network + "/" + containerID + "/" + ifName
}

// parseLinkAlias is the inverse of linkAlias for the given network.
func parseLinkAlias(network, alias string) (containerID, ifName string, ok bool) {
	rest, ok := strings.CutPrefix(alias, "idcni/"+network+"/")
	if !ok {
		return "", "", false
	}
	containerID, ifName, ok = strings.Cut(rest, "/")
	if !ok || containerID == "" || ifName == "" || strings.Contains(ifName, "/") {
		return "", "", false
	}
	return containerID, ifName, true
}
