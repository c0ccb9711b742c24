package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/idcni/idcni/e2e/internal/kube"
	"github.com/idcni/idcni/identity"
)

// Issue 12, the propagation race: an agent announces a new pod's addresses
// to the other nodes as soon as its plugin registers it, in a ConfigMap of
// its namespace, until the kubelet writes them into the pod's status; the
// other agents believe an announcement only for a pod of the announcing
// node, with its UID, inside that node's pod CIDRs. Here no kubelet runs:
// the test writes the status as one would.

// announcedPods reads a node's announcement as the agents write it.
func announcedPods(t *testing.T, e *agentEnv, node string) map[string][]string {
	t.Helper()
	cm, err := e.kube.Client.CoreV1().ConfigMaps(kube.AgentNamespace).Get(context.Background(), "idcni-announce-"+node, metav1.GetOptions{})
	if err != nil {
		return nil
	}
	var p struct {
		Node string
		Pods []struct {
			Pod string
			IPs []string
		}
	}
	if err := json.Unmarshal([]byte(cm.Data["pods"]), &p); err != nil {
		t.Fatalf("announcement of %s: %v: %q", node, err, cm.Data["pods"])
	}
	out := map[string][]string{}
	for _, x := range p.Pods {
		out[x.Pod] = x.IPs
	}
	return out
}

func TestAgentAnnouncesNewPods(t *testing.T) {
	e := newAgentEnv(t)
	ctx := context.Background()
	pods := e.kube.Client.CoreV1().Pods("default")
	create := func(name, node string, labels map[string]string) *corev1.Pod {
		t.Helper()
		p, err := pods.Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
			Spec:       corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "c", Image: "idcni/test:none"}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	setStatus := func(name string, ip netip.Addr) {
		t.Helper()
		p, err := pods.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		p.Status.PodIP, p.Status.PodIPs = ip.String(), []corev1.PodIP{{IP: ip.String()}}
		if _, err := pods.UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	// This node announces its new pod from the plugin's ADD, and stops
	// once the status has the address.
	web := create("web", e.node, map[string]string{"app": "web"})
	p := e.NewPod(t)
	p.Args = [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "default"}, {"K8S_POD_NAME", "web"}, {"K8S_POD_UID", string(web.UID)}}
	res := e.MustAdd(t, p)
	t.Cleanup(func() { _ = e.Del(p) })
	addr, _ := netip.AddrFromSlice(res.IPs[0].Address.IP.To4())
	start := time.Now()
	waitFor(t, 10*time.Second, "the agent to announce web", func() bool {
		got := announcedPods(t, e, e.node)["default/web"]
		return len(got) == 1 && got[0] == addr.String()
	})
	t.Logf("web %s announced %v after its ADD returned", addr, time.Since(start).Round(time.Millisecond))
	setStatus("web", addr)
	waitFor(t, 10*time.Second, "the announcement to drop web once its status has the address", func() bool {
		_, ok := announcedPods(t, e, e.node)["default/web"]
		return !ok
	})

	// Another node's announcement, written as its agent would. Its pods
	// get their identity from it before any status has their address;
	// what it may not claim is ignored.
	const other = "node-b"
	cidr := netip.MustParsePrefix("10.251.7.0/24")
	if _, err := e.kube.Client.CoreV1().Nodes().Create(ctx, &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: other},
		Spec:       corev1.NodeSpec{PodCIDR: cidr.String(), PodCIDRs: []string{cidr.String()}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	remote := create("remote", other, map[string]string{"app": "remote"})
	wrongUID := create("wrong-uid", other, map[string]string{"app": "remote"})
	elsewhere := create("elsewhere", e.node, map[string]string{"app": "remote"})
	outside := create("outside", other, map[string]string{"app": "remote"})
	ips := map[string]netip.Addr{
		"remote": netip.MustParseAddr("10.251.7.10"), "wrong-uid": netip.MustParseAddr("10.251.7.11"),
		"elsewhere": netip.MustParseAddr("10.251.7.12"), "outside": netip.MustParseAddr("10.252.0.13"),
	}
	entry := func(p *corev1.Pod, uid string) string {
		return fmt.Sprintf(`{"pod":"default/%s","uid":%q,"ips":[%q]}`, p.Name, uid, ips[p.Name].String())
	}
	payload := fmt.Sprintf(`{"node":%q,"pods":[%s,%s,%s,%s]}`, other,
		entry(remote, string(remote.UID)), entry(wrongUID, "not-its-uid"), entry(elsewhere, string(elsewhere.UID)), entry(outside, string(outside.UID)))
	cms := e.kube.Client.CoreV1().ConfigMaps(kube.AgentNamespace)
	announce := &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "idcni-announce-" + other, Labels: map[string]string{"app.kubernetes.io/component": "idcni-announce"}},
		Data:       map[string]string{"pods": payload},
	}
	if _, err := cms.Create(ctx, announce, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// A ConfigMap that says it is another node's speaks for nobody.
	if _, err := cms.Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "idcni-announce-node-c", Labels: announce.Labels},
		Data:       map[string]string{"pods": strings.Replace(payload, `"ips":["10.251.7.10"]`, `"ips":["10.251.7.20"]`, 1)},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	d := e.Datapath(t)
	idOf := func(a netip.Addr) identity.ID {
		id, _, _ := d.IPCacheLookup(a)
		return id
	}
	waitFor(t, 10*time.Second, "remote's announced address to get its identity", func() bool { return idOf(ips["remote"]).IsLabel() })
	for name, why := range map[string]string{
		"wrong-uid": "the UID is not the pod's", "elsewhere": "the pod is not on the announcing node",
		"outside": "the address is outside the announcing node's pod CIDRs",
	} {
		if id := idOf(ips[name]); id != identity.World {
			t.Errorf("%s's announced address %s has identity %v, want world: %s", name, ips[name], id, why)
		}
	}
	if id := idOf(netip.MustParseAddr("10.251.7.20")); id != identity.World {
		t.Errorf("an announcement under another node's name gave 10.251.7.20 identity %v", id)
	}
	// The status takes over; the announcement's end changes nothing.
	before := idOf(ips["remote"])
	setStatus("remote", ips["remote"])
	announce.Data["pods"] = fmt.Sprintf(`{"node":%q,"pods":[]}`, other)
	if _, err := cms.Update(ctx, announce, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	if id := idOf(ips["remote"]); id != before {
		t.Errorf("remote's identity went from %v to %v when its status took over from the announcement", before, id)
	}
	// Without status, an announcement that ends takes the address away.
	if id := idOf(ips["wrong-uid"]); id != identity.World {
		t.Errorf("wrong-uid: %v", id)
	}
	if n := metricValue(t, e.agent.metrics, "idcni_announce_errors_total"); n != 0 {
		t.Errorf("idcni_announce_errors_total %v", n)
	}
}

// metricValue reads one sample (name with labels, as /metrics prints it)
// from an agent's metrics listener; 0 when absent.
func metricValue(t testing.TB, addr, sample string) float64 {
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
