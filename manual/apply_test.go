package manual

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net/netip"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/desired"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// loadDatapath loads the real datapath under a private bpffs root, as the
// CNI plugin does on its first ADD, and removes it after the test.
func loadDatapath(t *testing.T) *bpf.Datapath {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to load BPF programs")
	}
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	root := "/sys/fs/bpf/idcni-test-" + hex.EncodeToString(b)
	t.Cleanup(func() {
		if err := bpf.Unpin(root); err != nil {
			t.Error(err)
		}
	})
	d, err := bpf.Load(bpf.Options{Root: root})
	if err != nil {
		t.Fatalf("load datapath: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

var (
	podA  = netip.MustParseAddr("10.13.0.2")
	podA6 = netip.MustParseAddr("fd00:13::2")
	podB  = netip.MustParseAddr("10.13.0.3")
	far   = netip.MustParseAddr("10.99.0.7") // on another node
)

// putPod enters a pod as the plugin does: endpoint and ipcache entries as
// the unresolved identity.
func putPod(t *testing.T, d *bpf.Datapath, ifindex int, addrs ...netip.Addr) {
	t.Helper()
	ep := bpf.Endpoint{Identity: identity.Unresolved}
	for _, a := range addrs {
		if a.Is4() {
			ep.IPv4 = a
		} else {
			ep.IPv6 = a
		}
		if err := d.PutIPCache(desired.HostPrefix(a), identity.Unresolved); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.PutEndpoint(ifindex, ep); err != nil {
		t.Fatal(err)
	}
}

type snapshot struct {
	Endpoints map[int]bpf.Endpoint
	IPCache   map[netip.Prefix]identity.ID
	Policy    *policy.MapState
	Revision  uint32
}

func snap(t *testing.T, d *bpf.Datapath) snapshot {
	t.Helper()
	var s snapshot
	var err error
	if s.Endpoints, err = d.Endpoints(); err != nil {
		t.Fatal(err)
	}
	if s.IPCache, err = d.IPCache(); err != nil {
		t.Fatal(err)
	}
	if s.Policy, err = d.Policy(); err != nil {
		t.Fatal(err)
	}
	if s.Revision, err = d.Revision(); err != nil {
		t.Fatal(err)
	}
	return s
}

func mustLookup(t *testing.T, d *bpf.Datapath, a netip.Addr) (identity.ID, bool) {
	t.Helper()
	id, ok, err := d.IPCacheLookup(a)
	if err != nil {
		t.Fatal(err)
	}
	return id, ok
}

func TestApplyBindsAndUnbinds(t *testing.T) {
	d := loadDatapath(t)
	putPod(t, d, 101, podA, podA6)
	putPod(t, d, 102, podB)

	var st State
	_, _ = st.Bind(podA, 1001)
	_, _ = st.Bind(far, 1002)
	_, _ = st.AddRule(rule(policy.Allow, 1001, 1002, true, policy.ProtoAny, 0, 0))
	rev0 := snap(t, d).Revision
	if err := Apply(d, st); err != nil {
		t.Fatal(err)
	}
	s := snap(t, d)
	if s.Endpoints[101].Identity != 1001 {
		t.Errorf("pod A endpoint = %+v, want identity 1001", s.Endpoints[101])
	}
	if s.Endpoints[102].Identity != identity.Unresolved {
		t.Errorf("unbound pod B endpoint = %+v, want it left unresolved", s.Endpoints[102])
	}
	for a, want := range map[netip.Addr]identity.ID{podA: 1001, podA6: 1001, far: 1002, podB: identity.Unresolved} {
		if got, _ := mustLookup(t, d, a); got != want {
			t.Errorf("ipcache %s = %s, want %s", a, got, want)
		}
	}
	want, _ := st.Compile()
	if !samePolicy(s.Policy, want) {
		t.Errorf("policy maps = %+v, want %+v", s.Policy, want)
	}
	if s.Revision <= rev0 {
		t.Errorf("revision %d -> %d: flows would not be judged again", rev0, s.Revision)
	}
	if drift, err := Drift(d, st); err != nil || len(drift) != 0 {
		t.Errorf("Drift after Apply = %v, %v", drift, err)
	}

	// Applying again is a no-op on the maps.
	if err := Apply(d, st); err != nil {
		t.Fatal(err)
	}
	again := snap(t, d)
	if !reflect.DeepEqual(again.Endpoints, s.Endpoints) || !reflect.DeepEqual(again.IPCache, s.IPCache) {
		t.Error("a second Apply changed the maps")
	}

	// Removing the bindings: the local pod goes back to unresolved with
	// both its addresses, the remote address leaves the ipcache.
	_, _ = st.Unbind(podA)
	_, _ = st.Unbind(far)
	if err := Apply(d, st); err != nil {
		t.Fatal(err)
	}
	s = snap(t, d)
	if s.Endpoints[101].Identity != identity.Unresolved {
		t.Errorf("unbound pod A endpoint = %+v, want unresolved", s.Endpoints[101])
	}
	for _, a := range []netip.Addr{podA, podA6} {
		if got, ok := mustLookup(t, d, a); !ok || got != identity.Unresolved {
			t.Errorf("ipcache %s = %s (found %v), want unresolved", a, got, ok)
		}
	}
	if _, ok := mustLookup(t, d, far); ok {
		t.Errorf("ipcache still has unbound remote %s", far)
	}
	// Rules stay with no address bound: the policy maps still hold them.
	if !samePolicy(s.Policy, want) {
		t.Error("unbinding addresses changed the policy maps")
	}
}

func TestApplyLeavesOtherIdentitiesAlone(t *testing.T) {
	d := loadDatapath(t)
	// An agent's label identity and a CIDR identity are not manual state.
	label := identity.ID(70000)
	if err := d.PutEndpoint(103, bpf.Endpoint{Identity: label, IPv4: podB}); err != nil {
		t.Fatal(err)
	}
	if err := d.PutIPCache(desired.HostPrefix(podB), label); err != nil {
		t.Fatal(err)
	}
	cidr := netip.MustParsePrefix("192.0.2.0/24")
	if err := d.PutIPCache(cidr, identity.MinCIDR); err != nil {
		t.Fatal(err)
	}
	// A manual-range entry that is not a host prefix is not a binding.
	wide := netip.MustParsePrefix("198.51.100.0/24")
	if err := d.PutIPCache(wide, 1001); err != nil {
		t.Fatal(err)
	}
	if err := Apply(d, State{}); err != nil {
		t.Fatal(err)
	}
	s := snap(t, d)
	if s.Endpoints[103].Identity != label || s.IPCache[desired.HostPrefix(podB)] != label || s.IPCache[cidr] != identity.MinCIDR || s.IPCache[wide] != 1001 {
		t.Errorf("Apply of an empty state touched entries that are not manual: %+v %+v", s.Endpoints, s.IPCache)
	}
}

func TestApplyRefusesConflictWithoutWriting(t *testing.T) {
	d := loadDatapath(t)
	putPod(t, d, 101, podA, podA6)
	before := snap(t, d)
	var st State
	_, _ = st.Bind(podA, 1001)
	_, _ = st.Bind(podA6, 1002)
	_, _ = st.AddRule(rule(policy.Allow, 1001, 1002, false, policy.ProtoAny, 0, 0))
	err := Apply(d, st)
	if err == nil || !strings.Contains(err.Error(), "bound to different identities") {
		t.Fatalf("Apply = %v, want the one-identity-per-pod error", err)
	}
	if after := snap(t, d); !reflect.DeepEqual(after, before) {
		t.Errorf("a refused Apply wrote to the maps:\nbefore %+v\nafter  %+v", before, after)
	}
}

func TestUpdateKeepsFileAndMapsOnFailure(t *testing.T) {
	d := loadDatapath(t)
	db := openStore(t)
	putPod(t, d, 101, podA, podA6)

	_, after, err := Update(db, d, func(st *State) error {
		_, err := st.Bind(podA, 1001)
		return err
	})
	if err != nil || len(after.Bindings) != 1 {
		t.Fatalf("Update = %+v, %v", after, err)
	}
	good := snap(t, d)

	failures := map[string]func(*State) error{
		"fn fails": func(st *State) error {
			_, _ = st.Bind(podB, 1002)
			return errors.New("no")
		},
		"maps refuse": func(st *State) error {
			// Valid alone, but pod A would get two identities.
			_, err := st.Bind(podA6, 1002)
			return err
		},
		"too many ranges": func(st *State) error {
			for i := range policy.MaxAllowRanges + 1 {
				p := uint16(2000 + 10*i)
				if _, err := st.AddRule(rule(policy.Allow, 1001, 1002, false, policy.ProtoTCP, p, p)); err != nil {
					return err
				}
			}
			return nil
		},
	}
	for name, fn := range failures {
		if _, _, err := Update(db, d, fn); err == nil {
			t.Errorf("%s: Update succeeded", name)
		}
		st, err := Load(db)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(st, after) {
			t.Errorf("%s: state file = %+v, want %+v", name, st, after)
		}
		s := snap(t, d)
		if !reflect.DeepEqual(s.Endpoints, good.Endpoints) || !reflect.DeepEqual(s.IPCache, good.IPCache) || !samePolicy(s.Policy, good.Policy) {
			t.Errorf("%s: maps changed:\n got %+v\nwant %+v", name, s, good)
		}
	}
}

func TestDriftAfterReboot(t *testing.T) {
	d := loadDatapath(t)
	var st State
	_, _ = st.Bind(far, 1001)
	_, _ = st.AddRule(rule(policy.Deny, 1001, 1002, false, policy.ProtoAny, 0, 0))
	drift, err := Drift(d, st)
	if err != nil {
		t.Fatal(err)
	}
	if len(drift) != 2 || !strings.Contains(drift[0], "10.99.0.7 is not identity 1001") || !strings.Contains(drift[1], "policy maps") {
		t.Errorf("Drift on empty maps = %q", drift)
	}
	if err := Apply(d, st); err != nil {
		t.Fatal(err)
	}
	if drift, _ := Drift(d, st); len(drift) != 0 {
		t.Errorf("Drift after Apply = %q", drift)
	}
}

func TestApplyRepairsHalfUndoneBinding(t *testing.T) {
	d := loadDatapath(t)
	putPod(t, d, 101, podA, podA6)
	// As if an unbind stopped between resetting the endpoint and its
	// ipcache entries.
	if err := d.PutIPCache(desired.HostPrefix(podA), 1001); err != nil {
		t.Fatal(err)
	}
	var st State
	if drift, _ := Drift(d, st); len(drift) == 0 {
		t.Error("Drift does not see the leftover ipcache entry")
	}
	if err := Apply(d, st); err != nil {
		t.Fatal(err)
	}
	if got, _ := mustLookup(t, d, podA); got != identity.Unresolved {
		t.Errorf("ipcache %s = %s, want the pod's own identity (unresolved)", podA, got)
	}
	if drift, _ := Drift(d, st); len(drift) != 0 {
		t.Errorf("Drift after Apply = %q", drift)
	}
}
