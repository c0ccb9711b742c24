package kube_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/idcni/idcni/e2e/internal/kube"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// TestCluster drives the objects the agent watches (Namespace, Pod with a
// node and an IP, NetworkPolicy) through a real apiserver and reads them
// back with shared informers, as the agent does.
func TestCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd and kube-apiserver (and builds them when not cached)")
	}
	c := kube.Start(t, kube.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	// The ldflags of scripts/build-kube.sh must reach the binary: a node or
	// apiserver reporting v0.0.0 confuses version-skew logic.
	v, err := c.Client.Discovery().ServerVersion()
	if err != nil {
		t.Fatalf("server version: %v", err)
	}
	if !strings.HasPrefix(v.GitVersion, "v1.") {
		t.Errorf("apiserver reports version %q, want a real v1.x release", v.GitVersion)
	}
	t.Logf("apiserver version %s", v.GitVersion)

	const ns, node = "idcni-e2e", "fake-node"
	c.CreateNamespace(t, ns, map[string]string{"team": "blue"})

	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: ns, Labels: map[string]string{"app": "web"}},
		Spec: corev1.PodSpec{
			// Bound to a node that does not exist: no scheduler and no
			// kubelet, the object only has to be stored and watched.
			NodeName:   node,
			Containers: []corev1.Container{{Name: "c", Image: "idcni.test/never-pulled"}},
		},
	}
	pod, err = c.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create pod: %v", err)
	}
	// What a kubelet reports after the CNI ADD: status is a subresource, so
	// an update of the pod itself would drop it.
	pod.Status.Phase = corev1.PodRunning
	pod.Status.PodIP = "10.13.0.5"
	pod.Status.PodIPs = []corev1.PodIP{{IP: "10.13.0.5"}}
	if _, err := c.Client.CoreV1().Pods(ns).UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("update pod status: %v", err)
	}

	port := intstr.FromInt32(80)
	tcp := corev1.ProtocolTCP
	np := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "web-from-client", Namespace: ns},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "client"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &port}},
			}},
		},
	}
	if _, err := c.Client.NetworkingV1().NetworkPolicies(ns).Create(ctx, np, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create network policy: %v", err)
	}

	factory := informers.NewSharedInformerFactory(c.Client, 0)
	pods := factory.Core().V1().Pods()
	podEvents := make(chan *corev1.Pod, 16)
	if _, err := pods.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) { podEvents <- obj.(*corev1.Pod) },
	}); err != nil {
		t.Fatalf("add pod handler: %v", err)
	}
	namespaces := factory.Core().V1().Namespaces().Lister()
	policies := factory.Networking().V1().NetworkPolicies().Lister()
	stop := make(chan struct{})
	defer close(stop)
	factory.Start(stop)
	for typ, ok := range factory.WaitForCacheSync(stop) {
		if !ok {
			t.Fatalf("informer for %v did not sync", typ)
		}
	}

	gotNS, err := namespaces.Get(ns)
	if err != nil || gotNS.Labels["team"] != "blue" {
		t.Errorf("namespace from informer: %v, labels %v", err, gotNS.GetLabels())
	}
	gotPod, err := pods.Lister().Pods(ns).Get("web")
	switch {
	case err != nil:
		t.Errorf("pod from informer: %v", err)
	case gotPod.Spec.NodeName != node || gotPod.Status.PodIP != "10.13.0.5":
		t.Errorf("pod from informer: node %q IP %q, want %q 10.13.0.5", gotPod.Spec.NodeName, gotPod.Status.PodIP, node)
	}
	gotNP, err := policies.NetworkPolicies(ns).List(labels.Everything())
	if err != nil || len(gotNP) != 1 || gotNP[0].Name != np.Name {
		t.Errorf("network policies from informer: %v, %d objects", err, len(gotNP))
	}

	// Watches, not only lists: a pod created after the sync reaches the
	// handler (the initial list's events may still be arriving: skip them).
	late := pod.DeepCopy()
	late.ObjectMeta = metav1.ObjectMeta{Name: "late", Namespace: ns, Labels: map[string]string{"app": "client"}}
	late.Status = corev1.PodStatus{}
	if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, late, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create late pod: %v", err)
	}
	timeout := time.After(30 * time.Second)
wait:
	for {
		select {
		case p := <-podEvents:
			if p.Name == "late" {
				break wait
			}
		case <-timeout:
			t.Errorf("no watch event for a pod created after the informer synced")
			break wait
		}
	}

	// Authorization is real: a user without bindings is refused.
	cfg, _, err := c.UserConfig("idcni-e2e-nobody")
	if err != nil {
		t.Fatalf("user config: %v", err)
	}
	nobody, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatalf("user clientset: %v", err)
	}
	if _, err := nobody.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("list pods without RBAC: err %v, want Forbidden", err)
	}

	// The kubeconfig works for kubectl, when the build made one.
	if kubectl := filepath.Join(c.BinDir, "kubectl"); isFile(kubectl) {
		out, err := exec.CommandContext(ctx, kubectl, "--kubeconfig", c.Kubeconfig, "get", "networkpolicies", "-n", ns, "-o", "name").CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != "networkpolicy.networking.k8s.io/web-from-client" {
			t.Errorf("kubectl get networkpolicies: %v\n%s", err, out)
		}
	}

	stopStart := time.Now()
	if err := c.Stop(); err != nil {
		t.Errorf("stop: %v", err)
	}
	t.Logf("cluster stopped in %s", time.Since(stopStart).Round(time.Millisecond))
	if err := c.Stop(); err != nil {
		t.Errorf("second stop: %v", err)
	}
	if _, err := c.Client.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{}); err == nil {
		t.Errorf("apiserver still answers after Stop")
	}
}

func isFile(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.Mode().IsRegular()
}
