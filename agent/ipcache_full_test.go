package agent

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"k8s.io/client-go/kubernetes/fake"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/manual"
)

// flushAgent is an agent from New whose datapath has an ipcache of
// capacity entries, pinned under private bpffs roots the test removes.
func flushAgent(t *testing.T, capacity uint32) *Agent {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("needs root to load BPF programs")
	}
	root := func() string {
		b := make([]byte, 6)
		_, _ = rand.Read(b)
		r := filepath.Join("/sys/fs/bpf", "idcni-test-"+hex.EncodeToString(b))
		t.Cleanup(func() { _ = bpf.Unpin(r) })
		return r
	}
	cfg := Config{NodeName: "node-a", BPFRoot: root(), StatePath: filepath.Join(t.TempDir(), "state.db"),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	a, err := New(cfg, fake.NewClientset())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	// The agent loads the compiled-in sizes; swap in a small ipcache.
	a.dp.Close()
	a.dp, err = bpf.Load(bpf.Options{Root: root(), IPCacheEntries: capacity})
	if err != nil {
		a.dp = nil
		t.Fatal(err)
	}
	a.maps = a.dp
	return a
}

func churnAddr(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 97, byte(i >> 8), byte(i)}) }

// flushBindings makes the manual bindings the whole desired ipcache (the
// fake cluster has no nodes, pods or policies) and flushes.
func flushBindings(a *Agent, want map[netip.Addr]identity.ID) error {
	var st manual.State
	for addr, id := range want {
		st.Bindings = append(st.Bindings, manual.Binding{IP: addr, Identity: id})
	}
	a.setManual(st)
	return a.flush()
}

func checkIPCache(t *testing.T, a *Agent, want map[netip.Addr]identity.ID) {
	t.Helper()
	have, err := a.dp.IPCache()
	if err != nil {
		t.Fatal(err)
	}
	wantP := map[netip.Prefix]identity.ID{}
	for addr, id := range want {
		wantP[netip.PrefixFrom(addr, 32)] = id
	}
	if !maps.Equal(have, wantP) {
		t.Fatalf("ipcache holds %d entries, want the %d desired ones", len(have), len(wantP))
	}
}

// Issue 11: a flush put new ipcache entries in before it deleted stale
// ones, so at capacity a churn (some pods go, as many others come) failed on
// the first insert with nothing deleted, every retry the same: the ipcache
// was wedged full for good.
func TestFlushChurnAtFullIPCache(t *testing.T) {
	const capacity = 64
	a := flushAgent(t, capacity)
	want := map[netip.Addr]identity.ID{}
	for i := range capacity {
		want[churnAddr(i)] = identity.ID(1000 + i)
	}
	if err := flushBindings(a, want); err != nil {
		t.Fatalf("fill the ipcache to capacity: %v", err)
	}
	checkIPCache(t, a, want)

	// 16 go, 16 others come, 8 that stay change identity (in place).
	for i := range 16 {
		delete(want, churnAddr(i))
		want[churnAddr(capacity+i)] = identity.ID(2000 + i)
	}
	for i := 16; i < 24; i++ {
		want[churnAddr(i)] = identity.ID(3000 + i)
	}
	if err := flushBindings(a, want); err != nil {
		t.Fatalf("churn flush at a full ipcache: %v", err)
	}
	checkIPCache(t, a, want)

	// Churn again, the whole ipcache at once.
	want = map[netip.Addr]identity.ID{}
	for i := range capacity {
		want[churnAddr(500+i)] = identity.ID(4000 + i)
	}
	if err := flushBindings(a, want); err != nil {
		t.Fatalf("replace every entry of a full ipcache: %v", err)
	}
	checkIPCache(t, a, want)

	// More than fits waits, and says why and how to raise the size; the
	// rest is written.
	extra := churnAddr(1000)
	want[extra] = identity.ID(5000)
	var st manual.State
	for addr, id := range want {
		st.Bindings = append(st.Bindings, manual.Binding{IP: addr, Identity: id})
	}
	a.setManual(st)
	fs, err := a.st.flush(a.maps, a.subjectRules)
	if err != nil {
		t.Fatalf("flush of %d entries into an ipcache of %d failed: %v; want the one that does not fit to wait", len(want), capacity, err)
	}
	if fs.ipcFull != 1 || !errors.Is(fs.ipcErr, bpf.ErrMapFull) || !strings.Contains(fs.ipcErr.Error(), "IPCacheEntries") {
		t.Fatalf("flush of %d entries into an ipcache of %d: %d waiting (%v), want 1 with ErrMapFull naming IPCacheEntries", len(want), capacity, fs.ipcFull, fs.ipcErr)
	}
	if _, ok := a.st.dirtyPfx[netip.PrefixFrom(extra, 32)]; !ok {
		t.Fatal("the entry that did not fit is not kept for the next flush")
	}
}
