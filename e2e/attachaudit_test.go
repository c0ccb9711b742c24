package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/idcni/idcni/cni"
)

// TestAgentAuditReattachesDetachedPrograms is issue 14's unenforced pod
// that looked healthy: a pod whose programs went away (here: its tcx link
// pins removed, which detaches them, as `--uninstall` did under running
// pods) ran with no policy while the agent kept writing its entries. The
// agent's audit must find it, attach the programs again, count the repair
// and log it, and the pod's policy must hold again.
func TestAgentAuditReattachesDetachedPrograms(t *testing.T) {
	e := newAgentEnvArgs(t, "--audit-interval", "1s")

	e.kube.CreateNamespace(t, "aud", nil)
	client := e.newPod(t, "aud", "client", map[string]string{"app": "client"})
	server := e.newPod(t, "aud", "server", map[string]string{"app": "server"})
	client.serve(t, 80)
	if !server.reach(client, 80) {
		t.Fatal("server -> client:80 denied before any policy")
	}
	e.apply(t, &networkingv1.NetworkPolicy{
		// The server may send nothing: its egress is judged only by
		// the program on its own host veth.
		ObjectMeta: metav1.ObjectMeta{Name: "server-deny-egress", Namespace: "aud"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "server"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
		},
	})
	eventually(t, "server -> client:80 under the server's deny-egress", false, func() bool { return server.reach(client, 80) })

	host := cni.HostVethName(server.ContainerID, server.IfName)
	l, err := netlink.LinkByName(host)
	if err != nil {
		t.Fatal(err)
	}
	dp := e.Datapath(t)
	defer dp.Close()
	// Detach: a tcx link lives as long as something holds it, and only
	// its pin does.
	for _, suffix := range []string{"ingress", "egress"} {
		if err := os.Remove(filepath.Join(e.BPFRoot, "links", host+"_"+suffix)); err != nil {
			t.Fatal(err)
		}
	}
	// The kernel releases the links a moment after their pins go, and
	// the audit runs every second: the repair counter is what shows the
	// audit found the veth without its programs.
	waitFor(t, 30*time.Second, "the audit attaches the server's programs again", func() bool {
		return metricValue(t, e.agent.metrics, "idcni_attach_repairs_total") >= 1
	})
	if ok, err := dp.AttachedIndex(l.Attrs().Index); err != nil || !ok {
		t.Fatalf("programs not attached to %s after the repair (%v, %v)", host, ok, err)
	}
	if server.reach(client, 80) {
		t.Fatal("server -> client:80 allowed after the audit re-attached the programs: its deny-egress is not enforced")
	}
	if n := metricValue(t, e.agent.metrics, "idcni_endpoints_unattached"); n != 0 {
		t.Errorf("idcni_endpoints_unattached = %v, want 0", n)
	}
	b, err := os.ReadFile(e.agent.log)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), "attached them again") || !strings.Contains(string(b), host) {
		t.Errorf("agent log has no repair line naming %s", host)
	}
	if out := e.cli(t, "policyctl", "status"); strings.Contains(out, "not attached") {
		t.Errorf("policyctl status reports unattached endpoints after the repair:\n%s", out)
	}

	// With no agent to repair it, policyctl status says which pod runs
	// without its programs.
	e.agent.stop()
	for _, suffix := range []string{"ingress", "egress"} {
		if err := os.Remove(filepath.Join(e.BPFRoot, "links", host+"_"+suffix)); err != nil {
			t.Fatal(err)
		}
	}
	var out string
	deadline := time.Now().Add(10 * time.Second)
	for {
		out = e.cli(t, "policyctl", "status")
		if strings.Contains(out, host) && strings.Contains(out, "not attached") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("policyctl status does not report %s as unattached:\n%s", host, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("policyctl status:\n%s", grepLines(out, "WARNING"))
	// The agent's start repairs it before it is ready. It loads programs
	// of its own, so the check asks about the ones pinned now.
	e.agent.start()
	now := e.Datapath(t)
	defer now.Close()
	if ok, err := now.AttachedIndex(l.Attrs().Index); err != nil || !ok {
		t.Errorf("the agent's start did not attach %s's programs again (%v, %v)", host, ok, err)
	}
}
