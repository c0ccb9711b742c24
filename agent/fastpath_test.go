package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"testing"
)

// fakeFastDP records what the fast path does to the datapath, in order.
type fakeFastDP struct {
	ops      []string
	cidrs    []netip.Prefix
	pinned   []string
	attached map[int]bool // by ifindex, as the kernel would answer
	failOn   string       // AttachNet of this device fails
	links    *fakeLinks
}

func (f *fakeFastDP) SetRemoteCIDRs(c []netip.Prefix) error {
	f.ops = append(f.ops, fmt.Sprintf("cidrs %v", c))
	f.cidrs = slices.Clone(c)
	return nil
}

func (f *fakeFastDP) AttachNet(name string) error {
	if name == f.failOn {
		return errors.New("attach refused")
	}
	f.ops = append(f.ops, "attach "+name)
	if !slices.Contains(f.pinned, name) {
		f.pinned = append(f.pinned, name)
	}
	for idx, l := range f.links.byIndex {
		if l.Name == name {
			f.attached[idx] = true
		}
	}
	return nil
}

func (f *fakeFastDP) DetachNet(name string) error {
	f.ops = append(f.ops, "detach "+name)
	f.pinned = slices.DeleteFunc(f.pinned, func(s string) bool { return s == name })
	return nil
}

func (f *fakeFastDP) AttachedNetIndex(idx int) (bool, error) { return f.attached[idx], nil }
func (f *fakeFastDP) NetLinks() ([]string, error)            { return slices.Clone(f.pinned), nil }
func (f *fakeFastDP) Lock() (func(), error)                  { return func() {}, nil }
func (f *fakeFastDP) ReopenPrograms() error                  { return nil }

func newFakeFastPath(on bool) (*fastPath, *fakeFastDP) {
	links := &fakeLinks{byIndex: map[int]hostLink{2: {Index: 2, Name: "eth0"}, 9: {Index: 9, Name: "idcni_vxlan"}}}
	dp := &fakeFastDP{links: links, attached: map[int]bool{}}
	return newFastPath(dp, links, slog.New(slog.DiscardHandler), on), dp
}

var (
	direct1 = nodeRoute{Dst: netip.MustParsePrefix("10.1.0.0/24"), Via: netip.MustParseAddr("192.0.2.1"), LinkIndex: 2}
	direct6 = nodeRoute{Dst: netip.MustParsePrefix("fd00:1::/64"), Via: netip.MustParseAddr("2001:db8::1"), LinkIndex: 2}
	tunnel2 = nodeRoute{Dst: netip.MustParsePrefix("10.2.0.0/24"), Via: netip.MustParseAddr("198.51.100.2"), LinkIndex: 9, Onlink: true}
)

// The fast path is the routes': their destinations, from_net on their
// devices. from_net goes on before the ranges go in, and comes off only
// after they went out, so a node never has one direction without the
// other.
func TestFastPathFollowsRoutes(t *testing.T) {
	f, dp := newFakeFastPath(true)
	if err := f.sync([]nodeRoute{tunnel2, direct6, direct1}); err != nil {
		t.Fatal(err)
	}
	want := []string{"attach eth0", "attach idcni_vxlan", "cidrs [10.1.0.0/24 10.2.0.0/24 fd00:1::/64]"}
	if !slices.Equal(dp.ops, want) {
		t.Fatalf("first sync did %q, want %q", dp.ops, want)
	}
	dp.ops = nil
	if err := f.sync([]nodeRoute{direct1}); err != nil {
		t.Fatal(err)
	}
	want = []string{"cidrs [10.1.0.0/24]", "detach idcni_vxlan"}
	if !slices.Equal(dp.ops, want) {
		t.Fatalf("after the tunnel route went: %q, want %q", dp.ops, want)
	}
	// An earlier run's from_net on a device no route uses any more goes.
	dp.pinned = append(dp.pinned, "old0")
	dp.ops = nil
	if err := f.sync(nil); err != nil {
		t.Fatal(err)
	}
	want = []string{"cidrs []", "detach eth0", "detach old0"}
	if !slices.Equal(dp.ops, want) {
		t.Fatalf("with no routes: %q, want %q", dp.ops, want)
	}
}

// A device from_net cannot go on keeps its ranges out of the map: the
// node's forwarding takes both directions of them, not one.
func TestFastPathLeavesOutADeviceItCannotAttach(t *testing.T) {
	f, dp := newFakeFastPath(true)
	dp.failOn = "idcni_vxlan"
	err := f.sync([]nodeRoute{direct1, tunnel2})
	if err == nil {
		t.Fatal("a failed attach was not reported")
	}
	if want := []netip.Prefix{direct1.Dst}; !slices.Equal(dp.cidrs, want) {
		t.Fatalf("remote_cidrs %v, want %v", dp.cidrs, want)
	}
}

// --fast-path=false empties the map and takes from_net off what an
// earlier run put it on, whatever the routes.
func TestFastPathOff(t *testing.T) {
	f, dp := newFakeFastPath(false)
	dp.pinned = []string{"eth0"}
	dp.cidrs = []netip.Prefix{direct1.Dst}
	if err := f.sync([]nodeRoute{direct1}); err != nil {
		t.Fatal(err)
	}
	if len(dp.cidrs) != 0 || len(dp.pinned) != 0 {
		t.Fatalf("fast path off left remote_cidrs %v and from_net on %v", dp.cidrs, dp.pinned)
	}
}

// The audit puts from_net back where the kernel says it is gone, on the
// device of that name now (made again, with another ifindex).
func TestFastPathAudit(t *testing.T) {
	f, dp := newFakeFastPath(true)
	if err := f.sync([]nodeRoute{direct1, tunnel2}); err != nil {
		t.Fatal(err)
	}
	if n, failed := f.audit(); n != 0 || failed != nil {
		t.Fatalf("audit of an intact fast path repaired %d, failed %v", n, failed)
	}
	// idcni_vxlan made again: ifindex 9 is gone, 11 has its name.
	delete(dp.links.byIndex, 9)
	delete(dp.attached, 9)
	dp.links.byIndex[11] = hostLink{Index: 11, Name: "idcni_vxlan"}
	if n, failed := f.audit(); n != 1 || failed != nil {
		t.Fatalf("audit repaired %d, failed %v; want 1 repair", n, failed)
	}
	if !dp.attached[11] || f.devices[11] != "idcni_vxlan" {
		t.Fatalf("from_net not on the new idcni_vxlan: attached %v, devices %v", dp.attached, f.devices)
	}
	if n, _ := f.audit(); n != 0 {
		t.Fatalf("a second audit repaired %d again", n)
	}
}

// A route to another node's pods that goes (or moves) leaves the fast
// path first: with the range still in remote_cidrs and its route gone,
// from_pod would send its packets by whatever route is left.
func TestFastPathLetsGoBeforeARouteGoes(t *testing.T) {
	fr := newFakeRoutes(connectedNet{Prefix: netip.MustParsePrefix("192.0.2.0/24"), Addr: netip.MustParseAddr("192.0.2.10"), LinkIndex: 2, MTU: 1500})
	r := newNodeRouter(fr, slog.New(slog.DiscardHandler), nil, RoutingDirect, 0)
	var seen [][]netip.Prefix
	r.releasing = func(kept []nodeRoute) error {
		var dsts []netip.Prefix
		for _, k := range kept {
			dsts = append(dsts, k.Dst)
		}
		// What the table still holds when the fast path is told.
		if len(fr.routes()) != 2 {
			t.Errorf("told to let go with %d routes left in the table, want both still there", len(fr.routes()))
		}
		seen = append(seen, dsts)
		return nil
	}
	peer := func(name, cidr, addr string) peerNode {
		return peerNode{name: name, cidrs: []netip.Prefix{netip.MustParsePrefix(cidr)}, addrs: []netip.Addr{netip.MustParseAddr(addr)}}
	}
	self := selfNode{cidrs: []netip.Prefix{netip.MustParsePrefix("10.9.0.0/24")}, addrs: []netip.Addr{netip.MustParseAddr("192.0.2.10")}, internal: []netip.Addr{netip.MustParseAddr("192.0.2.10")}}
	if err := r.sync([]peerNode{peer("a", "10.1.0.0/24", "192.0.2.1"), peer("b", "10.2.0.0/24", "192.0.2.2")}, self); err != nil {
		t.Fatal(err)
	}
	if len(r.installed) != 2 || seen != nil {
		t.Fatalf("after the first sync: installed %v, told %v", r.installed, seen)
	}
	if err := r.sync([]peerNode{peer("a", "10.1.0.0/24", "192.0.2.1")}, self); err != nil {
		t.Fatal(err)
	}
	if want := [][]netip.Prefix{{netip.MustParsePrefix("10.1.0.0/24")}}; !slices.EqualFunc(seen, want, slices.Equal) {
		t.Fatalf("told %v before node b's route went, want %v", seen, want)
	}
	if len(fr.routes()) != 1 || len(r.installed) != 1 {
		t.Fatalf("after node b went: table %v, installed %v", fr.routes(), r.installed)
	}
}
