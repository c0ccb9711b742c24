package bpf

import (
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"github.com/cilium/ebpf"
)

// LayoutVersion numbers the layout of what the datapath pins: every pinned
// map's type, key and value size, flags and default size, and which pinned
// maps each program uses. Binaries of one layout version can share pins;
// binaries of different ones cannot, because a program reads a map's value
// at the offsets it was compiled with, and a map is never resized or
// re-laid in place. It must change whenever the layout does:
// TestLayoutVersion fails until it has, and its golden table has a row for
// the new number. `--version` on every binary prints it, so an operator can
// tell whether two builds can share a node's pins.
const LayoutVersion = 4

// ErrLayoutMismatch means a pinned map's layout is not the one this build
// was compiled with: pins of another idcni version. Nothing of this build
// may use it.
var ErrLayoutMismatch = errors.New("pinned map layout differs from this idcni build")

// pinnedMaps are the names of the maps pinned under the root, the same
// set mapFields opens.
func pinnedMaps() []string {
	var d Datapath
	names := make([]string, 0, len(d.mapFields()))
	for name := range d.mapFields() {
		names = append(names, name)
	}
	sort.Strings(names)
	return names
}

// describeMapSpec is one map's layout as a line of the golden table.
func describeMapSpec(name string, m *ebpf.MapSpec) string {
	s := fmt.Sprintf("map %s: %s key %d value %d max %d flags %#x", name, m.Type, m.KeySize, m.ValueSize, m.MaxEntries, m.Flags)
	if m.InnerMap != nil {
		s += " inner(" + describeMapSpec("", m.InnerMap)[len("map : "):] + ")"
	}
	return s
}

// layoutOf describes the layout of the pinned part of spec, one line per
// pinned map and per program (with the pinned maps it uses), sorted: what
// LayoutVersion stands for.
func layoutOf(spec *ebpf.CollectionSpec) []string {
	var out []string
	pinned := map[string]bool{}
	for _, name := range pinnedMaps() {
		pinned[name] = true
		if m, ok := spec.Maps[name]; ok {
			out = append(out, describeMapSpec(name, m))
		} else {
			out = append(out, "map "+name+": missing from the object")
		}
	}
	for name, p := range spec.Programs {
		var uses []string
		for _, ins := range p.Instructions {
			if ref := ins.Reference(); pinned[ref] && !slices.Contains(uses, ref) {
				uses = append(uses, ref)
			}
		}
		sort.Strings(uses)
		out = append(out, fmt.Sprintf("prog %s: %s maps %s", name, p.Type, strings.Join(uses, ",")))
	}
	sort.Strings(out)
	return out
}

// describeMap is a pinned map's layout in the words of an error message.
func describeMap(typ ebpf.MapType, key, value, max, flags uint32) string {
	return fmt.Sprintf("type %s, key %d bytes, value %d bytes, %d entries, flags %#x", typ, key, value, max, flags)
}

// checkLayout refuses a pinned map whose layout is not want's. Its size
// counts only when checkSize: a tool that asked for no size works with a
// datapath loaded with non-default sizes. Every other property is checked
// on every path: a program or tool of this build reading a map of another
// layout would read garbage or fail at the first lookup.
func checkLayout(root, name string, want *ebpf.MapSpec, m *ebpf.Map, checkSize bool) error {
	w := want.Copy()
	if !checkSize {
		w.MaxEntries = m.MaxEntries()
	}
	err := w.Compatible(m)
	if err == nil {
		return nil
	}
	return fmt.Errorf("%w: pinned map %s has %s; this idcni build (pin layout %d) expects %s (%w). "+
		"The pins come from another idcni version (%s): %s",
		ErrLayoutMismatch, filepath.Join(root, name),
		describeMap(m.Type(), m.KeySize(), m.ValueSize(), m.MaxEntries(), m.Flags()),
		LayoutVersion, describeMap(w.Type, w.KeySize, w.ValueSize, w.MaxEntries, w.Flags), err,
		pinnedLayoutName(root), agentMigrates)
}

// pinnedLayoutName says which layout the pins under root are, for an
// error message.
func pinnedLayoutName(root string) string {
	desc, err := readDescriptor(root)
	switch {
	case err != nil:
		return "layout unknown: " + err.Error()
	case desc == nil:
		return "pin layout 1, which has no descriptor"
	}
	return fmt.Sprintf("pin layout %d", desc.Layout)
}
