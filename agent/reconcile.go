package agent

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/cache"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// Work queue keys are "<kind>:<namespace/name>".
const (
	kindPod       = "pod"
	kindNamespace = "namespace"
	kindPolicy    = "networkpolicy"
	kindNode      = "node"
)

func (a *Agent) handler(kind string) cache.ResourceEventHandler {
	enqueue := func(obj any) {
		key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
		if err != nil {
			a.log.Error("cannot key object", "kind", kind, "err", err)
			return
		}
		a.queue.Add(kind + ":" + key)
	}
	return cache.ResourceEventHandlerFuncs{
		AddFunc:    enqueue,
		UpdateFunc: func(_, obj any) { enqueue(obj) },
		DeleteFunc: enqueue,
	}
}

// processNext syncs one key into the compiler, and writes the maps once
// the queue is empty and something changed, so a burst of changes costs one
// write and a resync that changes nothing costs none.
func (a *Agent) processNext() bool {
	key, quit := a.queue.Get()
	if quit {
		return false
	}
	defer a.queue.Done(key)
	a.mu.Lock()
	err := a.sync(key)
	if err == nil && a.queue.Len() == 0 && !a.dirtySince.IsZero() {
		err = a.flush()
	}
	a.mu.Unlock()
	if err != nil {
		a.log.Error("reconcile", "key", key, "err", err)
		a.metrics.reconcileErrors.Inc()
		a.queue.AddRateLimited(key)
		return true
	}
	a.queue.Forget(key)
	return true
}

// sync moves one object's current state from the informer cache into the
// compiler. Callers hold a.mu.
func (a *Agent) sync(key string) error {
	kind, nsName, _ := strings.Cut(key, ":")
	ns, name, err := cache.SplitMetaNamespaceKey(nsName)
	if err != nil {
		return err
	}
	var changed bool
	switch kind {
	case kindPod:
		changed, err = a.syncPod(ns, name)
	case kindNamespace:
		changed, err = a.syncNamespace(name)
	case kindPolicy:
		changed, err = a.syncPolicy(ns, name)
	case kindNode:
		changed, err = a.syncNodes()
	default:
		return fmt.Errorf("unknown key %q", key)
	}
	if changed {
		a.markDirty()
	}
	return err
}

// markDirty records that the maps lag the compiler, and since when.
func (a *Agent) markDirty() {
	if a.dirtySince.IsZero() {
		a.dirtySince = time.Now()
	}
}

func (a *Agent) syncPod(ns, name string) (bool, error) {
	pod, err := a.pods.Pods(ns).Get(name)
	if apierrors.IsNotFound(err) {
		if _, err := a.compiler.DeletePod(ns, name); err != nil {
			return false, err
		}
		return true, a.alloc.Release(podUser(ns, name))
	}
	if err != nil {
		return false, err
	}
	// Changed even when the compiler's Delta is empty: the Delta names
	// identities whose rules changed, not addresses that moved in the
	// ipcache.
	_, err = a.compiler.UpsertPod(a.withLocalAddrs(pod))
	return true, err
}

// syncNodes hands every node address to the compiler: this node's resolve
// to host, every other node's to remote-node, and ipBlocks containing them
// allow those identities (pods reaching the API server on a node address,
// for one).
func (a *Agent) syncNodes() (bool, error) {
	local, remote, err := a.nodeAddrs()
	if err != nil {
		return false, err
	}
	a.compiler.SetNodeAddrs(local, remote)
	return true, nil // node addresses are ipcache entries too
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
		for _, na := range n.Status.Addresses {
			if na.Type != corev1.NodeInternalIP && na.Type != corev1.NodeExternalIP {
				continue
			}
			addr, err := netip.ParseAddr(na.Address)
			if err != nil {
				continue
			}
			if n.Name == a.cfg.NodeName {
				local = append(local, addr.Unmap())
			} else {
				remote = append(remote, addr.Unmap())
			}
		}
	}
	return local, remote, nil
}

func (a *Agent) syncNamespace(name string) (bool, error) {
	ns, err := a.nss.Get(name)
	if apierrors.IsNotFound(err) {
		_, err := a.compiler.DeleteNamespace(name)
		return true, err
	}
	if err != nil {
		return false, err
	}
	// A label change moves the namespace's pods to other identities in
	// the ipcache, which the Delta does not report.
	_, err = a.compiler.UpsertNamespace(ns)
	return true, err
}

func (a *Agent) syncPolicy(ns, name string) (bool, error) {
	np, err := a.policies.NetworkPolicies(ns).Get(name)
	if apierrors.IsNotFound(err) {
		d, err := a.compiler.DeletePolicy(ns, name)
		return !d.Empty(), err
	}
	if err != nil {
		return false, err
	}
	d, err := a.compiler.UpsertPolicy(np)
	if err != nil {
		a.recorder.Eventf(np, corev1.EventTypeWarning, "PolicyRejected", "idcni cannot enforce this policy: %v", err)
		a.log.Warn("policy rejected", "policy", ns+"/"+name, "err", err)
		// Not retried: the previous version stays in force until the
		// object changes again.
		return false, nil
	}
	if d.Empty() {
		return false, nil
	}
	// A policy that does not fit the maps is refused whole: write now, and
	// take the policy out again when the maps cannot hold it.
	a.markDirty()
	if err := a.flush(); err != nil {
		if _, derr := a.compiler.DeletePolicy(ns, name); derr != nil {
			return true, errors.Join(err, derr)
		}
		a.recorder.Eventf(np, corev1.EventTypeWarning, "PolicyRejected", "idcni cannot enforce this policy: %v", err)
		a.log.Error("policy refused: it does not fit the maps", "policy", ns+"/"+name, "err", err)
		return true, a.flush()
	}
	return false, nil
}

// withLocalAddrs gives a local pod the addresses its plugin registered,
// which the API server learns only after the CNI ADD returned.
func (a *Agent) withLocalAddrs(pod *corev1.Pod) *corev1.Pod {
	ep, ok := a.endpoints.byPod(pod.Namespace, pod.Name)
	if !ok || len(podAddrs(pod)) > 0 {
		return pod
	}
	pod = pod.DeepCopy()
	for _, addr := range ep.Addresses {
		pod.Status.PodIPs = append(pod.Status.PodIPs, corev1.PodIP{IP: addr.String()})
	}
	pod.Status.PodIP = pod.Status.PodIPs[0].IP
	return pod
}

// resync feeds every cached object to the compiler and writes the maps.
func (a *Agent) resync() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	// Registry hook (endpointaudit.go): before the pods are compiled,
	// since withLocalAddrs reads the registry.
	if err := a.auditEndpoints(); err != nil {
		a.log.Warn("endpoint registry audit", "err", err)
	}
	nss, err := a.nss.List(labels.Everything())
	if err != nil {
		return err
	}
	for _, ns := range nss {
		if _, err := a.compiler.UpsertNamespace(ns); err != nil {
			return err
		}
	}
	pods, err := a.pods.List(labels.Everything())
	if err != nil {
		return err
	}
	for _, pod := range pods {
		if _, err := a.compiler.UpsertPod(a.withLocalAddrs(pod)); err != nil {
			a.log.Warn("pod not compiled", "pod", pod.Namespace+"/"+pod.Name, "err", err)
		}
	}
	if _, err := a.syncNodes(); err != nil {
		return err
	}
	nps, err := a.policies.List(labels.Everything())
	if err != nil {
		return err
	}
	for _, np := range nps {
		if _, err := a.compiler.UpsertPolicy(np); err != nil {
			a.recorder.Eventf(np, corev1.EventTypeWarning, "PolicyRejected", "idcni cannot enforce this policy: %v", err)
		}
	}
	a.releaseGonePods(pods)
	a.dirtySince = time.Now()
	return a.flush()
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

// desired computes what the maps must hold: every pod of the cluster and
// every CIDR identity in the ipcache, every local endpoint, and the policy
// of compiled NetworkPolicies plus manual rules. Manual bindings win over
// label identities for the addresses they name.
func (a *Agent) desired() (ipc map[netip.Prefix]identity.ID, eps map[int]bpf.Endpoint, set *policy.Set, err error) {
	ipc = map[netip.Prefix]identity.ID{}
	for _, c := range a.compiler.CIDRs() {
		ipc[c.Prefix] = c.ID
	}
	local, remote, err := a.nodeAddrs()
	if err != nil {
		return nil, nil, nil, err
	}
	// Local after remote: an address two Node objects claim, one of them
	// this node's, is this node's, as the compiler has it.
	for _, r := range remote {
		ipc[netip.PrefixFrom(r, r.BitLen())] = identity.RemoteNode
	}
	for _, l := range local {
		ipc[netip.PrefixFrom(l, l.BitLen())] = identity.Host
	}
	pods, err := a.pods.List(labels.Everything())
	if err != nil {
		return nil, nil, nil, err
	}
	podByAddr := map[netip.Addr]string{}
	for _, pod := range pods {
		id, ok := a.compiler.PodIdentity(pod.Namespace, pod.Name)
		if !ok {
			continue
		}
		for _, addr := range podAddrs(a.withLocalAddrs(pod)) {
			ipc[netip.PrefixFrom(addr, addr.BitLen())] = id
			podByAddr[addr] = pod.Namespace + "/" + pod.Name
		}
	}
	a.events.setPods(podByAddr)
	manualIDs := map[netip.Addr]identity.ID{}
	for _, b := range a.manual.Bindings {
		manualIDs[b.IP] = b.Identity
		ipc[netip.PrefixFrom(b.IP, b.IP.BitLen())] = b.Identity
	}
	eps = map[int]bpf.Endpoint{}
	for _, ep := range a.endpoints.all() {
		id, ok := a.compiler.PodIdentity(ep.PodNamespace, ep.PodName)
		if !ok {
			id = identity.Unresolved
		}
		e := bpf.Endpoint{Identity: id}
		for _, addr := range ep.Addresses {
			if m, ok := manualIDs[addr]; ok {
				e.Identity = m
			}
			if addr.Is4() {
				e.IPv4 = addr
			} else {
				e.IPv6 = addr
			}
		}
		eps[ep.HostIfIndex] = e
	}
	set = a.compiler.Set()
	set.Rules = append(set.Rules, a.manual.PolicyRules()...)
	return ipc, eps, set, nil
}

// flush makes the maps equal to the desired state. Order matters: new
// ipcache entries and endpoints first (rules may name them), then the
// policy (written before stale entries go), then stale ipcache entries, then
// a revision bump so established flows are checked against all of it. An
// ipcache too full for the new entries beside the stale ones loses the
// stale ones first.
// Callers hold a.mu.
func (a *Agent) flush() error {
	start := time.Now()
	ipc, eps, set, err := a.desired()
	if err != nil {
		return err
	}
	ms, err := set.Compile()
	if err != nil {
		return fmt.Errorf("compile policy: %w", err)
	}
	have, err := a.dp.IPCache()
	if err != nil {
		return err
	}
	var stale []netip.Prefix
	for p := range have {
		if _, ok := ipc[p]; !ok {
			stale = append(stale, p)
		}
	}
	added := 0
	for p := range ipc {
		if _, ok := have[p]; !ok {
			added++
		}
	}
	// Stale entries go after the policy that may still name them, unless
	// the new ones would not fit beside them: then they go first, or a map
	// near capacity refuses the churn before anything leaves it and stays
	// full for good. Nothing the new state wants resolves through a stale
	// prefix, so removing it early only moves its addresses to what they
	// resolve to after the flush (a covering prefix, or world).
	if len(stale) > 0 && len(have)+added >= a.dp.IPCacheCapacity() {
		for _, p := range stale {
			if err := a.dp.DeleteIPCache(p); err != nil {
				return err
			}
		}
		stale = nil
	}
	// Changed entries are replaced in place, never deleted and re-added, so
	// an address is never unresolved; they go before new prefixes, while
	// the map has the most room.
	for p, id := range ipc {
		if cur, ok := have[p]; ok && cur != id {
			if err := a.dp.PutIPCache(p, id); err != nil {
				return err
			}
		}
	}
	for p, id := range ipc {
		if _, ok := have[p]; !ok {
			if err := a.dp.PutIPCache(p, id); err != nil {
				return err
			}
		}
	}
	haveEps, err := a.dp.Endpoints()
	if err != nil {
		return err
	}
	for ifindex, ep := range eps {
		cur, ok := haveEps[ifindex]
		// The conntrack slot is the plugin's, and PutEndpoint keeps it.
		ep.ConntrackSlot = cur.ConntrackSlot
		if !ok || cur != ep {
			if err := a.dp.PutEndpoint(ifindex, ep); err != nil {
				return err
			}
		}
	}
	if err := a.dp.ApplyPolicy(ms); err != nil {
		return err
	}
	for _, p := range stale {
		if err := a.dp.DeleteIPCache(p); err != nil {
			return err
		}
	}
	if err := a.dp.BumpRevision(); err != nil {
		return err
	}
	now := time.Now()
	a.metrics.flushSeconds.Observe(now.Sub(start).Seconds())
	if !a.dirtySince.IsZero() {
		a.metrics.reconcileSeconds.Observe(now.Sub(a.dirtySince).Seconds())
		a.dirtySince = time.Time{}
	}
	a.metrics.observeState(len(ipc), len(eps), ms)
	return nil
}
