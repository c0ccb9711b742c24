package cni

import (
	"crypto/rand"
	"encoding/hex"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/desired"
	"github.com/idcni/idcni/identity"
)

// Issue 11, defect 7: who owns an ipcache entry was decided in four places
// that had drifted: DEL kept a manual binding's entry when its pod went,
// GC's clean-up of an orphaned endpoint removed it. Both ask package
// desired now.
func TestGCKeepsAManualBindingAsDELDoes(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to load BPF programs")
	}
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	root := filepath.Join("/sys/fs/bpf", "idcni-test-gc-"+hex.EncodeToString(b))
	t.Cleanup(func() { _ = bpf.Unpin(root) })
	dp, err := bpf.Load(bpf.Options{Root: root})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Close() })

	// Two endpoints whose host veths are gone (no link has these
	// indexes): one on a manually bound address, one unresolved.
	bound, plain := netip.MustParseAddr("10.77.0.2"), netip.MustParseAddr("10.77.0.3")
	const gone = 1 << 30
	for _, w := range []struct {
		ifindex int
		addr    netip.Addr
		id      identity.ID
	}{{gone, bound, 1001}, {gone + 1, plain, identity.Unresolved}} {
		if err := dp.PutEndpoint(w.ifindex, bpf.Endpoint{Identity: w.id, IPv4: w.addr}); err != nil {
			t.Fatal(err)
		}
		if err := dp.PutIPCache(desired.HostPrefix(w.addr), w.id); err != nil {
			t.Fatal(err)
		}
	}
	if err := gcOrphans(&NetConf{BPFRoot: root}); err != nil {
		t.Fatal(err)
	}
	eps, err := dp.Endpoints()
	if err != nil {
		t.Fatal(err)
	}
	if len(eps) != 0 {
		t.Errorf("GC left endpoint entries %v", eps)
	}
	if id, ok, _ := dp.IPCacheLookup(bound); !ok || id != 1001 {
		t.Errorf("GC changed the binding of %s: identity %s (present %v), want 1001 as DEL keeps it", bound, id, ok)
	}
	if id, ok, _ := dp.IPCacheLookup(plain); ok {
		t.Errorf("GC kept the ipcache entry of the unresolved orphan %s (identity %s)", plain, id)
	}
}
