package agent

import (
	"errors"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/cni"
	"github.com/idcni/idcni/store"
)

// fakeLinks is a host's links by ifindex.
type fakeLinks struct {
	byIndex map[int]hostLink
	err     map[int]error
}

func (f *fakeLinks) ByIndex(i int) (hostLink, bool, error) {
	if err := f.err[i]; err != nil {
		return hostLink{}, false, err
	}
	l, ok := f.byIndex[i]
	return l, ok, nil
}

func (f *fakeLinks) List() ([]hostLink, error) {
	var out []hostLink
	for _, l := range f.byIndex {
		out = append(out, l)
	}
	return out, nil
}

func (f *fakeLinks) add(network string, ep api.EndpointRequest) {
	f.byIndex[ep.HostIfIndex] = hostLink{Index: ep.HostIfIndex, Name: ep.HostIfName,
		Alias: "idcni/" + network + "/" + ep.ContainerID + "/" + ep.IfName}
}

const testNet = "idcni"

func testEndpoint(cid string, ifindex int, addr, pod string) api.EndpointRequest {
	return api.EndpointRequest{ContainerID: cid, IfName: "eth0", HostIfName: "veth" + cid[:4], HostIfIndex: ifindex,
		Addresses: []netip.Addr{netip.MustParseAddr(addr)}, PodNamespace: "ns", PodName: pod}
}

// openTestRegistry opens a registry in a fresh state file; reopen reads
// that file again, as an agent restart would.
func openTestRegistry(t *testing.T) (r *endpointRegistry, reopen func() *endpointRegistry) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "state.db")
	var db *store.DB
	open := func() *endpointRegistry {
		if db != nil {
			db.Close()
		}
		var err error
		db, err = store.Open(path, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		r, err := openEndpointRegistry(db)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	t.Cleanup(func() { db.Close() })
	return open(), open
}

func ids(eps []api.EndpointRequest) []string {
	var out []string
	for _, ep := range eps {
		out = append(out, ep.ContainerID)
	}
	return out
}

// Defect 3: an entry whose host veth is gone, or whose ifindex went to
// another container's veth (or to a link that is no idcni veth at all), is
// forgotten, in the state file too; entries whose link checks out stay,
// and one whose link cannot be read stays and is reported.
func TestRegistryVerifyPrunesEntriesWithoutTheirVeth(t *testing.T) {
	r, reopen := openTestRegistry(t)
	links := &fakeLinks{byIndex: map[int]hostLink{}, err: map[int]error{}}
	live := testEndpoint("aaaa01", 10, "10.0.0.1", "live")
	gone := testEndpoint("bbbb02", 11, "10.0.0.2", "gone")
	reused := testEndpoint("cccc03", 12, "10.0.0.3", "reused")
	foreign := testEndpoint("dddd04", 13, "10.0.0.4", "foreign")
	otherNet := testEndpoint("eeee05", 14, "10.0.0.5", "othernet")
	unreadable := testEndpoint("ffff06", 15, "10.0.0.6", "unreadable")
	renamed := testEndpoint("abab07", 16, "10.0.0.7", "renamed")
	for _, ep := range []api.EndpointRequest{live, gone, reused, foreign, otherNet, unreadable, renamed} {
		if err := r.put(ep); err != nil {
			t.Fatal(err)
		}
	}
	links.add(testNet, live)
	// A new pod's veth got the ifindex of reused: its alias names the new container.
	links.add(testNet, testEndpoint("9999aa", 12, "10.0.0.9", "new"))
	links.byIndex[13] = hostLink{Index: 13, Name: foreign.HostIfName} // no alias
	links.add("other", otherNet)
	links.err[15] = errors.New("netlink: interrupted")
	links.add(testNet, renamed)
	l := links.byIndex[16]
	l.Name = "eth9"
	links.byIndex[16] = l

	pruned, err := r.verify(links, testNet)
	if err == nil || !strings.Contains(err.Error(), "interrupted") {
		t.Errorf("verify error = %v, want the unreadable link reported", err)
	}
	want := []string{"abab07", "bbbb02", "cccc03", "dddd04", "eeee05"}
	if got := ids(pruned); !slices.Equal(got, want) {
		t.Errorf("pruned %v, want %v", got, want)
	}
	r = reopen()
	if got := ids(r.all()); !slices.Equal(got, []string{"aaaa01", "ffff06"}) {
		t.Errorf("after a restart the registry holds %v, want the live entry and the unreadable one", got)
	}
	if _, ok := r.byPod("ns", "gone"); ok {
		t.Error("byPod still finds a pruned entry")
	}
}

// Registration checks the link at the ifindex and takes the ifindex from
// older entries holding it.
func TestRegistryClaim(t *testing.T) {
	r, _ := openTestRegistry(t)
	links := &fakeLinks{byIndex: map[int]hostLink{}}
	old := testEndpoint("aaaa01", 10, "10.0.0.1", "old")
	keep := testEndpoint("bbbb02", 11, "10.0.0.2", "keep")
	for _, ep := range []api.EndpointRequest{old, keep} {
		if err := r.put(ep); err != nil {
			t.Fatal(err)
		}
	}
	links.add(testNet, keep)
	neu := testEndpoint("cccc03", 10, "10.0.0.3", "new")

	// Its veth is not at the ifindex yet (or any more): refused.
	if _, err := r.claim(links, neu, testNet); !errors.Is(err, errLinkNotOwned) {
		t.Fatalf("claim without the link: %v, want errLinkNotOwned", err)
	}
	links.add(testNet, old)
	if _, err := r.claim(links, neu, testNet); !errors.Is(err, errLinkNotOwned) {
		t.Fatalf("claim of another container's link: %v, want errLinkNotOwned", err)
	}
	if len(r.all()) != 2 {
		t.Fatalf("a refused claim changed the registry: %v", ids(r.all()))
	}

	links.add(testNet, neu)
	displaced, err := r.claim(links, neu, testNet)
	if err != nil {
		t.Fatal(err)
	}
	if got := ids(displaced); !slices.Equal(got, []string{"aaaa01"}) {
		t.Errorf("displaced %v, want the old entry at the ifindex", got)
	}
	if got := ids(r.all()); !slices.Equal(got, []string{"bbbb02"}) {
		t.Errorf("registry holds %v", got)
	}
}

// Defect 4: with the state file lost, the registry is rebuilt from the
// live veths, the plugin's records and the informer's pods; what cannot be
// attributed is reported, and entries still backed by their veth are left.
func TestRegistryRebuild(t *testing.T) {
	r, _ := openTestRegistry(t)
	links := &fakeLinks{byIndex: map[int]hostLink{}}
	known := testEndpoint("aaaa01", 10, "10.0.0.1", "known")
	if err := r.put(known); err != nil {
		t.Fatal(err)
	}
	fromRecord := testEndpoint("bbbb02", 11, "10.0.0.2", "rec")
	fromAddr := testEndpoint("cccc03", 12, "10.0.0.3", "byaddr") // an old record without the pod
	conflict := testEndpoint("dddd04", 13, "10.0.0.4", "conflict")
	nobody := testEndpoint("eeee05", 14, "10.0.0.5", "nobody")
	noAddrs := testEndpoint("ffff06", 15, "10.0.0.6", "noaddrs")
	otherNet := testEndpoint("abab07", 16, "10.0.0.7", "othernet")
	fromMap := testEndpoint("acac08", 17, "10.0.0.8", "frommap") // no record at all
	for _, ep := range []api.EndpointRequest{known, fromRecord, fromAddr, conflict, nobody, noAddrs, fromMap} {
		links.add(testNet, ep)
	}
	links.add("other", otherNet)
	links.byIndex[1] = hostLink{Index: 1, Name: "lo"}

	rec := func(ep api.EndpointRequest, withPod bool) *cni.Record {
		c := &cni.Record{Network: testNet, ContainerID: ep.ContainerID, IfName: ep.IfName, HostIfName: ep.HostIfName,
			HostIfIndex: ep.HostIfIndex, Addresses: ep.Addresses, Complete: true}
		if withPod {
			c.PodNamespace, c.PodName = ep.PodNamespace, ep.PodName
		}
		return c
	}
	records := []*cni.Record{rec(fromRecord, true), rec(fromAddr, false), rec(conflict, true), rec(nobody, false),
		{Network: testNet, ContainerID: noAddrs.ContainerID, IfName: "eth0", HostIfName: noAddrs.HostIfName}}
	// The endpoints map: the record's addresses win over an entry a stale
	// flush overwrote (fromRecord's), and fill in for a missing record.
	eps := map[int]bpf.Endpoint{
		11: {Identity: 5, IPv4: netip.MustParseAddr("10.9.9.9")},
		17: {Identity: 6, IPv4: fromMap.Addresses[0]},
	}
	pods := map[netip.Addr]string{
		fromRecord.Addresses[0]: "ns/rec",
		fromAddr.Addresses[0]:   "ns/byaddr",
		conflict.Addresses[0]:   "ns/someone-else",
		fromMap.Addresses[0]:    "ns/frommap",
	}
	podAt := func(a netip.Addr) (string, bool) { p, ok := pods[a]; return p, ok }
	readErr := errors.New("record x is corrupt")
	calls := 0
	added, skipped, err := r.rebuild(mustList(t, links), testNet, eps,
		func() ([]*cni.Record, error) { calls++; return records, readErr }, podAt)
	if !errors.Is(err, readErr) {
		t.Errorf("rebuild error = %v, want the unreadable record reported", err)
	}
	if got := ids(added); !slices.Equal(got, []string{"bbbb02", "cccc03", "acac08"}) {
		t.Errorf("added %v", got)
	}
	for _, want := range []api.EndpointRequest{fromRecord, fromAddr, fromMap} {
		got, ok := r.byPod(want.PodNamespace, want.PodName)
		if !ok || got.ContainerID != want.ContainerID || got.HostIfIndex != want.HostIfIndex ||
			got.HostIfName != want.HostIfName || !slices.Equal(got.Addresses, want.Addresses) {
			t.Errorf("entry of pod %s = %+v (found %v), want %+v", want.PodName, got, ok, want)
		}
	}
	if len(skipped) != 3 {
		t.Errorf("skipped %d veths, want 3 (conflict, nobody, noaddrs):\n%s", len(skipped), strings.Join(skipped, "\n"))
	}
	for i, frag := range []string{"reports ns/someone-else", "no record names its pod", "neither a record"} {
		if i < len(skipped) && !strings.Contains(skipped[i], frag) {
			t.Errorf("skipped[%d] = %q, want it to say %q", i, skipped[i], frag)
		}
	}

	// Nothing missing any more but the unattributable: records are read
	// again only for those, and nothing is added twice.
	added, _, _ = r.rebuild(mustList(t, links), testNet, eps, func() ([]*cni.Record, error) { calls++; return records, nil }, podAt)
	if len(added) != 0 || calls != 2 {
		t.Errorf("second rebuild added %v after %d record reads", ids(added), calls)
	}
	delete(links.byIndex, 13)
	delete(links.byIndex, 14)
	delete(links.byIndex, 15)
	if _, _, err := r.rebuild(mustList(t, links), testNet, eps, func() ([]*cni.Record, error) { calls++; return nil, nil }, podAt); err != nil || calls != 2 {
		t.Errorf("rebuild with nothing missing read the records (%d reads, err %v)", calls, err)
	}
}

func mustList(t *testing.T, l hostLinks) []hostLink {
	t.Helper()
	ls, err := l.List()
	if err != nil {
		t.Fatal(err)
	}
	return ls
}

// The ownership rule the plugin's DEL and the agent's unregister share.
func TestEndpointHoldsAny(t *testing.T) {
	a, b := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("fd00::1")
	ep := bpf.Endpoint{IPv4: a, IPv6: b}
	for _, c := range []struct {
		addrs []netip.Addr
		want  bool
	}{
		{nil, false},
		{[]netip.Addr{netip.MustParseAddr("10.0.0.2")}, false},
		{[]netip.Addr{netip.MustParseAddr("10.0.0.2"), b}, true},
		{[]netip.Addr{a}, true},
		{[]netip.Addr{{}}, false},
	} {
		if got := ep.HoldsAny(c.addrs); got != c.want {
			t.Errorf("HoldsAny(%v) = %v, want %v", c.addrs, got, c.want)
		}
	}
	if (bpf.Endpoint{}).HoldsAny([]netip.Addr{{}}) {
		t.Error("an endpoint without addresses holds the zero address")
	}
}
