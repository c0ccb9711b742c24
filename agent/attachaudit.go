package agent

import (
	"fmt"
)

// auditAttachments checks that every registered endpoint's host veth has
// the current programs attached, asking the kernel (bpf.AttachedIndex), and
// attaches them again where they are not. Without it a pod whose programs
// went away (its tcx link pin removed, `--uninstall` under running pods, a
// detach by hand) ran with no policy at all while the maps, the metrics
// and `policyctl status` looked healthy: the agent keeps writing endpoint
// entries that no program reads. Each repair is counted
// (idcni_attach_repairs_total) and logged; endpoints it could not repair
// are in idcni_endpoints_unattached. Call it after auditEndpoints, so the
// registry holds only endpoints whose veth is theirs.
func (a *Agent) auditAttachments() {
	if a.dp == nil || a.links == nil {
		return
	}
	unattached := 0
	for _, ep := range a.endpoints.all() {
		l, ok, err := a.links.ByIndex(ep.HostIfIndex)
		if err != nil {
			a.log.Warn("attachment audit: look up host veth", "pod", ep.PodNamespace+"/"+ep.PodName, "ifindex", ep.HostIfIndex, "err", err)
			continue
		}
		if !ok || !linkOwnedBy(l, ep, "") {
			continue // not this endpoint's veth any more: the registry audit's
		}
		attached, err := a.dp.AttachedIndex(ep.HostIfIndex)
		if err == nil && attached {
			continue
		}
		if err != nil {
			a.log.Warn("attachment audit: cannot tell whether the programs are attached; attaching them", "pod", ep.PodNamespace+"/"+ep.PodName, "hostIfName", l.Name, "err", err)
		}
		if err := a.reattach(l.Name); err != nil {
			unattached++
			a.log.Error("pod runs without its programs and attaching them failed: its traffic is not policed",
				"pod", ep.PodNamespace+"/"+ep.PodName, "container", short(ep.ContainerID), "hostIfName", l.Name, "ifindex", ep.HostIfIndex, "err", err)
			continue
		}
		a.metrics.attachRepairs.Inc()
		a.log.Warn("pod's programs were not attached to its host veth; attached them again",
			"pod", ep.PodNamespace+"/"+ep.PodName, "container", short(ep.ContainerID), "hostIfName", l.Name, "ifindex", ep.HostIfIndex)
	}
	a.metrics.unattached.Set(float64(unattached))
	if a.fast != nil {
		repaired, _ := a.fast.audit()
		a.metrics.attachRepairs.Add(float64(repaired))
	}
}

// reattach attaches the programs pinned now to ifname under the root lock,
// as the plugin's ADD does: a program replacement in between must not leave
// the veth on the programs it replaced.
func (a *Agent) reattach(ifname string) error {
	unlock, err := a.dp.Lock()
	if err != nil {
		return err
	}
	defer unlock()
	if err := a.dp.ReopenPrograms(); err != nil {
		return fmt.Errorf("open the current programs: %w", err)
	}
	return a.dp.Attach(ifname)
}
