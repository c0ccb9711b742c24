package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/cni"
)

// Hooks that keep the endpoint registry true to the host's links (issue
// 11, defects 3 and 4). The writer loop calls them:
//
//   - auditEndpoints, before the first flush and on every audit;
//   - claimEndpoint, for a registration before the entry is stored.

// auditEndpoints verifies every registry entry against the host's links,
// forgets those whose host veth is gone or now another's (and their
// endpoint entry, while it still carries their addresses), then rebuilds
// the entries of live host veths of the network the registry is missing,
// from the plugin's records, the endpoints map and the informer cache. The
// next flush writes them all under the identities the agent resolves now,
// so after a lost state file every running pod's endpoint entry matches
// its ipcache identity again. Call it with the caches synced, before the
// pods are compiled (withLocalAddrs reads the registry), and flush after.
func (a *Agent) auditEndpoints() error {
	if a.links == nil {
		return nil
	}
	network, dataDir := a.pluginNetwork()
	var errs []error
	// Any network's alias binds an entry to its container: the network
	// only says where the records are and which veths to rebuild.
	pruned, err := a.endpoints.verify(a.links, "")
	if err != nil {
		errs = append(errs, fmt.Errorf("verify endpoint registry: %w", err))
	}
	for _, ep := range pruned {
		a.log.Info("endpoint forgotten: its host veth is gone or belongs to another container",
			"pod", ep.PodNamespace+"/"+ep.PodName, "container", short(ep.ContainerID),
			"hostIfName", ep.HostIfName, "ifindex", ep.HostIfIndex)
		if err := a.dropEndpointEntry(ep); err != nil {
			errs = append(errs, err)
		}
	}
	links, err := a.links.List()
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	eps, err := a.maps.Endpoints()
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	podAt, err := a.localPodAt()
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	records := func() ([]*cni.Record, error) { return cni.ReadRecords(dataDir, network) }
	if network == "" {
		records = func() ([]*cni.Record, error) {
			return nil, errors.New("the network's name is unknown (no CNI config template)")
		}
	}
	added, skipped, err := a.endpoints.rebuild(links, network, eps, records, podAt)
	for _, ep := range added {
		a.log.Info("endpoint rebuilt from the host veth and the plugin's records",
			"pod", ep.PodNamespace+"/"+ep.PodName, "container", short(ep.ContainerID),
			"hostIfName", ep.HostIfName, "ifindex", ep.HostIfIndex, "addresses", ep.Addresses)
	}
	for _, s := range skipped {
		a.log.Warn("live host veth not in the endpoint registry and not attributable to a pod; it keeps the endpoint entry the plugin wrote", "veth", s)
	}
	if err != nil {
		errs = append(errs, fmt.Errorf("rebuild endpoint registry: %w", err))
	}
	return errors.Join(errs...)
}

// claimEndpoint checks a registration against the host's links before it
// is stored (see endpointRegistry.claim): an error wrapping
// errLinkNotOwned is the client's (409), others the agent's. Entries it
// displaces lose their endpoint entry only while it still carries their
// addresses: the plugin's ADD just wrote the new pod's.
func (a *Agent) claimEndpoint(req api.EndpointRequest) error {
	if a.links == nil {
		return nil
	}
	// Any network: a conflist the agent did not write still registers
	// with it, and the container ID is what binds the veth.
	displaced, err := a.endpoints.claim(a.links, req, "")
	for _, ep := range displaced {
		a.log.Info("endpoint forgotten: its ifindex now holds another container's host veth",
			"pod", ep.PodNamespace+"/"+ep.PodName, "container", short(ep.ContainerID),
			"ifindex", ep.HostIfIndex, "by", short(req.ContainerID))
		if derr := a.dropEndpointEntry(ep); derr != nil {
			err = errors.Join(err, derr)
		}
	}
	return err
}

// dropEndpointEntry deletes the endpoint entry at ep's ifindex only if it
// still carries one of ep's addresses (bpf.Endpoint.HoldsAny, the rule of
// the plugin's DEL): a late DEL of a container whose ifindex went to a new
// pod must leave the new pod's entry alone.
func (a *Agent) dropEndpointEntry(ep api.EndpointRequest) error {
	cur, ok, err := a.maps.Endpoint(ep.HostIfIndex)
	if err != nil || !ok || !cur.HoldsAny(ep.Addresses) {
		return err
	}
	return a.maps.DeleteEndpoint(ep.HostIfIndex)
}

// pluginNetwork reads the network's name and the plugin's record directory
// from the conflist the agent installs (Config.CNIConf): "" and the
// plugin's default directory without one.
func (a *Agent) pluginNetwork() (network, dataDir string) {
	dataDir = cni.DefaultDataDir
	var conf struct {
		Name    string `json:"name"`
		Plugins []struct {
			Type    string `json:"type"`
			DataDir string `json:"dataDir"`
		} `json:"plugins"`
	}
	if len(a.cfg.CNIConf) == 0 || json.Unmarshal(a.cfg.CNIConf, &conf) != nil {
		return "", dataDir
	}
	for _, p := range conf.Plugins {
		if p.Type == "idcni" && p.DataDir != "" {
			dataDir = p.DataDir
		}
	}
	return conf.Name, dataDir
}

// localPodAt maps the addresses of this node's running pods, as the
// informer cache reports them, to "namespace/name". Host-network pods
// share the node's addresses and have no host veth: they are left out.
func (a *Agent) localPodAt() (func(netip.Addr) (string, bool), error) {
	pods, err := a.pods.List(labels.Everything())
	if err != nil {
		return nil, fmt.Errorf("list pods: %w", err)
	}
	m := map[netip.Addr]string{}
	for _, p := range pods {
		if p.Spec.NodeName != a.cfg.NodeName || p.Spec.HostNetwork ||
			p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			continue
		}
		for _, addr := range podAddrs(p) {
			m[addr] = p.Namespace + "/" + p.Name
		}
	}
	return func(addr netip.Addr) (string, bool) { p, ok := m[addr]; return p, ok }, nil
}
