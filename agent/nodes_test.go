package agent

import (
	"net/netip"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy/netpol"
)

func node(name string, addrs ...corev1.NodeAddress) *corev1.Node {
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}, Status: corev1.NodeStatus{Addresses: addrs}}
}

// Only this node's addresses are host; another node reaching a pod must
// meet the pod's policy (issue 10: every node address used to be host,
// which the datapath never polices).
func TestNodeAddrsSplitLocalFromRemote(t *testing.T) {
	idx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
	for _, n := range []*corev1.Node{
		node("me",
			corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: "192.0.2.10"},
			corev1.NodeAddress{Type: corev1.NodeExternalIP, Address: "203.0.113.10"},
			corev1.NodeAddress{Type: corev1.NodeHostName, Address: "me"}),
		node("other",
			corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: "192.0.2.11"},
			corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: "::ffff:192.0.2.12"},
			corev1.NodeAddress{Type: corev1.NodeInternalDNS, Address: "other.example"}),
		// A stale Node claiming this node's address does not make it
		// remote.
		node("stale", corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: "192.0.2.10"}),
	} {
		if err := idx.Add(n); err != nil {
			t.Fatal(err)
		}
	}
	a := &Agent{cfg: Config{NodeName: "me"}, nodes: corelisters.NewNodeLister(idx), st: newNodeState()}
	local, remote, err := a.nodeAddrs()
	if err != nil {
		t.Fatal(err)
	}
	addrs := func(s ...string) []netip.Addr {
		var out []netip.Addr
		for _, x := range s {
			out = append(out, netip.MustParseAddr(x))
		}
		return out
	}
	slices.SortFunc(local, netip.Addr.Compare)
	slices.SortFunc(remote, netip.Addr.Compare)
	if want := addrs("192.0.2.10", "203.0.113.10"); !slices.Equal(local, want) {
		t.Errorf("local %v, want %v", local, want)
	}
	if want := addrs("192.0.2.10", "192.0.2.11", "192.0.2.12"); !slices.Equal(remote, want) {
		t.Errorf("remote %v, want %v", remote, want)
	}

	a.compiler = netpol.NewCompiler(netpol.NewMemoryIdentities())
	if err := a.syncNodes(); err != nil {
		t.Fatal(err)
	}
	for addr, want := range map[string]identity.ID{"192.0.2.10": identity.Host, "203.0.113.10": identity.Host, "192.0.2.11": identity.RemoteNode, "192.0.2.12": identity.RemoteNode, "192.0.2.13": identity.World} {
		if got := a.compiler.IdentityOfAddr(netip.MustParseAddr(addr)); got != want {
			t.Errorf("compiler resolves %s to %s, want %s", addr, got, want)
		}
	}
}
