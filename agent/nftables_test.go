package agent

import (
	"errors"
	"net/netip"
	"slices"
	"testing"

	"github.com/google/nftables"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func rangeStrings(rs []addrRange) []string {
	var out []string
	for _, r := range rs {
		out = append(out, r.String())
	}
	return out
}

func TestMergeRanges(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   []string
		want []string
	}{
		{"empty", nil, nil},
		{"one host", []string{"192.0.2.1/32"}, []string{"192.0.2.1"}},
		{"duplicates", []string{"192.0.2.1/32", "192.0.2.1/32"}, []string{"192.0.2.1"}},
		{"sorted", []string{"10.2.0.0/24", "10.1.0.0/24"}, []string{"10.1.0.0-10.1.0.255", "10.2.0.0-10.2.0.255"}},
		// An interval set refuses overlapping elements: a node address
		// inside a pod CIDR, or a --no-masquerade-cidr holding the pod
		// CIDRs, must become one range.
		{"contained", []string{"10.1.0.0/16", "10.1.2.3/32"}, []string{"10.1.0.0-10.1.255.255"}},
		{"overlapping", []string{"10.1.0.0/24", "10.0.0.0/15"}, []string{"10.0.0.0-10.1.255.255"}},
		{"adjacent", []string{"10.1.0.0/24", "10.1.1.0/24"}, []string{"10.1.0.0-10.1.1.255"}},
		{"not adjacent", []string{"10.1.0.0/24", "10.1.2.0/24"}, []string{"10.1.0.0-10.1.0.255", "10.1.2.0-10.1.2.255"}},
		{"host bits", []string{"10.1.0.7/24"}, []string{"10.1.0.0-10.1.0.255"}},
		{"all", []string{"0.0.0.0/1", "128.0.0.0/1"}, []string{"0.0.0.0-255.255.255.255"}},
		{"ipv6", []string{"fd00:1::/64", "2001:db8::1/128"}, []string{"2001:db8::1", "fd00:1::-fd00:1::ffff:ffff:ffff:ffff"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := rangeStrings(mergeRanges(prefixes(tc.in...))); !slices.Equal(got, tc.want) {
				t.Errorf("mergeRanges(%v) = %v, want %v", tc.in, got, tc.want)
			}
		})
	}
}

func TestSetElements(t *testing.T) {
	el := func(a string, end bool) nftables.SetElement {
		return nftables.SetElement{Key: netip.MustParseAddr(a).AsSlice(), IntervalEnd: end}
	}
	for _, tc := range []struct {
		name string
		in   []string
		want []nftables.SetElement
	}{
		{"host", []string{"192.0.2.1/32"}, []nftables.SetElement{el("192.0.2.1", false), el("192.0.2.2", true)}},
		{"prefix", []string{"10.1.0.0/24"}, []nftables.SetElement{el("10.1.0.0", false), el("10.1.1.0", true)}},
		// No address after the last one: the interval stays open.
		{"to the end", []string{"128.0.0.0/1"}, []nftables.SetElement{el("128.0.0.0", false)}},
		{"ipv6 to the end", []string{"::/0"}, []nftables.SetElement{el("::", false)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := setElements(mergeRanges(prefixes(tc.in...)))
			if len(got) != len(tc.want) {
				t.Fatalf("setElements(%v) = %v, want %v", tc.in, got, tc.want)
			}
			for i := range got {
				if !slices.Equal(got[i].Key, tc.want[i].Key) || got[i].IntervalEnd != tc.want[i].IntervalEnd {
					t.Errorf("setElements(%v)[%d] = %v end %v, want %v end %v", tc.in, i, got[i].Key, got[i].IntervalEnd, tc.want[i].Key, tc.want[i].IntervalEnd)
				}
			}
		})
	}
}

var errNoKernel = errors.New("no kernel in unit tests")

// What the kernel lists comes back as the ranges written, in whatever
// order it lists them, with or without a leading end element.
func TestRangesOf(t *testing.T) {
	el := func(a string, end bool) nftables.SetElement {
		return nftables.SetElement{Key: netip.MustParseAddr(a).AsSlice(), IntervalEnd: end}
	}
	for _, in := range [][]string{
		nil,
		{"192.0.2.1/32"},
		{"10.1.0.0/24", "10.1.2.0/24", "192.0.2.7/32"},
		{"10.0.0.0/8", "128.0.0.0/1"},
		{"fd00:1::/64", "2001:db8::1/128", "8000::/1"},
	} {
		want := mergeRanges(prefixes(in...))
		els := setElements(want)
		slices.Reverse(els)
		if got := rangesOf(els); !slices.Equal(got, want) {
			t.Errorf("rangesOf(setElements(%v)) = %v, want %v", in, rangeStrings(got), rangeStrings(want))
		}
	}
	got := rangesOf([]nftables.SetElement{el("0.0.0.0", true), el("10.1.0.0", false), el("10.1.1.0", true)})
	if want := []string{"10.1.0.0-10.1.0.255"}; !slices.Equal(rangeStrings(got), want) {
		t.Errorf("rangesOf with a leading end element = %v, want %v", rangeStrings(got), want)
	}
}

func testNode(name string, cidrs []string, addrs ...corev1.NodeAddress) *corev1.Node {
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.NodeSpec{PodCIDRs: cidrs},
		Status: corev1.NodeStatus{Addresses: addrs}}
}

func TestPlanNFT(t *testing.T) {
	internal := func(a string) corev1.NodeAddress { return corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: a} }
	external := func(a string) corev1.NodeAddress { return corev1.NodeAddress{Type: corev1.NodeExternalIP, Address: a} }
	nodes := []*corev1.Node{
		testNode("a", []string{"10.1.0.0/24", "fd00:1::/64"}, internal("192.0.2.1"), internal("2001:db8::1"), external("203.0.113.1"),
			// Not addresses packets come from: never a node address.
			corev1.NodeAddress{Type: corev1.NodeHostName, Address: "a.example"}, corev1.NodeAddress{Type: corev1.NodeInternalDNS, Address: "a.internal"}),
		testNode("b", []string{"10.1.1.0/24"}, internal("192.0.2.2"), internal("::ffff:192.0.2.3")),
		// The older single spec.podCIDR.
		{ObjectMeta: metav1.ObjectMeta{Name: "c"}, Spec: corev1.NodeSpec{PodCIDR: "10.1.5.0/24"}, Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{internal("not an address")}}},
	}
	// This node's pod CIDR from --pod-cidr, which its Node lacks.
	local := prefixes("10.1.9.0/24", "fd00:9::/64")
	p := planNFT(nodes, local, prefixes("172.16.0.0/12"), true, 8472)
	if !p.Masquerade || p.TunnelPort != 8472 {
		t.Errorf("plan: masquerade %v tunnel port %d, want true 8472", p.Masquerade, p.TunnelPort)
	}
	want := map[string][]string{
		setLocalPods4: {"10.1.9.0-10.1.9.255"},
		setLocalPods6: {"fd00:9::-fd00:9::ffff:ffff:ffff:ffff"},
		setCluster4: {"10.1.0.0-10.1.1.255", "10.1.5.0-10.1.5.255", "10.1.9.0-10.1.9.255", "172.16.0.0-172.31.255.255",
			"192.0.2.1-192.0.2.3", "203.0.113.1"},
		setCluster6: {"2001:db8::1", "fd00:1::-fd00:1::ffff:ffff:ffff:ffff", "fd00:9::-fd00:9::ffff:ffff:ffff:ffff"},
		// An IPv4-mapped InternalIP is the IPv4 address.
		setNodes4: {"192.0.2.1-192.0.2.3", "203.0.113.1"},
		setNodes6: {"2001:db8::1"},
	}
	if len(p.Sets) != len(want) {
		t.Errorf("plan has sets %v, want %d", sortedKeys(p.Sets), len(want))
	}
	for name, w := range want {
		if got := rangeStrings(p.Sets[name]); !slices.Equal(got, w) {
			t.Errorf("set %s = %v, want %v", name, got, w)
		}
	}

	// No Nodes, no pod CIDR: the sets are empty, and a pod CIDR that
	// comes later fills them.
	p = planNFT(nil, nil, nil, false, 0)
	for name, rs := range p.Sets {
		if len(rs) != 0 {
			t.Errorf("set %s with no Nodes = %v, want empty", name, rs)
		}
	}
}

// sync rebuilds the table whole the first time, when the chains change
// (masquerade or the tunnel port) and after a failure; otherwise it only
// refills the sets that changed, and with nothing changed it writes
// nothing. The connection fails here (no kernel): what is checked is which
// path each call takes.
func TestNFTSyncPaths(t *testing.T) {
	calls := 0
	nt := &nftTable{conn: func() (*nftables.Conn, error) { calls++; return nil, errNoKernel }, base: map[string]uint64{}}
	p := planNFT([]*corev1.Node{testNode("a", []string{"10.1.0.0/24"})}, prefixes("10.1.0.0/24"), nil, true, 8472)
	nt.applied = &p
	if rebuilt, err := nt.sync(p); rebuilt || err != nil || calls != 0 {
		t.Errorf("sync of the plan in force: rebuilt %v err %v connections %d, want false nil 0", rebuilt, err, calls)
	}
	q := planNFT([]*corev1.Node{testNode("a", []string{"10.1.0.0/24"}), testNode("b", []string{"10.1.1.0/24"})}, prefixes("10.1.0.0/24"), nil, true, 8472)
	if rebuilt, err := nt.sync(q); rebuilt || !errors.Is(err, errNoKernel) {
		t.Errorf("sync with a new Node: rebuilt %v err %v, want an update of the sets", rebuilt, err)
	}
	if nt.applied != &p {
		t.Error("a failed update changed the plan in force")
	}
	q = p
	q.Masquerade = false
	if rebuilt, _ := nt.sync(q); !rebuilt {
		t.Error("sync with masquerade switched off did not rebuild the table")
	}
	nt.applied = &p
	q = p
	q.TunnelPort = 4789
	if rebuilt, _ := nt.sync(q); !rebuilt {
		t.Error("sync with another tunnel port did not rebuild the table")
	}
	nt.applied = nil
	if rebuilt, _ := nt.sync(p); !rebuilt {
		t.Error("sync with no table built did not rebuild it")
	}
}
