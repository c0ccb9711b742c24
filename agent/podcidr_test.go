package agent

import (
	"context"
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/idcni/idcni/manifests"
)

// conflistIPAM reads the idcni plugin's ipam section of a written conflist.
func conflistIPAM(t *testing.T, path string) map[string]any {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var conf struct {
		Plugins []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(raw, &conf); err != nil {
		t.Fatal(err)
	}
	for _, p := range conf.Plugins {
		if p["type"] == "idcni" {
			ipam, _ := p["ipam"].(map[string]any)
			return ipam
		}
	}
	t.Fatalf("no idcni plugin in %s", raw)
	return nil
}

// rangeSubnets are host-local's ranges as subnets, one string per range set.
func rangeSubnets(t *testing.T, ipam map[string]any) []string {
	t.Helper()
	var out []string
	sets, _ := ipam["ranges"].([]any)
	for _, set := range sets {
		var subs []string
		for _, r := range set.([]any) {
			subs = append(subs, r.(map[string]any)["subnet"].(string))
		}
		out = append(out, strings.Join(subs, ","))
	}
	return out
}

func prefixes(s ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, x := range s {
		out = append(out, netip.MustParsePrefix(x))
	}
	return out
}

// The conflist hands out the Node's ranges, one range set per family, and
// keeps the template's other IPAM keys.
func TestCNIConfRangesFromPodCIDRs(t *testing.T) {
	tmpl := []byte(`{"cniVersion":"1.0.0","name":"idcni","plugins":[{"type":"idcni","ipam":{"type":"host-local","dataDir":"/var/lib/x","subnet":"10.13.0.0/24","ranges":[[{"subnet":"10.13.0.0/24"}]]}}]}`)
	for _, c := range []struct {
		name  string
		cidrs []netip.Prefix
		want  []string
	}{
		{"v4", prefixes("10.13.5.0/24"), []string{"10.13.5.0/24"}},
		{"dual-stack", prefixes("10.13.6.0/24", "fd00:13:6::/64"), []string{"10.13.6.0/24", "fd00:13:6::/64"}},
		{"v6 first", prefixes("fd00:13:7::/64", "10.13.7.0/24"), []string{"fd00:13:7::/64", "10.13.7.0/24"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			a := &Agent{cfg: Config{CNIConfDir: dir, CNIConfName: "10-idcni.conflist", CNIConf: tmpl, Socket: "/run/x.sock"}, log: discardLogger()}
			if err := a.WriteCNIConf(c.cidrs, 0); err != nil {
				t.Fatal(err)
			}
			ipam := conflistIPAM(t, filepath.Join(dir, "10-idcni.conflist"))
			if got := rangeSubnets(t, ipam); !slices.Equal(got, c.want) {
				t.Errorf("ranges %v, want %v", got, c.want)
			}
			if ipam["type"] != "host-local" || ipam["dataDir"] != "/var/lib/x" {
				t.Errorf("ipam %v: type or dataDir lost", ipam)
			}
			if _, ok := ipam["subnet"]; ok {
				t.Errorf("ipam %v keeps the single-range subnet beside ranges", ipam)
			}
		})
	}
	// The shipped template too: its static range is replaced.
	dir := t.TempDir()
	a := &Agent{cfg: Config{CNIConfDir: dir, CNIConfName: "c.conflist", CNIConf: manifests.CNIConflist}, log: discardLogger()}
	if err := a.WriteCNIConf(prefixes("10.13.9.0/24"), 0); err != nil {
		t.Fatal(err)
	}
	if got := rangeSubnets(t, conflistIPAM(t, filepath.Join(dir, "c.conflist"))); !slices.Equal(got, []string{"10.13.9.0/24"}) {
		t.Errorf("shipped template: ranges %v", got)
	}
}

func nodeWithCIDRs(name, internalIP string, cidrs ...string) *corev1.Node {
	n := node(name, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: internalIP})
	n.Spec.PodCIDRs = cidrs
	if len(cidrs) > 0 {
		n.Spec.PodCIDR = cidrs[0]
	}
	return n
}

// startCNIConf is what Run does once the first write of the maps is done.
func (ta *testAgent) startCNIConf(t *testing.T) {
	t.Helper()
	ta.started = true
	if err := ta.updateCNIConf(); err != nil {
		t.Fatal(err)
	}
	if !ta.confWritten {
		ta.removeStaleCNIConf()
	}
}

func (ta *testAgent) isReady() bool {
	select {
	case <-ta.ready:
		return true
	default:
		return false
	}
}

func withConfDir(dir string, podCIDRs ...netip.Prefix) func(*Agent) {
	return func(a *Agent) {
		a.cfg.CNIConfDir, a.cfg.CNIConfName, a.cfg.CNIConf = dir, "10-idcni.conflist", manifests.CNIConflist
		a.cfg.PodCIDRs = podCIDRs
	}
}

// Issue 12: every node handed out 10.13.0.0/24, fixed in the conflist. A
// Node without a pod CIDR (and no --pod-cidr) gets no config, a log line
// and a Warning Event, and the agent is not ready; once the pod CIDR comes
// the config is written with it and the agent is ready. A stale config of
// an earlier run is removed at start.
func TestNoPodCIDRRefusedUntilItComes(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "10-idcni.conflist")
	if err := os.WriteFile(path, []byte(`{"stale":true}`), 0o644); err != nil {
		t.Fatal(err)
	}
	ta := newTestAgentWith(t, newFakeMaps(), withConfDir(dir), nodeWithCIDRs(localNode, "192.0.2.10"))
	ta.startCNIConf(t)
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("CNI config present without a pod CIDR (err %v)", err)
	}
	if ta.isReady() {
		t.Fatal("ready without a pod CIDR")
	}
	select {
	case ev := <-ta.events.Events:
		if !strings.HasPrefix(ev, "Warning NoPodCIDR") || !strings.Contains(ev, localNode) ||
			!strings.Contains(ev, "--allocate-node-cidrs") || !strings.Contains(ev, "--pod-cidr") {
			t.Errorf("event %q", ev)
		}
	default:
		t.Fatal("no NoPodCIDR event")
	}
	// A resync of the Node without a pod CIDR reports nothing new.
	ta.queue.Add(key{kind: kindNode})
	ta.settle(t)
	if len(ta.events.Events) != 0 {
		t.Errorf("repeated event: %q", <-ta.events.Events)
	}

	n, err := ta.client.CoreV1().Nodes().Get(context.Background(), localNode, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	n.Spec.PodCIDRs, n.Spec.PodCIDR = []string{"10.13.4.0/24", "fd00:13:4::/64"}, "10.13.4.0/24"
	n.ResourceVersion = "2"
	if _, err := ta.client.CoreV1().Nodes().Update(context.Background(), n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	ta.settle(t)
	if !ta.isReady() {
		t.Fatal("not ready after the pod CIDR came")
	}
	if got := rangeSubnets(t, conflistIPAM(t, path)); !slices.Equal(got, []string{"10.13.4.0/24", "fd00:13:4::/64"}) {
		t.Fatalf("ranges %v after the pod CIDR came", got)
	}

	// Changed pod CIDRs rewrite the config.
	n.Spec.PodCIDRs, n.Spec.PodCIDR = []string{"10.13.8.0/24"}, "10.13.8.0/24"
	n.ResourceVersion = "3"
	if _, err := ta.client.CoreV1().Nodes().Update(context.Background(), n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	ta.settle(t)
	if got := rangeSubnets(t, conflistIPAM(t, path)); !slices.Equal(got, []string{"10.13.8.0/24"}) {
		t.Fatalf("ranges %v after the pod CIDRs changed", got)
	}
}

// --pod-cidr wins over the Node's, and stands in for a missing one.
func TestPodCIDROverride(t *testing.T) {
	for _, n := range []*corev1.Node{nodeWithCIDRs(localNode, "192.0.2.10"), nodeWithCIDRs(localNode, "192.0.2.10", "10.13.1.0/24")} {
		dir := t.TempDir()
		ta := newTestAgentWith(t, newFakeMaps(), withConfDir(dir, prefixes("10.77.0.0/24")...), n)
		ta.startCNIConf(t)
		if !ta.isReady() {
			t.Fatal("not ready with --pod-cidr")
		}
		if got := rangeSubnets(t, conflistIPAM(t, filepath.Join(dir, "10-idcni.conflist"))); !slices.Equal(got, []string{"10.77.0.0/24"}) {
			t.Errorf("Node pod CIDRs %v: ranges %v, want the override", n.Spec.PodCIDRs, got)
		}
	}
}

// Without a CNI config directory nothing is written and no pod CIDR is
// needed.
func TestNoConfDirNeedsNoPodCIDR(t *testing.T) {
	ta := newTestAgent(t, newFakeMaps(), nodeWithCIDRs(localNode, "192.0.2.10"))
	ta.startCNIConf(t)
	if !ta.isReady() {
		t.Fatal("not ready")
	}
	if len(ta.events.Events) != 0 {
		t.Errorf("event %q", <-ta.events.Events)
	}
}
