package e2e

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/internal/clitest"
)

// labelledEvent is what a line of 'policyctl monitor -o json' says about
// the identities: their node-local numbers and the label sets that compare
// across nodes.
type labelledEvent struct {
	SrcIdentity identity.ID       `json:"srcIdentity"`
	DstIdentity identity.ID       `json:"dstIdentity"`
	SrcLabels   map[string]string `json:"srcLabels"`
	DstLabels   map[string]string `json:"dstLabels"`
}

// Identity numbers are node-local, so the real agent's numbers come with
// their label sets: in policyctl identity (through the agent, and from the
// state file once it is gone) and in every monitor line (the agent's
// stream, and the ring read directly once it is gone).
func TestIdentityLabelsFromAgentAndStateFile(t *testing.T) {
	e := newAgentEnv(t)
	e.kube.CreateNamespace(t, "lbl", map[string]string{"team": "blue"})
	server := e.newPod(t, "lbl", "server", map[string]string{"role": "server"})
	intruder := e.newPod(t, "lbl", "intruder", map[string]string{"role": "intruder"})
	server.serve(t, 80)
	e.apply(t, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "deny-server", Namespace: "lbl"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"role": "server"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
		},
	})
	eventually(t, "intruder cut off from server", false, func() bool { return intruder.reach(server, 80) })

	ctl := clitest.ForRoot(t, e.BPFRoot, e.agent.socket)
	ctl.State = e.state

	// Through the agent: every pod's identity with its labels and pods.
	var l api.IdentityList
	r := ctl.MustRun("policyctl", "identity", "list", "-o", "json")
	if err := json.Unmarshal([]byte(r.Stdout), &l); err != nil {
		t.Fatalf("identity list -o json: %v\n%s", err, r)
	}
	idOf := func(pod string) api.Identity {
		t.Helper()
		for _, x := range l.Identities {
			if slices.Contains(x.Pods, pod) {
				return x
			}
		}
		t.Fatalf("no identity lists pod %s:\n%s", pod, r.Stdout)
		return api.Identity{}
	}
	srv, intr := idOf("lbl/server"), idOf("lbl/intruder")
	for _, c := range []struct {
		x    api.Identity
		role string
	}{{srv, "server"}, {intr, "intruder"}} {
		if !c.x.ID.IsLabel() || c.x.Kind != "label" || c.x.Labels["role"] != c.role ||
			c.x.Labels[identity.NamespaceLabel] != "lbl" || c.x.Labels[identity.NamespaceLabelPrefix+"team"] != "blue" {
			t.Errorf("identity of lbl/%s = %+v", c.role, c.x)
		}
	}
	r = ctl.MustRun("policyctl", "identity", "get", fmt.Sprint(srv.ID))
	for _, want := range []string{"role=server", identity.NamespaceLabelPrefix + "team=blue", "lbl/server"} {
		if !strings.Contains(r.Stdout, want) {
			t.Errorf("identity get %d through the agent lacks %q:\n%s", srv.ID, want, r)
		}
	}
	ctl.MustFail("is not allocated on this node; identity numbers are node-local", false, "policyctl", "identity", "get", "16000000")

	// Monitor through the agent: the labels come with the events.
	ev, _ := watchDrop(t, ctl, intruder, server, "-o", "json")
	checkLabelled(t, "through the agent", ev, intr.ID, srv.ID)
	line, _ := watchDrop(t, ctl, intruder, server)
	for _, want := range []string{fmt.Sprintf("id %d (ns=lbl,role=intruder)", intr.ID), fmt.Sprintf("id %d (ns=lbl,role=server)", srv.ID)} {
		if !strings.Contains(line, want) {
			t.Errorf("monitor text through the agent lacks %q:\n%s", want, line)
		}
	}

	// The agent holds the state file for as long as it runs: a tool not
	// pointed at its socket gets a clear error, not a hang.
	elsewhere := *ctl
	elsewhere.Socket = filepath.Join(t.TempDir(), "no-agent.sock")
	start := time.Now()
	elsewhere.MustFail("is locked by another process (a running idcni-agent", false, "policyctl", "identity", "list")
	if took := time.Since(start); took > 20*time.Second {
		t.Errorf("identity list waited %s on the agent's state file", took)
	}

	// Without the agent: the state file it left, read-only, and the ring
	// read directly. Enforcement goes on, so do the drops.
	t.Cleanup(func() {
		// Before the pods' DELs (cleanups run last first): the plugin
		// of this env needs its agent.
		if e.agent.cmd == nil {
			e.agent.start()
		}
	})
	e.agent.kill9()
	var one api.Identity
	r = ctl.MustRun("policyctl", "identity", "get", fmt.Sprint(srv.ID), "-o", "json")
	if err := json.Unmarshal([]byte(r.Stdout), &one); err != nil || one.Labels["role"] != "server" || !slices.Contains(one.Pods, "lbl/server") {
		t.Errorf("identity get %d from the state file = %+v, %v\n%s", srv.ID, one, err, r)
	}
	ev, stderr := watchDrop(t, ctl, intruder, server, "-o", "json")
	if !strings.Contains(stderr, "Listening for verdicts of the datapath") {
		t.Errorf("monitor did not read the ring itself:\n%s", stderr)
	}
	checkLabelled(t, "from the state file", ev, intr.ID, srv.ID)
	if strings.Contains(stderr, "no label set") {
		t.Errorf("monitor without the agent warns of missing labels:\n%s", stderr)
	}
	e.agent.start()
}

func checkLabelled(t *testing.T, how, line string, src, dst identity.ID) {
	t.Helper()
	var ev labelledEvent
	if err := json.Unmarshal([]byte(line), &ev); err != nil {
		t.Fatalf("monitor -o json %s: %v\n%s", how, err, line)
	}
	if ev.SrcIdentity != src || ev.DstIdentity != dst || ev.SrcLabels["role"] != "intruder" || ev.DstLabels["role"] != "server" ||
		ev.SrcLabels[identity.NamespaceLabel] != "lbl" || ev.DstLabels[identity.NamespaceLabelPrefix+"team"] != "blue" {
		t.Errorf("monitor -o json %s: want %d (role=intruder) -> %d (role=server) with their labels, got:\n%s", how, src, dst, line)
	}
}

// watchDrop runs policyctl monitor for one drop while from knocks on
// to's port 80, and returns the line and monitor's stderr.
func watchDrop(t *testing.T, ctl *clitest.Env, from, to *kpod, args ...string) (string, string) {
	t.Helper()
	mon := ctl.Start("policyctl", append([]string{"monitor", "--verdict", "drop", "-c", "1"}, args...)...)
	if !mon.WaitStderr("Listening for verdicts", 10*time.Second) {
		t.Fatalf("policyctl monitor did not start: %s", mon.Stderr())
	}
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case l, ok := <-mon.Lines():
			if !ok {
				t.Fatalf("policyctl monitor exited without an event: %s", mon.Stderr())
			}
			_, _, _ = mon.Interrupt(5 * time.Second)
			return l, mon.Stderr()
		default:
		}
		from.reach(to, 80)
	}
	t.Fatalf("policyctl monitor saw no drop in 20s: %s", mon.Stderr())
	return "", ""
}
