package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"

	"github.com/idcni/idcni/bpf"
)

// WriteCNIConf writes the plugin's conflist into the CNI config directory,
// pointing the plugin at this agent and requiring it, with host-local
// handing out addresses from podCIDRs (one range set per CIDR, so one
// address per family on a dual-stack node). The template's other IPAM keys
// (dataDir, routes) stay. Until this file exists the runtime reports the
// network not ready, so no pod starts before its policy can be enforced.
// The file is written in place, not renamed in: containerd 1.6 ignores
// files that appear by rename. mtu, when not 0, is the pods' "mtu" unless
// the template sets one (the operator's choice wins: a node may sit in
// another overlay the agent cannot see).
func (a *Agent) WriteCNIConf(podCIDRs []netip.Prefix, mtu int) error {
	if a.cfg.CNIConfDir == "" {
		return nil
	}
	var conf map[string]any
	if err := json.Unmarshal(a.cfg.CNIConf, &conf); err != nil {
		return fmt.Errorf("CNI config template: %w", err)
	}
	plugins, _ := conf["plugins"].([]any)
	for _, p := range plugins {
		if pm, ok := p.(map[string]any); ok && pm["type"] == "idcni" {
			pm["agentSocket"] = a.cfg.Socket
			pm["agentRequired"] = true
			if a.cfg.BPFRoot != "" {
				pm["bpfRoot"] = a.cfg.BPFRoot
			}
			if len(podCIDRs) > 0 {
				pm["ipam"] = hostLocalIPAM(pm["ipam"], podCIDRs)
			}
			if _, set := pm["mtu"]; !set && mtu > 0 {
				pm["mtu"] = mtu
			}
		}
	}
	out, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(a.cfg.CNIConfDir, 0o755); err != nil {
		return fmt.Errorf("create CNI config directory: %w", err)
	}
	path := a.cniConfPath()
	if err := os.WriteFile(path, append(out, '\n'), 0o644); err != nil {
		return fmt.Errorf("write CNI config %s: %w", path, err)
	}
	a.log.Info("CNI config written", "path", path, "podCIDRs", podCIDRs, "mtu", mtu)
	return nil
}

func (a *Agent) cniConfPath() string { return filepath.Join(a.cfg.CNIConfDir, a.cfg.CNIConfName) }

// hostLocalIPAM is the template's ipam section with host-local's ranges
// set to cidrs, one range set each. The single-range keys (subnet,
// rangeStart, rangeEnd, gateway) go: ranges replaces them.
func hostLocalIPAM(tmpl any, cidrs []netip.Prefix) map[string]any {
	ipam, _ := tmpl.(map[string]any)
	if ipam == nil {
		ipam = map[string]any{}
	}
	ipam["type"] = "host-local"
	for _, k := range []string{"subnet", "rangeStart", "rangeEnd", "gateway"} {
		delete(ipam, k)
	}
	ranges := make([]any, 0, len(cidrs))
	for _, c := range cidrs {
		ranges = append(ranges, []any{map[string]any{"subnet": c.String()}})
	}
	ipam["ranges"] = ranges
	return ipam
}

// podCIDRsOf returns a Node's pod CIDRs (spec.podCIDRs, or the older
// spec.podCIDR alone), masked; unparsable ones are left out.
func podCIDRsOf(n *corev1.Node) []netip.Prefix {
	raw := n.Spec.PodCIDRs
	if len(raw) == 0 && n.Spec.PodCIDR != "" {
		raw = []string{n.Spec.PodCIDR}
	}
	var out []netip.Prefix
	for _, s := range raw {
		if p, err := netip.ParsePrefix(s); err == nil {
			out = append(out, p.Masked())
		}
	}
	return out
}

// localPodCIDRs are the ranges this node's pods get addresses from: the
// --pod-cidr override, else the Node's spec.podCIDRs. node is this node's
// Node object, nil when it is not in the cache.
func (a *Agent) localPodCIDRs() (cidrs []netip.Prefix, node *corev1.Node, err error) {
	node, err = a.nodes.Get(a.cfg.NodeName)
	if apierrors.IsNotFound(err) {
		node, err = nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("get node %s: %w", a.cfg.NodeName, err)
	}
	if len(a.cfg.PodCIDRs) > 0 {
		return a.cfg.PodCIDRs, node, nil
	}
	if node != nil {
		cidrs = podCIDRsOf(node)
	}
	return cidrs, node, nil
}

// updateCNIConf writes the CNI config once this node's pod CIDRs are known,
// and again when they change, and makes the agent ready the first time.
// Without pod CIDRs it writes nothing and says why, once, in the log and
// in a Warning Event on the Node: the node then takes no pods, rather than
// handing out addresses another node hands out too. It runs in the writer
// loop once the first write of the maps is done.
func (a *Agent) updateCNIConf() error {
	if a.cfg.CNIConfDir == "" {
		// Nothing to write (tests, or an agent run by hand): the pod
		// CIDRs do not matter.
		a.becomeReady()
		return nil
	}
	cidrs, node, err := a.localPodCIDRs()
	if err != nil {
		return err
	}
	if len(cidrs) == 0 {
		if !a.noPodCIDR {
			a.noPodCIDR = true
			a.reportNoPodCIDR(node)
		}
		return nil
	}
	a.noPodCIDR = false
	mtu := a.podMTU(node)
	if a.confWritten && slices.Equal(cidrs, a.confCIDRs) && mtu == a.confMTU {
		return nil
	}
	if a.confWritten && !slices.Equal(cidrs, a.confCIDRs) {
		a.log.Warn("this node's pod CIDRs changed: rewriting the CNI config; running pods keep the addresses they have, new pods get addresses from the new ranges",
			"node", a.cfg.NodeName, "old", a.confCIDRs, "new", cidrs)
	}
	if a.confWritten && mtu != a.confMTU {
		a.log.Warn("the pods' MTU changed: rewriting the CNI config; running pods keep the MTU they have (a veth's MTU is set once, at creation), new pods get the new one",
			"node", a.cfg.NodeName, "old", a.confMTU, "new", mtu)
	}
	if err := a.WriteCNIConf(cidrs, mtu); err != nil {
		return err
	}
	a.confWritten, a.confCIDRs, a.confMTU = true, slices.Clone(cidrs), mtu
	a.becomeReady()
	return nil
}

// podMTU is the pods' MTU for the CNI config: the MTU of the uplink, the
// link holding this node's InternalIP (the tunnel's endpoint), less the
// VXLAN overhead (50 bytes over IPv4, 70 over IPv6) unless the routing
// mode is direct. In auto mode the overhead is taken even while every
// node is on a connected subnet: a node elsewhere may join later, and a
// pod's MTU cannot change after it is created, so every pod must fit the
// tunnel from the start. 0 (the template's, or the plugin's default) when
// the agent does not route, or cannot tell the uplink.
func (a *Agent) podMTU(node *corev1.Node) int {
	if a.routes == nil || node == nil {
		return 0
	}
	underlay := tunnelUnderlay(internalIPs(node))
	if !underlay.IsValid() {
		return 0
	}
	connected, err := a.routes.table.Connected()
	if err != nil {
		a.log.Warn("pods' MTU: the uplink's MTU is unknown", "err", err)
		return 0
	}
	up, ok := uplinkOf(connected, underlay)
	if !ok || up.MTU == 0 {
		if !a.noUplink {
			a.log.Warn("pods' MTU: this node's InternalIP is on none of its links; the CNI config keeps the template's MTU", "internalIP", underlay)
			a.noUplink = true
		}
		return 0
	}
	a.noUplink = false
	if a.routes.mode == RoutingDirect {
		return up.MTU
	}
	return up.MTU - tunnelOverhead(underlay)
}

func (a *Agent) becomeReady() {
	a.readyOnce.Do(func() {
		close(a.ready)
		a.log.Info("ready", "node", a.cfg.NodeName, "socket", a.cfg.Socket)
	})
}

// reportNoPodCIDR logs and records, on the Node, why no CNI config is
// written.
func (a *Agent) reportNoPodCIDR(node *corev1.Node) {
	msg := fmt.Sprintf("node %s has no pod CIDR (spec.podCIDRs is empty) and the agent has no --pod-cidr: idcni writes no CNI config and the node takes no pods until it has one. Fix: run kube-controller-manager with --allocate-node-cidrs and --cluster-cidr, or start idcni-agent with --pod-cidr=<this node's range>",
		a.cfg.NodeName)
	a.log.Error(msg, "node", a.cfg.NodeName)
	var obj runtime.Object = node
	if node == nil {
		// Not registered yet: kubelet's own Node events name it so.
		obj = &corev1.ObjectReference{Kind: "Node", Name: a.cfg.NodeName, UID: types.UID(a.cfg.NodeName)}
	}
	a.recorder.Event(obj, corev1.EventTypeWarning, "NoPodCIDR", msg)
}

// removeStaleCNIConf removes a config an earlier run wrote, at a start
// that finds no pod CIDR: its range may be another node's now.
func (a *Agent) removeStaleCNIConf() {
	if a.cfg.CNIConfDir == "" {
		return
	}
	err := os.Remove(a.cniConfPath())
	switch {
	case err == nil:
		a.log.Warn("removed the CNI config an earlier run wrote: this node has no pod CIDR now", "path", a.cniConfPath())
	case !errors.Is(err, os.ErrNotExist):
		a.log.Error("remove stale CNI config", "path", a.cniConfPath(), "err", err)
	}
}

// Uninstall removes the CNI config (the node turns NotReady for new pods)
// and every pin of the datapath (programs detach from all veths).
func Uninstall(confDir, confName, bpfRoot string) error {
	var errs []error
	if confDir != "" {
		if err := os.Remove(filepath.Join(confDir, confName)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	// Legacy from_net filters on the uplinks do not go with the pins.
	errs = append(errs, bpf.RemoveNetFilters(), removePins(bpfRoot))
	return errors.Join(errs...)
}
