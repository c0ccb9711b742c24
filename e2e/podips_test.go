package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Issue 12, the propagation race: the agent writes a new pod's addresses
// into its status as soon as its plugin registers it, so other nodes learn
// the pod's identity before the kubelet's next relist (which, without it,
// is the first they hear of the address). Here no kubelet runs: the status
// stays empty unless the agent publishes.

func TestAgentPublishesNewPodAddresses(t *testing.T) {
	e := newAgentEnv(t)
	ctx := context.Background()
	pods := e.kube.Client.CoreV1().Pods("default")
	create := func(name string) *corev1.Pod {
		t.Helper()
		p, err := pods.Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app": "early"}},
			Spec:       corev1.PodSpec{NodeName: e.node, Containers: []corev1.Container{{Name: "c", Image: "idcni/test:none"}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	plug := func(name string, uid string) netip.Addr {
		t.Helper()
		p := e.NewPod(t)
		p.Args = [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "default"}, {"K8S_POD_NAME", name}, {"K8S_POD_UID", uid}}
		res := e.MustAdd(t, p)
		t.Cleanup(func() { _ = e.Del(p) })
		a, _ := netip.AddrFromSlice(res.IPs[0].Address.IP.To4())
		return a
	}
	status := func(name string) []string {
		p, err := pods.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, ip := range p.Status.PodIPs {
			out = append(out, ip.IP)
		}
		if len(out) > 0 && p.Status.PodIP != out[0] {
			t.Errorf("pod %s: status.podIP %q is not podIPs[0] %q", name, p.Status.PodIP, out[0])
		}
		return out
	}

	// A new pod: its address is in its status without any kubelet.
	web := create("web")
	addr := plug("web", string(web.UID))
	start := time.Now()
	waitFor(t, 10*time.Second, "the agent to publish web's address", func() bool { return len(status("web")) > 0 })
	t.Logf("published %v after %v", status("web"), time.Since(start).Round(time.Millisecond))
	if got := status("web"); len(got) != 1 || got[0] != addr.String() {
		t.Fatalf("web's status.podIPs = %v, want [%s], the address the plugin gave it", got, addr)
	}
	// The kubelet's later write of the same addresses goes through.
	p, err := pods.Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Status.Phase = corev1.PodRunning
	if _, err := pods.UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("the kubelet's status write after the agent's: %v", err)
	}

	// A registration of an old pod (its UID) never writes into a new pod
	// of the same name.
	old := create("db")
	if err := pods.Delete(ctx, "db", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "db to be gone", func() bool {
		_, err := pods.Get(ctx, "db", metav1.GetOptions{})
		return err != nil
	})
	create("db")
	plug("db", string(old.UID))
	// Published or refused, the counter moves; then the status must
	// still be empty.
	waitFor(t, 10*time.Second, "the agent to handle db's registration", func() bool {
		return metricSum(t, e.agent.metrics, `idcni_pod_ips_published_total{result="skipped"}`) >= 1
	})
	if got := status("db"); len(got) != 0 {
		t.Fatalf("a registration with the old pod's UID wrote %v into the new db's status", got)
	}
	if n := metricSum(t, e.agent.metrics, `idcni_pod_ips_published_total{result="published"}`); n != 1 {
		t.Errorf("published %v times, want 1 (web)", n)
	}
}

// metricSum reads one sample (name with labels, as /metrics prints it)
// from an agent's metrics listener; 0 when absent.
func metricSum(t testing.TB, addr, sample string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, sample+" "); ok {
			var f float64
			if _, err := fmt.Sscan(v, &f); err == nil {
				return f
			}
		}
	}
	return 0
}
