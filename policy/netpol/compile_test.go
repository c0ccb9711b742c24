package netpol

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

const tcp, udp, sctp, icmp = policy.ProtoTCP, policy.ProtoUDP, policy.ProtoSCTP, policy.ProtoICMP

// baseCluster: namespaces a (team=red) and b (team=blue) and c (no labels),
// each with pods web, db, and (in a) an unlabelled pod.
func baseCluster() ([]*corev1.Namespace, []*corev1.Pod) {
	nss := []*corev1.Namespace{mkNS("a", "team", "red"), mkNS("b", "team", "blue"), mkNS("c")}
	pods := []*corev1.Pod{
		mkPod("a", "web", "10.0.0.1", map[string]string{"app": "web"}, portSpec{"http", 80, corev1.ProtocolTCP}),
		mkPod("a", "db", "10.0.0.2", map[string]string{"app": "db", "tier": "data"}, portSpec{"pg", 5432, ""}),
		mkPod("a", "bare", "10.0.0.3", nil),
		mkPod("b", "web", "10.0.1.1", map[string]string{"app": "web"}, portSpec{"http", 8080, corev1.ProtocolTCP}),
		mkPod("b", "db", "10.0.1.2", map[string]string{"app": "db"}),
		mkPod("c", "web", "10.0.2.1", map[string]string{"app": "web"}),
	}
	return nss, pods
}

func TestNoPolicyAllowsEverything(t *testing.T) {
	nss, pods := baseCluster()
	w := compileAll(t, nss, pods, nil)
	w.expect("a/web", "b/db", tcp, 1, true)
	w.expect("b/db", "a/web", icmp, 0, true)
	if s := w.c.Set(); len(s.Rules) != 0 || len(s.Isolation) != 0 {
		t.Fatalf("unexpected output %+v", s)
	}
}

func TestDefaultDenyAndPodSelector(t *testing.T) {
	nss, pods := baseCluster()
	pols := []*networkingv1.NetworkPolicy{
		mkPolicy("a", "deny", metav1.LabelSelector{}, nil),
		mkPolicy("a", "web-to-db", *sel("app", "db"), func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{podPeer(sel("app", "web"))}}}
		}),
	}
	w := compileAll(t, nss, pods, pols)
	w.expect("a/web", "a/db", tcp, 5432, true)
	w.expect("a/web", "a/db", icmp, 0, true) // no ports: every protocol
	w.expect("a/bare", "a/db", tcp, 5432, false)
	w.expect("b/web", "a/db", tcp, 5432, false) // podSelector alone: own namespace only
	w.expect("a/db", "a/web", tcp, 80, false)
	w.expect("a/web", "b/db", tcp, 1, true) // b is not isolated; a's egress is open
	iso := w.c.Isolation(w.id("a/db"))
	if !iso.Ingress || iso.Egress {
		t.Errorf("a/db isolation %+v, want ingress only", iso)
	}
	if got := w.c.IsolatedBy(w.id("a/db"), policy.Ingress); !slices.Equal(got, []string{"a/deny", "a/web-to-db"}) {
		t.Errorf("IsolatedBy = %v", got)
	}
	for _, r := range w.c.Rules(w.id("a/db")) {
		if r.Origin != "a/web-to-db ingress[0]" {
			t.Errorf("rule origin %q", r.Origin)
		}
	}
}

func TestNamespaceAndPodSelectorCombinations(t *testing.T) {
	nss, pods := baseCluster()
	in := func(name string, peers ...networkingv1.NetworkPolicyPeer) *networkingv1.NetworkPolicy {
		return mkPolicy("b", name, *sel("app", "db"), func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: peers}}
		})
	}
	t.Run("namespaceSelector only", func(t *testing.T) {
		w := compileAll(t, nss, pods, []*networkingv1.NetworkPolicy{in("p", nsPeer(sel("team", "red")))})
		w.expect("a/web", "b/db", tcp, 1, true)
		w.expect("a/bare", "b/db", tcp, 1, true)
		w.expect("b/web", "b/db", tcp, 1, false)
		w.expect("c/web", "b/db", tcp, 1, false)
	})
	t.Run("both in one peer is AND", func(t *testing.T) {
		w := compileAll(t, nss, pods, []*networkingv1.NetworkPolicy{in("p", networkingv1.NetworkPolicyPeer{
			NamespaceSelector: sel("team", "red"), PodSelector: sel("app", "web")})})
		w.expect("a/web", "b/db", tcp, 1, true)
		w.expect("a/db", "b/db", tcp, 1, false)
		w.expect("b/web", "b/db", tcp, 1, false)
		w.expect("c/web", "b/db", tcp, 1, false)
	})
	t.Run("separate peers are OR", func(t *testing.T) {
		w := compileAll(t, nss, pods, []*networkingv1.NetworkPolicy{in("p", nsPeer(sel("team", "red")), podPeer(sel("app", "web")))})
		w.expect("a/web", "b/db", tcp, 1, true)
		w.expect("a/db", "b/db", tcp, 1, true)
		w.expect("b/web", "b/db", tcp, 1, true)
		w.expect("c/web", "b/db", tcp, 1, false)
	})
	t.Run("empty selectors", func(t *testing.T) {
		w := compileAll(t, nss, pods, []*networkingv1.NetworkPolicy{in("p", podPeer(&metav1.LabelSelector{}))})
		w.expect("b/web", "b/db", tcp, 1, true)
		w.expect("a/web", "b/db", tcp, 1, false)
		w = compileAll(t, nss, pods, []*networkingv1.NetworkPolicy{in("p", nsPeer(&metav1.LabelSelector{}))})
		w.expect("c/web", "b/db", tcp, 1, true)
		w.expect("ip:192.0.2.1", "b/db", tcp, 1, false) // all pods is not everything
	})
	t.Run("default namespace name label", func(t *testing.T) {
		w := compileAll(t, nss, pods, []*networkingv1.NetworkPolicy{in("p", nsPeer(sel(corev1.LabelMetadataName, "c")))})
		w.expect("c/web", "b/db", tcp, 1, true)
		w.expect("a/web", "b/db", tcp, 1, false)
	})
}

func TestMatchExpressions(t *testing.T) {
	nss, pods := baseCluster()
	cases := []struct {
		name string
		sel  *metav1.LabelSelector
		from map[string]bool // sources in namespace a
	}{
		{"In", expr("app", metav1.LabelSelectorOpIn, "web", "x"), map[string]bool{"a/web": true, "a/db": false, "a/bare": false}},
		// NotIn matches pods without the key (a/bare).
		{"NotIn", expr("app", metav1.LabelSelectorOpNotIn, "web"), map[string]bool{"a/web": false, "a/db": true, "a/bare": true}},
		{"Exists", expr("tier", metav1.LabelSelectorOpExists), map[string]bool{"a/web": false, "a/db": true, "a/bare": false}},
		{"DoesNotExist", expr("tier", metav1.LabelSelectorOpDoesNotExist), map[string]bool{"a/web": true, "a/db": false, "a/bare": true}},
		// matchLabels {k: ""} needs the key to be there.
		{"empty value", sel("tier", ""), map[string]bool{"a/web": false, "a/db": false, "a/bare": false}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			pol := mkPolicy("a", "p", metav1.LabelSelector{}, func(s *networkingv1.NetworkPolicySpec) {
				s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{podPeer(tc.sel)}}}
			})
			w := compileAll(t, nss, pods, []*networkingv1.NetworkPolicy{pol})
			for from, want := range tc.from {
				w.expect(from, "a/web", tcp, 80, want)
			}
		})
	}
	// A namespace selector NotIn on a key the namespace lacks matches too.
	pol := mkPolicy("b", "p", *sel("app", "db"), func(s *networkingv1.NetworkPolicySpec) {
		s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{nsPeer(expr("team", metav1.LabelSelectorOpNotIn, "red"))}}}
	})
	w := compileAll(t, nss, pods, []*networkingv1.NetworkPolicy{pol})
	w.expect("c/web", "b/db", tcp, 1, true)
	w.expect("b/web", "b/db", tcp, 1, true)
	w.expect("a/web", "b/db", tcp, 1, false)
}

func TestIPBlock(t *testing.T) {
	nss, pods := baseCluster()
	pols := []*networkingv1.NetworkPolicy{
		mkPolicy("b", "blocks", *sel("app", "db"), func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{
				blockPeer("10.0.0.0/16", "10.0.0.2/32", "10.0.2.0/24"),
				blockPeer("192.168.0.0/16", "192.168.1.0/24"),
			}}}
		}),
		// Another policy names a prefix inside the first block: addresses
		// there get that prefix's identity, which the first block must
		// still allow.
		mkPolicy("c", "nested", metav1.LabelSelector{}, func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{blockPeer("192.168.2.0/24")}}}
		}),
	}
	w := compileAll(t, nss, pods, pols)
	// Pod addresses.
	w.expect("a/web", "b/db", tcp, 1, true)  // 10.0.0.1 inside
	w.expect("a/db", "b/db", tcp, 1, false)  // 10.0.0.2 excepted
	w.expect("b/web", "b/db", tcp, 1, true)  // 10.0.1.1 inside
	w.expect("c/web", "b/db", tcp, 1, false) // 10.0.2.1 excepted
	// Other addresses.
	w.expect("ip:10.0.9.9", "b/db", tcp, 1, true)
	w.expect("ip:10.0.2.200", "b/db", tcp, 1, false)
	w.expect("ip:192.168.0.1", "b/db", tcp, 1, true)
	w.expect("ip:192.168.1.1", "b/db", tcp, 1, false)
	w.expect("ip:192.168.2.1", "b/db", tcp, 1, true)
	w.expect("ip:192.168.2.1", "c/web", tcp, 1, true)
	w.expect("ip:192.168.3.1", "c/web", tcp, 1, false)
	w.expect("ip:172.16.0.1", "b/db", tcp, 1, false)

	cidrs := w.c.CIDRs()
	var got []string
	for _, ci := range cidrs {
		if !ci.ID.IsCIDR() {
			t.Errorf("prefix %s got non-CIDR identity %d", ci.Prefix, ci.ID)
		}
		got = append(got, ci.Prefix.String())
	}
	want := []string{"10.0.0.0/16", "10.0.0.2/32", "10.0.2.0/24", "192.168.0.0/16", "192.168.1.0/24", "192.168.2.0/24"}
	if !slices.Equal(got, want) {
		t.Errorf("CIDRs = %v, want %v", got, want)
	}

	// Pod IP changes are followed: a/db moves out of the except.
	moved := mkPod("a", "db", "10.0.0.9", map[string]string{"app": "db", "tier": "data"}, portSpec{"pg", 5432, ""})
	d, err := w.c.UpsertPod(moved)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(d.Identities, w.id("b/db")) {
		t.Errorf("delta %v does not name b/db", d.Identities)
	}
	w.expect("a/db", "b/db", tcp, 1, true)
}

func TestEgressIPBlockAndDefaults(t *testing.T) {
	nss, pods := baseCluster()
	pols := []*networkingv1.NetworkPolicy{
		// Egress rules with no policyTypes: egress is isolated too.
		mkPolicy("a", "egress", *sel("app", "web"), func(s *networkingv1.NetworkPolicySpec) {
			s.Egress = []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{blockPeer("0.0.0.0/0", "10.0.0.0/8")}}}
		}),
		// policyTypes [Ingress]: the egress section is ignored.
		mkPolicy("b", "ingress-only", *sel("app", "web"), func(s *networkingv1.NetworkPolicySpec) {
			s.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{}}
			s.Egress = []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{blockPeer("1.1.1.1/32")}}}
		}),
		// Egress only: ingress stays open.
		mkPolicy("c", "egress-only", metav1.LabelSelector{}, func(s *networkingv1.NetworkPolicySpec) {
			s.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
		}),
	}
	w := compileAll(t, nss, pods, pols)
	if iso := w.c.Isolation(w.id("a/web")); !iso.Ingress || !iso.Egress {
		t.Errorf("a/web isolation %+v, want both", iso)
	}
	if iso := w.c.Isolation(w.id("b/web")); !iso.Ingress || iso.Egress {
		t.Errorf("b/web isolation %+v, want ingress", iso)
	}
	if iso := w.c.Isolation(w.id("c/web")); iso.Ingress || !iso.Egress {
		t.Errorf("c/web isolation %+v, want egress", iso)
	}
	w.expect("a/web", "ip:8.8.8.8", udp, 53, true)
	w.expect("a/web", "b/db", tcp, 1, false)
	w.expect("a/web", "ip:10.9.9.9", tcp, 1, false)
	w.expect("b/web", "ip:9.9.9.9", tcp, 1, true)
	w.expect("a/db", "b/web", tcp, 1, true) // ingress rule {} allows all
	w.expect("c/web", "a/db", tcp, 1, false)
	w.expect("a/db", "c/web", tcp, 1, true)
}

func TestNodeAddrs(t *testing.T) {
	nss, pods := baseCluster()
	pols := []*networkingv1.NetworkPolicy{
		mkPolicy("a", "to-apiserver", *sel("app", "web"), func(s *networkingv1.NetworkPolicySpec) {
			s.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
			s.Egress = []networkingv1.NetworkPolicyEgressRule{{
				To:    []networkingv1.NetworkPolicyPeer{blockPeer("192.0.2.0/24", "192.0.2.128/25")},
				Ports: []networkingv1.NetworkPolicyPort{tcpPort(6443)},
			}}
		}),
		// Ingress from the other nodes' subnet only: remote nodes are
		// addresses outside the cluster, which only an ipBlock admits.
		mkPolicy("b", "from-nodes", *sel("app", "web"), func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{
				From: []networkingv1.NetworkPolicyPeer{blockPeer("198.51.100.0/28")},
			}}
		}),
		mkPolicy("c", "from-all-pods", *sel("app", "web"), func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{
				From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: &metav1.LabelSelector{}}},
			}}
		}),
	}
	w := compileAll(t, nss, pods, pols)
	local := netip.MustParseAddr("192.0.2.10")
	remoteIn, remoteOut := netip.MustParseAddr("198.51.100.5"), netip.MustParseAddr("198.51.100.200")
	w.expect("a/web", "ip:192.0.2.10", tcp, 6443, true) // a CIDR identity so far
	d := w.c.SetNodeAddrs([]netip.Addr{local, netip.MustParseAddr("192.0.2.200")}, []netip.Addr{remoteIn, remoteOut})
	if !slices.Equal(d.Identities, []identity.ID{w.id("a/web"), w.id("b/web")}) {
		t.Errorf("delta %v, want a/web and b/web", d.Identities)
	}
	for a, want := range map[netip.Addr]identity.ID{local: identity.Host, remoteIn: identity.RemoteNode, remoteOut: identity.RemoteNode} {
		if got := w.c.IdentityOfAddr(a); got != want {
			t.Errorf("%s resolves to %s, want %s", a, got, want)
		}
	}
	w.expect("a/web", "ip:192.0.2.10", tcp, 6443, true)  // host, inside the block
	w.expect("a/web", "ip:192.0.2.200", tcp, 6443, true) // host too, but through 192.0.2.10
	// A remote node is no pod: the ipBlock admits it, the namespace
	// selector of c/web's policy does not.
	w.expect("ip:198.51.100.5", "b/web", tcp, 80, true)
	w.expect("ip:198.51.100.200", "b/web", tcp, 80, true) // remote-node too, through 198.51.100.5
	w.expect("ip:198.51.100.5", "c/web", tcp, 80, false)
	w.expect("ip:192.0.2.10", "c/web", tcp, 80, false)
	// The local node's address in b's block allows host, not remote-node.
	w.c.SetNodeAddrs([]netip.Addr{netip.MustParseAddr("198.51.100.6")}, []netip.Addr{remoteOut})
	w.expect("ip:198.51.100.200", "b/web", tcp, 80, false)
	w.expect("ip:198.51.100.6", "b/web", tcp, 80, true)
	// An address in both lists is the local node's.
	w.c.SetNodeAddrs([]netip.Addr{remoteIn}, []netip.Addr{remoteIn, remoteOut})
	if got := w.c.IdentityOfAddr(remoteIn); got != identity.Host {
		t.Errorf("%s, local and remote, resolves to %s, want host", remoteIn, got)
	}
	w.expect("ip:198.51.100.200", "b/web", tcp, 80, false)
	// The rule names host once any host address is inside: the ipcache
	// cannot tell node addresses apart. Without one inside, no rule.
	w.c.SetNodeAddrs([]netip.Addr{netip.MustParseAddr("192.0.2.200")}, nil)
	w.expect("a/web", "ip:192.0.2.200", tcp, 6443, false)
	w.expect("ip:198.51.100.5", "b/web", tcp, 80, true) // a CIDR identity again
	w.c.SetNodeAddrs(nil, nil)
	w.expect("a/web", "ip:192.0.2.200", tcp, 6443, false)
	w.expect("a/web", "ip:192.0.2.10", tcp, 6443, true)
}

func TestPorts(t *testing.T) {
	nss, pods := baseCluster()
	pods = append(pods,
		// Same labels as b/web (so the same identity), other number for
		// "http": the identity gets both numbers.
		mkPod("b", "web2", "10.0.1.3", map[string]string{"app": "web"}, portSpec{"http", 8081, corev1.ProtocolTCP}),
		mkPod("c", "dns", "10.0.2.2", map[string]string{"app": "dns"}, portSpec{"dns", 53, corev1.ProtocolUDP}, portSpec{"dns-tcp", 53, corev1.ProtocolTCP}),
	)
	pols := []*networkingv1.NetworkPolicy{
		mkPolicy("b", "named", *sel("app", "web"), func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{
				namedPort("http", corev1.ProtocolTCP),
				namedPort("http", corev1.ProtocolUDP), // no UDP port named http: nothing
				rangePort(9000, 9010, corev1.ProtocolSCTP),
				{Protocol: protoPtr(corev1.ProtocolUDP)}, // every UDP port
			}}}
		}),
		mkPolicy("a", "egress-named", *sel("app", "web"), func(s *networkingv1.NetworkPolicySpec) {
			s.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
			s.Egress = []networkingv1.NetworkPolicyEgressRule{
				{Ports: []networkingv1.NetworkPolicyPort{namedPort("dns", corev1.ProtocolUDP)}},                                                         // all destinations
				{Ports: []networkingv1.NetworkPolicyPort{namedPort("http", "")}, To: []networkingv1.NetworkPolicyPeer{nsPeer(&metav1.LabelSelector{})}}, // resolves per peer
				{Ports: []networkingv1.NetworkPolicyPort{tcpPort(443)}},
			}
		}),
	}
	w := compileAll(t, nss, pods, pols)
	w.expect("a/db", "b/web", tcp, 8080, true)
	w.expect("a/db", "b/web2", tcp, 8081, true)
	w.expect("a/db", "b/web", tcp, 8081, true) // union over the identity
	w.expect("a/db", "b/web", tcp, 80, false)
	w.expect("a/db", "b/web", sctp, 9005, true)
	w.expect("a/db", "b/web", sctp, 9011, false)
	w.expect("a/db", "b/web", tcp, 9005, false)
	w.expect("a/db", "b/web", udp, 12345, true)
	w.expect("a/db", "b/web", icmp, 0, false)

	w.expect("a/web", "c/dns", udp, 53, true)
	w.expect("a/web", "c/dns", tcp, 53, false) // "dns" is UDP; dns-tcp is another name
	w.expect("a/web", "b/web", tcp, 8080, true)
	w.expect("a/web", "a/web", tcp, 80, true)
	w.expect("a/web", "b/web", tcp, 80, false)
	w.expect("a/web", "ip:1.2.3.4", tcp, 443, true)
	w.expect("a/web", "ip:1.2.3.4", udp, 53, false) // a name never resolves on an address
}

func TestUnionOfPoliciesAndDirections(t *testing.T) {
	nss, pods := baseCluster()
	pols := []*networkingv1.NetworkPolicy{
		mkPolicy("a", "p1", *sel("app", "db"), func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{tcpPort(1)}}}
		}),
		mkPolicy("a", "p2", *sel("app", "db"), func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{tcpPort(2)}, From: []networkingv1.NetworkPolicyPeer{podPeer(sel("app", "web"))}}}
		}),
		mkPolicy("a", "web-egress", *sel("app", "web"), func(s *networkingv1.NetworkPolicySpec) {
			s.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
			s.Egress = []networkingv1.NetworkPolicyEgressRule{{Ports: []networkingv1.NetworkPolicyPort{tcpPort(2)}}}
		}),
	}
	w := compileAll(t, nss, pods, pols)
	w.expect("a/bare", "a/db", tcp, 1, true)
	w.expect("a/bare", "a/db", tcp, 2, false)
	w.expect("a/web", "a/db", tcp, 2, true)
	w.expect("a/web", "a/db", tcp, 1, false) // web's egress allows only port 2
	s := w.c.Set()
	d := s.Decide(w.id("a/db"), policy.Ingress, w.id("a/web"), tcp, 2)
	if !d.Allowed || d.Rule == nil || d.Rule.Origin != "a/p2 ingress[0]" {
		t.Errorf("decision %+v", d)
	}
}

func TestNonEndpoints(t *testing.T) {
	nss, pods := baseCluster()
	hn := mkPod("a", "node-agent", "192.0.2.10", map[string]string{"app": "web"})
	hn.Spec.HostNetwork = true
	done := mkPod("a", "job", "10.0.0.50", map[string]string{"app": "job"})
	done.Status.Phase = corev1.PodSucceeded
	w := compileAll(t, nss, append(pods, hn, done), nil)
	for _, k := range []string{"a/node-agent", "a/job"} {
		ns, name := splitKey(k)
		if _, ok := w.c.PodIdentity(ns, name); ok {
			t.Errorf("%s is not an endpoint but got an identity", k)
		}
	}
	// A running pod turning host-network leaves.
	web := mkPod("a", "web", "10.0.0.1", map[string]string{"app": "web"})
	web.Spec.HostNetwork = true
	if _, err := w.c.UpsertPod(web); err != nil {
		t.Fatal(err)
	}
	if _, ok := w.c.PodIdentity("a", "web"); ok {
		t.Error("a/web still an endpoint after turning host-network")
	}
}

func TestInvalidPolicies(t *testing.T) {
	bad := map[string]func(*networkingv1.NetworkPolicySpec){
		"endPort with name": func(s *networkingv1.NetworkPolicySpec) {
			p := namedPort("http", corev1.ProtocolTCP)
			e := int32(90)
			p.EndPort = &e
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{p}}}
		},
		"endPort below port": func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{rangePort(90, 80, corev1.ProtocolTCP)}}}
		},
		"bad protocol": func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{{Protocol: protoPtr("ICMP")}}}}
		},
		"bad cidr": func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{blockPeer("10.0.0.0/33")}}}
		},
		"except outside": func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{blockPeer("10.0.0.0/16", "10.1.0.0/24")}}}
		},
		"ipBlock with selector": func(s *networkingv1.NetworkPolicySpec) {
			p := blockPeer("10.0.0.0/16")
			p.PodSelector = sel()
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{p}}}
		},
		"empty peer": func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{}}}}
		},
		"bad selector": func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{podPeer(expr("a", metav1.LabelSelectorOpIn))}}}
		},
		"bad policyType": func(s *networkingv1.NetworkPolicySpec) {
			s.PolicyTypes = []networkingv1.PolicyType{"Sideways"}
		},
	}
	for name, f := range bad {
		c := NewCompiler(NewMemoryIdentities())
		_, err := c.UpsertPolicy(mkPolicy("a", "bad", metav1.LabelSelector{}, f))
		if err == nil {
			t.Errorf("%s: no error", name)
			continue
		}
		if !strings.Contains(err.Error(), "a/bad") {
			t.Errorf("%s: error %q does not name the policy", name, err)
		}
	}
}

func TestMemoryIdentities(t *testing.T) {
	m := NewMemoryIdentities()
	ns := mkNS("a", "x", "1")
	p1 := mkPod("a", "p1", "", map[string]string{"app": "web"})
	p2 := mkPod("a", "p2", "", map[string]string{"app": "web"})
	p3 := mkPod("a", "p3", "", map[string]string{"app": "db"})
	id1, _ := m.IdentityOf(p1, ns)
	id2, _ := m.IdentityOf(p2, ns)
	id3, _ := m.IdentityOf(p3, ns)
	id4, _ := m.IdentityOf(p1, mkNS("a", "x", "2"))
	if id1 != id2 || id1 == id3 || id1 == id4 || id1 != identity.MinLabel {
		t.Errorf("ids %d %d %d %d", id1, id2, id3, id4)
	}
	if _, err := m.IdentityOf(mkPod("", "p", "", nil), ns); err == nil {
		t.Error("pod without namespace accepted")
	}
}

func TestIdentityOfAddr(t *testing.T) {
	nss, pods := baseCluster()
	w := compileAll(t, nss, pods, nil)
	if got := w.c.IdentityOfAddr(netip.MustParseAddr("10.0.0.1")); got != w.id("a/web") {
		t.Errorf("pod address -> %d", got)
	}
	if got := w.c.IdentityOfAddr(netip.MustParseAddr("8.8.8.8")); got != identity.World {
		t.Errorf("unknown address -> %d", got)
	}
}
