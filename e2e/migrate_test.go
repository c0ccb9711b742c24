package e2e

import (
	"bytes"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netlink"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/cni"
	"github.com/idcni/idcni/e2e/internal/cnitest"
	"github.com/idcni/idcni/identity"
)

// refusedRollback is what a build's agent says when it refuses another
// layout's pins and leaves them as they were.
const refusedRollback = "nothing was changed"

// oldBin is the bin/ of `make build` at an earlier commit, the build an
// upgrade starts from and a rollback returns to: IDCNI_MIGRATE_OLD_BIN.
// Two references: a82db2e, the last build of pin layout 1 (as in
// TestRollingUpgrade before layout 3), which refuses to take later pins
// back, changing nothing (layout 2's counters have entries it has no
// index for), and 460f741, the last build of layout 2, which must take
// them back (it reads the optional tails the pins' descriptor declares).
// Both tests accept a82db2e's refusal, which is what a rollback to it
// does, and go on as the node would, on this build.
//
//	git worktree add /tmp/old-migrate 460f741 && make -C /tmp/old-migrate build
//	IDCNI_MIGRATE_OLD_BIN=/tmp/old-migrate/bin go test ./e2e -run 'TestAgentUpgradeAndRollback|TestUpgradeAndRollbackWithAnEarlierBuild'
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

// oldLayout is the layout of the pins the earlier build made under root,
// which must be older than this build's. A rollback to a build of layout
// 2 or later must succeed: it carries the pins back by their descriptor.
// Only layout 1 (a82db2e) may refuse.
func oldLayout(t *testing.T, root string) (mayRefuse bool) {
	t.Helper()
	l, err := bpf.PinnedLayout(root)
	if err != nil || l < 1 || l >= bpf.LayoutVersion {
		t.Fatalf("pins of the earlier build say layout %d (%v): IDCNI_MIGRATE_OLD_BIN is not a build of an earlier layout than %d", l, err, bpf.LayoutVersion)
	}
	return l == 1
}

// refusedKeptPrograms fails unless the programs pinned under root are
// still ids, as a rollback the earlier build refused must leave them.
func refusedKeptPrograms(t *testing.T, root string, ids map[string]ebpf.ProgramID) {
	t.Helper()
	if now := pinnedProgramIDs(t, root); !reflect.DeepEqual(now, ids) {
		t.Fatalf("a refused rollback replaced the programs: %v, then %v", ids, now)
	}
	t.Log("the earlier build refused this build's pins and changed nothing")
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
// at both hooks of every pod's host veth, whichever build pinned them.
func runsPinnedPrograms(t *testing.T, e *agentEnv, what string, pods ...*kpod) {
	t.Helper()
	for _, p := range pods {
		hooksRunPinned(t, e.BPFRoot, what, "pod "+p.name, cni.HostVethName(p.ContainerID, p.IfName))
	}
}

// hooksRunPinned fails unless the kernel runs the programs pinned under
// root at both hooks of the host veth host (who, in the message).
func hooksRunPinned(t *testing.T, root, what, who, host string) {
	t.Helper()
	l, err := netlink.LinkByName(host)
	if err != nil {
		t.Fatal(err)
	}
	missing, err := bpf.MissingPinnedHooks(root, l.Attrs().Index)
	if err != nil {
		t.Fatal(err)
	}
	if len(missing) > 0 {
		t.Fatalf("%s: %s runs no current program at its %v hook", what, who, missing)
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
	mayRefuse := oldLayout(t, e.BPFRoot)

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

	// The rollback: the earlier build takes the pins back, or refuses
	// and changes nothing (then the node stays on this build's pins and
	// programs, and this build's plugin).
	ids := pinnedProgramIDs(t, e.BPFRoot)
	e.agent.stop()
	e.agent.bin = filepath.Join(old, "idcni-agent")
	later := late
	if e.agent.startOrExit() {
		if !mayRefuse {
			log, _ := os.ReadFile(e.agent.log)
			t.Fatalf("the earlier build's agent, of a layout that carries pins back, exited:\n%s", grepLines(string(log), "level=ERROR"))
		}
		if log, _ := os.ReadFile(e.agent.log); !strings.Contains(string(log), refusedRollback) {
			t.Fatalf("the earlier build's agent exited without saying it changed nothing:\n%s", grepLines(string(log), "level=ERROR"))
		}
		refusedKeptPrograms(t, e.BPFRoot, ids)
		holds("refused rollback")
	} else {
		holds("rollback to the earlier build")
		e.CNI = cnitest.NewCNIConfig(old, e.CacheDir)
		later = e.newPod(t, "app", "later", map[string]string{"role": "intruder"})
		eventually(t, "a pod added after the rollback is denied", false, func() bool { return later.reach(server, 80) })
	}

	restart(buildAgent(t), "upgrade again")
	runsPinnedPrograms(t, e, "upgrade again", late, later)
	log, _ := os.ReadFile(e.agent.log)
	if strings.Contains(string(log), "level=ERROR") {
		t.Logf("agent log has errors:\n%s", grepLines(string(log), "level=ERROR"))
	}
}

// startPins is what a node's pins hold that an upgrade must keep: the
// endpoints, the ipcache and the local pods.
type startPins struct {
	endpoints map[int]bpf.Endpoint
	ipcache   map[netip.Prefix]identity.ID
	local     map[netip.Addr]bpf.LocalPod
}

func readPins(t *testing.T, e *cnitest.Env) startPins {
	t.Helper()
	dp := e.Datapath(t)
	var s startPins
	var err error
	if s.endpoints, err = dp.Endpoints(); err != nil {
		t.Fatal(err)
	}
	if s.ipcache, err = dp.IPCache(); err != nil {
		t.Fatal(err)
	}
	if s.local, err = dp.LocalPods(); err != nil {
		t.Fatal(err)
	}
	return s
}

// podsRunPinned fails unless the kernel runs the programs pinned now at
// both hooks of each pod's host veth.
func podsRunPinned(t *testing.T, e *cnitest.Env, what string, pods ...*cnitest.Pod) {
	t.Helper()
	for _, p := range pods {
		host := cni.HostVethName(p.ContainerID, p.IfName)
		hooksRunPinned(t, e.BPFRoot, what, "host veth "+host, host)
	}
}

// startOldAgent runs the earlier build's agent start as far as its
// datapath load (Load with Replace, its rollback of the pins) and stops
// it: it runs in a network namespace of its own (its start removes the
// nftables table and routes of its own namespace) with a kubeconfig that
// leads nowhere, so it never gets further than waiting for the API
// server. The tcx links it moves are pinned in the shared bpffs. It
// reports whether the agent refused the pins, exiting with the line that
// says it changed nothing.
func startOldAgent(t *testing.T, old string, e *cnitest.Env) (refused bool) {
	t.Helper()
	dir := t.TempDir()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte("apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: \"https://127.0.0.1:1\", insecure-skip-tls-verify: true}\ncontexts:\n- name: c\n  context: {cluster: c, user: u}\nusers:\n- name: u\n  user: {token: x}\ncurrent-context: c\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	before := pinnedProgramIDs(t, e.BPFRoot)
	var out bytes.Buffer
	cmd := exec.Command("unshare", "-n", filepath.Join(old, "idcni-agent"), "--kubeconfig", kubeconfig, "--node-name", "node-"+cnitest.RandHex(6),
		"--bpf-root", e.BPFRoot, "--state", filepath.Join(dir, "state.db"), "--socket", filepath.Join(dir, "agent.sock"),
		"--metrics-addr", "127.0.0.1:0", "--cni-conf-dir", filepath.Join(dir, "net.d"),
		"--masquerade=false", "--tunnel-port=0", "--routing-mode=direct")
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop := func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-exited
	}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		select {
		case err := <-exited:
			if strings.Contains(out.String(), refusedRollback) {
				return true
			}
			t.Fatalf("the earlier build's agent exited before it replaced the programs (%v):\n%s", err, out.String())
		default:
		}
		after := pinnedProgramIDs(t, e.BPFRoot)
		if after["from_pod"] != before["from_pod"] && after["to_pod"] != before["to_pod"] {
			break
		}
		if time.Now().After(deadline) {
			stop()
			t.Fatalf("the earlier build's agent did not replace the programs in 2 minutes:\n%s", out.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The programs are pinned last: its load is done.
	stop()
	return false
}

// TestUpgradeAndRollbackWithAnEarlierBuild goes between the earlier build
// (IDCNI_MIGRATE_OLD_BIN) and this one on a node's pins, both ways, with
// pods attached: the earlier plugin pins layout 1 (no descriptor), this
// build's start (Load with Replace, the agent's start path) takes them,
// the earlier build's agent start takes them back, this build's again.
// Every start keeps every endpoint, ipcache and local pod entry, leaves
// every pod running the programs pinned after it, and the plugin of
// either build adds and deletes pods on the pins of the other.
func TestUpgradeAndRollbackWithAnEarlierBuild(t *testing.T) {
	old := oldBin(t)
	e := cnitest.New(t, cnitest.Options{})
	newCNI := e.CNI
	e.CNI = cnitest.NewCNIConfig(old, e.CacheDir)
	p1, p2 := e.NewPod(t), e.NewPod(t)
	r1, r2 := e.MustAdd(t, p1), e.MustAdd(t, p2)
	t.Cleanup(func() { _ = e.Del(p1); _ = e.Del(p2) })
	mayRefuse := oldLayout(t, e.BPFRoot)

	upgrade := func(what string) {
		t.Helper()
		ids := pinnedProgramIDs(t, e.BPFRoot)
		dp, err := bpf.Load(bpf.Options{Root: e.BPFRoot, Replace: true})
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		dp.Close()
		if now := pinnedProgramIDs(t, e.BPFRoot); now["from_pod"] == ids["from_pod"] {
			t.Fatalf("%s: the programs were not replaced", what)
		}
		if l, err := bpf.PinnedLayout(e.BPFRoot); err != nil || l != bpf.LayoutVersion {
			t.Fatalf("%s: pins say layout %d (%v), want %d", what, l, err, bpf.LayoutVersion)
		}
	}
	upgrade("upgrade to this build")
	// This build cannot read an earlier layout's maps (their sizes
	// differ), so the earlier build's pods are looked for in what it carried over.
	podsPinned(t, e, "after the upgrade", map[*cnitest.Pod]*current.Result{p1: r1, p2: r2})
	podsRunPinned(t, e, "after the upgrade", p1, p2)

	// This build's plugin on them: a new pod, and a pod of the earlier
	// build deleted.
	e.CNI = newCNI
	p3 := e.NewPod(t)
	e.MustAdd(t, p3)
	t.Cleanup(func() { _ = e.Del(p3) })
	if err := e.Del(p1); err != nil {
		t.Fatalf("this build's DEL of a pod the earlier build added: %v", err)
	}
	mid := readPins(t, e)
	podsRunPinned(t, e, "this build's ADD after the upgrade", p2, p3)

	ids := pinnedProgramIDs(t, e.BPFRoot)
	if startOldAgent(t, old, e) {
		if !mayRefuse {
			t.Fatal("the earlier build's agent, of a layout that carries pins back, refused this build's pins")
		}
		// Refused: nothing of this build's may have moved.
		refusedKeptPrograms(t, e.BPFRoot, ids)
		if got := readPins(t, e); !reflect.DeepEqual(got, mid) {
			t.Fatalf("a refused rollback changed the maps:\nbefore %+v\nafter  %+v", mid, got)
		}
		podsRunPinned(t, e, "after the refused rollback", p2, p3)
		upgrade("upgrade again")
		if got := readPins(t, e); !reflect.DeepEqual(got, mid) {
			t.Fatalf("the second upgrade changed the maps:\nbefore %+v\nafter  %+v", mid, got)
		}
		podsRunPinned(t, e, "after the second upgrade", p2, p3)
		return
	}
	// Taken back: the earlier build's plugin on them, then this build's
	// start again, which must carry everything over.
	e.CNI = cnitest.NewCNIConfig(old, e.CacheDir)
	p4 := e.NewPod(t)
	r4 := e.MustAdd(t, p4)
	t.Cleanup(func() { _ = e.Del(p4) })
	if err := e.Del(p3); err != nil {
		t.Fatalf("the earlier build's DEL of a pod this build added: %v", err)
	}
	upgrade("upgrade again")
	podsPinned(t, e, "after the second upgrade", map[*cnitest.Pod]*current.Result{p2: r2, p4: r4})
	podsRunPinned(t, e, "after the second upgrade", p2, p4)
}

// podsPinned fails unless every pod has its endpoint (by host veth) and a
// local pod entry for each of its addresses that names the endpoint's
// conntrack slot (layout 4 appended it; the migration fills it in for the
// pods an earlier build made).
func podsPinned(t *testing.T, e *cnitest.Env, what string, pods map[*cnitest.Pod]*current.Result) {
	t.Helper()
	got := readPins(t, e)
	for p, r := range pods {
		host := cni.HostVethName(p.ContainerID, p.IfName)
		l, err := netlink.LinkByName(host)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		ep, ok := got.endpoints[l.Attrs().Index]
		if !ok {
			t.Fatalf("%s: no endpoint for %s (ifindex %d) in %+v", what, host, l.Attrs().Index, got.endpoints)
		}
		for _, ip := range r.IPs {
			a, _ := netip.AddrFromSlice(ip.Address.IP)
			lp, ok := got.local[a.Unmap()]
			if !ok {
				t.Fatalf("%s: no local pod entry for %s (%s) in %+v", what, a, host, got.local)
			}
			if lp.ConntrackSlot == 0 || lp.ConntrackSlot != ep.ConntrackSlot {
				t.Fatalf("%s: the local pod entry for %s (%s) names conntrack slot %d, its endpoint %d", what, a, host, lp.ConntrackSlot, ep.ConntrackSlot)
			}
		}
	}
}
