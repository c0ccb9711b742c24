package agent

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/cache"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/desired"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/manual"
	"github.com/idcni/idcni/policy"
	"github.com/idcni/idcni/policy/netpol"
)

// kind is what a work queue key names.
type kind uint8

const (
	kindPod       kind = iota + 1 // ns/name
	kindNamespace                 // name
	kindPolicy                    // ns/name
	kindNode                      // every node at once (the set of node addresses)
	kindEndpoint                  // name: container ID of a registration or removal
	kindManual                    // the manual state's pending changes
	kindAudit                     // compare the maps with what was written
	kindRetry                     // flush what an earlier flush could not write
	kindAnnounce                  // name: another node's announcement ConfigMap
	kindService                   // ns/name: a Service, for itself and its EndpointSlices
)

func (k kind) String() string {
	return [...]string{"", "pod", "namespace", "networkpolicy", "node", "endpoint", "manual", "audit", "retry", "announcement", "service"}[k]
}

// key is one item of the work queue. Informer and API handlers only add
// keys; the one worker (processNext) turns them into map writes.
type key struct {
	kind      kind
	namespace string
	name      string
}

func (k key) String() string {
	if k.namespace != "" {
		return k.kind.String() + ":" + k.namespace + "/" + k.name
	}
	return k.kind.String() + ":" + k.name
}

// handler enqueues the objects of one kind. An update that changes nothing
// the agent looks at (a resync with the same ResourceVersion, a pod's
// condition or container status) enqueues nothing, so it costs nothing.
func (a *Agent) handler(k kind) cache.ResourceEventHandler {
	enqueue := func(obj any) {
		nsName, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
		if err != nil {
			a.log.Error("cannot key object", "kind", k, "err", err)
			return
		}
		ns, name, _ := cache.SplitMetaNamespaceKey(nsName)
		if k == kindNode {
			ns, name = "", ""
		}
		a.queue.Add(key{kind: k, namespace: ns, name: name})
	}
	return cache.ResourceEventHandlerFuncs{
		AddFunc: enqueue,
		UpdateFunc: func(old, obj any) {
			if relevantChange(k, old, obj) {
				enqueue(obj)
			}
		},
		DeleteFunc: enqueue,
	}
}

// relevantChange reports whether an update can change the maps.
func relevantChange(k kind, old, obj any) bool {
	switch k {
	case kindPod:
		o, n := old.(*corev1.Pod), obj.(*corev1.Pod)
		if o.ResourceVersion == n.ResourceVersion {
			return false
		}
		return !labels.Equals(o.Labels, n.Labels) || o.Status.PodIP != n.Status.PodIP ||
			!equality.Semantic.DeepEqual(o.Status.PodIPs, n.Status.PodIPs) ||
			netpol.IsEndpoint(o) != netpol.IsEndpoint(n) || !sameContainerPorts(o, n)
	case kindNamespace:
		o, n := old.(*corev1.Namespace), obj.(*corev1.Namespace)
		return o.ResourceVersion != n.ResourceVersion && !labels.Equals(o.Labels, n.Labels)
	case kindPolicy:
		o, n := old.(*networkingv1.NetworkPolicy), obj.(*networkingv1.NetworkPolicy)
		return o.ResourceVersion != n.ResourceVersion && !equality.Semantic.DeepEqual(o.Spec, n.Spec)
	case kindNode:
		o, n := old.(*corev1.Node), obj.(*corev1.Node)
		return o.ResourceVersion != n.ResourceVersion && (!equality.Semantic.DeepEqual(o.Status.Addresses, n.Status.Addresses) ||
			o.Spec.PodCIDR != n.Spec.PodCIDR || !slices.Equal(o.Spec.PodCIDRs, n.Spec.PodCIDRs))
	}
	return true
}

func sameContainerPorts(a, b *corev1.Pod) bool {
	ports := func(p *corev1.Pod) [][]corev1.ContainerPort {
		var out [][]corev1.ContainerPort
		for _, c := range p.Spec.InitContainers {
			out = append(out, c.Ports)
		}
		for _, c := range p.Spec.Containers {
			out = append(out, c.Ports)
		}
		return out
	}
	return equality.Semantic.DeepEqual(ports(a), ports(b))
}

// maxFlushDelay bounds how long changes wait for the queue to empty before
// they are written anyway, so a steady stream of events cannot hold back
// the writes.
const maxFlushDelay = 50 * time.Millisecond

// processNext takes one key into the compiler and the node state, and
// writes the maps once the queue is empty (or changes have waited
// maxFlushDelay), so a burst of changes costs one write. API callers whose
// changes the key carried are answered after the write that contains them.
func (a *Agent) processNext() bool {
	k, quit := a.queue.Get()
	if quit {
		return false
	}
	defer a.queue.Done(k)
	waiters := a.takeWaiters(k)
	err := a.sync(k)
	if err != nil {
		a.log.Error("reconcile", "key", k, "err", err)
		a.metrics.reconcileErrors.Inc()
		answer(waiters, err)
		if k.kind != kindEndpoint && k.kind != kindManual {
			a.queue.AddRateLimited(k)
		}
		return true
	}
	a.queue.Forget(k)
	a.held = append(a.held, waiters...)
	if a.st.dirty() || a.svc.isDirty() || len(a.held) > 0 {
		if a.dirtySince.IsZero() {
			a.dirtySince = time.Now()
		}
		if a.queue.Len() == 0 || time.Since(a.dirtySince) > maxFlushDelay {
			err := a.flush()
			answer(a.held, err)
			a.held = nil
		}
	}
	return true
}

// sync moves one key's current state into the compiler and the node state.
func (a *Agent) sync(k key) error {
	switch k.kind {
	case kindPod:
		return a.syncPod(k.namespace, k.name)
	case kindNamespace:
		return a.syncNamespace(k.name)
	case kindPolicy:
		return a.syncPolicy(k.namespace, k.name)
	case kindNode:
		return a.syncNodes()
	case kindEndpoint:
		return a.syncEndpoint(k.name)
	case kindManual:
		return a.syncManual()
	case kindAudit:
		return a.audit()
	case kindRetry:
		return nil
	case kindAnnounce:
		return a.syncAnnouncement(k.name)
	case kindService:
		return a.syncService(k.namespace, k.name)
	}
	return fmt.Errorf("unknown key %v", k)
}

// applyDelta marks what a compiler change touched.
func (a *Agent) applyDelta(d netpol.Delta) {
	a.st.touchSubjects(d.Identities)
	for _, c := range d.CIDRsAdded {
		a.st.setCIDR(c.Prefix, c.ID, true)
	}
	for _, c := range d.CIDRsRemoved {
		if a.st.cidrs[c.Prefix] == c.ID {
			a.st.setCIDR(c.Prefix, c.ID, false)
		}
	}
}

func (a *Agent) syncPod(ns, name string) error {
	pod, err := a.pods.Pods(ns).Get(name)
	if apierrors.IsNotFound(err) {
		return a.forgetPod(ns, name)
	}
	if err != nil {
		return err
	}
	return a.compilePod(pod)
}

func (a *Agent) forgetPod(ns, name string) error {
	d, err := a.compiler.DeletePod(ns, name)
	if err != nil {
		return err
	}
	a.applyDelta(d)
	key := ns + "/" + name
	a.announcer.remove(key)
	if c, ok := a.st.pods[key]; ok {
		for _, addr := range c.addrs {
			a.events.delPod(addr, key)
		}
	}
	a.st.setPod(key, 0, nil, false)
	return a.alloc.Release(podUser(ns, name))
}

// compilePod gives the compiler a pod (with the addresses its plugin
// registered, which the API server learns only after the CNI ADD) and
// records its identity and addresses.
func (a *Agent) compilePod(pod *corev1.Pod) error {
	if len(podAddrs(pod)) > 0 {
		// The kubelet has written the addresses: no need to announce
		// them any longer.
		a.announcer.remove(pod.Namespace + "/" + pod.Name)
	}
	pod = a.withAnnouncedAddrs(a.withLocalAddrs(pod))
	d, err := a.compiler.UpsertPod(pod)
	if err != nil {
		return err
	}
	a.applyDelta(d)
	key := pod.Namespace + "/" + pod.Name
	id, ok := a.compiler.PodIdentity(pod.Namespace, pod.Name)
	addrs := podAddrs(pod)
	slices.SortFunc(addrs, netip.Addr.Compare)
	if old, had := a.st.pods[key]; had {
		for _, addr := range old.addrs {
			a.events.delPod(addr, key)
		}
	}
	if ok {
		for _, addr := range addrs {
			a.events.setPod(addr, key)
		}
	}
	a.st.setPod(key, id, addrs, ok)
	return nil
}

// syncNodes follows the Nodes: their addresses into the compiler and the
// ipcache (this node's resolve to host, every other node's to
// remote-node), the routes to other nodes' pod CIDRs, the sets of the
// nftables table, and this node's pod CIDRs into the CNI config once the
// agent has started.
func (a *Agent) syncNodes() error {
	if err := a.syncNodeAddrs(); err != nil {
		return err
	}
	var errs []error
	if a.started {
		errs = append(errs, a.updateCNIConf())
	}
	errs = append(errs, a.syncRoutes(), a.syncNFT())
	return errors.Join(errs...)
}

// syncRoutes makes the routes to other nodes' pod CIDRs follow the Nodes.
func (a *Agent) syncRoutes() error {
	if a.routes == nil {
		return a.syncFastPath(nil)
	}
	nodes, local, err := a.nodesAndLocalCIDRs()
	if err != nil {
		return err
	}
	self := selfNode{cidrs: local}
	for _, n := range nodes {
		if n.Name == a.cfg.NodeName {
			self.addrs, self.internal = hostAddrs(n), internalIPs(n)
		}
	}
	err = a.routes.sync(peerNodes(nodes, a.cfg.NodeName), self)
	return errors.Join(err, a.syncFastPath(a.routes.installed))
}

// syncFastPath makes the fast path that of the routes in place: it
// follows them, never decides peers of its own.
func (a *Agent) syncFastPath(routes []nodeRoute) error {
	if a.fast == nil {
		return nil
	}
	return a.fast.sync(routes)
}

// nodesAndLocalCIDRs returns every Node and this node's pod CIDRs, what
// the routes and the nftables table are planned from.
func (a *Agent) nodesAndLocalCIDRs() ([]*corev1.Node, []netip.Prefix, error) {
	nodes, err := a.nodes.List(labels.Everything())
	if err != nil {
		return nil, nil, fmt.Errorf("list nodes: %w", err)
	}
	local, _, err := a.localPodCIDRs()
	if err != nil {
		return nil, nil, err
	}
	return nodes, local, nil
}

// syncNodeAddrs hands every node address to the compiler and the ipcache.
func (a *Agent) syncNodeAddrs() error {
	local, remote, err := a.nodeAddrs()
	if err != nil {
		return err
	}
	a.applyDelta(a.compiler.SetNodeAddrs(local, remote))
	want := map[netip.Addr]identity.ID{}
	// Local after remote: an address two Node objects claim, one of them
	// this node's, is this node's, as the compiler has it.
	for _, r := range remote {
		want[r] = identity.RemoteNode
	}
	for _, l := range local {
		want[l] = identity.Host
	}
	a.st.setNodes(want)
	return nil
}

// nodeAddrs returns the InternalIPs and ExternalIPs of this node (local)
// and of every other node (remote). Only the local node is host: the
// datapath lets host reach any pod, and another node's packets must meet
// the pods' policy like any other address outside the cluster.
func (a *Agent) nodeAddrs() (local, remote []netip.Addr, err error) {
	nodes, err := a.nodes.List(labels.Everything())
	if err != nil {
		return nil, nil, fmt.Errorf("list nodes: %w", err)
	}
	for _, n := range nodes {
		if n.Name == a.cfg.NodeName {
			local = append(local, hostAddrs(n)...)
		} else {
			remote = append(remote, hostAddrs(n)...)
		}
	}
	return local, remote, nil
}

func (a *Agent) syncNamespace(name string) error {
	ns, err := a.nss.Get(name)
	var d netpol.Delta
	switch {
	case apierrors.IsNotFound(err):
		d, err = a.compiler.DeleteNamespace(name)
	case err == nil:
		d, err = a.compiler.UpsertNamespace(ns)
	}
	if err != nil {
		return err
	}
	a.applyDelta(d)
	// A label change gives the namespace's pods other identities, which
	// the Delta does not list: ask the compiler again for each.
	pods, err := a.pods.Pods(name).List(labels.Everything())
	if err != nil {
		return err
	}
	for _, pod := range pods {
		key := pod.Namespace + "/" + pod.Name
		id, ok := a.compiler.PodIdentity(pod.Namespace, pod.Name)
		if old, had := a.st.pods[key]; had && ok && old.id != id {
			a.st.setPod(key, id, old.addrs, true)
		}
	}
	return nil
}

func (a *Agent) syncPolicy(ns, name string) error {
	np, err := a.policies.NetworkPolicies(ns).Get(name)
	if apierrors.IsNotFound(err) {
		d, err := a.compiler.DeletePolicy(ns, name)
		if err != nil {
			return err
		}
		a.applyDelta(d)
		delete(a.accepted, ns+"/"+name)
		if a.refused.forget(ns+"/"+name) || a.refused.len() > 0 {
			// Room freed: try the refused ones again.
			for k := range a.refused {
				rns, rname, _ := strings.Cut(k, "/")
				a.queue.Add(key{kind: kindPolicy, namespace: rns, name: rname})
			}
		}
		return nil
	}
	if err != nil {
		return err
	}
	d, err := a.compiler.UpsertPolicy(np)
	if err != nil {
		a.recorder.Eventf(np, corev1.EventTypeWarning, "PolicyRejected", "idcni cannot enforce this policy: %v", err)
		a.log.Warn("policy rejected", "policy", ns+"/"+name, "err", err)
		// Not retried: the previous version stays in force until the
		// object changes again.
		return nil
	}
	// A policy whose rules do not fit the policy map beside everything
	// else, or not in one entry, is refused alone: it is taken out
	// again, and the rest of the node's policy goes on being written.
	need, room, undo, err := a.policyGrowth(d.Identities)
	if err == nil && need <= room {
		a.applyDelta(d)
		a.accepted[ns+"/"+name] = np
		if a.refused.forget(ns + "/" + name) {
			a.metrics.policiesRefused.Set(float64(a.refused.len()))
		}
		return nil
	}
	if undo != nil {
		undo()
	}
	// Back to the version in force before, if any.
	var back netpol.Delta
	var derr error
	if prev := a.accepted[ns+"/"+name]; prev != nil {
		back, derr = a.compiler.UpsertPolicy(prev)
	} else {
		back, derr = a.compiler.DeletePolicy(ns, name)
	}
	if derr != nil {
		return errors.Join(fmt.Errorf("take out policy %s/%s that cannot be written", ns, name), derr)
	}
	a.applyDelta(d)
	a.applyDelta(back)
	a.refused.add(ns+"/"+name, np.ResourceVersion)
	a.metrics.policiesRefused.Set(float64(a.refused.len()))
	if err != nil {
		a.recorder.Eventf(np, corev1.EventTypeWarning, "PolicyRejected", "idcni cannot enforce this policy: %v", err)
		a.log.Warn("policy rejected", "policy", ns+"/"+name, "err", err)
		return nil
	}
	msg := fmt.Sprintf("idcni cannot enforce this policy on node %s: its rules need %d more policy map entries and %d are free (the map holds %d; raise the agent's --policy-map-size)",
		a.cfg.NodeName, need, room, a.maps.PolicyCapacity())
	a.recorder.Event(np, corev1.EventTypeWarning, "PolicyRefused", msg)
	a.log.Error("policy refused: it does not fit the policy map", "policy", ns+"/"+name, "need", need, "free", room)
	return nil
}

// policyGrowth is how many entries the policy map would gain if the
// subjects' rules were written now, and how many entries are free, counting
// the changes not written yet. It records the subjects' new sizes; undo
// puts the old ones back for a change that is refused.
func (a *Agent) policyGrowth(ids []identity.ID) (need, room int, undo func(), err error) {
	s := a.st
	room = a.maps.PolicyCapacity() - s.projectedEntries()
	prev := map[identity.ID]int{}
	for _, id := range ids {
		n := 0
		if s.wantsRules(id) {
			rules, iso := a.subjectRules(id)
			ms, err := desired.Subject(id, rules, iso)
			if err != nil {
				for id, n := range prev {
					s.projected[id] = n
				}
				return 0, 0, nil, err
			}
			n = len(ms.Entries)
		}
		cur := s.entriesOf(id)
		prev[id] = cur
		need += n - cur
		s.projected[id] = n
	}
	return need, room, func() {
		for id, n := range prev {
			s.projected[id] = n
		}
	}, nil
}

// syncEndpoint applies a registration or removal the API handed over.
func (a *Agent) syncEndpoint(containerID string) error {
	req, ok := a.pending.take(containerID)
	if !ok {
		return nil
	}
	if req.remove {
		ep, had, err := a.endpoints.remove(containerID)
		if err != nil || !had {
			return err
		}
		if ifindex, ok := a.st.findLocal(func(ep localEndpoint) bool { return ep.containerID == containerID }); ok {
			a.st.setLocal(ifindex, localEndpoint{}, false)
		}
		a.log.Info("endpoint removed", "pod", ep.PodNamespace+"/"+ep.PodName, "container", short(containerID))
		return nil
	}
	r := req.register
	if err := a.claimEndpoint(r); err != nil {
		return err
	}
	if err := a.endpoints.put(r); err != nil {
		return err
	}
	a.st.setLocal(r.HostIfIndex, localOf(r), true)
	pod := req.pod
	if cached, err := a.pods.Pods(r.PodNamespace).Get(r.PodName); err == nil {
		pod = cached
	}
	if err := a.compilePod(pod); err != nil {
		_, _, _ = a.endpoints.remove(r.ContainerID)
		a.st.setLocal(r.HostIfIndex, localEndpoint{}, false)
		return fmt.Errorf("idcni-agent: pod %s/%s: %w", r.PodNamespace, r.PodName, err)
	}
	a.announcer.add(r.PodNamespace, r.PodName, r.PodUID, r.Addresses)
	return nil
}

// syncLocal makes the local endpoints the registry's, after an audit of
// the registry pruned or rebuilt entries.
func (a *Agent) syncLocal() error {
	want := map[int]api.EndpointRequest{}
	for _, ep := range a.endpoints.all() {
		want[ep.HostIfIndex] = ep
	}
	for ifindex, l := range a.st.local {
		if w, ok := want[ifindex]; !ok || w.ContainerID != l.containerID {
			a.st.setLocal(ifindex, localEndpoint{}, false)
		}
	}
	for ifindex, ep := range want {
		if l, ok := a.st.local[ifindex]; ok && l.containerID == ep.ContainerID {
			continue
		}
		a.st.setLocal(ifindex, localOf(ep), true)
		if pod, err := a.pods.Pods(ep.PodNamespace).Get(ep.PodName); err == nil {
			if err := a.compilePod(pod); err != nil {
				return err
			}
		}
	}
	return nil
}

func sortedAddrs(in []netip.Addr) []netip.Addr {
	out := make([]netip.Addr, 0, len(in))
	for _, a := range in {
		out = append(out, a.Unmap())
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

// syncManual applies the pending manual changes in order: each is checked
// alone, a bad one is answered and skipped. They are written with the next
// flush and saved once written (changeManual).
func (a *Agent) syncManual() error {
	next := a.manual.Clone()
	for _, c := range a.pendingManual.take() {
		try := next.Clone()
		err := c.change(&try)
		if err == nil {
			err = try.Validate()
		}
		if err != nil {
			c.done <- badRequest{err}
			continue
		}
		next = try
		a.held = append(a.held, c.done)
		a.manualDirty = true
	}
	a.setManual(next)
	return nil
}

// refusedPolicies are the policies left out because they did not fit, by
// "ns/name", with the ResourceVersion refused.
type refusedPolicies map[string]string

func (r *refusedPolicies) add(k, rv string) {
	if *r == nil {
		*r = refusedPolicies{}
	}
	(*r)[k] = rv
}

// forget reports whether k was refused.
func (r refusedPolicies) forget(k string) bool {
	_, ok := r[k]
	delete(r, k)
	return ok
}

func (r refusedPolicies) len() int { return len(r) }

// setManual makes st the manual state the maps follow.
func (a *Agent) setManual(st manual.State) {
	old := a.manual
	a.manual = st
	view := st.Clone()
	a.manualView.Store(&view)
	want := map[netip.Addr]identity.ID{}
	for _, b := range st.Bindings {
		want[b.IP] = b.Identity
	}
	a.st.setBindings(want)
	a.manualRules = map[identity.ID][]policy.Rule{}
	for _, r := range st.PolicyRules() {
		a.manualRules[r.Subject] = append(a.manualRules[r.Subject], r)
	}
	for _, r := range old.PolicyRules() {
		a.st.dirtySub[r.Subject] = struct{}{}
	}
	for _, r := range st.PolicyRules() {
		a.st.dirtySub[r.Subject] = struct{}{}
	}
}

// subjectRules are one identity's compiled NetworkPolicy rules and
// isolation, with the manual rules of that identity.
func (a *Agent) subjectRules(id identity.ID) ([]policy.Rule, policy.Isolation) {
	rules := a.compiler.Rules(id)
	rules = append(rules, a.manualRules[id]...)
	iso := a.compiler.Isolation(id)
	if id.IsolatedByDefault() {
		iso = policy.Isolation{Ingress: true, Egress: true}
	}
	return rules, iso
}

// withLocalAddrs gives a local pod the addresses its plugin registered,
// which the API server learns only after the CNI ADD returned.
func (a *Agent) withLocalAddrs(pod *corev1.Pod) *corev1.Pod {
	ep, ok := a.endpoints.byPod(pod.Namespace, pod.Name)
	if !ok || len(podAddrs(pod)) > 0 {
		return pod
	}
	return withStatusAddrs(pod, ep.Addresses)
}

// withStatusAddrs is a copy of pod whose status has addrs, as the kubelet
// will write them: what the agent knows before the API server does.
func withStatusAddrs(pod *corev1.Pod, addrs []netip.Addr) *corev1.Pod {
	pod = pod.DeepCopy()
	for _, addr := range addrs {
		pod.Status.PodIPs = append(pod.Status.PodIPs, corev1.PodIP{IP: addr.String()})
	}
	pod.Status.PodIP = pod.Status.PodIPs[0].IP
	return pod
}

// resync feeds every cached object to the compiler and the node state:
// the start, from whatever the maps hold.
func (a *Agent) resync() error {
	// Before the pods are compiled: withLocalAddrs reads the registry.
	if err := a.auditEndpoints(); err != nil {
		a.log.Warn("endpoint registry audit", "err", err)
	}
	nss, err := a.nss.List(labels.Everything())
	if err != nil {
		return err
	}
	for _, ns := range nss {
		d, err := a.compiler.UpsertNamespace(ns)
		if err != nil {
			return err
		}
		a.applyDelta(d)
	}
	if err := a.syncNodeAddrs(); err != nil {
		return err
	}
	// The routes at start: stale ones of an earlier run go, missing ones
	// come. A failure is retried through a node key, not fatal.
	if err := a.syncRoutes(); err != nil {
		a.log.Error("routes to other nodes' pod CIDRs", "err", err)
		a.queue.AddRateLimited(key{kind: kindNode})
	}
	// The nftables table is built whole before the agent is ready: a
	// pod that started before it would reach outside with its own
	// address, and the tunnel would take packets from anyone.
	if err := a.syncNFT(); err != nil {
		return err
	}
	if a.removeNFT {
		// Masquerade and the tunnel filter are off: what an earlier
		// run with them on left must not go on masquerading.
		if err := RemoveNFTable(); err != nil {
			a.log.Warn("remove the nftables table an earlier run left", "err", err)
		}
	}
	pods, err := a.pods.List(labels.Everything())
	if err != nil {
		return err
	}
	for _, pod := range pods {
		if err := a.compilePod(pod); err != nil {
			a.log.Warn("pod not compiled", "pod", pod.Namespace+"/"+pod.Name, "err", err)
		}
	}
	a.releaseGonePods(pods)
	if err := a.syncLocal(); err != nil {
		return err
	}
	a.setManual(a.manual)
	if err := a.st.adopt(a.maps); err != nil {
		return fmt.Errorf("read the maps: %w", err)
	}
	if err := a.resyncServices(); err != nil {
		return err
	}
	nps, err := a.policies.List(labels.Everything())
	if err != nil {
		return err
	}
	return a.startPolicies(nps)
}

// startPolicies takes the cluster's policies in at start. Sized one by one
// (syncPolicy), each would compile the rules of every local subject it
// touches, 1,000 policies a thousand times over; so they go in together
// and are sized once, and one by one only when together they do not fit,
// to refuse the ones that do not.
func (a *Agent) startPolicies(nps []*networkingv1.NetworkPolicy) error {
	var in []*networkingv1.NetworkPolicy
	for _, np := range nps {
		d, err := a.compiler.UpsertPolicy(np)
		if err != nil {
			a.recorder.Eventf(np, corev1.EventTypeWarning, "PolicyRejected", "idcni cannot enforce this policy: %v", err)
			a.log.Warn("policy rejected", "policy", np.Namespace+"/"+np.Name, "err", err)
			continue
		}
		a.applyDelta(d)
		a.accepted[np.Namespace+"/"+np.Name] = np
		in = append(in, np)
	}
	need, room, undo, err := a.policyGrowth(slices.Collect(maps.Keys(a.st.dirtySub)))
	if err == nil && need <= room {
		return nil
	}
	if undo != nil {
		undo()
	}
	for _, np := range in {
		d, err := a.compiler.DeletePolicy(np.Namespace, np.Name)
		if err != nil {
			return err
		}
		a.applyDelta(d)
		delete(a.accepted, np.Namespace+"/"+np.Name)
	}
	for _, np := range in {
		if err := a.syncPolicy(np.Namespace, np.Name); err != nil {
			return err
		}
	}
	return nil
}

// releaseGonePods drops allocator users whose pods disappeared while the
// agent was down, so their identities can age out.
func (a *Agent) releaseGonePods(pods []*corev1.Pod) {
	live := map[string]bool{}
	for _, p := range pods {
		live[podUser(p.Namespace, p.Name)] = true
	}
	for user := range a.alloc.Users() {
		if strings.HasPrefix(user, "pod/") && !live[user] {
			if err := a.alloc.Release(user); err != nil {
				a.log.Warn("release identity user", "user", user, "err", err)
			}
		}
	}
}

// flush writes the dirty keys, then saves a manual state that just went
// in, and schedules a retry for what could not be written.
func (a *Agent) flush() error {
	start := time.Now()
	a.flushServices()
	st, err := a.st.flush(a.maps, a.subjectRules)
	if err != nil {
		// What was written is no longer certain: read it back and
		// compare everything on the retry.
		a.metrics.reconcileErrors.Inc()
		if rerr := a.readopt(); rerr != nil {
			err = errors.Join(err, rerr)
		}
		a.queue.AddRateLimited(key{kind: kindRetry})
		// A manual change is in force whole or not at all: its caller
		// hears the error, and the saved state stays the one to write.
		if a.manualDirty {
			a.manualDirty = false
			a.setManual(a.manualSaved)
		}
		return fmt.Errorf("write maps: %w", err)
	}
	if a.manualDirty {
		a.manualDirty = false
		if err := manual.Save(a.db, a.manual); err != nil {
			return err
		}
		a.manualSaved = a.manual
	}
	now := time.Now()
	a.metrics.observeFlush(st, now.Sub(start), now.Sub(a.dirtySince), a.st)
	a.dirtySince = time.Time{}
	if st.revoked {
		a.metrics.revisionBumps.Inc()
	}
	// What does not fit waits for room, and the rest goes on: a full map
	// must not fail every registration on the node.
	if len(st.overflow) > 0 {
		a.log.Error("policy map full: these identities' rules wait for room, their pods denied what the missing rules would allow; raise --policy-map-size",
			"identities", st.overflow, "entries", a.maps.PolicyCapacity())
		a.queue.AddAfter(key{kind: kindRetry}, 5*time.Second)
	}
	if st.ipcFull > 0 {
		a.log.Error("ipcache full: these addresses resolve to a shorter prefix or world until there is room; raise --ipcache-size",
			"waiting", st.ipcFull, "err", st.ipcErr)
		a.queue.AddAfter(key{kind: kindRetry}, 5*time.Second)
	}
	return nil
}

// readopt forgets what the writer believed it wrote and takes the maps as
// they are, every key dirty.
func (a *Agent) readopt() error {
	fresh := newNodeState()
	fresh.pods, fresh.addrPods, fresh.nodes, fresh.cidrs, fresh.bindings = a.st.pods, a.st.addrPods, a.st.nodes, a.st.cidrs, a.st.bindings
	fresh.local, fresh.localAddr = a.st.local, a.st.localAddr
	for id := range a.st.dirtySub {
		fresh.dirtySub[id] = struct{}{}
	}
	for id := range a.st.bySubject {
		fresh.dirtySub[id] = struct{}{}
	}
	for id := range a.st.subjects {
		fresh.dirtySub[id] = struct{}{}
	}
	for id := range a.manualRules {
		fresh.dirtySub[id] = struct{}{}
	}
	a.st = fresh
	return fresh.adopt(a.maps)
}
