package netpol

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/mattfenwick/cyclonus/pkg/connectivity/probe"
	"github.com/mattfenwick/cyclonus/pkg/generator"
	"github.com/mattfenwick/cyclonus/pkg/matcher"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// The oracle: cyclonus v0.5.6's pure-Go matcher, run on every test case its
// default generator produces, against this compiler plus policy.Set.Allowed,
// cell by cell (pod pair x port x protocol).
//
// The matcher departs from the Kubernetes API in two known places, and the
// API documentation decides both:
//
//  1. NotIn on a key the object does not have. The matcher says no match.
//     The Kubernetes documentation (Labels and Selectors, set-based
//     requirements) says: "tier notin (frontend, backend)" selects "all
//     resources with key equal to tier and values other than frontend and
//     backend, and all resources with no labels with the tier key". So the
//     object matches.
//
//  2. matchLabels {k: ""} on an object without k. The matcher compares
//     labels[k] == "" and so matches. The API (metav1.LabelSelector) says:
//     "A single {key,value} in the matchLabels map is equivalent to an
//     element of matchExpressions, whose key field is "key", the operator is
//     "In", and the values array contains only "value"", and In selects
//     "all resources with key equal to" the key and a listed value: an
//     object without k does not match.
//
// Neither difference is skipped. Every policy is also rewritten into an
// equivalent set of policies (equivalent under the API's semantics) on which
// the matcher's semantics coincide with the API's: matchLabels {k: v}
// becomes "k In (v)", and a selector with "k NotIn (V)" becomes two
// alternatives, one with "k DoesNotExist" and one with "k NotIn (V)" (which
// the matcher reads as "k present and not in V"); alternatives of a peer
// become several peers, alternatives of spec.podSelector several policies
// (policies and peers are unions, so this is exact). Each cell is then
// decided by the matcher on the original policies (the raw oracle) and on
// the rewritten ones (the corrected oracle). The compiler must agree with
// the corrected oracle on every cell; cells where raw and corrected differ
// are counted as documented differences, by cause.
//
// Nodes are probed too: the matcher sees a node address as an address
// outside the cluster (ipBlocks match it, selectors do not), which is what
// the compiler must make of it. At every step each node layout below is
// set with SetNodeAddrs in turn, and every pod's ingress from each remote
// node address and egress to each node address (local and remote) is
// decided by both. The remote addresses of one layout sit in the same
// place relative to every block the generator makes (the /24 and the /28
// around z/c, 0.0.0.0/0, 0.0.0.0/31), because the ipcache gives all remote
// nodes one identity: a block admits all of them or none (doc.go,
// "Identities, not pods"). Ingress from the local node is not compared:
// the datapath admits it whatever the policy.
//
// The harness models what a real API server does to the objects the
// generator's actions create: every namespace carries
// kubernetes.io/metadata.name=<name> (the matcher's own mock adds it for
// the initial namespaces, but its SetNamespaceLabels and CreateNamespace
// actions drop it), and deleting a namespace deletes its pods and policies.

// oracleCounts accumulates one run's numbers.
type oracleCounts struct {
	cases, steps, cells            int
	agree                          int // ours == raw matcher
	diffNotIn, diffEmptyValue      int // raw != corrected, by cause (a cell may have both)
	documented                     int // raw != corrected
	unprobeable                    int // jobs the matcher's job builder cannot form (port not served)
	mismatches                     int // ours != corrected: failures
	allowedCells, deniedCells      int
	byFamily                       map[string][3]int // cases, cells, documented
	firstMismatches                []string
	incrementalChecks, incMismatch int
	mapStateMismatch               int
	nodeCells, nodeAllowed         int
	nodeMismatches                 int
}

const (
	oraclePodCIDRHint = "10.244.1.5" // z/c: the generator builds its ipBlocks around it
)

// oracleIPs spreads pods so the generator's blocks (the /24 and the /28
// around z/c) split them: some inside the /28, some only in the /24, some
// outside both.
var oracleIPs = map[string]string{
	"x/a": "10.244.1.2", "x/b": "10.244.1.20", "x/c": "10.244.2.3",
	"y/a": "10.244.1.14", "y/b": "10.244.2.4", "y/c": "10.244.1.200",
	"z/a": "10.244.1.21", "z/b": "10.244.1.3", "z/c": oraclePodCIDRHint,
}

// nodeLayout is one set of node addresses, in matching positions relative
// to the generator's blocks (see the top of this file).
type nodeLayout struct {
	local, remote []netip.Addr
}

var oracleNodeLayouts = []nodeLayout{
	// Remote nodes in the /24, outside the /28 (the except); the local
	// node likewise.
	{local: addrs("10.244.1.150"), remote: addrs("10.244.1.100", "10.244.1.120")},
	// A remote node inside the /28, the except of "ipblock with except";
	// the local node outside every block but 0.0.0.0/0.
	{local: addrs("192.0.2.1"), remote: addrs("10.244.1.9")},
	// Remote nodes outside every block but 0.0.0.0/0; the local node
	// inside the /28.
	{local: addrs("10.244.1.10"), remote: addrs("198.51.100.7", "203.0.113.9")},
}

func addrs(s ...string) []netip.Addr {
	out := make([]netip.Addr, 0, len(s))
	for _, a := range s {
		out = append(out, netip.MustParseAddr(a))
	}
	return out
}

// oracleCluster is the simulated cluster of one test case, kept in the
// matcher's form (probe.Resources, policy list) and fed to a Compiler.
type oracleCluster struct {
	t        *testing.T
	res      *probe.Resources
	policies []*networkingv1.NetworkPolicy
	c        *Compiler
	ids      *MemoryIdentities
	nextIP   int
	nodes    nodeLayout // as last given to SetNodeAddrs
}

func newOracleCluster(t *testing.T) *oracleCluster {
	oc := &oracleCluster{t: t, res: &probe.Resources{Namespaces: map[string]map[string]string{}}, nextIP: 1}
	var nss []*corev1.Namespace
	var pods []*corev1.Pod
	for _, ns := range []string{"x", "y", "z"} {
		oc.res.Namespaces[ns] = apiServerNSLabels(ns, map[string]string{"ns": ns})
		nss = append(nss, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: oc.res.Namespaces[ns]}})
		for _, name := range []string{"a", "b", "c"} {
			p := probe.NewDefaultPod(ns, name, []int{80, 81}, []corev1.Protocol{corev1.ProtocolTCP, corev1.ProtocolUDP, corev1.ProtocolSCTP}, false, "registry.invalid")
			p.IP = oracleIPs[ns+"/"+name]
			oc.res.Pods = append(oc.res.Pods, p)
			pods = append(pods, kubePod(p))
		}
	}
	oc.ids = NewMemoryIdentities()
	c, err := Compile(oc.ids, nss, pods, nil)
	if err != nil {
		t.Fatalf("compile initial cluster: %v", err)
	}
	oc.c = c
	return oc
}

// apiServerNSLabels is what the API server stores for a namespace created
// or relabelled with l.
func apiServerNSLabels(name string, l map[string]string) map[string]string {
	out := maps.Clone(l)
	if out == nil {
		out = map[string]string{}
	}
	out[corev1.LabelMetadataName] = name
	return out
}

func kubePod(p *probe.Pod) *corev1.Pod {
	kp := p.KubePod()
	kp.Status.PodIP = p.IP
	kp.Status.Phase = corev1.PodRunning
	return kp
}

func (oc *oracleCluster) must(_ Delta, err error) {
	oc.t.Helper()
	if err != nil {
		oc.t.Fatal(err)
	}
}

func (oc *oracleCluster) apply(a *generator.Action) {
	t := oc.t
	t.Helper()
	var err error
	switch {
	case a.CreatePolicy != nil || a.UpdatePolicy != nil:
		np := a.CreatePolicy
		var pol *networkingv1.NetworkPolicy
		if np != nil {
			pol = np.Policy
		} else {
			pol = a.UpdatePolicy.Policy
		}
		oc.policies = slices.DeleteFunc(oc.policies, func(p *networkingv1.NetworkPolicy) bool {
			return p.Namespace == pol.Namespace && p.Name == pol.Name
		})
		oc.policies = append(oc.policies, pol)
		oc.must(oc.c.UpsertPolicy(pol))
	case a.DeletePolicy != nil:
		d := a.DeletePolicy
		oc.policies = slices.DeleteFunc(oc.policies, func(p *networkingv1.NetworkPolicy) bool {
			return p.Namespace == d.Namespace && p.Name == d.Name
		})
		oc.must(oc.c.DeletePolicy(d.Namespace, d.Name))
	case a.CreateNamespace != nil:
		ns := a.CreateNamespace
		l := apiServerNSLabels(ns.Namespace, ns.Labels)
		oc.res, err = oc.res.CreateNamespace(ns.Namespace, l)
		oc.must(Delta{}, err)
		oc.must(oc.c.UpsertNamespace(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns.Namespace, Labels: l}}))
	case a.SetNamespaceLabels != nil:
		ns := a.SetNamespaceLabels
		l := apiServerNSLabels(ns.Namespace, ns.Labels)
		oc.res, err = oc.res.UpdateNamespaceLabels(ns.Namespace, l)
		oc.must(Delta{}, err)
		oc.must(oc.c.UpsertNamespace(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns.Namespace, Labels: l}}))
	case a.DeleteNamespace != nil:
		name := a.DeleteNamespace.Namespace
		for _, p := range oc.res.Pods {
			if p.Namespace == name {
				oc.must(oc.c.DeletePod(p.Namespace, p.Name))
			}
		}
		oc.policies = slices.DeleteFunc(oc.policies, func(p *networkingv1.NetworkPolicy) bool {
			if p.Namespace == name {
				oc.must(oc.c.DeletePolicy(p.Namespace, p.Name))
				return true
			}
			return false
		})
		oc.res, err = oc.res.DeleteNamespace(name)
		oc.must(Delta{}, err)
		oc.must(oc.c.DeleteNamespace(name))
	case a.CreatePod != nil:
		cp := a.CreatePod
		oc.res, err = oc.res.CreatePod(cp.Namespace, cp.Pod, cp.Labels)
		oc.must(Delta{}, err)
		p, err := oc.res.GetPod(cp.Namespace, cp.Pod)
		oc.must(Delta{}, err)
		// The matcher's CreatePod leaves the address to the cluster.
		p.IP = fmt.Sprintf("10.244.3.%d", oc.nextIP)
		oc.nextIP++
		oc.must(oc.c.UpsertPod(kubePod(p)))
	case a.SetPodLabels != nil:
		sl := a.SetPodLabels
		oc.res, err = oc.res.SetPodLabels(sl.Namespace, sl.Pod, sl.Labels)
		oc.must(Delta{}, err)
		p, err := oc.res.GetPod(sl.Namespace, sl.Pod)
		oc.must(Delta{}, err)
		oc.must(oc.c.UpsertPod(kubePod(p)))
	case a.DeletePod != nil:
		dp := a.DeletePod
		oc.res, err = oc.res.DeletePod(dp.Namespace, dp.Pod)
		oc.must(Delta{}, err)
		oc.must(oc.c.DeletePod(dp.Namespace, dp.Pod))
	case a.ReadNetworkPolicies != nil:
		// Reads the cluster's policies back: nothing changes.
	default:
		t.Fatalf("unknown action %+v", a)
	}
}

// fullCompile compiles the current objects from scratch, to hold the
// incremental path to it here too.
func (oc *oracleCluster) fullCompile() *Compiler {
	var nss []*corev1.Namespace
	for name, l := range oc.res.Namespaces {
		nss = append(nss, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: l}})
	}
	var pods []*corev1.Pod
	for _, p := range oc.res.Pods {
		pods = append(pods, kubePod(p))
	}
	c, err := Compile(oc.ids, nss, pods, oc.policies)
	if err != nil {
		oc.t.Fatalf("full compile: %v", err)
	}
	c.SetNodeAddrs(oc.nodes.local, oc.nodes.remote)
	return c
}

var oracleProto = map[corev1.Protocol]policy.Proto{
	corev1.ProtocolTCP: policy.ProtoTCP, corev1.ProtocolUDP: policy.ProtoUDP, corev1.ProtocolSCTP: policy.ProtoSCTP,
}

func (oc *oracleCluster) probe(family, desc string, stepIdx int, pc *generator.ProbeConfig, n *oracleCounts) {
	t := oc.t
	raw := matcher.BuildNetworkPolicies(true, oc.policies)
	fixNotIn := matcher.BuildNetworkPolicies(true, k8sEquivalent(oc.policies, true, false))
	fixEmpty := matcher.BuildNetworkPolicies(true, k8sEquivalent(oc.policies, false, true))
	corrected := matcher.BuildNetworkPolicies(true, k8sEquivalent(oc.policies, true, true))
	set := oc.c.Set()
	// The map contents the agent would write must decide the same way: the
	// datapath is tested against MapState, so this closes the chain.
	ms, err := set.Compile()
	if err != nil {
		t.Fatalf("%s step %d: compile to map state: %v", desc, stepIdx, err)
	}

	jobs := (&probe.JobBuilder{TimeoutSeconds: 1}).GetJobsForProbeConfig(oc.res, pc)
	n.unprobeable += len(jobs.BadNamedPort) + len(jobs.BadPortProtocol)
	fam := n.byFamily[family]
	for _, job := range jobs.Valid {
		src, ok1 := oc.c.PodIdentity(job.FromNamespace, job.FromPod)
		ns, name := splitKey(job.ToKey)
		dst, ok2 := oc.c.PodIdentity(ns, name)
		if !ok1 || !ok2 {
			t.Fatalf("%s: no identity for %s or %s", desc, job.FromKey, job.ToKey)
		}
		traffic := job.Traffic()
		rawOK := raw.IsTrafficAllowed(traffic).IsAllowed()
		want := corrected.IsTrafficAllowed(traffic).IsAllowed()
		proto, port := oracleProto[job.Protocol], uint16(job.ResolvedPort)
		got := set.Allowed(src, dst, proto, port)
		eg, _ := ms.Decide(src, policy.Egress, dst, proto, port)
		in, _ := ms.Decide(dst, policy.Ingress, src, proto, port)
		if (eg && in) != got {
			n.mapStateMismatch++
			t.Errorf("%s step %d: %s -> %s: Set says %v, MapState %v", desc, stepIdx, job.FromKey, job.ToKey, got, eg && in)
		}
		n.cells++
		fam[1]++
		if got {
			n.allowedCells++
		} else {
			n.deniedCells++
		}
		if got == rawOK {
			n.agree++
		}
		if rawOK != want {
			n.documented++
			fam[2]++
			if fixNotIn.IsTrafficAllowed(traffic).IsAllowed() != rawOK {
				n.diffNotIn++
			}
			if fixEmpty.IsTrafficAllowed(traffic).IsAllowed() != rawOK {
				n.diffEmptyValue++
			}
		}
		if got != want {
			n.mismatches++
			if len(n.firstMismatches) < 20 {
				n.firstMismatches = append(n.firstMismatches, fmt.Sprintf("%s [%s] step %d: %s -> %s %s/%d (%s): compiler %v, oracle %v",
					family, desc, stepIdx, job.FromKey, job.ToKey, job.Protocol, job.ResolvedPort, job.ResolvedPortName, got, want))
			}
		}
	}
	n.byFamily[family] = fam
	for _, l := range oracleNodeLayouts {
		oc.probeNodes(desc, stepIdx, l, jobs.Valid, corrected, n)
	}

	// Incremental state equals a full compile of the same objects.
	n.incrementalChecks++
	if d := differingSubjects(takeSnapshot(oc.c), takeSnapshot(oc.fullCompile())); len(d) > 0 {
		n.incMismatch++
		t.Errorf("%s [%s] step %d: incremental differs from full compile for %v", family, desc, stepIdx, d)
	}
}

// probeNodes decides, for one node layout, every pod's ingress from each
// remote node and egress to each node, on the ports and protocols of the
// step's jobs.
func (oc *oracleCluster) probeNodes(desc string, stepIdx int, l nodeLayout, jobs []*probe.Job, oracle *matcher.Policy, n *oracleCounts) {
	t := oc.t
	oc.nodes = l
	oc.c.SetNodeAddrs(l.local, l.remote)
	set := oc.c.Set()
	ms, err := set.Compile()
	if err != nil {
		t.Fatalf("%s step %d: compile to map state: %v", desc, stepIdx, err)
	}
	cell := func(what string, tr *matcher.Traffic, src, dst identity.ID) {
		proto, port := oracleProto[tr.Protocol], uint16(tr.ResolvedPort)
		want := oracle.IsTrafficAllowed(tr).IsAllowed()
		got := set.Allowed(src, dst, proto, port)
		eg, _ := ms.Decide(src, policy.Egress, dst, proto, port)
		in, _ := ms.Decide(dst, policy.Ingress, src, proto, port)
		if (eg && in) != got {
			n.mapStateMismatch++
			t.Errorf("%s step %d: %s: Set says %v, MapState %v", desc, stepIdx, what, got, eg && in)
		}
		n.nodeCells++
		if got {
			n.nodeAllowed++
		}
		if got != want {
			n.nodeMismatches++
			if len(n.firstMismatches) < 20 {
				n.firstMismatches = append(n.firstMismatches, fmt.Sprintf("[%s] step %d: %s %s/%d: compiler %v, oracle %v", desc, stepIdx, what, tr.Protocol, tr.ResolvedPort, got, want))
			}
		}
	}
	seen := map[string]bool{}
	for _, job := range jobs {
		src, _ := oc.c.PodIdentity(job.FromNamespace, job.FromPod)
		dstNS, dstName := splitKey(job.ToKey)
		dst, _ := oc.c.PodIdentity(dstNS, dstName)
		for _, a := range l.remote {
			key := fmt.Sprintf("in %s %s %s/%d", a, job.ToKey, job.Protocol, job.ResolvedPort)
			if seen[key] {
				continue
			}
			seen[key] = true
			tr := job.Traffic()
			tr.Source = &matcher.TrafficPeer{IP: a.String()}
			if id := oc.c.IdentityOfAddr(a); id != identity.RemoteNode {
				t.Fatalf("remote node %s resolves to %s", a, id)
			}
			cell(fmt.Sprintf("remote node %s -> %s", a, job.ToKey), tr, identity.RemoteNode, dst)
		}
		for _, a := range slices.Concat(l.local, l.remote) {
			key := fmt.Sprintf("out %s %s %s/%d", job.FromKey, a, job.Protocol, job.ResolvedPort)
			if seen[key] {
				continue
			}
			seen[key] = true
			tr := job.Traffic()
			tr.Destination = &matcher.TrafficPeer{IP: a.String()}
			// A node declares no container ports: named ports never
			// match it.
			tr.ResolvedPortName = ""
			cell(fmt.Sprintf("%s -> node %s", job.FromKey, a), tr, src, oc.c.IdentityOfAddr(a))
		}
	}
}

func runOracleCase(t *testing.T, family string, tc *generator.TestCase, n *oracleCounts) {
	oc := newOracleCluster(t)
	n.cases++
	fam := n.byFamily[family]
	fam[0]++
	n.byFamily[family] = fam
	for i, step := range tc.Steps {
		for _, a := range step.Actions {
			oc.apply(a)
		}
		n.steps++
		oc.probe(family, tc.Description, i, step.Probe, n)
	}
}

// k8sEquivalent rewrites policies as described at the top of this file.
func k8sEquivalent(pols []*networkingv1.NetworkPolicy, splitNotIn, emptyValues bool) []*networkingv1.NetworkPolicy {
	var out []*networkingv1.NetworkPolicy
	for _, p := range pols {
		subjects := alternatives(&p.Spec.PodSelector, splitNotIn, emptyValues)
		for i, s := range subjects {
			np := p.DeepCopy()
			if len(subjects) > 1 {
				np.Name = fmt.Sprintf("%s-alt%d", p.Name, i)
			}
			np.Spec.PodSelector = *s
			for r := range np.Spec.Ingress {
				np.Spec.Ingress[r].From = expandPeers(np.Spec.Ingress[r].From, splitNotIn, emptyValues)
			}
			for r := range np.Spec.Egress {
				np.Spec.Egress[r].To = expandPeers(np.Spec.Egress[r].To, splitNotIn, emptyValues)
			}
			out = append(out, np)
		}
	}
	return out
}

func expandPeers(peers []networkingv1.NetworkPolicyPeer, splitNotIn, emptyValues bool) []networkingv1.NetworkPolicyPeer {
	var out []networkingv1.NetworkPolicyPeer
	for _, peer := range peers {
		if peer.IPBlock != nil {
			out = append(out, peer)
			continue
		}
		pods := alternatives(peer.PodSelector, splitNotIn, emptyValues)
		nss := alternatives(peer.NamespaceSelector, splitNotIn, emptyValues)
		for _, ps := range pods {
			for _, ns := range nss {
				out = append(out, networkingv1.NetworkPolicyPeer{PodSelector: ps, NamespaceSelector: ns})
			}
		}
	}
	return out
}

// alternatives returns selectors whose union, under the API's semantics,
// selects what s selects, and on which the matcher agrees with the API. A
// nil selector stays nil: nil and empty mean different things in a peer.
func alternatives(s *metav1.LabelSelector, splitNotIn, emptyValues bool) []*metav1.LabelSelector {
	if s == nil {
		return []*metav1.LabelSelector{nil}
	}
	base := &metav1.LabelSelector{}
	for _, k := range slices.Sorted(maps.Keys(s.MatchLabels)) {
		v := s.MatchLabels[k]
		if emptyValues {
			base.MatchExpressions = append(base.MatchExpressions, metav1.LabelSelectorRequirement{Key: k, Operator: metav1.LabelSelectorOpIn, Values: []string{v}})
		} else {
			if base.MatchLabels == nil {
				base.MatchLabels = map[string]string{}
			}
			base.MatchLabels[k] = v
		}
	}
	alts := []*metav1.LabelSelector{base}
	for _, e := range s.MatchExpressions {
		var next []*metav1.LabelSelector
		for _, a := range alts {
			if splitNotIn && e.Operator == metav1.LabelSelectorOpNotIn {
				absent := a.DeepCopy()
				absent.MatchExpressions = append(absent.MatchExpressions, metav1.LabelSelectorRequirement{Key: e.Key, Operator: metav1.LabelSelectorOpDoesNotExist})
				next = append(next, absent)
			}
			b := a.DeepCopy()
			b.MatchExpressions = append(b.MatchExpressions, e)
			next = append(next, b)
		}
		alts = next
	}
	return alts
}

// supplementaryCases exercise the two known differences; the default
// generator's cases never reach them (every pod has "pod", every namespace
// "ns", and no selector uses an empty value).
func supplementaryCases() []*generator.TestCase {
	tcp := corev1.ProtocolTCP
	ingress := func(name string, subject metav1.LabelSelector, peers ...networkingv1.NetworkPolicyPeer) *networkingv1.NetworkPolicy {
		return &networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: name},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: subject,
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
				Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: peers, Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp}}}},
			},
		}
	}
	egress := func(name string, peers ...networkingv1.NetworkPolicyPeer) *networkingv1.NetworkPolicy {
		return &networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "y", Name: name},
			Spec: networkingv1.NetworkPolicySpec{
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
				Egress:      []networkingv1.NetworkPolicyEgressRule{{To: peers}},
			},
		}
	}
	all := generator.ProbeAllAvailable
	return []*generator.TestCase{
		generator.NewTestCase("NotIn on a pod label nobody has", nil,
			generator.NewTestStep(all, generator.CreatePolicy(ingress("notin-pod", metav1.LabelSelector{},
				networkingv1.NetworkPolicyPeer{PodSelector: expr("team", metav1.LabelSelectorOpNotIn, "red"), NamespaceSelector: &metav1.LabelSelector{}}))),
			generator.NewTestStep(all, generator.SetPodLabels("y", "b", map[string]string{"pod": "b", "team": "red"})),
			generator.NewTestStep(all, generator.SetPodLabels("y", "c", map[string]string{"pod": "c", "team": "blue"}))),
		generator.NewTestCase("NotIn on a namespace label nobody has", nil,
			generator.NewTestStep(all, generator.CreatePolicy(ingress("notin-ns", *sel("pod", "a"),
				nsPeer(expr("env", metav1.LabelSelectorOpNotIn, "prod"))))),
			generator.NewTestStep(all, generator.SetNamespaceLabels("z", map[string]string{"ns": "z", "env": "prod"}))),
		generator.NewTestCase("NotIn in spec.podSelector", nil,
			generator.NewTestStep(all, generator.CreatePolicy(ingress("notin-subject", *expr("team", metav1.LabelSelectorOpNotIn, "red"),
				podPeer(sel("pod", "a"))))),
			generator.NewTestStep(all, generator.SetPodLabels("x", "b", map[string]string{"pod": "b", "team": "red"}))),
		generator.NewTestCase("matchLabels with an empty value", nil,
			generator.NewTestStep(all, generator.CreatePolicy(ingress("empty-value", metav1.LabelSelector{},
				networkingv1.NetworkPolicyPeer{PodSelector: sel("role", ""), NamespaceSelector: &metav1.LabelSelector{}}))),
			generator.NewTestStep(all, generator.SetPodLabels("z", "a", map[string]string{"pod": "a", "role": ""}))),
		generator.NewTestCase("egress to namespaces by empty value and NotIn", nil,
			generator.NewTestStep(all, generator.CreatePolicy(egress("egress-mixed",
				nsPeer(sel("env", "")),
				podPeer(expr("tier", metav1.LabelSelectorOpNotIn, "db"))))),
			generator.NewTestStep(all, generator.SetNamespaceLabels("x", map[string]string{"ns": "x", "env": ""}))),
	}
}

func TestCyclonusOracle(t *testing.T) {
	for _, allowDNS := range []bool{true, false} {
		t.Run(fmt.Sprintf("allowDNS=%v", allowDNS), func(t *testing.T) {
			g := generator.NewTestCaseGenerator(allowDNS, oraclePodCIDRHint, []string{"x", "y", "z"}, nil, nil)
			families := []struct {
				name  string
				cases []*generator.TestCase
			}{
				{"target", g.TargetTestCases()},
				{"rules", g.RulesTestCases()},
				{"peers", g.PeersTestCases()},
				{"port-protocol", g.PortProtocolTestCases()},
				{"example", g.ExampleTestCases()},
				{"action", g.ActionTestCases()},
				{"conflict", g.ConflictTestCases()},
				{"namespace", g.NamespaceTestCases()},
				{"upstream-e2e", g.UpstreamE2ETestCases()},
				{"supplementary (ours)", supplementaryCases()},
			}
			total := 0
			for _, f := range families[:len(families)-1] {
				total += len(f.cases)
			}
			if all := len(g.GenerateAllTestCases()); all != total {
				t.Fatalf("families cover %d cases, the generator has %d", total, all)
			}
			n := &oracleCounts{byFamily: map[string][3]int{}}
			for _, f := range families {
				for _, tc := range f.cases {
					runOracleCase(t, f.name, tc, n)
				}
			}
			var b strings.Builder
			fmt.Fprintf(&b, "cyclonus oracle (allowDNS=%v): %d cases (%d generated + %d supplementary), %d probe steps, %d cells (%d allowed, %d denied), %d unprobeable jobs left out by the job builder\n",
				allowDNS, n.cases, total, n.cases-total, n.steps, n.cells, n.allowedCells, n.deniedCells, n.unprobeable)
			fmt.Fprintf(&b, "  agree with raw matcher: %d; documented differences: %d (NotIn with missing key: %d, matchLabels empty value: %d); disagreements with corrected oracle: %d\n",
				n.agree, n.documented, n.diffNotIn, n.diffEmptyValue, n.mismatches)
			fmt.Fprintf(&b, "  incremental == full compile: %d/%d steps; MapState disagreements with Set: %d\n", n.incrementalChecks-n.incMismatch, n.incrementalChecks, n.mapStateMismatch)
			fmt.Fprintf(&b, "  nodes: %d cells (%d allowed) in %d layouts, %d disagreements with the oracle\n", n.nodeCells, n.nodeAllowed, len(oracleNodeLayouts), n.nodeMismatches)
			for _, f := range families {
				c := n.byFamily[f.name]
				fmt.Fprintf(&b, "  %-22s %4d cases %7d cells %5d documented differences\n", f.name, c[0], c[1], c[2])
			}
			t.Log(b.String())
			for _, m := range n.firstMismatches {
				t.Error(m)
			}
			if n.mismatches > 0 {
				t.Fatalf("%d cells disagree with the corrected oracle", n.mismatches)
			}
			if n.nodeMismatches > 0 {
				t.Fatalf("%d node cells disagree with the corrected oracle", n.nodeMismatches)
			}
			if n.nodeAllowed == 0 || n.nodeAllowed == n.nodeCells {
				t.Fatalf("node cells: %d of %d allowed; the probe tells nothing apart", n.nodeAllowed, n.nodeCells)
			}
			if n.documented != n.cells-n.agree {
				t.Fatalf("%d cells differ from the raw matcher but only %d are documented differences", n.cells-n.agree, n.documented)
			}
		})
	}
}
