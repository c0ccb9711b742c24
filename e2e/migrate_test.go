package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/cni"
	"github.com/idcni/idcni/e2e/internal/cnitest"
)

// oldBin is the bin/ of `make build` at an earlier commit, the build an
// upgrade starts from and a rollback returns to: IDCNI_MIGRATE_OLD_BIN.
// Today's reference is d88275c, the last build of pin layout 1 without a
// layout descriptor:
//
//	git worktree add /tmp/old-migrate d88275c && make -C /tmp/old-migrate build
//	IDCNI_MIGRATE_OLD_BIN=/tmp/old-migrate/bin go test ./e2e -run TestAgentUpgradeAndRollback
func oldBin(t *testing.T) string {
	t.Helper()
	d := os.Getenv("IDCNI_MIGRATE_OLD_BIN")
	if d == "" {
		t.Skip("IDCNI_MIGRATE_OLD_BIN is not set: no earlier build to upgrade from (see oldBin)")
	}
	for _, name := range []string{"idcni", "idcni-agent", "host-local", "loopback"} {
		if _, err := os.Stat(filepath.Join(d, name)); err != nil {
			t.Fatalf("IDCNI_MIGRATE_OLD_BIN=%s: %v (run make build in that checkout)", d, err)
		}
	}
	return d
}

// pinnedProgramIDs is the kernel id of each program pinned under root.
func pinnedProgramIDs(t *testing.T, root string) map[string]ebpf.ProgramID {
	t.Helper()
	out := map[string]ebpf.ProgramID{}
	for _, name := range []string{"from_pod", "to_pod"} {
		p, err := ebpf.LoadPinnedProgram(filepath.Join(root, "progs", name), nil)
		if err != nil {
			t.Fatal(err)
		}
		info, err := p.Info()
		p.Close()
		if err != nil {
			t.Fatal(err)
		}
		out[name], _ = info.ID()
	}
	return out
}

// runsPinnedPrograms fails unless the kernel runs the programs pinned now
// at both hooks of every pod's host veth.
func runsPinnedPrograms(t *testing.T, e *agentEnv, what string, pods ...*kpod) {
	t.Helper()
	dp := e.Datapath(t)
	for _, p := range pods {
		host := cni.HostVethName(p.ContainerID, p.IfName)
		l, err := netlink.LinkByName(host)
		if err != nil {
			t.Fatal(err)
		}
		missing, err := dp.MissingHooks(l.Attrs().Index)
		if err != nil {
			t.Fatal(err)
		}
		if len(missing) > 0 {
			t.Fatalf("%s: pod %s runs no current program at its %v hook", what, p.name, missing)
		}
	}
}

// TestAgentUpgradeAndRollbackBetweenBuilds starts a node on the earlier
// build (agent and plugin), with a NetworkPolicy, an established
// connection and a denied pod; restarts the agent as this build (the
// DaemonSet's rollout), then as the earlier build again (its rollback),
// then as this build once more. Through every start the connection keeps
// carrying data, the denied pod stays denied, every pod runs the programs
// pinned at the time, and this build's starts leave a descriptor that
// says the pins' layout.
func TestAgentUpgradeAndRollbackBetweenBuilds(t *testing.T) {
	old := oldBin(t)
	e := newAgentEnvBin(t, filepath.Join(old, "idcni-agent"))
	newCNI := e.CNI
	e.CNI = cnitest.NewCNIConfig(old, e.CacheDir) // the earlier build's plugin
	e.kube.CreateNamespace(t, "app", nil)
	client := e.newPod(t, "app", "client", map[string]string{"role": "client"})
	server := e.newPod(t, "app", "server", map[string]string{"role": "server"})
	intruder := e.newPod(t, "app", "intruder", map[string]string{"role": "intruder"})
	server.serve(t, 80)
	e.apply(t, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "server", Namespace: "app"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"role": "server"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "client"}}}},
			}},
		},
	})
	eventually(t, "intruder cut off", false, func() bool { return intruder.reach(server, 80) })
	conn, err := client.dial(server.ip, 80, 2e9)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if !echoOK(conn) {
		t.Fatal("established connection does not carry data")
	}
	if _, err := os.Stat(filepath.Join(e.BPFRoot, "pin_layout")); err == nil {
		t.Fatal("the earlier build pinned a layout descriptor: IDCNI_MIGRATE_OLD_BIN is not a layout-1 build")
	}

	holds := func(what string) {
		t.Helper()
		if !echoOK(conn) {
			t.Fatalf("%s: the established connection broke", what)
		}
		if intruder.reach(server, 80) {
			t.Fatalf("%s: the intruder reaches the server", what)
		}
		if !client.reach(server, 80) {
			t.Fatalf("%s: the client no longer reaches the server", what)
		}
		runsPinnedPrograms(t, e, what, client, server, intruder)
	}
	restart := func(bin, what string) map[string]ebpf.ProgramID {
		t.Helper()
		before := pinnedProgramIDs(t, e.BPFRoot)
		e.agent.stop()
		e.agent.bin = bin
		e.agent.start()
		after := pinnedProgramIDs(t, e.BPFRoot)
		for name, id := range after {
			if id == before[name] {
				t.Fatalf("%s: program %s is still the one pinned before the start", what, name)
			}
		}
		holds(what)
		return after
	}

	restart(buildAgent(t), "upgrade to this build")
	if l, err := bpf.PinnedLayout(e.BPFRoot); err != nil || l != bpf.LayoutVersion {
		t.Fatalf("pins after this build's start say layout %d (%v), want %d", l, err, bpf.LayoutVersion)
	}
	// This build's plugin on the migrated pins.
	e.CNI = newCNI
	late := e.newPod(t, "app", "late", map[string]string{"role": "client"})
	eventually(t, "a pod added after the upgrade reaches the server", true, func() bool { return late.reach(server, 80) })

	restart(filepath.Join(old, "idcni-agent"), "rollback to the earlier build")
	e.CNI = cnitest.NewCNIConfig(old, e.CacheDir)
	later := e.newPod(t, "app", "later", map[string]string{"role": "intruder"})
	eventually(t, "a pod added after the rollback is denied", false, func() bool { return later.reach(server, 80) })

	restart(buildAgent(t), "upgrade again")
	runsPinnedPrograms(t, e, "upgrade again", late, later)
	log, _ := os.ReadFile(e.agent.log)
	if strings.Contains(string(log), "level=ERROR") {
		t.Logf("agent log has errors:\n%s", grepLines(string(log), "level=ERROR"))
	}
}
