package main

import (
	"encoding/json"
	"net/netip"
	"os"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/internal/clitest"
	"github.com/idcni/idcni/policy"
	"github.com/idcni/idcni/store"
)

func TestMain(m *testing.M) {
	code := m.Run()
	clitest.RemoveBins()
	os.Exit(code)
}

var (
	podA = netip.MustParseAddr("10.13.0.2")
	podB = netip.MustParseAddr("10.13.0.3")
)

// allowed asks the policy maps, as the datapath reads them, whether a
// packet from src to dst passes both src's egress and dst's ingress.
func allowed(t *testing.T, d *bpf.Datapath, src, dst identity.ID, proto policy.Proto, port uint16) bool {
	t.Helper()
	ms, err := d.Policy()
	if err != nil {
		t.Fatal(err)
	}
	eg, _ := ms.Decide(src, policy.Egress, dst, proto, port)
	in, _ := ms.Decide(dst, policy.Ingress, src, proto, port)
	return eg && in
}

type flow struct {
	src, dst identity.ID
	proto    policy.Proto
	port     uint16
}

func checkFlows(t *testing.T, d *bpf.Datapath, step string, want map[flow]bool) {
	t.Helper()
	for f, w := range want {
		if got := allowed(t, d, f.src, f.dst, f.proto, f.port); got != w {
			t.Errorf("%s: %s -> %s %s/%d allowed = %v, want %v", step, f.src, f.dst, f.proto, f.port, got, w)
		}
	}
}

var (
	icmp12 = flow{1001, 1002, policy.ProtoICMP, 0}
	icmp21 = flow{1002, 1001, policy.ProtoICMP, 0}
)

func TestSeedWalkthroughRules(t *testing.T) {
	t.Parallel()
	e, d := clitest.New(t)
	e.MustRun("endpointctl", "add", "--ip", "10.13.0.2", "--identity", "1001")
	e.MustRun("endpointctl", "add", "--ip", "10.13.0.3", "--identity", "1002")
	checkFlows(t, d, "default deny", map[flow]bool{icmp12: false, icmp21: false})

	rev, _ := d.Revision()
	r := e.MustRun("policyctl", "allow", "--src", "1001", "--dst", "1002", "--symmetric")
	if strings.TrimSpace(r.Stdout) != "rule added: allow --src 1001 --dst 1002 --symmetric" {
		t.Errorf("allow said:\n%s", r)
	}
	checkFlows(t, d, "allow --symmetric", map[flow]bool{icmp12: true, icmp21: true, {1001, 1003, policy.ProtoICMP, 0}: false})
	// The exact entries: egress and ingress of both, every protocol.
	ms, _ := d.Policy()
	for _, k := range []policy.Key{
		{Subject: 1001, Peer: 1002, Direction: policy.Egress}, {Subject: 1002, Peer: 1001, Direction: policy.Ingress},
		{Subject: 1002, Peer: 1001, Direction: policy.Egress}, {Subject: 1001, Peer: 1002, Direction: policy.Ingress},
	} {
		if e := ms.Entries[k]; e == nil || !e.AllowAll || e.DenyAll {
			t.Errorf("policy entry %+v = %+v, want allow all", k, e)
		}
	}
	if len(ms.Entries) != 4 {
		t.Errorf("policy map has %d entries, want 4: %+v", len(ms.Entries), ms.Entries)
	}
	if now, _ := d.Revision(); now <= rev {
		t.Errorf("revision %d -> %d: established flows would keep their verdicts", rev, now)
	}

	e.MustRun("policyctl", "deny", "--src", "1002", "--dst", "1001")
	checkFlows(t, d, "deny", map[flow]bool{icmp12: true, icmp21: false})
	ms, _ = d.Policy()
	if ok, reason := ms.Decide(1002, policy.Egress, 1001, policy.ProtoICMP, 0); ok || reason != policy.ReasonDenyRule {
		t.Errorf("1002 egress to 1001 = %v (%s), want a deny rule", ok, reason)
	}

	var l struct {
		Rules []listedRule `json:"rules"`
	}
	r = e.MustRun("policyctl", "list", "-o", "json")
	if err := json.Unmarshal([]byte(r.Stdout), &l); err != nil {
		t.Fatalf("list -o json: %v\n%s", err, r)
	}
	want := []listedRule{
		{Action: "allow", Src: 1001, Dst: 1002, Symmetric: true, Proto: "any", Port: "any"},
		{Action: "deny", Src: 1002, Dst: 1001, Proto: "any", Port: "any"},
	}
	if !reflect.DeepEqual(l.Rules, want) {
		t.Errorf("list -o json = %+v, want %+v", l.Rules, want)
	}
	r = e.MustRun("policyctl", "list")
	if got := strings.Fields(r.Stdout); strings.Join(got, " ") != "ACTION SRC -> DST PROTO PORT allow 1001 <-> 1002 any any deny 1002 -> 1001 any any" {
		t.Errorf("list:\n%s", r)
	}

	// Undo step 5.
	r = e.MustRun("policyctl", "delete", "--src", "1002", "--dst", "1001")
	if strings.TrimSpace(r.Stdout) != "rule deleted: deny --src 1002 --dst 1001" {
		t.Errorf("delete said:\n%s", r)
	}
	checkFlows(t, d, "after delete", map[flow]bool{icmp12: true, icmp21: true})
	e.MustFail("no manual rule matches --src 1002 --dst 1001", false, "policyctl", "delete", "--src", "1002", "--dst", "1001")
}

// Rules may name the reserved identities no pod has: host, world and
// remote-node (the other nodes), by number or by the name policyctl list
// prints, so that other nodes can be let in to or kept from a manual
// identity.
func TestReservedPeers(t *testing.T) {
	t.Parallel()
	e, d := clitest.New(t)
	e.MustRun("endpointctl", "add", "--ip", "10.13.0.2", "--identity", "1001")
	fromNode := flow{identity.RemoteNode, 1001, policy.ProtoTCP, 80}
	fromWorld := flow{identity.World, 1001, policy.ProtoTCP, 80}
	toHost := flow{1001, identity.Host, policy.ProtoTCP, 10250}
	checkFlows(t, d, "default deny", map[flow]bool{fromNode: false, fromWorld: false, toHost: false})

	r := e.MustRun("policyctl", "allow", "--src", "6", "--dst", "1001", "--port", "80")
	if strings.TrimSpace(r.Stdout) != "rule added: allow --src remote-node --dst 1001 --proto tcp --port 80" {
		t.Errorf("allow said:\n%s", r)
	}
	e.MustRun("policyctl", "allow", "--src", "1001", "--dst", "host", "--port", "10250")
	checkFlows(t, d, "allowed", map[flow]bool{fromNode: true, fromWorld: false, toHost: true})

	e.MustRun("policyctl", "deny", "--src", "remote-node", "--dst", "1001")
	checkFlows(t, d, "denied", map[flow]bool{fromNode: false, fromWorld: false, toHost: true})
	r = e.MustRun("policyctl", "list")
	if got := strings.Join(strings.Fields(r.Stdout), " "); got != "ACTION SRC -> DST PROTO PORT allow remote-node -> 1001 tcp 80 allow 1001 -> host tcp 10250 deny remote-node -> 1001 any any" {
		t.Errorf("list:\n%s", r)
	}
	// What list prints is what the flags take.
	e.MustRun("policyctl", "delete", "--src", "remote-node", "--dst", "1001", "--action", "deny")
	checkFlows(t, d, "deny deleted", map[flow]bool{fromNode: true})
}

func TestPortsAndProtocols(t *testing.T) {
	t.Parallel()
	e, d := clitest.New(t)
	// --port alone means TCP, as in Kubernetes.
	r := e.MustRun("policyctl", "allow", "--src", "1001", "--dst", "1002", "--port", "8080-8089")
	if !strings.Contains(r.Stdout, "--proto tcp --port 8080-8089") {
		t.Errorf("allow --port said:\n%s", r)
	}
	e.MustRun("policyctl", "allow", "--src", "1001", "--dst", "1002", "--proto", "udp", "--port", "53")
	e.MustRun("policyctl", "allow", "--src", "1003", "--dst", "1002", "--proto", "icmp")
	e.MustRun("policyctl", "allow", "--src", "1003", "--dst", "1002", "--proto", "132", "--port", "9000")
	e.MustRun("policyctl", "deny", "--src", "1001", "--dst", "1002", "--port", "8085", "--symmetric")
	checkFlows(t, d, "ports", map[flow]bool{
		{1001, 1002, policy.ProtoTCP, 8080}:  true,
		{1001, 1002, policy.ProtoTCP, 8089}:  true,
		{1001, 1002, policy.ProtoTCP, 8085}:  false, // deny wins
		{1001, 1002, policy.ProtoTCP, 8090}:  false,
		{1001, 1002, policy.ProtoTCP, 53}:    false,
		{1001, 1002, policy.ProtoUDP, 53}:    true,
		{1001, 1002, policy.ProtoUDP, 8080}:  false,
		{1001, 1002, policy.ProtoICMP, 0}:    false,
		{1002, 1001, policy.ProtoTCP, 8080}:  false, // one way only
		{1003, 1002, policy.ProtoICMP, 0}:    true,
		{1003, 1002, policy.ProtoTCP, 80}:    false,
		{1003, 1002, policy.ProtoSCTP, 9000}: true,
	})
	ms, _ := d.Policy()
	tcp := ms.Entries[policy.Key{Subject: 1001, Peer: 1002, Direction: policy.Egress, Proto: policy.ProtoTCP}]
	if tcp == nil || !reflect.DeepEqual(tcp.Allow, []policy.PortRange{{Lo: 8080, Hi: 8089}}) || !reflect.DeepEqual(tcp.Deny, []policy.PortRange{{Lo: 8085, Hi: 8085}}) {
		t.Errorf("tcp entry of 1001 egress = %+v", tcp)
	}

	// delete needs the same spelling; --action narrows it.
	e.MustFail("no manual rule matches --src 1001 --dst 1002 --proto tcp --port 8080", false, "policyctl", "delete", "--src", "1001", "--dst", "1002", "--port", "8080")
	e.MustFail("no manual allow rule matches --src 1002 --dst 1001 --symmetric --proto tcp --port 8085", false,
		"policyctl", "delete", "--src", "1002", "--dst", "1001", "--symmetric", "--port", "8085", "--action", "allow")
	// The symmetric deny matches with --src and --dst swapped.
	e.MustRun("policyctl", "delete", "--src", "1002", "--dst", "1001", "--symmetric", "--port", "8085", "--action", "deny")
	e.MustRun("policyctl", "delete", "--src", "1001", "--dst", "1002", "--proto", "tcp", "--port", "8080-8089")
	checkFlows(t, d, "after delete", map[flow]bool{
		{1001, 1002, policy.ProtoTCP, 8085}: false,
		{1001, 1002, policy.ProtoTCP, 8080}: false,
		{1001, 1002, policy.ProtoUDP, 53}:   true,
	})
	r = e.MustRun("policyctl", "allow", "--src", "1001", "--dst", "1002", "--proto", "UDP", "--port", "53")
	if !strings.Contains(r.Stdout, "rule unchanged (already present)") {
		t.Errorf("adding a rule twice said:\n%s", r)
	}
}

// snapshot is everything the CLIs may write: the maps and the state file.
type snapshot struct {
	clitest.Maps
	State []byte
}

func snap(t *testing.T, e *clitest.Env, d *bpf.Datapath) snapshot {
	t.Helper()
	s := snapshot{Maps: clitest.SnapshotMaps(t, d)}
	s.State, _ = os.ReadFile(e.State)
	return s
}

func TestErrorsChangeNothing(t *testing.T) {
	t.Parallel()
	e, d := clitest.New(t)
	e.MustRun("endpointctl", "add", "--ip", "10.13.0.2", "--identity", "1001")
	e.MustRun("policyctl", "allow", "--src", "1001", "--dst", "1002")
	before := snap(t, e, d)

	for _, c := range []struct {
		want  string
		usage bool
		args  []string
	}{
		{"bad --src: identity 255 cannot be named in a rule: want a manual identity 256-65535, or 1 (host), 2 (world) or 6 (remote-node)", false, []string{"allow", "--src", "255", "--dst", "1002"}},
		{"bad --dst: identity 70000 cannot be named in a rule", false, []string{"deny", "--src", "1001", "--dst", "70000"}},
		{"bad --src: identity 0 cannot be named in a rule", false, []string{"delete", "--src", "0", "--dst", "1002"}},
		{`bad --port: bad port "0"`, false, []string{"allow", "--src", "1001", "--dst", "1002", "--port", "0"}},
		{`bad --port: bad port "90-80"`, false, []string{"allow", "--src", "1001", "--dst", "1002", "--port", "90-80"}},
		{`bad --port: bad port "70000"`, false, []string{"allow", "--src", "1001", "--dst", "1002", "--port", "70000"}},
		{`bad --port: bad port "http"`, false, []string{"deny", "--src", "1001", "--dst", "1002", "--port", "http"}},
		{"protocol icmp has no ports", false, []string{"allow", "--src", "1001", "--dst", "1002", "--proto", "icmp", "--port", "80"}},
		{`bad --proto: unknown protocol "tpc"`, false, []string{"allow", "--src", "1001", "--dst", "1002", "--proto", "tpc"}},
		{`bad --action "reject"`, false, []string{"delete", "--src", "1001", "--dst", "1002", "--action", "reject"}},
		{"no manual rule matches --src 1001 --dst 1002 --symmetric", false, []string{"delete", "--src", "1001", "--dst", "1002", "--symmetric"}},
		{"required flag(s) --dst not set", true, []string{"allow", "--src", "1001"}},
		{"unknown flag: --from", true, []string{"allow", "--from", "1001", "--dst", "1002"}},
		{"unknown shorthand flag: 'x'", true, []string{"deny", "-x"}},
		{`invalid argument "web" for "--src" flag`, true, []string{"allow", "--src", "web", "--dst", "1002"}},
		{"bad --src: identity 5 cannot be named in a rule", false, []string{"allow", "--src", "unresolved", "--dst", "1002"}},
		{"a rule from remote-node to host names no manual identity", false, []string{"deny", "--src", "remote-node", "--dst", "1"}},
		{`unknown command "permit"`, true, []string{"permit", "--src", "1001", "--dst", "1002"}},
		{"want 'on' or 'off'", true, []string{"debug", "yes"}},
		{`bad --verdict "deny"`, false, []string{"monitor", "--verdict", "deny"}},
		{"--pod and --namespace need idcni-agent", false, []string{"monitor", "--pod", "frontend"}},
		{`unknown output format "wide"`, true, []string{"list", "-o", "wide"}},
		{`unknown output format "yaml"`, true, []string{"status", "-o", "yaml"}},
	} {
		e.MustFail(c.want, c.usage, "policyctl", c.args...)
	}
	if after := snap(t, e, d); !reflect.DeepEqual(after, before) {
		t.Errorf("failed commands changed the maps or the state file:\nbefore %+v\nafter  %+v", before, after)
	}
}

func TestTooManyPortRangesChangesNothing(t *testing.T) {
	t.Parallel()
	e, d := clitest.New(t)
	for i := range policy.MaxAllowRanges {
		p := 1000 + 10*i
		e.MustRun("policyctl", "allow", "--src", "1001", "--dst", "1002", "--port", strconv.Itoa(p))
	}
	before := snap(t, e, d)
	r := e.MustFail("port ranges", false, "policyctl", "allow", "--src", "1001", "--dst", "1002", "--port", "2000")
	if !strings.Contains(r.Stderr, "a map entry holds 16") {
		t.Errorf("the error does not say the limit:\n%s", r)
	}
	if after := snap(t, e, d); !reflect.DeepEqual(after, before) {
		t.Error("a refused rule changed the maps or the state file")
	}
}

func TestNotLoadedNotRootLocked(t *testing.T) {
	t.Parallel()
	empty := clitest.NewEmpty(t)
	for _, args := range [][]string{
		{"allow", "--src", "1001", "--dst", "1002", "--symmetric"},
		{"deny", "--src", "1002", "--dst", "1001"},
		{"debug", "on"},
		{"monitor"},
		{"restore"},
		{"status"},
	} {
		r := empty.MustFail("datapath not loaded: the idcni CNI plugin loads it on the first pod ADD, or idcni-agent on start", false, "policyctl", args...)
		if !strings.Contains(r.Stderr, empty.BPFRoot) {
			t.Errorf("the error does not say where it looked:\n%s", r)
		}
	}
	if _, err := os.Stat(empty.State); !os.IsNotExist(err) {
		t.Errorf("failed commands created the state file: %v", err)
	}

	e, d := clitest.New(t)
	before := snap(t, e, d)
	for _, args := range [][]string{
		{"allow", "--src", "1001", "--dst", "1002"},
		{"delete", "--src", "1001", "--dst", "1002"},
		{"list"}, {"debug", "on"}, {"restore"}, {"status"}, {"monitor"},
		{"identity", "list"}, {"identity", "get", "65536"},
	} {
		r := e.RunAs(65534, 65534, "policyctl", args...)
		if r.Code != 1 || !strings.HasPrefix(r.Stderr, "Error: must run as root: policyctl") || strings.Count(r.Stderr, "\n") != 1 {
			t.Errorf("as nobody:\n%s", r)
		}
	}

	db, err := store.Open(e.State, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	before.State, _ = os.ReadFile(e.State)
	e.MustFail("state file "+e.State+" is locked by another process", false, "policyctl", "allow", "--src", "1001", "--dst", "1002")
	e.MustFail("is locked by another process", false, "policyctl", "restore")
	db.Close()
	if after := snap(t, e, d); !reflect.DeepEqual(after, before) {
		t.Errorf("failed commands changed something:\nbefore %+v\nafter  %+v", before, after)
	}
}

func TestRestoreAfterReboot(t *testing.T) {
	t.Parallel()
	e, d := clitest.New(t)
	veth, idx := clitest.HostVeth(t)
	clitest.PutPod(t, d, idx, podA)
	e.MustRun("endpointctl", "add", "--ip", "10.13.0.2", "--identity", "1001")
	e.MustRun("endpointctl", "add", "--ip", "10.13.0.3", "--identity", "1002")
	e.MustRun("policyctl", "allow", "--src", "1001", "--dst", "1002", "--symmetric")
	e.MustRun("policyctl", "deny", "--src", "1002", "--dst", "1001", "--proto", "udp", "--port", "53")
	wantPolicy, _ := d.Policy()

	// Reboot: bpffs is empty. Until the datapath is loaded, restore says
	// what loads it; --wait waits for it.
	e.Wipe(d)
	e.MustFail("datapath not loaded", false, "policyctl", "restore")
	r := e.MustRun("policyctl", "list")
	if !strings.Contains(r.Stderr, "stored but not in effect") || !strings.Contains(r.Stdout, "1001 <-> 1002") {
		t.Errorf("list before the datapath is back:\n%s", r)
	}

	var d2 *bpf.Datapath
	loaded := make(chan struct{})
	go func() {
		defer close(loaded)
		time.Sleep(time.Second)
		var err error
		if d2, err = bpf.Load(bpf.Options{Root: e.BPFRoot}); err != nil {
			t.Errorf("reload: %v", err)
		}
	}()
	r = e.MustRun("policyctl", "restore", "--wait", "30s")
	<-loaded
	if d2 == nil {
		t.FailNow()
	}
	defer d2.Close()
	if !strings.Contains(r.Stdout, "restored 2 manual endpoints and 2 rules") || !strings.Contains(r.Stderr, "Waiting up to 30s") {
		t.Errorf("restore --wait said:\n%s", r)
	}
	if id, _, _ := d2.IPCacheLookup(podA); id != 1001 {
		t.Errorf("ipcache %s after restore = %s, want 1001", podA, id)
	}

	// The plugin re-creates the pod on the same host veth, unresolved:
	// the listings say the datapath has drifted, restore fixes it.
	clitest.PutPod(t, d2, idx, podA)
	r = e.MustRun("endpointctl", "list")
	if !strings.Contains(r.Stderr, "endpoint 10.13.0.2 is not identity 1001 in the datapath") || !strings.Contains(r.Stderr, "policyctl restore") {
		t.Errorf("list does not warn about the unresolved pod:\n%s", r)
	}
	r = e.MustRun("policyctl", "restore", "--dry-run")
	if !strings.Contains(r.Stdout, "would fix: endpoint 10.13.0.2 is not identity 1001") {
		t.Errorf("dry run:\n%s", r)
	}
	if got := endpointIdentity(t, d2, idx); got != identity.Unresolved {
		t.Errorf("a dry run changed the pod to %s", got)
	}
	e.MustRun("policyctl", "restore")

	if got := endpointIdentity(t, d2, idx); got != 1001 {
		t.Errorf("pod on %s after restore = %s, want 1001", veth, got)
	}
	for a, want := range map[netip.Addr]identity.ID{podA: 1001, podB: 1002} {
		if id, _, _ := d2.IPCacheLookup(a); id != want {
			t.Errorf("ipcache %s after restore = %s, want %s", a, id, want)
		}
	}
	got, _ := d2.Policy()
	if up, del := policy.Diff(got, wantPolicy); len(up) != 0 || len(del) != 0 || !reflect.DeepEqual(got.Identities, wantPolicy.Identities) {
		t.Errorf("policy after restore = %+v, want %+v", got, wantPolicy)
	}
	r = e.MustRun("policyctl", "restore", "--dry-run")
	if !strings.Contains(r.Stdout, "nothing to restore") {
		t.Errorf("dry run after restore:\n%s", r)
	}
	r = e.MustRun("policyctl", "status")
	if !strings.Contains(r.Stdout, "2 endpoints, 2 rules in "+e.State+", in the datapath") {
		t.Errorf("status after restore:\n%s", r)
	}
}

func endpointIdentity(t *testing.T, d *bpf.Datapath, idx int) identity.ID {
	t.Helper()
	ep, ok, err := d.Endpoint(idx)
	if err != nil || !ok {
		t.Fatalf("endpoint %d: %v, %v", idx, ok, err)
	}
	return ep.Identity
}

func TestDebugAndStatus(t *testing.T) {
	t.Parallel()
	e, d := clitest.New(t)
	r := e.MustRun("policyctl", "debug", "on")
	if !strings.Contains(r.Stdout, "trace_pipe") {
		t.Errorf("debug on does not say where to read:\n%s", r)
	}
	if on, _ := d.Debug(); !on {
		t.Error("debug on did not switch the datapath")
	}
	if r := e.MustRun("policyctl", "debug"); strings.TrimSpace(r.Stdout) != "debug trace lines are on" {
		t.Errorf("debug:\n%s", r)
	}
	e.MustRun("policyctl", "debug", "off")
	if on, _ := d.Debug(); on {
		t.Error("debug off did not switch the datapath")
	}

	e.MustRun("endpointctl", "add", "--ip", "10.13.0.2", "--identity", "1001")
	e.MustRun("policyctl", "allow", "--src", "1001", "--dst", "1002")
	r = e.MustRun("policyctl", "status", "-o", "json")
	var s statusView
	if err := json.Unmarshal([]byte(r.Stdout), &s); err != nil {
		t.Fatalf("status -o json: %v\n%s", err, r)
	}
	rev, _ := d.Revision()
	if s.Datapath.Root != e.BPFRoot || s.Datapath.Revision != rev || s.Datapath.PolicyEntries != 2 || s.Datapath.IPCache != 1 ||
		s.Agent.Running || s.Manual == nil || !s.Manual.InSync || s.Manual.Rules != 1 || s.Manual.Endpoints != 1 {
		t.Errorf("status -o json = %+v", s)
	}
	if want := len(bpf.Reasons()) * 2; len(s.Counters) != want {
		t.Errorf("status has %d counters, want every reason at both hooks (%d)", len(s.Counters), want)
	}
	if _, ok := s.Stats["event-lost"]; !ok {
		t.Errorf("status stats = %v", s.Stats)
	}
	// The shared conntrack table (slot 0) is always there; this test's
	// datapath has no plugin-made pods, so it is the only one.
	if len(s.Conntrack) != 1 || s.Conntrack[0].Slot != 0 || s.Conntrack[0].Capacity == 0 || s.EventsNotSent == nil {
		t.Errorf("status conntrack = %+v, events not sent = %v", s.Conntrack, s.EventsNotSent)
	}
	r = e.MustRun("policyctl", "status")
	if !strings.Contains(r.Stdout, "policy revision") || !strings.Contains(r.Stdout, "Agent:        not running") ||
		!strings.Contains(r.Stdout, "Conntrack:    the shared table and 0 pods' own") {
		t.Errorf("status:\n%s", r)
	}
	// A table of a pod's own that evicted flows is listed by itself.
	slot, err := d.AddConntrackTable(256)
	if err != nil {
		t.Fatal(err)
	}
	defer d.DeleteConntrackTable(slot)
	r = e.MustRun("policyctl", "status", "--all")
	if !strings.Contains(r.Stdout, "Conntrack:    the shared table and 1 pods' own") || !strings.Contains(r.Stdout, "ADMITTED") {
		t.Errorf("status --all with a second table:\n%s", r)
	}
}

func TestSimulateIsMounted(t *testing.T) {
	t.Parallel()
	e := clitest.NewEmpty(t)
	// Offline: works without a datapath, and as any user.
	r := e.RunAs(65534, 65534, "policyctl", "simulate", "-f", "testdata/shop", "-o", "json")
	if r.Code != 0 {
		t.Fatalf("%s", r)
	}
	var results []map[string]any
	if err := json.Unmarshal([]byte(r.Stdout), &results); err != nil || len(results) == 0 {
		t.Errorf("simulate -o json = %d results, %v\n%s", len(results), err, r)
	}
}
