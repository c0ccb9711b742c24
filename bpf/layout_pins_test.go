package bpf

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
)

// repinWider replaces the pin of the named map with a new map of the same
// type, key size, size and flags but a value 8 bytes wider: what a build
// that grew the map's value struct leaves behind for this one.
func repinWider(t *testing.T, root, name string) {
	t.Helper()
	path := filepath.Join(root, name)
	old, err := ebpf.LoadPinnedMap(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	spec := &ebpf.MapSpec{Name: name, Type: old.Type(), KeySize: old.KeySize(), ValueSize: old.ValueSize() + 8,
		MaxEntries: old.MaxEntries(), Flags: old.Flags()}
	old.Close()
	m, err := ebpf.NewMap(spec)
	if err != nil {
		t.Fatalf("create a wider %s: %v", name, err)
	}
	defer m.Close()
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := m.Pin(path); err != nil {
		t.Fatal(err)
	}
}

// TestOpenRefusesEveryLayoutMismatch is issue 14's layout defect: the open
// path (the plugin's fast path, DEL, the CLIs) accepted a policy,
// conntrack or ipcache map of any layout unless a size was asked for. A
// mismatch of any pinned map must be refused, naming the map.
func TestOpenRefusesEveryLayoutMismatch(t *testing.T) {
	for _, name := range []string{"policy", "conntrack", "ipcache", "endpoints"} {
		t.Run(name, func(t *testing.T) {
			d := loadTest(t, Options{})
			root := d.Root()
			d.Close()
			repinWider(t, root, name)
			path := filepath.Join(root, name)
			if d, err := Open(root); err == nil {
				d.Close()
				t.Fatalf("Open accepted %s with a value 8 bytes wider than this build's", path)
			} else if !strings.Contains(err.Error(), path) {
				t.Fatalf("Open's error does not name %s: %v", path, err)
			} else {
				t.Logf("Open: %v", err)
			}
			if d, err := Load(Options{Root: root}); err == nil {
				d.Close()
				t.Fatalf("Load (the plugin's path) accepted %s with a value 8 bytes wider than this build's", path)
			} else if !strings.Contains(err.Error(), path) {
				t.Fatalf("Load's error does not name %s: %v", path, err)
			}
		})
	}
}
