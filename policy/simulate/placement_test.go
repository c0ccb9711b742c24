package simulate

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestSimulateWarnsOnStrippedSelectorLabels: a podSelector naming a label
// identities leave out (a placement label such as the zone Kubernetes copies
// onto pods, or a churn label) cannot select by it; simulate says so, once
// per policy and key, and pods in different zones are decided alike.
func TestSimulateWarnsOnStrippedSelectorLabels(t *testing.T) {
	zone := "topology.kubernetes.io/zone"
	in := &Inputs{
		Namespaces: []*corev1.Namespace{{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{corev1.LabelMetadataName: "shop"}}}},
		Pods: []*corev1.Pod{
			simPod("web-a", "10.0.0.1", 80, map[string]string{"app": "web", zone: "zone-a"}),
			simPod("web-b", "10.0.0.2", 80, map[string]string{"app": "web", zone: "zone-b"}),
			simPod("db", "10.0.0.4", 5432, map[string]string{"app": "db", zone: "zone-a"}),
		},
		Policies: []*networkingv1.NetworkPolicy{{
			ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "db-from-zone-a"},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "db"}},
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{
					{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web", zone: "zone-a"}}},
					{PodSelector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
						{Key: zone, Operator: metav1.LabelSelectorOpIn, Values: []string{"zone-a"}},
						{Key: "pod-template-hash", Operator: metav1.LabelSelectorOpExists},
					}}},
				}}},
			},
		}},
	}
	var warn strings.Builder
	got, err := Run(in, Options{}, &warn)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{zone, "pod-template-hash"} {
		if n := strings.Count(warn.String(), `shop/db-from-zone-a selects pods by label "`+k+`"`); n != 1 {
			t.Errorf("%d warnings about %s, want 1; warnings:\n%s", n, k, warn.String())
		}
	}
	if strings.Contains(warn.String(), `label "app"`) {
		t.Errorf("warned about a label identities keep:\n%s", warn.String())
	}
	verdict := map[string]bool{}
	for _, r := range got {
		if r.To == "shop/db" {
			verdict[r.From] = r.Allowed
		}
	}
	if verdict["shop/web-a"] != verdict["shop/web-b"] {
		t.Errorf("web-a (zone-a) and web-b (zone-b) decided differently: %v", verdict)
	}
}
