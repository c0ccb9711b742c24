package bpf

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
)

// testRoot returns a bpffs root no other run can use, removed after the test.
func testRoot(t testing.TB) string {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("needs root to load BPF programs")
	}
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	root := filepath.Join("/sys/fs/bpf", "idcni-test-"+hex.EncodeToString(b))
	t.Cleanup(func() { _ = Unpin(root) })
	return root
}

func loadTest(t testing.TB, opts Options) *Datapath {
	t.Helper()
	if opts.Root == "" {
		opts.Root = testRoot(t)
	}
	d, err := Load(opts)
	if err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			t.Fatalf("load: %+v", ve)
		}
		t.Fatalf("load: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func TestLoadPinsAndReopens(t *testing.T) {
	d := loadTest(t, Options{})
	for _, name := range []string{"progs/from_pod", "progs/to_pod", "policy", "conntrack", "ipcache", "endpoints", "events"} {
		if _, err := os.Stat(filepath.Join(d.Root(), name)); err != nil {
			t.Errorf("pin %s: %v", name, err)
		}
	}
	rev, err := d.Revision()
	if err != nil || rev != 1 {
		t.Fatalf("fresh revision = %d, %v; want 1", rev, err)
	}
	if err := d.BumpRevision(); err != nil {
		t.Fatal(err)
	}
	d2, err := Open(d.Root())
	if err != nil {
		t.Fatalf("open pinned: %v", err)
	}
	defer d2.Close()
	if rev, _ := d2.Revision(); rev != 2 {
		t.Fatalf("reopened revision = %d, want 2 (maps not shared)", rev)
	}
}

func TestOpenWithoutPinsSaysWhatLoads(t *testing.T) {
	root := testRoot(t)
	_, err := Open(root)
	if !errors.Is(err, ErrNotLoaded) {
		t.Fatalf("Open on empty root = %v, want ErrNotLoaded", err)
	}
}

// The Go side sizes slots and names reasons by constants the C side
// defines too: a change on one side only must fail here, not in a pod.
func TestConstantsMatchKernel(t *testing.T) {
	spec, err := loadDatapath()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"ep_states", "endpoints"} {
		if got := spec.Maps[name].MaxEntries; got != maxEndpoints {
			t.Errorf("map %s has %d entries, Go's maxEndpoints is %d", name, got, maxEndpoints)
		}
	}
	if got := spec.Maps["ct_tables"].MaxEntries; got != ctIndex(maxEndpoints, 0) {
		t.Errorf("ct_tables has %d entries, want two tables for each of %d slots", got, maxEndpoints)
	}
	if got, want := spec.Maps["event_loss"].MaxEntries, uint32(reasonMax)*2; got != want {
		t.Errorf("event_loss has %d entries, want 2 per reason (%d)", got, want)
	}
	if got, want := spec.Maps["counters"].MaxEntries, uint32(reasonMax)*2; got != want {
		t.Errorf("counters has %d entries, want 2 per reason (%d)", got, want)
	}
	for r := Reason(0); r <= ReasonDropUnknownFlow; r++ {
		if _, ok := reasonNames[r]; !ok {
			t.Errorf("reason %d has no name", r)
		}
	}
	if ReasonDropUnknownFlow >= reasonMax {
		t.Errorf("reason %d does not fit the counters (REASON_MAX %d)", ReasonDropUnknownFlow, reasonMax)
	}
	if got := spec.Maps["ct_tables"].InnerMap; got == nil || got.Type != ebpf.LRUHash {
		t.Errorf("ct_tables holds %v, want LRU hash tables", got)
	}
}
