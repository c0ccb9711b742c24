package agent

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// Sample-controller style tests: the agent's informers over a fake
// clientset, its writer loop driven by hand, and the maps in memory
// (fakeMaps). They check what the agent writes, not that the kernel takes
// it: the e2e tests run the real agent against a real kube-apiserver and
// the real datapath.

type testAgent struct {
	*Agent
	fm     *fakeMaps
	client *fake.Clientset
	events *record.FakeRecorder
}

const localNode = "node-a"

func newTestAgent(t *testing.T, fm *fakeMaps, objs ...runtime.Object) *testAgent {
	t.Helper()
	return newTestAgentWith(t, fm, nil, objs...)
}

// newTestAgentWith is newTestAgent with setup run on the agent before its
// informers start (to change its Config or give it fake routes).
func newTestAgentWith(t *testing.T, fm *fakeMaps, setup func(*Agent), objs ...runtime.Object) *testAgent {
	t.Helper()
	client := fake.NewClientset(objs...)
	cfg := Config{NodeName: localNode, StatePath: filepath.Join(t.TempDir(), "state.db"),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	a, err := newAgent(cfg, client, func() (*bpf.Datapath, datapathMaps, error) { return nil, fm, nil })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	rec := record.NewFakeRecorder(100)
	a.recorder = rec
	if setup != nil {
		setup(a)
	}
	ctx, cancel := context.WithCancel(context.Background())
	a.factory.Start(ctx.Done())
	t.Cleanup(func() { cancel(); a.factory.Shutdown() })
	if !cache.WaitForCacheSync(ctx.Done(), a.synced...) {
		t.Fatal("caches did not sync")
	}
	if err := a.resync(); err != nil {
		t.Fatal(err)
	}
	a.dirtySince = time.Now()
	if err := a.flush(); err != nil {
		t.Fatal(err)
	}
	ta := &testAgent{Agent: a, fm: fm, client: client, events: rec}
	// The informers' initial adds arrive as keys too; they change nothing.
	ta.settle(t)
	return ta
}

// settle waits for the informers' handlers to enqueue what the last change
// caused, then runs the writer loop until the queue is empty.
func (ta *testAgent) settle(t *testing.T) {
	t.Helper()
	quiet := 0
	for quiet < 20 {
		if ta.queue.Len() == 0 {
			quiet++
			time.Sleep(5 * time.Millisecond)
			continue
		}
		quiet = 0
		ta.processNext()
	}
	if len(ta.held) > 0 {
		t.Fatalf("%d callers still wait for a write", len(ta.held))
	}
}

// register hands a registration to the writer as the local API does.
func (ta *testAgent) register(t *testing.T, pod *corev1.Pod, ifindex int) {
	t.Helper()
	req := api.EndpointRequest{ContainerID: "c-" + pod.Name, HostIfName: fmt.Sprintf("idc%d", ifindex), HostIfIndex: ifindex,
		PodNamespace: pod.Namespace, PodName: pod.Name}
	for _, ip := range pod.Status.PodIPs {
		req.Addresses = append(req.Addresses, netip.MustParseAddr(ip.IP))
	}
	// The plugin's own entry comes first, as the plugin's ADD writes it.
	ta.fm.eps[ifindex] = bpf.Endpoint{Identity: identity.Unresolved, IPv4: req.Addresses[0], ConntrackSlot: uint32(ifindex)}
	ta.pending.put(req.ContainerID, endpointChange{register: req, pod: pod})
	ch := ta.waiting.wait(key{kind: kindEndpoint, name: req.ContainerID})
	ta.queue.Add(key{kind: kindEndpoint, name: req.ContainerID})
	ta.settle(t)
	select {
	case err := <-ch:
		if err != nil {
			t.Fatalf("register %s: %v", pod.Name, err)
		}
	default:
		t.Fatalf("register %s: not answered", pod.Name)
	}
}

func (ta *testAgent) unregister(t *testing.T, containerID string) {
	t.Helper()
	ta.pending.put(containerID, endpointChange{remove: true})
	ta.queue.Add(key{kind: kindEndpoint, name: containerID})
	ta.settle(t)
}

func ns(name string, labels map[string]string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels, ResourceVersion: "1"}}
}

func nodeObj(name, addr string) *corev1.Node {
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, ResourceVersion: "1"},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: addr}}}}
}

func pod(namespace, name, nodeName, ip string, labels map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name, Labels: labels, ResourceVersion: "1"},
		Spec:       corev1.PodSpec{NodeName: nodeName},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}},
	}
}

// allowFrom is a policy selecting pods with app=subject, allowing ingress
// on TCP port from pods with app=peer.
func allowFrom(namespace, name, subject, peer string, port int32) *networkingv1.NetworkPolicy {
	tcp := corev1.ProtocolTCP
	p := intstr.FromInt32(port)
	return &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name, ResourceVersion: "1"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": subject}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": peer}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &p}},
			}},
		},
	}
}

func (ta *testAgent) idOf(t *testing.T, namespace, name string) identity.ID {
	t.Helper()
	id, ok := ta.compiler.PodIdentity(namespace, name)
	if !ok {
		t.Fatalf("pod %s/%s has no identity", namespace, name)
	}
	return id
}

func hostPfx(s string) netip.Prefix {
	a := netip.MustParseAddr(s)
	return netip.PrefixFrom(a, a.BitLen())
}

// Issue 11, defect 1: every node wrote the rules of every identity of the
// cluster, so 270 pods with distinct labels on another node, under an
// "allow from the same namespace" policy, needed 270 x 270 entries on every
// node and overflowed the policy map. Only this node's endpoints are
// subjects now.
func TestControllerWritesRulesOfLocalSubjectsOnly(t *testing.T) {
	objs := []runtime.Object{ns("big", nil), nodeObj(localNode, "192.0.2.1"), nodeObj("node-b", "192.0.2.2"),
		&networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "big", Name: "same-namespace", ResourceVersion: "1"},
			Spec: networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{}}},
			}}},
		}}
	const remote = 270
	for i := range remote {
		objs = append(objs, pod("big", fmt.Sprintf("r%d", i), "node-b", fmt.Sprintf("10.2.%d.%d", i/200, 1+i%200), map[string]string{"i": fmt.Sprint(i)}))
	}
	local := pod("big", "local", localNode, "10.1.0.2", map[string]string{"app": "local"})
	objs = append(objs, local)
	fm := newFakeMaps()
	// Room for one subject's rules, far from room for every identity's.
	fm.polCap = 4 * (remote + 1)
	ta := newTestAgent(t, fm, objs...)
	ta.register(t, local, 7)

	subjects := fm.subjects()
	lid := ta.idOf(t, "big", "local")
	if len(subjects) != 1 || subjects[lid] != remote+1 {
		t.Fatalf("policy map subjects %v, want only the local pod's identity %s with %d entries (one per peer identity)", subjects, lid, remote+1)
	}
	if len(fm.ipc) != remote+1+2 {
		t.Errorf("ipcache holds %d entries, want every pod (%d) and both nodes", len(fm.ipc), remote+1)
	}
	if ep := fm.eps[7]; ep.Identity != lid || ep.ConntrackSlot != 7 {
		t.Errorf("endpoint 7 is %+v, want identity %s and the plugin's conntrack slot kept", ep, lid)
	}
	if got := fm.ipc[hostPfx("10.1.0.2")]; got != lid {
		t.Errorf("local pod's address resolves to %s, its endpoint is %s", got, lid)
	}
	if fm.ipc[hostPfx("192.0.2.1")] != identity.Host || fm.ipc[hostPfx("192.0.2.2")] != identity.RemoteNode {
		t.Errorf("node addresses: %s, %s; want host, remote-node", fm.ipc[hostPfx("192.0.2.1")], fm.ipc[hostPfx("192.0.2.2")])
	}

	// The local pod goes: its identity's rules go with it.
	ta.unregister(t, "c-local")
	if s := fm.subjects(); len(s) != 0 {
		t.Errorf("after the only local endpoint left, the policy map holds rules of %v", s)
	}
}

// A second pass over every object writes nothing and moves no revision.
func TestControllerSecondSyncWritesNothing(t *testing.T) {
	db := pod("shop", "db", localNode, "10.1.0.3", map[string]string{"app": "db"})
	ta := newTestAgent(t, newFakeMaps(), ns("shop", nil), nodeObj(localNode, "192.0.2.1"), db,
		pod("shop", "web", "node-b", "10.2.0.3", map[string]string{"app": "web"}),
		allowFrom("shop", "db-from-web", "db", "web", 80))
	ta.register(t, db, 9)
	before := len(ta.fm.ops)
	for _, k := range []key{{kind: kindPod, namespace: "shop", name: "db"}, {kind: kindPod, namespace: "shop", name: "web"},
		{kind: kindNamespace, name: "shop"}, {kind: kindPolicy, namespace: "shop", name: "db-from-web"}, {kind: kindNode}, {kind: kindAudit}, {kind: kindManual}} {
		ta.queue.Add(k)
	}
	ta.settle(t)
	if extra := ta.fm.ops[before:]; len(extra) > 0 {
		t.Fatalf("a sync of unchanged objects wrote %v", extra)
	}
}

// An update the maps do not depend on (a resync with the same
// ResourceVersion, a status condition) enqueues nothing.
func TestControllerIgnoresIrrelevantUpdates(t *testing.T) {
	p := pod("shop", "db", "node-b", "10.1.0.3", map[string]string{"app": "db"})
	q := p.DeepCopy()
	if relevantChange(kindPod, p, q) {
		t.Error("a resync (same ResourceVersion) is relevant")
	}
	q.ResourceVersion = "2"
	q.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
	if relevantChange(kindPod, p, q) {
		t.Error("a Ready condition is relevant")
	}
	for _, change := range []func(*corev1.Pod){
		func(p *corev1.Pod) { p.Labels["v"] = "2" },
		func(p *corev1.Pod) { p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: "fd00::3"}) },
		func(p *corev1.Pod) { p.Status.Phase = corev1.PodSucceeded },
		func(p *corev1.Pod) {
			p.Spec.Containers = []corev1.Container{{Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 80}}}}
		},
	} {
		r := q.DeepCopy()
		change(r)
		if !relevantChange(kindPod, p, r) {
			t.Errorf("change %+v not relevant", r)
		}
	}
}

// A peer that moves to a new identity: its new identity's allows are in
// the policy map before its address resolves to it, and the old identity's
// entries go after.
func TestControllerWritesAllowsBeforeRevocations(t *testing.T) {
	db := pod("shop", "db", localNode, "10.1.0.3", map[string]string{"app": "db"})
	web := pod("shop", "web", "node-b", "10.2.0.3", map[string]string{"app": "web"})
	ta := newTestAgent(t, newFakeMaps(), ns("shop", nil), db, web, allowFrom("shop", "db-from-web", "db", "web", 80))
	ta.register(t, db, 9)
	oldID := ta.idOf(t, "shop", "web")
	before := len(ta.fm.ops)

	web = web.DeepCopy()
	web.Labels["version"] = "2"
	web.ResourceVersion = "2"
	if _, err := ta.client.CoreV1().Pods("shop").Update(context.Background(), web, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	ta.settle(t)
	newID := ta.idOf(t, "shop", "web")
	if newID == oldID {
		t.Fatal("relabel kept the identity")
	}
	ops := ta.fm.ops[before:]
	at := func(prefix string) int {
		return slices.IndexFunc(ops, func(op string) bool { return strings.HasPrefix(op, prefix) })
	}
	put, ipc, del := at("policy put"), at("ipcache put 10.2.0.3"), at("policy delete")
	if put < 0 || ipc < 0 || del < 0 || !(put < ipc && ipc < del) {
		t.Fatalf("writes %v: want the new identity's allows, then the address, then the old entries", ops)
	}
	if rev := at("revision"); rev >= 0 && rev != len(ops)-1 {
		t.Fatalf("writes %v: the revision moves last", ops)
	}
	if ta.fm.ipc[hostPfx("10.2.0.3")] != newID {
		t.Fatalf("web resolves to %s, want %s", ta.fm.ipc[hostPfx("10.2.0.3")], newID)
	}
}

// The revision moves only for changes that can revoke what an established
// flow relies on.
func TestControllerMovesRevisionOnlyWhenRevoking(t *testing.T) {
	db := pod("shop", "db", localNode, "10.1.0.3", map[string]string{"app": "db"})
	ta := newTestAgent(t, newFakeMaps(), ns("shop", nil), db,
		pod("shop", "web", "node-b", "10.2.0.3", map[string]string{"app": "web"}),
		allowFrom("shop", "db-from-web", "db", "web", 80))
	ta.register(t, db, 9)
	ctx := context.Background()
	step := func(what string, wantRevision bool, change func() error) {
		t.Helper()
		rev := ta.fm.rev
		if err := change(); err != nil {
			t.Fatal(err)
		}
		ta.settle(t)
		if moved := ta.fm.rev != rev; moved != wantRevision {
			t.Errorf("%s: revision moved %v, want %v", what, moved, wantRevision)
		}
	}
	step("a new pod elsewhere", false, func() error {
		_, err := ta.client.CoreV1().Pods("shop").Create(ctx, pod("shop", "other", "node-b", "10.2.0.4", map[string]string{"app": "other"}), metav1.CreateOptions{})
		return err
	})
	step("another peer allowed", false, func() error {
		_, err := ta.client.NetworkingV1().NetworkPolicies("shop").Create(ctx, allowFrom("shop", "db-from-other", "db", "other", 80), metav1.CreateOptions{})
		return err
	})
	step("a port added to an allowed peer", false, func() error {
		_, err := ta.client.NetworkingV1().NetworkPolicies("shop").Create(ctx, allowFrom("shop", "db-from-other-81", "db", "other", 81), metav1.CreateOptions{})
		return err
	})
	step("that port removed again", true, func() error {
		return ta.client.NetworkingV1().NetworkPolicies("shop").Delete(ctx, "db-from-other-81", metav1.DeleteOptions{})
	})
	// Its address now resolves to world, and the flows it had may be
	// taken over by the next pod to get the address.
	step("an allowed peer's pod deleted", true, func() error {
		return ta.client.CoreV1().Pods("shop").Delete(ctx, "other", metav1.DeleteOptions{})
	})
	step("a pod now allowed takes an address nobody had", false, func() error {
		_, err := ta.client.CoreV1().Pods("shop").Create(ctx, pod("shop", "web2", "node-b", "10.2.0.5", map[string]string{"app": "web"}), metav1.CreateOptions{})
		return err
	})
}

// Only the changed subject's entries are written.
func TestControllerWritesOnlyTheChangedSubject(t *testing.T) {
	db1 := pod("shop", "db1", localNode, "10.1.0.3", map[string]string{"app": "db1"})
	db2 := pod("shop", "db2", localNode, "10.1.0.4", map[string]string{"app": "db2"})
	ta := newTestAgent(t, newFakeMaps(), ns("shop", nil), db1, db2,
		pod("shop", "web", "node-b", "10.2.0.3", map[string]string{"app": "web"}),
		allowFrom("shop", "db1-from-web", "db1", "web", 80), allowFrom("shop", "db2-from-web", "db2", "web", 80))
	ta.register(t, db1, 9)
	ta.register(t, db2, 10)
	id2 := ta.idOf(t, "shop", "db2")
	entries2 := map[policy.Key]*policy.Entry{}
	for k, e := range ta.fm.pol {
		if k.Subject == id2 {
			entries2[k] = e
		}
	}
	before := len(ta.fm.ops)
	np := allowFrom("shop", "db1-from-web", "db1", "web", 8080)
	np.ResourceVersion = "2"
	if _, err := ta.client.NetworkingV1().NetworkPolicies("shop").Update(context.Background(), np, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	ta.settle(t)
	if ops := ta.fm.ops[before:]; len(ops) != 2 || ops[0] != "policy put 1" || ops[1] != "revision" {
		t.Fatalf("writes %v, want one entry (db1's from web) and a revision (port 80 revoked)", ops)
	}
	for k, e := range entries2 {
		if ta.fm.pol[k] != e {
			t.Fatalf("db2's entry %+v was rewritten", k)
		}
	}
}

// Issue 11: a policy that does not fit the policy map is refused alone,
// with an Event, and everything else is written.
func TestControllerRefusesAPolicyThatDoesNotFit(t *testing.T) {
	db := pod("shop", "db", localNode, "10.1.0.3", map[string]string{"app": "db"})
	objs := []runtime.Object{ns("shop", nil), db, allowFrom("shop", "db-from-web", "db", "web", 80)}
	for i := range 10 {
		objs = append(objs, pod("shop", fmt.Sprintf("w%d", i), "node-b", fmt.Sprintf("10.2.0.%d", 10+i), map[string]string{"app": "web", "i": fmt.Sprint(i)}))
	}
	fm := newFakeMaps()
	fm.polCap = 10
	ta := newTestAgent(t, fm, objs...)
	ta.register(t, db, 9)
	if n := len(fm.pol); n != 10 {
		t.Fatalf("policy map holds %d entries, want 10 (one per web identity)", n)
	}
	// It adds port 443 to the 10 entries, and one entry for db itself.
	big := allowFrom("shop", "db-from-all", "db", "", 443)
	big.Spec.Ingress[0].From[0].PodSelector = &metav1.LabelSelector{}
	if _, err := ta.client.NetworkingV1().NetworkPolicies("shop").Create(context.Background(), big, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ta.settle(t)
	if n := len(fm.pol); n != 10 {
		t.Errorf("policy map holds %d entries after the refused policy, want the 10 of the policy that fits", n)
	}
	select {
	case ev := <-ta.events.Events:
		if !strings.Contains(ev, "PolicyRefused") || !strings.Contains(ev, "policy-map-size") {
			t.Errorf("event %q, want PolicyRefused naming --policy-map-size", ev)
		}
	default:
		t.Error("no Event for the refused policy")
	}
	if ta.refused.len() != 1 {
		t.Errorf("%d policies refused, want 1", ta.refused.len())
	}

	// A new pod keeps being written.
	if _, err := ta.client.CoreV1().Pods("shop").Create(context.Background(), pod("shop", "n", "node-b", "10.2.0.99", map[string]string{"app": "n"}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ta.settle(t)
	if _, ok := fm.ipc[hostPfx("10.2.0.99")]; !ok {
		t.Error("a new pod is missing from the ipcache while a policy is refused")
	}
}

// Issue 11, defect 3: a late removal of a container must not delete the
// entry of the pod that got its ifindex since.
func TestControllerLateRemovalKeepsTheNewPodsEndpoint(t *testing.T) {
	old := pod("shop", "old", localNode, "10.1.0.3", map[string]string{"app": "a"})
	ta := newTestAgent(t, newFakeMaps(), ns("shop", nil), old)
	ta.register(t, old, 9)
	// The plugin's ADD of a new pod reused ifindex 9.
	newEP := bpf.Endpoint{Identity: identity.Unresolved, IPv4: netip.MustParseAddr("10.1.0.4"), ConntrackSlot: 12}
	ta.fm.eps[9] = newEP
	ta.unregister(t, "c-old")
	if got, ok := ta.fm.eps[9]; !ok || got != newEP {
		t.Fatalf("endpoint 9 after the old container's removal: %+v (present %v), want the new pod's %+v", got, ok, newEP)
	}
}

// A write that fails leaves nothing believed written: the retry compares
// everything again and converges.
func TestControllerRecoversFromAFailedWrite(t *testing.T) {
	db := pod("shop", "db", localNode, "10.1.0.3", map[string]string{"app": "db"})
	ta := newTestAgent(t, newFakeMaps(), ns("shop", nil), db, allowFrom("shop", "db-from-web", "db", "web", 80))
	ta.register(t, db, 9)
	ta.fm.failNext = fmt.Errorf("injected")
	if _, err := ta.client.CoreV1().Pods("shop").Create(context.Background(), pod("shop", "web", "node-b", "10.2.0.3", map[string]string{"app": "web"}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ta.settle(t)
	// The retry key comes back after the rate limiter's delay.
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) && ta.fm.ipc[hostPfx("10.2.0.3")] == 0 {
		ta.settle(t)
	}
	web := ta.idOf(t, "shop", "web")
	if ta.fm.ipc[hostPfx("10.2.0.3")] != web {
		t.Fatal("the failed write was never retried")
	}
	if len(ta.fm.subjects()) != 1 {
		t.Fatalf("subjects %v after the retry", ta.fm.subjects())
	}
}

// The audit repairs entries changed behind the agent's back, and counts
// them.
func TestControllerAuditRepairsDrift(t *testing.T) {
	db := pod("shop", "db", localNode, "10.1.0.3", map[string]string{"app": "db"})
	ta := newTestAgent(t, newFakeMaps(), ns("shop", nil), db,
		pod("shop", "web", "node-b", "10.2.0.3", map[string]string{"app": "web"}), allowFrom("shop", "db-from-web", "db", "web", 80))
	ta.register(t, db, 9)
	want := ta.fm.ipc[hostPfx("10.2.0.3")]
	ta.fm.ipc[hostPfx("10.2.0.3")] = identity.World
	delete(ta.fm.ipc, hostPfx("10.1.0.3"))
	ta.fm.ipc[hostPfx("10.9.9.9")] = 70000
	for k := range ta.fm.pol {
		delete(ta.fm.pol, k)
	}
	rev := ta.fm.rev
	ta.queue.Add(key{kind: kindAudit})
	ta.settle(t)
	if ta.fm.ipc[hostPfx("10.2.0.3")] != want || ta.fm.ipc[hostPfx("10.1.0.3")] == 0 {
		t.Error("audit did not repair the ipcache")
	}
	if _, ok := ta.fm.ipc[hostPfx("10.9.9.9")]; ok {
		t.Error("audit left an entry nobody wants")
	}
	if len(ta.fm.pol) == 0 {
		t.Error("audit did not rewrite the policy")
	}
	if ta.fm.rev == rev {
		t.Error("revision did not move after repairs")
	}
}

// A new local subject whose rules do not fit waits for room isolated (its
// pod is denied what the missing rules would allow, never allowed more),
// and registrations go on being answered.
func TestControllerSubjectThatDoesNotFitFailsClosed(t *testing.T) {
	objs := []runtime.Object{ns("shop", nil), allowFrom("shop", "db-from-web", "db", "web", 80)}
	for i := range 5 {
		objs = append(objs, pod("shop", fmt.Sprintf("w%d", i), "node-b", fmt.Sprintf("10.2.0.%d", 10+i), map[string]string{"app": "web", "i": fmt.Sprint(i)}))
	}
	db := pod("shop", "db", localNode, "10.1.0.3", map[string]string{"app": "db"})
	other := pod("shop", "other", localNode, "10.1.0.4", map[string]string{"app": "other"})
	objs = append(objs, db, other)
	fm := newFakeMaps()
	fm.polCap = 3
	ta := newTestAgent(t, fm, objs...)
	ta.register(t, db, 9)
	ta.register(t, other, 10)
	id := ta.idOf(t, "shop", "db")
	if n := fm.subjects()[id]; n != 0 {
		t.Fatalf("%d of db's 5 entries written into a map of 3", n)
	}
	if f, ok := fm.flags[id]; !ok || !f.Isolated(policy.Ingress) {
		t.Fatalf("db's flags %v (present %v): want it isolated for ingress while its rules wait", f, ok)
	}
	if _, ok := ta.st.dirtySub[id]; !ok {
		t.Fatal("db's rules are not kept for a later flush")
	}
	// Room comes: the rules go in.
	fm.polCap = 100
	ta.queue.Add(key{kind: kindRetry})
	ta.settle(t)
	if n := fm.subjects()[id]; n != 5 {
		t.Fatalf("after room came, db has %d entries, want 5", n)
	}
}

// At start the policies are sized together; when together they do not
// fit, they are sized one by one and only the one that does not fit is
// refused.
func TestControllerRefusesAtStartOnlyThePolicyThatDoesNotFit(t *testing.T) {
	db := pod("shop", "db", localNode, "10.1.0.3", map[string]string{"app": "db"})
	big := allowFrom("shop", "db-from-all", "db", "", 443)
	big.Spec.Ingress[0].From[0].PodSelector = &metav1.LabelSelector{}
	objs := []runtime.Object{ns("shop", nil), db, allowFrom("shop", "db-from-web", "db", "web", 80), big}
	for i := range 10 {
		objs = append(objs, pod("shop", fmt.Sprintf("w%d", i), "node-b", fmt.Sprintf("10.2.0.%d", 10+i), map[string]string{"app": "web", "i": fmt.Sprint(i)}))
	}
	fm := newFakeMaps()
	fm.polCap = 10
	// The endpoint is registered already, as after an agent restart.
	fm.eps[9] = bpf.Endpoint{Identity: identity.Unresolved, IPv4: netip.MustParseAddr("10.1.0.3"), ConntrackSlot: 9}
	ta := newTestAgentWith(t, fm, func(a *Agent) {
		if err := a.endpoints.put(api.EndpointRequest{ContainerID: "c-db", HostIfName: "idc9", HostIfIndex: 9,
			Addresses: []netip.Addr{netip.MustParseAddr("10.1.0.3")}, PodNamespace: "shop", PodName: "db"}); err != nil {
			t.Fatal(err)
		}
	}, objs...)
	if ta.refused.len() != 1 {
		t.Fatalf("%d policies refused, want 1", ta.refused.len())
	}
	if _, ok := ta.refused["shop/db-from-all"]; !ok {
		t.Fatalf("refused %v, want shop/db-from-all", ta.refused)
	}
	if n := len(fm.pol); n != 10 {
		t.Fatalf("policy map holds %d entries, want the 10 of the policy that fits", n)
	}
}
