package agent

import (
	"encoding/json"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	corev1 "k8s.io/api/core/v1"

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
	if err := a.WriteCNIConf(nil); err != nil {
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
