package simulate

import (
	"io"
	"path/filepath"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy/netpol"
)

func simPod(name, ip string, port int32, labels map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: name, Labels: labels},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "c", Ports: []corev1.ContainerPort{{ContainerPort: port, Protocol: corev1.ProtocolTCP}}}}},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip},
	}
}

// TestSimulateNumbersIdentitiesAsTheAgent is issue 11's defect 9: simulate
// must give pods that differ only in a churn label (pod-template-hash) the
// one identity the agent gives them, so a policy whose selector names the
// churn label decides for both pods alike, as in the agent.
func TestSimulateNumbersIdentitiesAsTheAgent(t *testing.T) {
	port := intstr.FromInt32(5432)
	tcp := corev1.ProtocolTCP
	in := &Inputs{
		Namespaces: []*corev1.Namespace{{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{corev1.LabelMetadataName: "shop"}}}},
		Pods: []*corev1.Pod{
			simPod("web-a", "10.0.0.1", 80, map[string]string{"app": "web", "pod-template-hash": "aaa"}),
			simPod("web-b", "10.0.0.2", 80, map[string]string{"app": "web", "pod-template-hash": "bbb"}),
			simPod("api", "10.0.0.3", 80, map[string]string{"app": "api", "pod-template-hash": "aaa"}),
			simPod("db", "10.0.0.4", 5432, map[string]string{"app": "db"}),
		},
		Policies: []*networkingv1.NetworkPolicy{{
			ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "db-from-web-aaa"},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "db"}},
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{
					From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web", "pod-template-hash": "aaa"}}}},
					Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &port}},
				}},
			},
		}},
	}

	got, err := Run(in, Options{}, io.Discard)
	if err != nil {
		t.Fatalf("simulate: %v", err)
	}

	// What the agent computes: its identities (the persistent allocator on
	// a state file of the test's own, default churn labels) through the
	// same compiler.
	alloc, err := identity.OpenAllocator(filepath.Join(t.TempDir(), "state.db"), time.Second, identity.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { alloc.Close() })
	c, err := netpol.Compile(&netpol.PodIdentities{Alloc: alloc, Opts: identity.Options{}}, in.Namespaces, in.Pods, in.Policies)
	if err != nil {
		t.Fatalf("compile as the agent: %v", err)
	}
	pods := map[string]*corev1.Pod{}
	ids := map[string]identity.ID{}
	for _, p := range in.Pods {
		key := p.Namespace + "/" + p.Name
		pods[key] = p
		id, ok := c.PodIdentity(p.Namespace, p.Name)
		if !ok {
			t.Fatalf("agent gave %s no identity", key)
		}
		ids[key] = id
	}
	if ids["shop/web-a"] != ids["shop/web-b"] {
		t.Fatalf("agent: web-a %v, web-b %v: pods differing only in pod-template-hash must share an identity", ids["shop/web-a"], ids["shop/web-b"])
	}
	if ids["shop/api"] == ids["shop/web-a"] {
		t.Fatalf("agent: api and web-a differ in app but share identity %v", ids["shop/api"])
	}

	if len(got) == 0 {
		t.Fatal("simulate decided nothing")
	}
	set := c.Set()
	verdict := map[string]bool{}
	for _, r := range got {
		want := decide(c, set, pods[r.From], pods[r.To], ids[r.From], ids[r.To], portProto{r.Protocol, r.Port})
		if r != want {
			t.Errorf("%s -> %s %s/%d:\nsimulate: %+v\nagent:    %+v", r.From, r.To, r.Protocol, r.Port, r, want)
		}
		verdict[r.From+" "+r.To] = r.Allowed
	}
	if verdict["shop/web-a shop/db"] != verdict["shop/web-b shop/db"] {
		t.Errorf("web-a -> db allowed %v, web-b -> db allowed %v: one identity must get one verdict",
			verdict["shop/web-a shop/db"], verdict["shop/web-b shop/db"])
	}
}
