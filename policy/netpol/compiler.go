package netpol

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// CIDRIdentity is one entry the ipcache needs for ipBlock peers: addresses
// whose longest matching prefix is Prefix resolve to ID.
type CIDRIdentity struct {
	Prefix netip.Prefix `json:"prefix"`
	ID     identity.ID  `json:"id"`
}

// Delta says what a change did.
type Delta struct {
	// Identities are the subject identities whose rules or isolation
	// changed, sorted: the map entries the agent has to rewrite.
	Identities []identity.ID
	// CIDRsAdded must reach the ipcache before the rules that name them;
	// CIDRsRemoved are no longer named by any rule.
	CIDRsAdded   []CIDRIdentity
	CIDRsRemoved []CIDRIdentity
}

// Empty reports whether the change altered nothing the datapath sees.
func (d Delta) Empty() bool {
	return len(d.Identities) == 0 && len(d.CIDRsAdded) == 0 && len(d.CIDRsRemoved) == 0
}

// Compiler holds the current Namespaces, Pods and NetworkPolicies and their
// compiled rules. Every method is safe for concurrent use; changes are
// applied one at a time.
//
// The compiler keeps the Pod and Namespace objects it is given (to ask
// Identities again when a namespace's labels change): callers must not
// mutate them afterwards, as informer caches already require.
type Compiler struct {
	mu  sync.Mutex
	ids Identities

	namespaces map[string]*corev1.Namespace
	nsLabels   map[string]labels.Set // effective labels of the namespaces above

	pods       map[string]*podInfo          // endpoint pods by "ns/name"
	groups     map[string]*group            // by groupKey
	groupsByNS map[string]map[string]*group // namespace -> groupKey -> group

	policies map[string]*policyState // by "ns/name"

	// subjects[id][policyKey] is the output of a policy selecting id.
	subjects map[identity.ID]map[string]*policyOut
	// usedBy[id] holds the policies whose output names id, as subject or
	// peer: the ones to recompute when id's pods change.
	usedBy map[identity.ID]map[string]struct{}

	cidrs    map[netip.Prefix]*cidrEntry
	nextCIDR identity.ID

	// idPorts counts, per identity, the pods declaring each containerPort:
	// named ports resolve on the union of an identity's pods.
	idPorts map[identity.ID]map[containerPort]int
	// blocks indexes, per distinct ipBlock, how many endpoint pods of each
	// identity have an address inside it, so a pod change touches a policy
	// only when an identity enters or leaves one of its blocks.
	blocks map[string]*blockIndex
	// nodes are the node addresses the ipcache resolves to identity.Host
	// (the local node's) or identity.RemoteNode (every other node's), as
	// pseudo pods: they count in block indexes but are never selected.
	nodes map[netip.Addr]*podInfo
}

type blockIndex struct {
	peer   parsedPeer
	counts map[identity.ID]int // identity -> pods inside, never 0
	users  map[string]int      // policy key -> peers naming this block
}

type cidrEntry struct {
	id   identity.ID
	refs int // policies naming the prefix
}

type policyState struct {
	p   *parsedPolicy
	out *policyOut
}

// podInfo is what the compiler needs of an endpoint pod.
type podInfo struct {
	key    string
	ns     string
	obj    *corev1.Pod
	labels labels.Set
	ips    []netip.Addr
	ports  []containerPort
	id     identity.ID
	grp    *group
}

type containerPort struct {
	name  string
	proto corev1.Protocol
	port  uint16
}

// group is the pods of one namespace with the same labels and identity:
// selectors are evaluated once per group, not once per pod.
type group struct {
	key    string
	ns     string
	labels labels.Set
	id     identity.ID
	pods   map[string]*podInfo
}

// NewCompiler returns a Compiler with no objects.
func NewCompiler(ids Identities) *Compiler {
	return &Compiler{
		ids:        ids,
		namespaces: map[string]*corev1.Namespace{},
		nsLabels:   map[string]labels.Set{},
		pods:       map[string]*podInfo{},
		groups:     map[string]*group{},
		groupsByNS: map[string]map[string]*group{},
		policies:   map[string]*policyState{},
		subjects:   map[identity.ID]map[string]*policyOut{},
		usedBy:     map[identity.ID]map[string]struct{}{},
		cidrs:      map[netip.Prefix]*cidrEntry{},
		nextCIDR:   identity.MinCIDR,
		idPorts:    map[identity.ID]map[containerPort]int{},
		blocks:     map[string]*blockIndex{},
		nodes:      map[netip.Addr]*podInfo{},
	}
}

// Compile compiles a whole cluster state from scratch. The returned Compiler
// can take incremental changes from there (node addresses, if any, go in
// with SetNodeAddrs). Later objects replace earlier ones with the same
// namespace and name.
func Compile(ids Identities, namespaces []*corev1.Namespace, pods []*corev1.Pod, policies []*networkingv1.NetworkPolicy) (*Compiler, error) {
	c := NewCompiler(ids)
	for _, ns := range namespaces {
		if ns.Name == "" {
			return nil, fmt.Errorf("namespace object without a name")
		}
		c.namespaces[ns.Name] = ns
		c.nsLabels[ns.Name] = effectiveNSLabels(ns.Name, ns.Labels)
	}
	for _, pod := range pods {
		pi, err := c.podInfoOf(pod)
		if err != nil {
			return nil, err
		}
		if pi != nil {
			if old := c.pods[pi.key]; old != nil {
				c.removePod(old)
				c.countPorts(old, -1)
			}
			c.addPod(pi)
			c.countPorts(pi, 1)
		}
	}
	for _, np := range policies {
		p, err := parsePolicy(np)
		if err != nil {
			return nil, err
		}
		c.retainPrefixes(p.prefixes)
		c.retainBlocks(p)
		if old := c.policies[p.key]; old != nil {
			c.releasePrefixes(old.p.prefixes)
			c.releaseBlocks(old.p)
		}
		c.policies[p.key] = &policyState{p: p, out: emptyOut}
	}
	// CIDR identities were allocated in input order above; hand them out
	// again in prefix order so a full compile of the same objects always
	// numbers them the same way.
	prefixes := slices.SortedFunc(maps.Keys(c.cidrs), netip.Prefix.Compare)
	c.nextCIDR = identity.MinCIDR
	for _, pf := range prefixes {
		c.cidrs[pf].id = c.nextCIDR
		c.nextCIDR++
	}
	changed := map[identity.ID]struct{}{}
	for _, key := range slices.Sorted(maps.Keys(c.policies)) {
		c.recomputeOne(key, changed)
	}
	return c, nil
}

// effectiveNSLabels adds the label the API server puts on every namespace,
// so selectors on kubernetes.io/metadata.name work on manifests that omit it.
func effectiveNSLabels(name string, l map[string]string) labels.Set {
	out := make(labels.Set, len(l)+1)
	maps.Copy(out, l)
	if _, ok := out[corev1.LabelMetadataName]; !ok {
		out[corev1.LabelMetadataName] = name
	}
	return out
}

// nsLabelsOf returns the labels a namespace's selector sees.
func (c *Compiler) nsLabelsOf(ns string) labels.Set {
	if l, ok := c.nsLabels[ns]; ok {
		return l
	}
	return labels.Set{corev1.LabelMetadataName: ns}
}

// nsObjectOf returns the Namespace passed to Identities: always with its
// effective labels, so a namespace the compiler has not seen yet and one
// that arrives with only the default label give the same identities.
func (c *Compiler) nsObjectOf(ns string) *corev1.Namespace {
	var out corev1.Namespace
	if o := c.namespaces[ns]; o != nil {
		out = *o.DeepCopy()
	}
	out.Name = ns
	out.Labels = map[string]string(c.nsLabelsOf(ns))
	return &out
}

// IsEndpoint reports whether pod's traffic is the pod's own, so that
// policies apply to it: host-network pods send as the node, and finished
// pods no longer own their address.
func IsEndpoint(pod *corev1.Pod) bool {
	if pod.Spec.HostNetwork {
		return false
	}
	return pod.Status.Phase != corev1.PodSucceeded && pod.Status.Phase != corev1.PodFailed
}

// podInfoOf returns nil for pods that are not endpoints.
func (c *Compiler) podInfoOf(pod *corev1.Pod) (*podInfo, error) {
	if pod.Name == "" || pod.Namespace == "" {
		return nil, fmt.Errorf("pod %q in namespace %q: name and namespace are required", pod.Name, pod.Namespace)
	}
	if !IsEndpoint(pod) {
		return nil, nil
	}
	key := policyKey(pod.Namespace, pod.Name)
	pi := &podInfo{key: key, ns: pod.Namespace, obj: pod, labels: labels.Set(maps.Clone(pod.Labels))}
	if pi.labels == nil {
		pi.labels = labels.Set{}
	}
	seen := map[netip.Addr]bool{}
	addIP := func(s string) error {
		if s == "" {
			return nil
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return fmt.Errorf("pod %s: status pod IP: %w", key, err)
		}
		a = a.Unmap()
		if !seen[a] {
			seen[a] = true
			pi.ips = append(pi.ips, a)
		}
		return nil
	}
	if err := addIP(pod.Status.PodIP); err != nil {
		return nil, err
	}
	for _, ip := range pod.Status.PodIPs {
		if err := addIP(ip.IP); err != nil {
			return nil, err
		}
	}
	slices.SortFunc(pi.ips, netip.Addr.Compare)
	// Restartable init containers (sidecars) serve ports too.
	for _, cs := range [][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for _, ct := range cs {
			for _, p := range ct.Ports {
				if p.Name == "" || p.ContainerPort < 1 || p.ContainerPort > 65535 {
					continue
				}
				proto := p.Protocol
				if proto == "" {
					proto = corev1.ProtocolTCP
				}
				pi.ports = append(pi.ports, containerPort{name: p.Name, proto: proto, port: uint16(p.ContainerPort)})
			}
		}
	}
	id, err := c.ids.IdentityOf(pod, c.nsObjectOf(pod.Namespace))
	if err != nil {
		return nil, fmt.Errorf("identity of pod %s: %w", key, err)
	}
	pi.id = id
	return pi, nil
}

// samePod reports whether replacing a with b changes nothing the compiler
// looks at.
func samePod(a, b *podInfo) bool {
	return a.id == b.id && labels.Equals(a.labels, b.labels) &&
		slices.Equal(a.ips, b.ips) && slices.Equal(a.ports, b.ports)
}

func groupKey(ns string, l labels.Set, id identity.ID) string {
	return ns + "\x00" + canonicalLabels(l) + "\x00" + id.String()
}

// addPod files pi under its group and returns the group, and whether the
// group is new.
func (c *Compiler) addPod(pi *podInfo) (*group, bool) {
	k := groupKey(pi.ns, pi.labels, pi.id)
	g := c.groups[k]
	created := g == nil
	if created {
		g = &group{key: k, ns: pi.ns, labels: pi.labels, id: pi.id, pods: map[string]*podInfo{}}
		c.groups[k] = g
		byNS := c.groupsByNS[pi.ns]
		if byNS == nil {
			byNS = map[string]*group{}
			c.groupsByNS[pi.ns] = byNS
		}
		byNS[k] = g
	}
	g.pods[pi.key] = pi
	pi.grp = g
	c.pods[pi.key] = pi
	return g, created
}

// removePod takes pi out of its group and reports whether the group is
// gone.
func (c *Compiler) removePod(pi *podInfo) bool {
	g := pi.grp
	delete(g.pods, pi.key)
	delete(c.pods, pi.key)
	if len(g.pods) > 0 {
		return false
	}
	delete(c.groups, g.key)
	delete(c.groupsByNS[g.ns], g.key)
	if len(c.groupsByNS[g.ns]) == 0 {
		delete(c.groupsByNS, g.ns)
	}
	return true
}

// countPorts adds (delta 1) or removes (-1) pi's containerPorts to its
// identity's and reports whether the identity's set of ports changed.
func (c *Compiler) countPorts(pi *podInfo, delta int) bool {
	if len(pi.ports) == 0 {
		return false
	}
	m := c.idPorts[pi.id]
	if m == nil {
		m = map[containerPort]int{}
		c.idPorts[pi.id] = m
	}
	changed := false
	for _, cp := range pi.ports {
		n := m[cp] + delta
		switch {
		case n <= 0:
			delete(m, cp)
			changed = true
		case n == 1 && delta > 0:
			m[cp] = n
			changed = true
		default:
			m[cp] = n
		}
	}
	if len(m) == 0 {
		delete(c.idPorts, pi.id)
	}
	return changed
}

// countBlocks adds or removes pi in every block index holding one of its
// addresses; when its identity enters or leaves a block, the policies
// naming the block go into affected.
func (c *Compiler) countBlocks(pi *podInfo, delta int, affected map[string]struct{}) {
	if len(pi.ips) == 0 {
		return
	}
	for _, bi := range c.blocks {
		if !slices.ContainsFunc(pi.ips, bi.peer.blockMatches) {
			continue
		}
		n := bi.counts[pi.id] + delta
		if n <= 0 {
			delete(bi.counts, pi.id)
		} else {
			bi.counts[pi.id] = n
		}
		if n <= 0 || (n == 1 && delta > 0) {
			for k := range bi.users {
				affected[k] = struct{}{}
			}
		}
	}
}

// retainBlocks registers p's ipBlocks, indexing the pods of blocks no other
// policy names yet.
func (c *Compiler) retainBlocks(p *parsedPolicy) {
	for ri := range p.rules {
		for _, peer := range p.rules[ri].peers {
			if !peer.isBlock() {
				continue
			}
			bi := c.blocks[peer.blockKey]
			if bi == nil {
				bi = &blockIndex{peer: peer, counts: map[identity.ID]int{}, users: map[string]int{}}
				for _, pi := range c.pods {
					if slices.ContainsFunc(pi.ips, peer.blockMatches) {
						bi.counts[pi.id]++
					}
				}
				for _, n := range c.nodes {
					if peer.blockMatches(n.ips[0]) {
						bi.counts[n.id]++
					}
				}
				c.blocks[peer.blockKey] = bi
			}
			bi.users[p.key]++
		}
	}
}

// releaseBlocks is the reverse of retainBlocks.
func (c *Compiler) releaseBlocks(p *parsedPolicy) {
	for ri := range p.rules {
		for _, peer := range p.rules[ri].peers {
			if !peer.isBlock() {
				continue
			}
			bi := c.blocks[peer.blockKey]
			if bi == nil {
				continue
			}
			bi.users[p.key]--
			if bi.users[p.key] <= 0 {
				delete(bi.users, p.key)
			}
			if len(bi.users) == 0 {
				delete(c.blocks, peer.blockKey)
			}
		}
	}
}

// movePods swaps pods out and in and recomputes the policies whose output
// can change: those naming an identity whose group vanished, those that
// select a new group, those with named ports on an identity whose ports
// changed, and those with a block that an identity entered or left. A pod
// that only moves between existing groups with the same ports and blocks
// recomputes nothing.
func (c *Compiler) movePods(out, in []*podInfo) Delta {
	affected := map[string]struct{}{}
	portsChanged := map[identity.ID]struct{}{}
	for _, pi := range out {
		if c.removePod(pi) {
			maps.Copy(affected, c.usedBy[pi.id])
		}
		if c.countPorts(pi, -1) {
			portsChanged[pi.id] = struct{}{}
		}
		c.countBlocks(pi, -1, affected)
	}
	var created []*group
	for _, pi := range in {
		if g, isNew := c.addPod(pi); isNew {
			created = append(created, g)
		}
		if c.countPorts(pi, 1) {
			portsChanged[pi.id] = struct{}{}
		}
		c.countBlocks(pi, 1, affected)
	}
	for id := range portsChanged {
		for key := range c.usedBy[id] {
			if c.policies[key].p.hasNamed {
				affected[key] = struct{}{}
			}
		}
	}
	if len(created) > 0 {
		for key, ps := range c.policies {
			if _, ok := affected[key]; ok {
				continue
			}
			for _, g := range created {
				if c.mayMatch(ps.p, g) {
					affected[key] = struct{}{}
					break
				}
			}
		}
	}
	changed := map[identity.ID]struct{}{}
	for key := range affected {
		c.recomputeOne(key, changed)
	}
	return Delta{Identities: sortedIDs(changed)}
}

// mayMatch reports whether a new group g can contribute to p's output: as a
// subject, as a selected peer, or as a destination that resolves a named
// port of an egress rule without "to". (Blocks are tracked by countBlocks.)
func (c *Compiler) mayMatch(p *parsedPolicy, g *group) bool {
	if g.ns == p.ns && p.subject.Matches(g.labels) {
		return true
	}
	var nsl labels.Set
	for ri := range p.rules {
		r := &p.rules[ri]
		if r.allPeers {
			if r.dir == policy.Egress && p.egressNamed {
				return true
			}
			continue
		}
		for pi := range r.peers {
			peer := &r.peers[pi]
			if peer.isBlock() {
				continue
			}
			if peer.nsSel == nil {
				if g.ns != p.ns {
					continue
				}
			} else {
				if nsl == nil {
					nsl = c.nsLabelsOf(g.ns)
				}
				if !peer.nsSel.Matches(nsl) {
					continue
				}
			}
			if peer.podSel.Matches(g.labels) {
				return true
			}
		}
	}
	return false
}

// recomputeOne compiles policy key again (or to nothing when it is gone) and
// records which subjects' output changed.
func (c *Compiler) recomputeOne(key string, changed map[identity.ID]struct{}) {
	ps := c.policies[key]
	old, nw := emptyOut, emptyOut
	if ps != nil {
		old = ps.out
		nw = c.computePolicy(ps.p)
		ps.out = nw
	}
	c.applyOut(key, old, nw, changed)
}

func sortedIDs(m map[identity.ID]struct{}) []identity.ID {
	if len(m) == 0 {
		return nil
	}
	return slices.Sorted(maps.Keys(m))
}

// retainPrefixes counts one more user of each prefix, allocating an
// identity for new ones, and returns the new ones.
func (c *Compiler) retainPrefixes(pfs []netip.Prefix) []CIDRIdentity {
	var added []CIDRIdentity
	for _, pf := range pfs {
		e := c.cidrs[pf]
		if e == nil {
			// Numbers are not reused: a stale ipcache or conntrack entry can
			// then never make one prefix look like another.
			e = &cidrEntry{id: c.nextCIDR}
			c.nextCIDR++
			c.cidrs[pf] = e
			added = append(added, CIDRIdentity{Prefix: pf, ID: e.id})
		}
		e.refs++
	}
	return added
}

// releasePrefixes is the reverse of retainPrefixes.
func (c *Compiler) releasePrefixes(pfs []netip.Prefix) []CIDRIdentity {
	var removed []CIDRIdentity
	for _, pf := range pfs {
		e := c.cidrs[pf]
		if e == nil {
			continue
		}
		e.refs--
		if e.refs == 0 {
			delete(c.cidrs, pf)
			removed = append(removed, CIDRIdentity{Prefix: pf, ID: e.id})
		}
	}
	return removed
}

// prefixWithin reports whether every address of inner is in outer.
func prefixWithin(inner, outer netip.Prefix) bool {
	return outer.Bits() <= inner.Bits() && outer.Contains(inner.Addr())
}

// UpsertPolicy adds or replaces a NetworkPolicy. An invalid policy is
// rejected with an error and the previous version, if any, stays in force.
func (c *Compiler) UpsertPolicy(np *networkingv1.NetworkPolicy) (Delta, error) {
	p, err := parsePolicy(np)
	if err != nil {
		return Delta{}, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.replacePolicy(p.key, p), nil
}

// DeletePolicy removes a NetworkPolicy; deleting an unknown one is a no-op.
// An empty namespace means "default", as for UpsertPolicy.
func (c *Compiler) DeletePolicy(namespace, name string) (Delta, error) {
	if namespace == "" {
		namespace = metav1.NamespaceDefault
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.replacePolicy(policyKey(namespace, name), nil), nil
}

func (c *Compiler) replacePolicy(key string, p *parsedPolicy) Delta {
	old := c.policies[key]
	if old == nil && p == nil {
		return Delta{}
	}
	var d Delta
	// Retain before release, so a prefix both versions name keeps its
	// identity.
	if p != nil {
		d.CIDRsAdded = c.retainPrefixes(p.prefixes)
		c.retainBlocks(p)
	}
	if old != nil {
		d.CIDRsRemoved = c.releasePrefixes(old.p.prefixes)
		c.releaseBlocks(old.p)
	}
	affected := map[string]struct{}{key: {}}
	// A new or vanished prefix changes which CIDR identities an enclosing
	// block covers, in every policy.
	for _, list := range [][]CIDRIdentity{d.CIDRsAdded, d.CIDRsRemoved} {
		for _, ci := range list {
			for k, ps := range c.policies {
				if k != key && policyEncloses(ps.p, ci.Prefix) {
					affected[k] = struct{}{}
				}
			}
		}
	}
	if p == nil {
		delete(c.policies, key)
	} else if old == nil {
		c.policies[key] = &policyState{p: p, out: emptyOut}
	} else {
		old.p = p
	}
	changed := map[identity.ID]struct{}{}
	if p == nil {
		c.applyOut(key, old.out, emptyOut, changed)
		delete(affected, key)
	}
	for k := range affected {
		c.recomputeOne(k, changed)
	}
	d.Identities = sortedIDs(changed)
	return d
}

// policyEncloses reports whether some ipBlock of p contains pf.
func policyEncloses(p *parsedPolicy, pf netip.Prefix) bool {
	for _, b := range p.prefixes {
		if prefixWithin(pf, b) {
			return true
		}
	}
	return false
}

// UpsertPod adds or replaces a Pod. A pod that stops being an endpoint
// (finished, or host network) is removed.
func (c *Compiler) UpsertPod(pod *corev1.Pod) (Delta, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	pi, err := c.podInfoOf(pod)
	if err != nil {
		return Delta{}, err
	}
	var key string
	if pi != nil {
		key = pi.key
	} else {
		key = policyKey(pod.Namespace, pod.Name)
	}
	old := c.pods[key]
	switch {
	case old == nil && pi == nil:
		return Delta{}, nil
	case old == nil:
		return c.movePods(nil, []*podInfo{pi}), nil
	case pi == nil:
		return c.movePods([]*podInfo{old}, nil), nil
	case samePod(old, pi):
		// Nothing compiled changed, but keep the newest object for later
		// identity look-ups.
		old.obj = pod
		return Delta{}, nil
	}
	return c.movePods([]*podInfo{old}, []*podInfo{pi}), nil
}

// DeletePod removes a Pod; deleting an unknown one is a no-op.
func (c *Compiler) DeletePod(namespace, name string) (Delta, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.pods[policyKey(namespace, name)]
	if old == nil {
		return Delta{}, nil
	}
	return c.movePods([]*podInfo{old}, nil), nil
}

// UpsertNamespace adds or replaces a Namespace. A label change gives its
// pods new identities, and recompiles whatever selected them before or
// selects them now.
func (c *Compiler) UpsertNamespace(ns *corev1.Namespace) (Delta, error) {
	if ns.Name == "" {
		return Delta{}, fmt.Errorf("namespace object without a name")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.setNamespace(ns.Name, ns)
}

// DeleteNamespace forgets a Namespace's labels. Its pods, if any are left,
// stay endpoints and see only the default namespace label until deleted.
func (c *Compiler) DeleteNamespace(name string) (Delta, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.namespaces[name] == nil {
		return Delta{}, nil
	}
	return c.setNamespace(name, nil)
}

func (c *Compiler) setNamespace(name string, ns *corev1.Namespace) (Delta, error) {
	oldObj, oldLabels := c.namespaces[name], c.nsLabels[name]
	hadLabels := c.nsLabelsOf(name)
	if ns != nil {
		c.namespaces[name] = ns
		c.nsLabels[name] = effectiveNSLabels(name, ns.Labels)
	} else {
		delete(c.namespaces, name)
		delete(c.nsLabels, name)
	}
	if labels.Equals(hadLabels, c.nsLabelsOf(name)) {
		return Delta{}, nil
	}
	// Ask for every new identity first, so a failing allocator leaves the
	// old state whole.
	var out, in []*podInfo
	for _, g := range c.groupsByNS[name] {
		for _, pi := range g.pods {
			npi, err := c.podInfoOf(pi.obj)
			if err != nil {
				if oldObj != nil {
					c.namespaces[name], c.nsLabels[name] = oldObj, oldLabels
				} else {
					delete(c.namespaces, name)
					delete(c.nsLabels, name)
				}
				return Delta{}, fmt.Errorf("namespace %s: %w", name, err)
			}
			out = append(out, pi)
			in = append(in, npi)
		}
	}
	// Even with identities unchanged (an allocator that ignores namespace
	// labels), namespaceSelectors may now match differently: movePods
	// recomputes the policies that select the groups, before or after.
	return c.movePods(out, in), nil
}

// Set returns every rule and isolation flag, ordered by subject identity,
// then policy, then rule.
func (c *Compiler) Set() *policy.Set {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := &policy.Set{Isolation: map[identity.ID]policy.Isolation{}}
	for _, id := range slices.Sorted(maps.Keys(c.subjects)) {
		if iso := c.isolationLocked(id); iso.Ingress || iso.Egress {
			s.Isolation[id] = iso
		}
		s.Rules = append(s.Rules, c.rulesLocked(id)...)
	}
	return s
}

// Rules returns the rules whose subject is id.
func (c *Compiler) Rules(id identity.ID) []policy.Rule {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.rulesLocked(id)
}

func (c *Compiler) rulesLocked(id identity.ID) []policy.Rule {
	var out []policy.Rule
	m := c.subjects[id]
	for _, k := range slices.Sorted(maps.Keys(m)) {
		out = m[k].appendRules(out, id)
	}
	return out
}

// Isolation returns in which directions NetworkPolicies isolate id. An
// identity no policy selects is not isolated.
func (c *Compiler) Isolation(id identity.ID) policy.Isolation {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.isolationLocked(id)
}

func (c *Compiler) isolationLocked(id identity.ID) policy.Isolation {
	var iso policy.Isolation
	for _, po := range c.subjects[id] {
		iso.Ingress = iso.Ingress || po.iso.Ingress
		iso.Egress = iso.Egress || po.iso.Egress
	}
	return iso
}

// IsolatedBy names ("ns/name", sorted) the policies that isolate id in dir.
func (c *Compiler) IsolatedBy(id identity.ID, dir policy.Direction) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for k, po := range c.subjects[id] {
		if po.iso.In(dir) {
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return out
}

// CIDRs returns the prefix -> identity list for the ipcache, sorted by
// prefix.
func (c *Compiler) CIDRs() []CIDRIdentity {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]CIDRIdentity, 0, len(c.cidrs))
	for pf, e := range c.cidrs {
		out = append(out, CIDRIdentity{Prefix: pf, ID: e.id})
	}
	slices.SortFunc(out, func(a, b CIDRIdentity) int { return a.Prefix.Compare(b.Prefix) })
	return out
}

// PodIdentity returns the identity of an endpoint pod.
func (c *Compiler) PodIdentity(namespace, name string) (identity.ID, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	pi := c.pods[policyKey(namespace, name)]
	if pi == nil {
		return 0, false
	}
	return pi.id, true
}

// Stats counts what the compiler holds.
type Stats struct {
	Pods, Groups, Policies, Subjects, Rules, CIDRs int
}

// Stats returns current counts, for metrics and benchmarks.
func (c *Compiler) Stats() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := Stats{Pods: len(c.pods), Groups: len(c.groups), Policies: len(c.policies), Subjects: len(c.subjects), CIDRs: len(c.cidrs)}
	var buf []policy.Rule
	for id, m := range c.subjects {
		for _, po := range m {
			buf = po.appendRules(buf[:0], id)
			s.Rules += len(buf)
		}
	}
	return s
}

// IdentityOfAddr resolves an address as the datapath's ipcache would: a
// node address to host or remote-node, a pod address to its pod's
// identity, anything else
// to the CIDR identity of the longest prefix containing it, or to world. It
// scans every pod: a reference for tests and offline tools, not a lookup
// for hot paths.
func (c *Compiler) IdentityOfAddr(a netip.Addr) identity.ID {
	c.mu.Lock()
	defer c.mu.Unlock()
	a = a.Unmap()
	if n, ok := c.nodes[a]; ok {
		return n.id
	}
	for _, pi := range c.pods {
		if slices.Contains(pi.ips, a) {
			return pi.id
		}
	}
	best, id := -1, identity.World
	for pf, e := range c.cidrs {
		if pf.Contains(a) && pf.Bits() > best {
			best, id = pf.Bits(), e.id
		}
	}
	return id
}

// SetNodeAddrs declares the node addresses the ipcache resolves to
// reserved identities: local, the node's own, to identity.Host, and
// remote, every other node's, to identity.RemoteNode. An address in both
// is local: the ipcache holds one identity per address, and the local
// node's own traffic must stay host.
//
// NetworkPolicy ipBlocks match node addresses like any other address
// outside the cluster, so a block holding one of them (outside its
// excepts) also allows that address's identity as a peer; without this,
// egress to a host-network service such as the API server could never be
// allowed by an ipBlock. Selectors never match a node.
func (c *Compiler) SetNodeAddrs(local, remote []netip.Addr) Delta {
	c.mu.Lock()
	defer c.mu.Unlock()
	want := map[netip.Addr]identity.ID{}
	for _, a := range remote {
		want[a.Unmap()] = identity.RemoteNode
	}
	for _, a := range local {
		want[a.Unmap()] = identity.Host
	}
	affected := map[string]struct{}{}
	for a, n := range c.nodes {
		if want[a] != n.id {
			c.countBlocks(n, -1, affected)
			delete(c.nodes, a)
		}
	}
	for a, id := range want {
		if _, ok := c.nodes[a]; ok {
			continue
		}
		n := &podInfo{key: "node " + a.String(), ips: []netip.Addr{a}, id: id}
		c.nodes[a] = n
		c.countBlocks(n, 1, affected)
	}
	changed := map[identity.ID]struct{}{}
	for key := range affected {
		c.recomputeOne(key, changed)
	}
	return Delta{Identities: sortedIDs(changed)}
}
