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
	far  = netip.MustParseAddr("10.99.0.7")
)

func lookup(t *testing.T, d *bpf.Datapath, a netip.Addr) (identity.ID, bool) {
	t.Helper()
	id, ok, err := d.IPCacheLookup(a)
	if err != nil {
		t.Fatal(err)
	}
	return id, ok
}

func endpoint(t *testing.T, d *bpf.Datapath, ifindex int) bpf.Endpoint {
	t.Helper()
	ep, ok, err := d.Endpoint(ifindex)
	if err != nil || !ok {
		t.Fatalf("endpoint %d: %v, found %v", ifindex, err, ok)
	}
	return ep
}

type listJSON struct {
	Endpoints []struct {
		IP        netip.Addr  `json:"ip"`
		Identity  identity.ID `json:"identity"`
		Interface string      `json:"interface"`
		Ifindex   int         `json:"ifindex"`
	} `json:"endpoints"`
}

func TestAddListDel(t *testing.T) {
	t.Parallel()
	e, d := clitest.New(t)
	veth, idx := clitest.HostVeth(t)
	clitest.PutPod(t, d, idx, podA)

	// The seed's words.
	r := e.MustRun("endpointctl", "add", "--ip", "10.13.0.2", "--identity", "1001")
	if !strings.Contains(r.Stdout, "endpoint 10.13.0.2 bound to identity 1001 (local pod on "+veth) {
		t.Errorf("add said:\n%s", r)
	}
	if ep := endpoint(t, d, idx); ep.Identity != 1001 || ep.IPv4 != podA {
		t.Errorf("endpoint = %+v, want identity 1001", ep)
	}
	if id, _ := lookup(t, d, podA); id != 1001 {
		t.Errorf("ipcache %s = %s, want 1001", podA, id)
	}

	// An address no local pod has: the ipcache only.
	r = e.MustRun("endpointctl", "add", "--ip", far.String(), "--identity", "1002")
	if !strings.Contains(r.Stdout, "no local pod has this address") {
		t.Errorf("add of a remote address said:\n%s", r)
	}
	if id, _ := lookup(t, d, far); id != 1002 {
		t.Errorf("ipcache %s = %s, want 1002", far, id)
	}

	r = e.MustRun("endpointctl", "list")
	lines := strings.Split(strings.TrimSpace(r.Stdout), "\n")
	if len(lines) != 3 || strings.Join(strings.Fields(lines[0]), " ") != "IP IDENTITY INTERFACE IFINDEX" ||
		strings.Join(strings.Fields(lines[1]), " ") != "10.13.0.2 1001 "+veth+" "+strconv.Itoa(idx) ||
		strings.Join(strings.Fields(lines[2]), " ") != "10.99.0.7 1002 - -" {
		t.Errorf("list:\n%s", r)
	}
	if r.Stderr != "" {
		t.Errorf("list warned with the datapath in sync:\n%s", r)
	}

	var l listJSON
	r = e.MustRun("endpointctl", "list", "-o", "json")
	if err := json.Unmarshal([]byte(r.Stdout), &l); err != nil {
		t.Fatalf("list -o json is not JSON: %v\n%s", err, r)
	}
	if len(l.Endpoints) != 2 || l.Endpoints[0].IP != podA || l.Endpoints[0].Identity != 1001 || l.Endpoints[0].Interface != veth || l.Endpoints[0].Ifindex != idx ||
		l.Endpoints[1].IP != far || l.Endpoints[1].Identity != 1002 || l.Endpoints[1].Ifindex != 0 {
		t.Errorf("list -o json = %+v", l)
	}

	// Rebinding moves the address.
	r = e.MustRun("endpointctl", "add", "--ip", "10.13.0.2", "--identity", "1003")
	if !strings.Contains(r.Stdout, "moved from identity 1001 to 1003") {
		t.Errorf("rebind said:\n%s", r)
	}
	if ep := endpoint(t, d, idx); ep.Identity != 1003 {
		t.Errorf("endpoint after rebind = %+v", ep)
	}
	r = e.MustRun("endpointctl", "add", "--ip", "10.13.0.2", "--identity", "1003")
	if !strings.Contains(r.Stdout, "unchanged") {
		t.Errorf("same add again said:\n%s", r)
	}

	// del: the local pod is unresolved again, the remote address is gone.
	r = e.MustRun("endpointctl", "del", "--ip", "10.13.0.2")
	if !strings.Contains(r.Stdout, "endpoint 10.13.0.2 removed (was identity 1003); the local pod is unresolved (5) again") {
		t.Errorf("del said:\n%s", r)
	}
	if ep := endpoint(t, d, idx); ep.Identity != identity.Unresolved {
		t.Errorf("endpoint after del = %+v, want unresolved", ep)
	}
	if id, ok := lookup(t, d, podA); !ok || id != identity.Unresolved {
		t.Errorf("ipcache %s after del = %s (found %v), want unresolved", podA, id, ok)
	}
	e.MustRun("endpointctl", "delete", "--ip", far.String())
	if _, ok := lookup(t, d, far); ok {
		t.Errorf("ipcache still has %s after del", far)
	}
	e.MustFail("no manual endpoint has IP 10.99.0.7", false, "endpointctl", "del", "--ip", far.String())

	r = e.MustRun("endpointctl", "list", "-o", "json")
	if err := json.Unmarshal([]byte(r.Stdout), &l); err != nil || len(l.Endpoints) != 0 {
		t.Errorf("list -o json after del = %+v, %v", l, err)
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
	_, idx := clitest.HostVeth(t)
	clitest.PutPod(t, d, idx, podB)
	e.MustRun("endpointctl", "add", "--ip", podB.String(), "--identity", "1002")
	before := snap(t, e, d)

	for _, c := range []struct {
		want  string
		usage bool
		args  []string
	}{
		{"identity 255 is outside the manual range 256-65535", false, []string{"add", "--ip", "10.13.0.2", "--identity", "255"}},
		{"identity 65536 is outside the manual range", false, []string{"add", "--ip", "10.13.0.2", "--identity", "65536"}},
		{"identity 0 is outside the manual range", false, []string{"add", "--ip", "10.13.0.2", "--identity", "0"}},
		{`bad IP address "10.13.0.300"`, false, []string{"add", "--ip", "10.13.0.300", "--identity", "1001"}},
		{`bad IP address "10.13.0.0/24"`, false, []string{"add", "--ip", "10.13.0.0/24", "--identity", "1001"}},
		{"must be a unicast address", false, []string{"add", "--ip", "0.0.0.0", "--identity", "1001"}},
		{`bad IP address "frontend"`, false, []string{"del", "--ip", "frontend"}},
		{"no manual endpoint has IP 10.13.0.9", false, []string{"del", "--ip", "10.13.0.9"}},
		{`invalid argument "abc" for "--identity" flag`, true, []string{"add", "--ip", "10.13.0.2", "--identity", "abc"}},
		{`invalid argument "-1" for "--identity" flag`, true, []string{"add", "--ip", "10.13.0.2", "--identity", "-1"}},
		{"unknown flag: --identiy", true, []string{"add", "--ip", "10.13.0.2", "--identiy", "1001"}},
		{"required flag(s) --identity not set", true, []string{"add", "--ip", "10.13.0.2"}},
		{"required flag(s) --ip, --identity not set", true, []string{"add"}},
		{"required flag(s) --ip not set", true, []string{"del"}},
		{`unknown command "ad"`, true, []string{"ad", "--ip", "10.13.0.2"}},
		{"takes no arguments", true, []string{"add", "10.13.0.2", "--ip", "10.13.0.2", "--identity", "1001"}},
		{`unknown output format "yaml"`, true, []string{"list", "-o", "yaml"}},
	} {
		e.MustFail(c.want, c.usage, "endpointctl", c.args...)
	}
	if after := snap(t, e, d); !reflect.DeepEqual(after, before) {
		t.Errorf("failed commands changed the maps or the state file:\nbefore %+v\nafter  %+v", before, after)
	}
}

func TestNotLoaded(t *testing.T) {
	t.Parallel()
	e := clitest.NewEmpty(t)
	r := e.MustFail("datapath not loaded", false, "endpointctl", "add", "--ip", "10.13.0.2", "--identity", "1001")
	if !strings.Contains(r.Stderr, "idcni CNI plugin") || !strings.Contains(r.Stderr, "idcni-agent") || !strings.Contains(r.Stderr, e.BPFRoot) {
		t.Errorf("the error does not say what loads the datapath, or where it was looked for:\n%s", r)
	}
	e.MustFail("datapath not loaded", false, "endpointctl", "del", "--ip", "10.13.0.2")
	if _, err := os.Stat(e.State); !os.IsNotExist(err) {
		t.Errorf("a command that failed created the state file: %v", err)
	}
	if _, err := os.Stat(e.BPFRoot); !os.IsNotExist(err) {
		t.Errorf("a command that failed created %s: %v", e.BPFRoot, err)
	}
	// Listing an empty node is not an error.
	r = e.MustRun("endpointctl", "list")
	if r.Stdout != "" || !strings.Contains(r.Stderr, "No manual endpoints") {
		t.Errorf("list on an empty node:\n%s", r)
	}
}

func TestNotRoot(t *testing.T) {
	t.Parallel()
	e, d := clitest.New(t)
	before := snap(t, e, d)
	for _, args := range [][]string{
		{"add", "--ip", "10.13.0.2", "--identity", "1001"},
		{"del", "--ip", "10.13.0.2"},
		{"list"},
	} {
		r := e.RunAs(65534, 65534, "endpointctl", args...)
		if r.Code != 1 || !strings.HasPrefix(r.Stderr, "Error: must run as root: ") || strings.Count(r.Stderr, "\n") != 1 {
			t.Errorf("as nobody:\n%s", r)
		}
	}
	if after := snap(t, e, d); !reflect.DeepEqual(after, before) {
		t.Error("commands run as nobody changed something")
	}
}

func TestStateLocked(t *testing.T) {
	t.Parallel()
	e, d := clitest.New(t)
	before := snap(t, e, d)
	db, err := store.Open(e.State, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	before.State, _ = os.ReadFile(e.State)
	start := time.Now()
	r := e.MustFail("is locked by another process", false, "endpointctl", "add", "--ip", "10.13.0.2", "--identity", "1001")
	if !strings.Contains(r.Stderr, e.State) {
		t.Errorf("the error does not name the state file:\n%s", r)
	}
	if took := time.Since(start); took > 20*time.Second {
		t.Errorf("waited %s for the lock", took)
	}
	if after := snap(t, e, d); !reflect.DeepEqual(after, before) {
		t.Errorf("a command that found the state locked changed something:\nbefore %+v\nafter  %+v", before, after)
	}
}

func TestFlagsOverrideEnvironment(t *testing.T) {
	t.Parallel()
	e, d := clitest.New(t)
	other := clitest.NewEmpty(t)
	// The environment points at an empty root; the flags at the real one.
	r := other.Run("endpointctl", "--bpf-root", e.BPFRoot, "--state", e.State, "add", "--ip", "10.13.0.2", "--identity", "1001")
	if r.Code != 0 {
		t.Fatalf("%s", r)
	}
	if id, _ := lookup(t, d, podA); id != 1001 {
		t.Errorf("ipcache %s = %s, want 1001", podA, id)
	}
	if _, err := os.Stat(e.State); err != nil {
		t.Errorf("--state was not used: %v", err)
	}
}
