package agent

import (
	"encoding/json"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/manifests"
)

func TestEventFilter(t *testing.T) {
	drop := api.Event{Event: bpf.Event{Src: 70000, Dst: 70001, Allowed: false}, SrcPod: "shop/web", DstPod: "shop/db"}
	allow := api.Event{Event: bpf.Event{Src: 70002, Dst: 70001, Allowed: true}, SrcPod: "ops/prom", DstPod: "shop/db"}
	for _, c := range []struct {
		query      map[string][]string
		drop, pass bool
	}{
		{nil, true, true},
		{map[string][]string{"verdict": {"drop"}}, true, false},
		{map[string][]string{"verdict": {"allow"}}, false, true},
		{map[string][]string{"identity": {"70000"}}, true, false},
		{map[string][]string{"identity": {"70001"}}, true, true},
		{map[string][]string{"namespace": {"ops"}}, false, true},
		{map[string][]string{"pod": {"web"}}, true, false},
		{map[string][]string{"pod": {"shop/db"}}, true, true},
		{map[string][]string{"namespace": {"shop"}, "pod": {"prom"}}, false, false},
	} {
		f, err := parseEventFilter(c.query)
		if err != nil {
			t.Fatal(err)
		}
		if f.match(drop) != c.drop || f.match(allow) != c.pass {
			t.Errorf("filter %v: drop %v allow %v, want %v %v", c.query, f.match(drop), f.match(allow), c.drop, c.pass)
		}
	}
	for _, bad := range []map[string][]string{{"identity": {"x"}}, {"verdict": {"maybe"}}} {
		if _, err := parseEventFilter(bad); err == nil {
			t.Errorf("filter %v accepted", bad)
		}
	}
}

func TestPodAddrs(t *testing.T) {
	p := &corev1.Pod{Status: corev1.PodStatus{PodIP: "10.0.0.1", PodIPs: []corev1.PodIP{{IP: "10.0.0.1"}, {IP: "fd00::1"}}}}
	got := podAddrs(p)
	if len(got) != 2 || got[0] != netip.MustParseAddr("10.0.0.1") || got[1] != netip.MustParseAddr("fd00::1") {
		t.Fatalf("podAddrs = %v", got)
	}
	if got := podAddrs(&corev1.Pod{Status: corev1.PodStatus{PodIP: "10.0.0.2"}}); len(got) != 1 {
		t.Fatalf("podIP only: %v", got)
	}
	if got := podAddrs(&corev1.Pod{}); len(got) != 0 {
		t.Fatalf("no IP: %v", got)
	}
}

// The installed config is the shipped one, pointed at this agent and
// requiring it, so no pod starts unenforced while the agent is away.
func TestWriteCNIConf(t *testing.T) {
	dir := t.TempDir()
	a := &Agent{cfg: Config{CNIConfDir: dir, CNIConfName: "10-idcni.conflist", CNIConf: manifests.CNIConflist,
		Socket: "/run/test/agent.sock", BPFRoot: "/sys/fs/bpf/t"}, log: discardLogger()}
	if err := a.WriteCNIConf(nil, 0); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join(dir, "10-idcni.conflist"))
	if err != nil {
		t.Fatal(err)
	}
	var conf struct {
		Name    string           `json:"name"`
		Plugins []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(raw, &conf); err != nil {
		t.Fatal(err)
	}
	p := conf.Plugins[0]
	if conf.Name != "idcni" || p["agentSocket"] != "/run/test/agent.sock" || p["agentRequired"] != true || p["bpfRoot"] != "/sys/fs/bpf/t" {
		t.Fatalf("written config: %s", raw)
	}
	if err := Uninstall(dir, "10-idcni.conflist", filepath.Join(dir, "no-pins")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "10-idcni.conflist")); !os.IsNotExist(err) {
		t.Fatal("uninstall left the config")
	}
}

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// The informers keep of a Pod what identities, addresses, named ports and
// the endpoint test read, and nothing else.
func TestTrimKeepsWhatTheAgentReads(t *testing.T) {
	full := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "shop", UID: "u1", ResourceVersion: "7", Labels: map[string]string{"app": "web"},
			Annotations: map[string]string{"big": strings.Repeat("x", 4096)}, ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "kubelet"}}},
		Spec: corev1.PodSpec{NodeName: "n1", HostNetwork: false,
			InitContainers: []corev1.Container{{Name: "sidecar", Image: "envoy", Ports: []corev1.ContainerPort{{Name: "admin", ContainerPort: 9901}}}},
			Containers:     []corev1.Container{{Name: "c", Image: "nginx", Command: []string{"nginx"}, Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 80}}}}},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.1.0.2", PodIPs: []corev1.PodIP{{IP: "10.1.0.2"}, {IP: "fd00::2"}},
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady}}},
	}
	obj, err := trim(full)
	if err != nil {
		t.Fatal(err)
	}
	p := obj.(*corev1.Pod)
	if p.Name != "web" || p.Namespace != "shop" || p.UID != "u1" || p.ResourceVersion != "7" || p.Labels["app"] != "web" ||
		p.Spec.NodeName != "n1" || p.Status.Phase != corev1.PodRunning || len(p.Status.PodIPs) != 2 || p.Status.PodIP != "10.1.0.2" ||
		!sameContainerPorts(full, p) {
		t.Fatalf("trim lost something the agent reads: %+v", p)
	}
	if p.Annotations != nil || p.ManagedFields != nil || p.Spec.Containers[0].Image != "" || p.Status.Conditions != nil {
		t.Fatalf("trim kept what the agent never reads: %+v", p)
	}
}
