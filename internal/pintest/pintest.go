// Package pintest makes the pins an idcni build of another layout leaves
// behind, for the tests of how this build meets them (issue 14).
package pintest

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
)

// RepinWider replaces the pin of the named map under root with a new map
// of the same type, key size, size and flags but a value 8 bytes wider:
// what a build that grew the map's value struct leaves for this one.
func RepinWider(t testing.TB, root, name string) {
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
