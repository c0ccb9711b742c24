package netpol

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// The property: after any sequence of changes, the incrementally maintained
// Compiler holds exactly what a full Compile of the same objects yields, and
// each Delta names every identity whose rules or isolation changed.

type randCluster struct {
	r      *rand.Rand
	local  []netip.Addr // node addresses: host
	remote []netip.Addr // and remote-node
	nss    map[string]*corev1.Namespace
	pods   map[string]*corev1.Pod
	pols   map[string]*networkingv1.NetworkPolicy
}

var (
	nsNames  = []string{"n0", "n1", "n2", "n3"}
	podNames = []string{"p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p9"}
	polNames = []string{"q0", "q1", "q2", "q3", "q4"}
	cidrPool = [][]string{
		{"10.0.0.0/24"},
		{"10.0.0.0/28", "10.0.0.4/30"},
		{"10.0.0.8/29"},
		{"10.0.0.0/16", "10.0.0.0/29", "10.0.0.12/30"},
		{"0.0.0.0/0", "10.0.0.0/8"},
		{"192.168.0.0/24"},
	}
)

func (rc *randCluster) pick(s []string) string { return s[rc.r.IntN(len(s))] }

func (rc *randCluster) labels(keys map[string][]string) map[string]string {
	m := map[string]string{}
	for k, vals := range keys {
		if rc.r.IntN(3) > 0 {
			m[k] = vals[rc.r.IntN(len(vals))]
		}
	}
	return m
}

func (rc *randCluster) randNS() *corev1.Namespace {
	ns := mkNS(rc.pick(nsNames))
	ns.Labels = rc.labels(map[string][]string{"team": {"red", "blue"}, "env": {"prod", ""}})
	return ns
}

func (rc *randCluster) randPod() *corev1.Pod {
	lbl := rc.labels(map[string][]string{"app": {"a", "b", "c"}, "tier": {"x", ""}})
	ip := ""
	if rc.r.IntN(8) > 0 {
		ip = fmt.Sprintf("10.0.0.%d", 1+rc.r.IntN(16))
	}
	var ports []portSpec
	if rc.r.IntN(2) == 0 {
		ports = append(ports, portSpec{"http", []int32{80, 8080}[rc.r.IntN(2)], corev1.ProtocolTCP})
	}
	if rc.r.IntN(3) == 0 {
		ports = append(ports, portSpec{"dns", 53, corev1.ProtocolUDP})
	}
	p := mkPod(rc.pick(nsNames), rc.pick(podNames), ip, lbl, ports...)
	switch rc.r.IntN(12) {
	case 0:
		p.Spec.HostNetwork = true
	case 1:
		p.Status.Phase = corev1.PodSucceeded
	}
	return p
}

func (rc *randCluster) randSelector() *metav1.LabelSelector {
	switch rc.r.IntN(7) {
	case 0:
		return &metav1.LabelSelector{}
	case 1:
		return sel("app", rc.pick([]string{"a", "b", "c"}))
	case 2:
		return expr("app", metav1.LabelSelectorOpNotIn, rc.pick([]string{"a", "b"}))
	case 3:
		return expr("tier", metav1.LabelSelectorOpExists)
	case 4:
		return expr("tier", metav1.LabelSelectorOpDoesNotExist)
	case 5:
		return sel("tier", "")
	}
	return expr("app", metav1.LabelSelectorOpIn, "a", "c")
}

func (rc *randCluster) randNSSelector() *metav1.LabelSelector {
	switch rc.r.IntN(5) {
	case 0:
		return &metav1.LabelSelector{}
	case 1:
		return sel("team", rc.pick([]string{"red", "blue"}))
	case 2:
		return expr("env", metav1.LabelSelectorOpNotIn, "prod")
	case 3:
		return sel(corev1.LabelMetadataName, rc.pick(nsNames))
	}
	return sel("env", "")
}

func (rc *randCluster) randPeers() []networkingv1.NetworkPolicyPeer {
	var peers []networkingv1.NetworkPolicyPeer
	for range rc.r.IntN(3) {
		switch rc.r.IntN(4) {
		case 0:
			peers = append(peers, podPeer(rc.randSelector()))
		case 1:
			peers = append(peers, nsPeer(rc.randNSSelector()))
		case 2:
			peers = append(peers, networkingv1.NetworkPolicyPeer{PodSelector: rc.randSelector(), NamespaceSelector: rc.randNSSelector()})
		default:
			c := cidrPool[rc.r.IntN(len(cidrPool))]
			peers = append(peers, blockPeer(c[0], c[1:]...))
		}
	}
	return peers
}

func (rc *randCluster) randPorts() []networkingv1.NetworkPolicyPort {
	var ports []networkingv1.NetworkPolicyPort
	for range rc.r.IntN(3) {
		switch rc.r.IntN(5) {
		case 0:
			ports = append(ports, tcpPort([]int{80, 53, 8080}[rc.r.IntN(3)]))
		case 1:
			ports = append(ports, namedPort(rc.pick([]string{"http", "dns"}), []corev1.Protocol{corev1.ProtocolTCP, corev1.ProtocolUDP}[rc.r.IntN(2)]))
		case 2:
			ports = append(ports, rangePort(50, 90, corev1.ProtocolTCP))
		case 3:
			ports = append(ports, networkingv1.NetworkPolicyPort{Protocol: protoPtr(corev1.ProtocolUDP)})
		default:
			v := intstr.FromInt32(80)
			ports = append(ports, networkingv1.NetworkPolicyPort{Port: &v, Protocol: protoPtr(corev1.ProtocolSCTP)})
		}
	}
	return ports
}

func (rc *randCluster) randPolicy() *networkingv1.NetworkPolicy {
	return mkPolicy(rc.pick(nsNames), rc.pick(polNames), *rc.randSelector(), func(s *networkingv1.NetworkPolicySpec) {
		for range rc.r.IntN(3) {
			s.Ingress = append(s.Ingress, networkingv1.NetworkPolicyIngressRule{From: rc.randPeers(), Ports: rc.randPorts()})
		}
		for range rc.r.IntN(3) {
			s.Egress = append(s.Egress, networkingv1.NetworkPolicyEgressRule{To: rc.randPeers(), Ports: rc.randPorts()})
		}
		switch rc.r.IntN(4) {
		case 0:
			s.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
		case 1:
			s.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
		case 2:
			s.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}
		}
	})
}

// snapshot is a compiler's output with CIDR identities replaced by their
// prefixes, since the two paths may number prefixes differently.
type snapshot struct {
	rules map[identity.ID][]string
	iso   map[identity.ID]policy.Isolation
	cidrs []string
}

func takeSnapshot(c *Compiler) snapshot {
	names := map[identity.ID]string{}
	var cidrs []string
	for _, ci := range c.CIDRs() {
		names[ci.ID] = ci.Prefix.String()
		cidrs = append(cidrs, ci.Prefix.String())
	}
	s := c.Set()
	snap := snapshot{rules: map[identity.ID][]string{}, iso: s.Isolation, cidrs: cidrs}
	for _, r := range s.Rules {
		peer := r.Peer.String()
		if r.Peer.IsCIDR() {
			n, ok := names[r.Peer]
			if !ok {
				n = "unknown-cidr-" + peer
			}
			peer = n
		}
		snap.rules[r.Subject] = append(snap.rules[r.Subject], fmt.Sprintf("%s peer=%s %s/%s %s", r.Direction, peer, r.Proto, r.Ports, r.Origin))
	}
	for _, rs := range snap.rules {
		slices.Sort(rs)
	}
	return snap
}

// differingSubjects lists identities whose rules or isolation differ.
func differingSubjects(a, b snapshot) []identity.ID {
	ids := map[identity.ID]struct{}{}
	for _, m := range []snapshot{a, b} {
		for id := range m.rules {
			ids[id] = struct{}{}
		}
		for id := range m.iso {
			ids[id] = struct{}{}
		}
	}
	var out []identity.ID
	for id := range ids {
		if !slices.Equal(a.rules[id], b.rules[id]) || a.iso[id] != b.iso[id] {
			out = append(out, id)
		}
	}
	slices.Sort(out)
	return out
}

func (rc *randCluster) fullCompile(t *testing.T, ids Identities) *Compiler {
	t.Helper()
	var nss []*corev1.Namespace
	for _, k := range slices.Sorted(maps.Keys(rc.nss)) {
		nss = append(nss, rc.nss[k])
	}
	var pods []*corev1.Pod
	for _, k := range slices.Sorted(maps.Keys(rc.pods)) {
		pods = append(pods, rc.pods[k])
	}
	var pols []*networkingv1.NetworkPolicy
	for _, k := range slices.Sorted(maps.Keys(rc.pols)) {
		pols = append(pols, rc.pols[k])
	}
	c, err := Compile(ids, nss, pods, pols)
	if err != nil {
		t.Fatalf("full compile: %v", err)
	}
	c.SetNodeAddrs(rc.local, rc.remote)
	return c
}

func TestIncrementalEqualsFull(t *testing.T) {
	const seeds, steps = 40, 150
	var changes, reported, needed int
	for seed := range seeds {
		rc := &randCluster{
			r:    rand.New(rand.NewPCG(uint64(seed), 0x1dc41)),
			nss:  map[string]*corev1.Namespace{},
			pods: map[string]*corev1.Pod{},
			pols: map[string]*networkingv1.NetworkPolicy{},
		}
		ids := NewMemoryIdentities()
		inc := NewCompiler(ids)
		prev := takeSnapshot(inc)
		for step := range steps {
			var d Delta
			var err error
			var what string
			switch op := rc.r.IntN(11); {
			case op == 10:
				// Addresses move between host, remote-node and none,
				// sometimes in both lists, and share blocks with pods
				// (10.0.0.5) and with each other.
				rc.local, rc.remote = nil, nil
				for _, a := range []string{"10.0.0.200", "192.168.0.1", "172.16.0.1", "10.0.0.5", "10.0.0.9", "192.168.0.7"} {
					switch rc.r.IntN(4) {
					case 0:
						rc.local = append(rc.local, netip.MustParseAddr(a))
					case 1:
						rc.remote = append(rc.remote, netip.MustParseAddr(a))
					case 2:
						if rc.r.IntN(4) == 0 {
							rc.local = append(rc.local, netip.MustParseAddr(a))
							rc.remote = append(rc.remote, netip.MustParseAddr(a))
						}
					}
				}
				what = fmt.Sprintf("set node addresses local %v remote %v", rc.local, rc.remote)
				d = inc.SetNodeAddrs(rc.local, rc.remote)
			case op < 1:
				ns := rc.randNS()
				what = "upsert namespace " + ns.Name + fmt.Sprint(ns.Labels)
				rc.nss[ns.Name] = ns
				d, err = inc.UpsertNamespace(ns)
			case op < 2:
				name := rc.pick(nsNames)
				what = "delete namespace " + name
				delete(rc.nss, name)
				d, err = inc.DeleteNamespace(name)
			case op < 5:
				p := rc.randPod()
				what = fmt.Sprintf("upsert pod %s/%s %v %s", p.Namespace, p.Name, p.Labels, p.Status.PodIP)
				rc.pods[p.Namespace+"/"+p.Name] = p
				d, err = inc.UpsertPod(p)
			case op < 6:
				ns, name := rc.pick(nsNames), rc.pick(podNames)
				what = "delete pod " + ns + "/" + name
				delete(rc.pods, ns+"/"+name)
				d, err = inc.DeletePod(ns, name)
			case op < 9:
				np := rc.randPolicy()
				what = "upsert policy " + np.Namespace + "/" + np.Name
				rc.pols[np.Namespace+"/"+np.Name] = np
				d, err = inc.UpsertPolicy(np)
			default:
				ns, name := rc.pick(nsNames), rc.pick(polNames)
				what = "delete policy " + ns + "/" + name
				delete(rc.pols, ns+"/"+name)
				d, err = inc.DeletePolicy(ns, name)
			}
			if err != nil {
				t.Fatalf("seed %d step %d %s: %v", seed, step, what, err)
			}
			got := takeSnapshot(inc)
			want := takeSnapshot(rc.fullCompile(t, ids))
			if diff := differingSubjects(got, want); len(diff) > 0 || !slices.Equal(got.cidrs, want.cidrs) {
				for _, id := range diff {
					t.Errorf("identity %s:\n incremental %v %q\n full        %v %q", id, got.iso[id], got.rules[id], want.iso[id], want.rules[id])
				}
				t.Fatalf("seed %d step %d %s: incremental differs from full compile (cidrs %v vs %v)", seed, step, what, got.cidrs, want.cidrs)
			}
			need := differingSubjects(prev, got)
			for _, id := range need {
				if !slices.Contains(d.Identities, id) {
					t.Fatalf("seed %d step %d %s: identity %s changed but the delta %v does not name it", seed, step, what, id, d.Identities)
				}
			}
			// The ipcache delta must turn the previous CIDR list into the
			// new one.
			cidrs := map[string]bool{}
			for _, p := range prev.cidrs {
				cidrs[p] = true
			}
			for _, ci := range d.CIDRsRemoved {
				delete(cidrs, ci.Prefix.String())
			}
			for _, ci := range d.CIDRsAdded {
				cidrs[ci.Prefix.String()] = true
			}
			if !slices.Equal(slices.Sorted(maps.Keys(cidrs)), slices.Sorted(slices.Values(got.cidrs))) {
				t.Fatalf("seed %d step %d %s: CIDR delta +%v -%v does not turn %v into %v", seed, step, what, d.CIDRsAdded, d.CIDRsRemoved, prev.cidrs, got.cidrs)
			}
			changes++
			reported += len(d.Identities)
			needed += len(need)
			prev = got
		}
	}
	t.Logf("%d changes: %d identities changed, %d reported", changes, needed, reported)
}
