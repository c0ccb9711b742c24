package netpol

import (
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// Builders that keep the semantic tests readable.

func mkNS(name string, kv ...string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: kvMap(kv)}}
}

func kvMap(kv []string) map[string]string {
	if len(kv)%2 != 0 {
		panic("odd key/value list")
	}
	m := map[string]string{}
	for i := 0; i < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return m
}

type portSpec struct {
	name  string
	num   int32
	proto corev1.Protocol
}

func mkPod(ns, name, ip string, lbl map[string]string, ports ...portSpec) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: lbl},
		Status:     corev1.PodStatus{PodIP: ip, Phase: corev1.PodRunning},
	}
	var cps []corev1.ContainerPort
	for _, ps := range ports {
		cps = append(cps, corev1.ContainerPort{Name: ps.name, ContainerPort: ps.num, Protocol: ps.proto})
	}
	p.Spec.Containers = []corev1.Container{{Name: "c", Ports: cps}}
	return p
}

func sel(kv ...string) *metav1.LabelSelector {
	return &metav1.LabelSelector{MatchLabels: kvMap(kv)}
}

func expr(key string, op metav1.LabelSelectorOperator, values ...string) *metav1.LabelSelector {
	return &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: key, Operator: op, Values: values}}}
}

func protoPtr(p corev1.Protocol) *corev1.Protocol { return &p }

func tcpPort(n int) networkingv1.NetworkPolicyPort {
	v := intstr.FromInt32(int32(n))
	return networkingv1.NetworkPolicyPort{Port: &v}
}

func namedPort(name string, proto corev1.Protocol) networkingv1.NetworkPolicyPort {
	v := intstr.FromString(name)
	return networkingv1.NetworkPolicyPort{Port: &v, Protocol: protoPtr(proto)}
}

func rangePort(lo, hi int32, proto corev1.Protocol) networkingv1.NetworkPolicyPort {
	v := intstr.FromInt32(lo)
	return networkingv1.NetworkPolicyPort{Port: &v, EndPort: &hi, Protocol: protoPtr(proto)}
}

func mkPolicy(ns, name string, subject metav1.LabelSelector, spec func(*networkingv1.NetworkPolicySpec)) *networkingv1.NetworkPolicy {
	np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	np.Spec.PodSelector = subject
	if spec != nil {
		spec(&np.Spec)
	}
	return np
}

func podPeer(s *metav1.LabelSelector) networkingv1.NetworkPolicyPeer {
	return networkingv1.NetworkPolicyPeer{PodSelector: s}
}

func nsPeer(s *metav1.LabelSelector) networkingv1.NetworkPolicyPeer {
	return networkingv1.NetworkPolicyPeer{NamespaceSelector: s}
}

func blockPeer(cidr string, except ...string) networkingv1.NetworkPolicyPeer {
	return networkingv1.NetworkPolicyPeer{IPBlock: &networkingv1.IPBlock{CIDR: cidr, Except: except}}
}

// world is a compiled cluster under test.
type world struct {
	t *testing.T
	c *Compiler
}

func compileAll(t *testing.T, nss []*corev1.Namespace, pods []*corev1.Pod, pols []*networkingv1.NetworkPolicy) *world {
	t.Helper()
	c, err := Compile(NewMemoryIdentities(), nss, pods, pols)
	if err != nil {
		t.Fatalf("Compile: %v", err)
	}
	return &world{t: t, c: c}
}

func (w *world) id(nsName string) identity.ID {
	w.t.Helper()
	ns, name := splitKey(nsName)
	id, ok := w.c.PodIdentity(ns, name)
	if !ok {
		w.t.Fatalf("no identity for pod %s", nsName)
	}
	return id
}

func splitKey(k string) (string, string) {
	for i := range k {
		if k[i] == '/' {
			return k[:i], k[i+1:]
		}
	}
	panic("bad key " + k)
}

// allowed decides traffic between two endpoints, or an address on either
// side ("ip:10.0.0.1"), through the compiled Set.
func (w *world) allowed(from, to string, proto policy.Proto, port uint16) bool {
	w.t.Helper()
	return w.c.Set().Allowed(w.resolve(from), w.resolve(to), proto, port)
}

func (w *world) resolve(s string) identity.ID {
	w.t.Helper()
	if len(s) > 3 && s[:3] == "ip:" {
		return w.c.IdentityOfAddr(netip.MustParseAddr(s[3:]))
	}
	return w.id(s)
}

func (w *world) expect(from, to string, proto policy.Proto, port uint16, want bool) {
	w.t.Helper()
	if got := w.allowed(from, to, proto, port); got != want {
		w.t.Errorf("%s -> %s %s/%d: allowed=%v, want %v\nrules:\n%s", from, to, proto, port, got, want, dumpRules(w.c.Set()))
	}
}

func dumpRules(s *policy.Set) string {
	out := ""
	for _, r := range s.Rules {
		out += "  " + r.String() + "\n"
	}
	for id, iso := range s.Isolation {
		out += "  isolation " + id.String() + ": "
		if iso.Ingress {
			out += "ingress "
		}
		if iso.Egress {
			out += "egress"
		}
		out += "\n"
	}
	return out
}
