package bpf

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"sort"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Pins describe themselves: next to the maps, every build from layout 2 on
// pins a descriptor (layoutPin) that names its layout version and, for each
// pinned map, the facts a build of another layout needs to carry the
// contents over: type, key and value size, size, flags, the inner map of a
// map of maps, and how much of the value an older build may drop. The
// kernel tells most of that about any map; what it cannot tell (whether a
// value's tail may be cut, the inner layout of an empty map of maps) is what
// the descriptor is for. Pins without one are layout 1's.
//
// The maps stay pinned under their own names in the root, not in a
// directory per version: builds of layout 1 only know those paths, so a
// layout they cannot read meets them as a map they refuse by name, with
// the message they already have, and never as an empty root they would
// fill with a second datapath beside the running one.

// layoutPin is the descriptor's pin under the root. Its own shape
// (layoutPinSpec) and the JSON in it (pinDescriptor, format 1) are frozen:
// every later build must read them.
const layoutPin = "pin_layout"

var layoutPinSpec = ebpf.MapSpec{Name: "idcni_layout", Type: ebpf.Array, KeySize: 4, ValueSize: 16384, MaxEntries: 1}

// pinDescriptor is what the layout pin holds.
type pinDescriptor struct {
	Format   int                  `json:"format"`
	Layout   int                  `json:"layout"`
	Maps     map[string]mapLayout `json:"maps"`
	Programs []string             `json:"programs"`
}

// mapLayout is one pinned map as the descriptor has it.
type mapLayout struct {
	Type       uint32     `json:"type"`
	TypeName   string     `json:"typeName"`
	KeySize    uint32     `json:"keySize"`
	ValueSize  uint32     `json:"valueSize"`
	MaxEntries uint32     `json:"maxEntries"`
	Flags      uint32     `json:"flags"`
	Inner      *mapLayout `json:"inner,omitempty"`
	// OptionalFrom, when not zero, is where the value's optional tail
	// starts: fields appended after an older layout, zero meaning "not
	// set", so a build that knows only the first OptionalFrom bytes may
	// cut the rest.
	OptionalFrom uint32 `json:"optionalFrom,omitempty"`
	// OptionalEntriesFrom, when not zero, is for an array the first index
	// a build of an older, smaller array may drop: entries of statistics
	// added after it, which that build does not count.
	OptionalEntriesFrom uint32 `json:"optionalEntriesFrom,omitempty"`
}

// optionalTails is, per pinned map, the value size of the oldest layout
// whose readers may drop what was appended since (see
// mapLayout.OptionalFrom); "name/inner" for the inner maps of a map of
// maps. Growing a value by appending fields whose zero means "not set"
// needs no converter (older values are zero-extended); recording the old
// size here is what lets a build of the older layout take the pins back.
// Leave a map out when dropping its tail would change what an entry means:
// a rollback then refuses before touching anything.
var optionalTails = map[string]uint32{
	// Layout 2 appended the Service translation (nat_addr, nat_port) to
	// conntrack's values. A layout-1 build taking the pins back keeps
	// every flow to a pod address; a flow through a ClusterIP loses its
	// translation, and its next packet goes to the frontend's address,
	// where kube-proxy (if any) has no record of it.
	"conntrack":       32,
	"ct_tables/inner": 32,
	// Layout 3 appended the range's kept next hop (struct nexthop) to
	// remote_cidrs' values, which were only the __u32 present. A build
	// of layout 2 taking the pins back keeps every range; its flows ask
	// the FIB again, as every new flow of that build does.
	"remote_cidrs": 4,
	// Layout 4 appended the pod's conntrack slot to local_pods' values (a
	// copy of its endpoint's). A build of layout 3 taking the pins back
	// keeps every pod; it looks the endpoint up for the slot, as it
	// always did.
	"local_pods": 16,
}

// optionalEntries is, per pinned array, its size in the oldest layout
// whose readers may drop the entries past it (mapLayout.OptionalEntriesFrom):
// arrays of statistics indexed by a reason, where an older build does not
// know the newer reasons. Without it an array that shrinks on a rollback
// refuses before touching anything. (Layout-1 builds never read it: a82db2e
// copies every index and fails on the first one past its size.)
var optionalEntries = map[string]uint32{
	// Layout 2 added the reason no-backend (REASON_MAX 16 to 17).
	"counters":   32,
	"event_loss": 32,
}

// build is what this build knows of layouts: its own version, the
// optional tails of its maps' values and its converters. Tests stand in
// for builds of other layouts with their own.
type build struct {
	version    int
	tails      map[string]uint32
	entries    map[string]uint32
	converters map[convertKey]entryConverter
}

var thisBuild = build{version: LayoutVersion, tails: optionalTails, entries: optionalEntries, converters: converters}

// entryConverter turns one entry of a map of another layout into this
// layout's entry; ok false drops the entry.
type entryConverter func(key, value []byte) (newKey, newValue []byte, ok bool, err error)

// convertKey names a converter: the map, the layout of the pins and this
// build's.
type convertKey struct {
	Map      string
	From, To int
}

// converters carry over what the generic copy cannot: a changed key, a
// field moved or re-encoded. The generic copy handles a map of the same
// type, flags and key whose value grew at the end (zero-extended) or lost
// an optional tail (cut).
var converters = map[convertKey]entryConverter{}

func describeLayout(typ ebpf.MapType, key, value, max, flags uint32) mapLayout {
	return mapLayout{Type: uint32(typ), TypeName: typ.String(), KeySize: key, ValueSize: value, MaxEntries: max, Flags: flags}
}

// descriptorOf describes what this build pins for spec.
func (b build) descriptorOf(spec *ebpf.CollectionSpec, progs []string) *pinDescriptor {
	desc := &pinDescriptor{Format: 1, Layout: b.version, Maps: map[string]mapLayout{}, Programs: slices.Sorted(slices.Values(progs))}
	for name, m := range spec.Maps {
		if m.Pinning != ebpf.PinByName {
			continue
		}
		l := describeLayout(m.Type, m.KeySize, m.ValueSize, m.MaxEntries, m.Flags)
		l.OptionalFrom = b.tails[name]
		l.OptionalEntriesFrom = b.entries[name]
		if m.InnerMap != nil {
			in := describeLayout(m.InnerMap.Type, m.InnerMap.KeySize, m.InnerMap.ValueSize, m.InnerMap.MaxEntries, m.InnerMap.Flags)
			in.OptionalFrom = b.tails[name+"/inner"]
			l.Inner = &in
		}
		desc.Maps[name] = l
	}
	return desc
}

// readDescriptor reads the pins' descriptor; nil without error for pins
// of layout 1, which have none.
func readDescriptor(root string) (*pinDescriptor, error) {
	path := filepath.Join(root, layoutPin)
	m, err := ebpf.LoadPinnedMap(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open the pins' layout descriptor %s: %w", path, err)
	}
	defer m.Close()
	if err := layoutPinSpec.Compatible(m); err != nil {
		return nil, fmt.Errorf("the pins' layout descriptor %s is not one this build reads: %w", path, err)
	}
	buf := make([]byte, layoutPinSpec.ValueSize)
	if err := m.Lookup(uint32(0), buf); err != nil {
		return nil, fmt.Errorf("read the pins' layout descriptor %s: %w", path, err)
	}
	var desc pinDescriptor
	if err := json.Unmarshal(bytes.TrimRight(buf, "\x00"), &desc); err != nil {
		return nil, fmt.Errorf("decode the pins' layout descriptor %s: %w", path, err)
	}
	if desc.Format != 1 {
		return nil, fmt.Errorf("the pins' layout descriptor %s has format %d; this build reads format 1", path, desc.Format)
	}
	return &desc, nil
}

// descriptorMap makes a new descriptor map holding desc, not pinned yet.
func descriptorMap(desc *pinDescriptor) (*ebpf.Map, error) {
	b, err := json.Marshal(desc)
	if err != nil {
		return nil, fmt.Errorf("encode layout descriptor: %w", err)
	}
	if len(b) > int(layoutPinSpec.ValueSize) {
		return nil, fmt.Errorf("layout descriptor of %d bytes does not fit its map of %d", len(b), layoutPinSpec.ValueSize)
	}
	m, err := ebpf.NewMap(&layoutPinSpec)
	if err != nil {
		return nil, fmt.Errorf("create layout descriptor map: %w", err)
	}
	buf := make([]byte, layoutPinSpec.ValueSize)
	copy(buf, b)
	if err := m.Update(uint32(0), buf, ebpf.UpdateAny); err != nil {
		m.Close()
		return nil, fmt.Errorf("write layout descriptor: %w", err)
	}
	return m, nil
}

// pinnedLayoutVersion is the layout the pins under root say they are: the
// descriptor's, 1 without one.
func pinnedLayoutVersion(desc *pinDescriptor) int {
	if desc == nil {
		return 1
	}
	return desc.Layout
}

// mapMove is what a load does with one pinned map: keep the pinned one,
// create it, or copy the pinned one into a new map of this build's layout.
type mapMove struct {
	name  string
	want  *ebpf.MapSpec
	old   *ebpf.Map // nil: nothing pinned under the name
	fresh *ebpf.Map // nil: old is used as it is
	conv  entryConverter
	inner *innerMove // maps of maps whose inner layout changed
	keep  bool       // old serves this build as it is
}

// current is the map this build's programs use.
func (mv *mapMove) current() *ebpf.Map {
	if mv.fresh != nil {
		return mv.fresh
	}
	return mv.old
}

// innerMove says how the inner maps of a map of maps are carried over.
type innerMove struct {
	want *ebpf.MapSpec
	conv entryConverter
}

// migrationFaults lets tests make a step of a migration fail, to see
// the old pins and programs stay in force. Nil outside tests.
type migrationFaults func(step string) error

func (f migrationFaults) at(step string) error {
	if f == nil {
		return nil
	}
	return f(step)
}

// sameLayout reports whether m can serve as want as it is.
func sameLayout(want *ebpf.MapSpec, m *ebpf.Map, checkSize bool) bool {
	w := want.Copy()
	if !checkSize {
		w.MaxEntries = m.MaxEntries()
	}
	return w.Compatible(m) == nil
}

// planMove decides what becomes of the map pinned as name (old, nil when
// none) under this build's want. It refuses, touching nothing, what it
// cannot carry over without changing what an entry means.
func (b build) planMove(name, path string, want *ebpf.MapSpec, old *ebpf.Map, desc *pinDescriptor, checkSize bool) (*mapMove, error) {
	mv := &mapMove{name: name, want: want, old: old}
	if old == nil {
		return mv, nil
	}
	from := pinnedLayoutVersion(desc)
	var pinned *mapLayout
	if desc != nil {
		if l, ok := desc.Maps[name]; ok {
			pinned = &l
		}
	}
	if want.InnerMap != nil {
		in, err := b.planInner(name, want, old, pinned, from)
		if err != nil {
			return nil, err
		}
		mv.inner = in
	}
	if mv.inner == nil && sameLayout(want, old, checkSize) {
		mv.keep = true
		return mv, nil
	}
	if conv, ok := b.converters[convertKey{name, from, b.version}]; ok {
		mv.conv = conv
		return mv, nil
	}
	have := describeLayout(old.Type(), old.KeySize(), old.ValueSize(), old.MaxEntries(), old.Flags())
	if pinned != nil {
		have.OptionalFrom, have.OptionalEntriesFrom = pinned.OptionalFrom, pinned.OptionalEntriesFrom
	}
	if err := genericCopyable(have, want); err != nil {
		return nil, fmt.Errorf("%w: pinned map %s (layout %d) has %s; this build (layout %d) wants %s (%w), and %v",
			ErrLayoutMismatch, path, from, describeMap(old.Type(), old.KeySize(), old.ValueSize(), old.MaxEntries(), old.Flags()),
			b.version, describeMap(want.Type, want.KeySize, want.ValueSize, want.MaxEntries, want.Flags), want.Compatible(old), err)
	}
	return mv, nil
}

// genericCopyable says why the generic copy cannot carry a map of this
// shape into want, if it cannot.
func genericCopyable(have mapLayout, want *ebpf.MapSpec) error {
	switch {
	case ebpf.MapType(have.Type) != want.Type:
		return fmt.Errorf("its type changed, which needs a converter this build does not have")
	case have.KeySize != want.KeySize:
		return fmt.Errorf("its key changed, which needs a converter this build does not have")
	case have.Flags != want.Flags:
		return fmt.Errorf("its flags changed, which needs a converter this build does not have")
	case have.ValueSize > want.ValueSize && (have.OptionalFrom == 0 || have.OptionalFrom > want.ValueSize):
		return fmt.Errorf("cutting its value to %d bytes would drop fields the pins do not declare optional (optional from byte %d)", want.ValueSize, have.OptionalFrom)
	case isArray(want.Type) && have.MaxEntries > want.MaxEntries && (have.OptionalEntriesFrom == 0 || have.OptionalEntriesFrom > want.MaxEntries):
		return fmt.Errorf("shrinking the array to %d entries would drop entries the pins do not declare optional (optional from index %d)", want.MaxEntries, have.OptionalEntriesFrom)
	}
	return nil
}

// pastEnd reports whether key, an array index, is past the end of the
// array dst: an entry planMove let go (mapLayout.OptionalEntriesFrom).
func pastEnd(dst *ebpf.Map, key []byte) bool {
	return isArray(dst.Type()) && len(key) == 4 && binary.NativeEndian.Uint32(key) >= dst.MaxEntries()
}

// planInner decides how the inner maps of the map of maps old are carried
// into want's; nil when they can stay as they are. The inner layout comes
// from the descriptor, else from an installed inner map; an outer map with
// none installed has nothing to carry.
func (b build) planInner(name string, want *ebpf.MapSpec, old *ebpf.Map, pinned *mapLayout, from int) (*innerMove, error) {
	var have *mapLayout
	if pinned != nil && pinned.Inner != nil {
		have = pinned.Inner
	} else if in, err := firstInner(old); err != nil {
		return nil, err
	} else if in != nil {
		l := describeLayout(in.Type(), in.KeySize(), in.ValueSize(), in.MaxEntries(), in.Flags())
		in.Close()
		have = &l
	}
	w := want.InnerMap
	if have == nil || (have.Type == uint32(w.Type) && have.KeySize == w.KeySize && have.ValueSize == w.ValueSize && have.Flags == w.Flags) {
		return nil, nil
	}
	im := &innerMove{want: w}
	if conv, ok := b.converters[convertKey{name + "/inner", from, b.version}]; ok {
		im.conv = conv
		return im, nil
	}
	if err := genericCopyable(*have, w); err != nil {
		return nil, fmt.Errorf("%w: the inner maps of pinned map %s (layout %d) have %s; this build (layout %d) wants %s, and %v",
			ErrLayoutMismatch, name, from, describeMap(ebpf.MapType(have.Type), have.KeySize, have.ValueSize, have.MaxEntries, have.Flags),
			b.version, describeMap(w.Type, w.KeySize, w.ValueSize, w.MaxEntries, w.Flags), err)
	}
	return im, nil
}

// firstInner opens the first inner map installed in the map of maps m.
func firstInner(m *ebpf.Map) (*ebpf.Map, error) {
	key := make([]byte, m.KeySize())
	var id uint32
	it := m.Iterate()
	for it.Next(key, &id) {
		in, err := ebpf.NewMapFromID(ebpf.MapID(id))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("open an inner map of %s: %w", m, err)
		}
		return in, nil
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list the inner maps: %w", err)
	}
	return nil, nil
}

// hasContent reports whether a map of type t holds entries worth carrying
// over: a ring buffer's events are read or lost, not migrated.
func hasContent(t ebpf.MapType) bool {
	switch t {
	case ebpf.RingBuf, ebpf.PerfEventArray, ebpf.ProgramArray:
		return false
	}
	return true
}

func isPerCPU(t ebpf.MapType) bool {
	switch t {
	case ebpf.PerCPUArray, ebpf.PerCPUHash, ebpf.LRUCPUHash:
		return true
	}
	return false
}

func isArray(t ebpf.MapType) bool {
	switch t {
	case ebpf.Array, ebpf.PerCPUArray, ebpf.ArrayOfMaps:
		return true
	}
	return false
}

// resize zero-extends v to n bytes or cuts it: what the generic copy does
// with a value that grew or lost its optional tail.
func resize(v []byte, n uint32) []byte {
	out := make([]byte, n)
	copy(out, v)
	return out
}

// copyEntries copies every entry of src into dst, converting each (conv,
// else resize to dst's value size). With onlyMissing, entries dst holds
// already stay as they are: the catch-up after the switch, for flows the
// old programs opened since the first copy. Maps of maps go through
// migration.copyOuter.
func copyEntries(src, dst *ebpf.Map, conv entryConverter, onlyMissing bool) error {
	if !hasContent(src.Type()) {
		return nil
	}
	if onlyMissing && isArray(dst.Type()) {
		return nil // every index exists: nothing can be missing
	}
	if isPerCPU(src.Type()) {
		return copyPerCPU(src, dst, onlyMissing)
	}
	keys, vals, err := readAll(src)
	if err != nil {
		return err
	}
	if onlyMissing {
		have, _, err := readAll(dst)
		if err != nil {
			return err
		}
		there := make(map[string]bool, len(have))
		for _, k := range have {
			there[string(k)] = true
		}
		var mk, mv [][]byte
		for i, k := range keys {
			if !there[string(k)] {
				mk, mv = append(mk, k), append(mv, vals[i])
			}
		}
		keys, vals = mk, mv
	}
	outK := make([][]byte, 0, len(keys))
	outV := make([][]byte, 0, len(keys))
	for i, k := range keys {
		v := vals[i]
		if conv != nil {
			var ok bool
			k, v, ok, err = conv(k, v)
			if err != nil {
				return fmt.Errorf("convert an entry of %s: %w", src, err)
			}
			if !ok {
				continue
			}
		}
		if pastEnd(dst, k) {
			continue
		}
		outK, outV = append(outK, resize(k, dst.KeySize())), append(outV, resize(v, dst.ValueSize()))
	}
	flag := ebpf.UpdateAny
	if onlyMissing {
		flag = ebpf.UpdateNoExist
	}
	return writeAll(dst, outK, outV, flag, src.String())
}

// batchChunk is how many entries one batch syscall moves.
const batchChunk = 4096

// rawSlice is a slice of n byte arrays of size bytes each, the shape
// cilium/ebpf's batch calls take keys and values of any size in.
func rawSlice(n int, size uint32) reflect.Value {
	return reflect.MakeSlice(reflect.SliceOf(reflect.ArrayOf(int(size), reflect.TypeFor[byte]())), n, n)
}

func rawAt(s reflect.Value, i int) []byte {
	return bytes.Clone(s.Index(i).Slice(0, s.Index(i).Len()).Bytes())
}

// readAll reads every entry of m: in batches where the kernel can (hash
// and array maps: a few syscalls for a table of flows), else one by one
// (an LPM trie).
func readAll(m *ebpf.Map) (keys, vals [][]byte, err error) {
	ks, vs := rawSlice(batchChunk, m.KeySize()), rawSlice(batchChunk, m.ValueSize())
	var cursor ebpf.MapBatchCursor
	for {
		n, err := m.BatchLookup(&cursor, ks.Interface(), vs.Interface(), nil)
		for i := range n {
			keys, vals = append(keys, rawAt(ks, i)), append(vals, rawAt(vs, i))
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return keys, vals, nil
		}
		if errors.Is(err, ebpf.ErrNotSupported) || errors.Is(err, unix.EINVAL) {
			break
		}
		if err != nil {
			return nil, nil, fmt.Errorf("read %s: %w", m, err)
		}
	}
	keys, vals = nil, nil
	key, val := make([]byte, m.KeySize()), make([]byte, m.ValueSize())
	it := m.Iterate()
	for it.Next(key, val) {
		keys, vals = append(keys, bytes.Clone(key)), append(vals, bytes.Clone(val))
	}
	if err := it.Err(); err != nil {
		return nil, nil, fmt.Errorf("read %s: %w", m, err)
	}
	return keys, vals, nil
}

// writeAll writes the entries into m, in batches where the kernel can.
// With UpdateNoExist an entry the programs added meanwhile wins.
func writeAll(m *ebpf.Map, keys, vals [][]byte, flag ebpf.MapUpdateFlags, from string) error {
	if m.Type() == ebpf.LRUHash {
		// The kernel hands out an LRU map's free elements through
		// per-CPU lists: writes from a thread the scheduler moves between
		// CPUs evict entries while elements sit free on another CPU's
		// list, so a full table would lose flows to its own copy. One CPU
		// fills it to its capacity.
		restore, err := onOneCPU()
		if err != nil {
			return fmt.Errorf("copy entries of %s: %w", from, err)
		}
		defer restore()
	}
	one := func(i int) error {
		err := m.Update(keys[i], vals[i], flag)
		if flag == ebpf.UpdateNoExist && errors.Is(err, ebpf.ErrKeyExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("copy an entry of %s: %w", from, mapFull(err, m.String()))
		}
		return nil
	}
	batch := flag == ebpf.UpdateAny
	for i := 0; i < len(keys); i += batchChunk {
		j := min(i+batchChunk, len(keys))
		if batch {
			ks, vs := rawSlice(j-i, m.KeySize()), rawSlice(j-i, m.ValueSize())
			for n := i; n < j; n++ {
				reflect.Copy(ks.Index(n-i).Slice(0, int(m.KeySize())), reflect.ValueOf(keys[n]))
				reflect.Copy(vs.Index(n-i).Slice(0, int(m.ValueSize())), reflect.ValueOf(vals[n]))
			}
			_, err := m.BatchUpdate(ks.Interface(), vs.Interface(), nil)
			if err == nil {
				continue
			}
			if !errors.Is(err, ebpf.ErrNotSupported) && !errors.Is(err, unix.EINVAL) {
				return fmt.Errorf("copy entries of %s: %w", from, mapFull(err, m.String()))
			}
			batch = false
		}
		for n := i; n < j; n++ {
			if err := one(n); err != nil {
				return err
			}
		}
	}
	return nil
}

// copyPerCPU copies a per-CPU map entry by entry (counters: a handful).
func copyPerCPU(src, dst *ebpf.Map, onlyMissing bool) error {
	flag := ebpf.UpdateAny
	if onlyMissing {
		flag = ebpf.UpdateNoExist
	}
	key := make([]byte, src.KeySize())
	val := perCPUValues(src.ValueSize()).Interface()
	it := src.Iterate()
	for it.Next(key, val) {
		if pastEnd(dst, key) {
			continue
		}
		if err := dst.Update(resize(key, dst.KeySize()), resizePerCPU(reflect.ValueOf(val), dst.ValueSize()), flag); err != nil {
			if onlyMissing && errors.Is(err, ebpf.ErrKeyExist) {
				continue
			}
			return fmt.Errorf("copy an entry of %s: %w", src, mapFull(err, dst.String()))
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read %s: %w", src, err)
	}
	return nil
}

// perCPUValues is a slice with one size-byte array per possible CPU, what
// cilium/ebpf reads a per-CPU value of any size into.
func perCPUValues(size uint32) reflect.Value {
	n, _ := ebpf.PossibleCPU()
	return reflect.MakeSlice(reflect.SliceOf(reflect.ArrayOf(int(size), reflect.TypeFor[byte]())), n, n)
}

func resizePerCPU(vals reflect.Value, size uint32) any {
	out := perCPUValues(size)
	for i := range vals.Len() {
		reflect.Copy(out.Index(i).Slice(0, out.Index(i).Len()), vals.Index(i).Slice(0, vals.Index(i).Len()))
	}
	return out.Interface()
}

// migration is one load of this build over the pins under root: the plan,
// the maps it made, and what it needs to undo them.
type migration struct {
	root   string
	log    *slog.Logger
	desc   *pinDescriptor
	moves  []*mapMove
	inners map[ebpf.MapID]*innerCopy // old inner map -> its copy (or itself)
	faults migrationFaults
}

// innerCopy is an inner map of the old layout and what stands for it in
// this one: itself when its layout did not change, else its copy.
type innerCopy struct {
	old, now *ebpf.Map
	conv     entryConverter
}

func (mg *migration) close() {
	for _, mv := range mg.moves {
		mv.old.Close()
		mv.fresh.Close()
	}
	for _, ic := range mg.inners {
		if ic.now != ic.old {
			ic.now.Close()
		}
		ic.old.Close()
	}
}

// copyOuter fills the new map of maps mv.fresh with the inner maps of
// mv.old, each one copied into the new inner layout once (slot 0's two
// indexes share the node's table) and a pinned map's copy standing for it
// (the shared conntrack table is the pinned conntrack map).
func (mg *migration) copyOuter(mv *mapMove) error {
	key := make([]byte, mv.old.KeySize())
	var id uint32
	it := mv.old.Iterate()
	for it.Next(key, &id) {
		ic, ok := mg.inners[ebpf.MapID(id)]
		if !ok {
			in, err := ebpf.NewMapFromID(ebpf.MapID(id))
			if errors.Is(err, os.ErrNotExist) {
				continue // freed since the lookup: the endpoint went
			}
			if err != nil {
				return fmt.Errorf("open an inner map of %s: %w", mv.name, err)
			}
			ic = &innerCopy{old: in, now: in}
			mg.inners[ebpf.MapID(id)] = ic
			if mv.inner != nil {
				spec := mv.inner.want.Copy()
				spec.MaxEntries = in.MaxEntries() // each pod keeps its capacity
				if info, err := in.Info(); err == nil {
					spec.Name = info.Name
				}
				now, err := ebpf.NewMap(spec)
				if err != nil {
					return fmt.Errorf("create the new layout's inner map of %s for %s: %w", mv.name, in, err)
				}
				ic.now, ic.conv = now, mv.inner.conv
				if err := copyEntries(in, now, ic.conv, false); err != nil {
					return err
				}
			}
		}
		if err := mv.fresh.Update(key, ic.now, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("install an inner map in the new %s: %w", mv.name, err)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read %s: %w", mv.name, err)
	}
	return nil
}

// fill creates the maps of this layout that are not pinned as they are
// and copies the pinned contents into them. Nothing pinned changes.
func (mg *migration) fill() error {
	for _, mv := range mg.moves {
		if mv.keep {
			continue
		}
		if err := mg.faults.at("create " + mv.name); err != nil {
			return fmt.Errorf("create map %s: %w", mv.name, err)
		}
		spec := mv.want.Copy()
		spec.Pinning = ebpf.PinNone
		m, err := ebpf.NewMap(spec)
		if err != nil {
			return fmt.Errorf("create map %s of this layout: %w", mv.name, err)
		}
		mv.fresh = m
		if mv.old != nil {
			if info, err := mv.old.Info(); err == nil {
				if id, ok := info.ID(); ok {
					mg.inners[id] = &innerCopy{now: m, conv: mv.conv}
				}
			}
		}
	}
	// Plain maps first: the maps of maps point at some of them.
	for _, mv := range mg.moves {
		if mv.fresh == nil || mv.old == nil || mv.want.InnerMap != nil {
			continue
		}
		if err := mg.faults.at("copy " + mv.name); err != nil {
			return fmt.Errorf("copy map %s: %w", mv.name, err)
		}
		if err := copyEntries(mv.old, mv.fresh, mv.conv, false); err != nil {
			return fmt.Errorf("copy map %s into this layout: %w", mv.name, err)
		}
	}
	for _, mv := range mg.moves {
		if mv.fresh == nil || mv.old == nil || mv.want.InnerMap == nil {
			continue
		}
		if err := mg.faults.at("copy " + mv.name); err != nil {
			return fmt.Errorf("copy map %s: %w", mv.name, err)
		}
		if err := mg.copyOuter(mv); err != nil {
			return fmt.Errorf("copy map %s into this layout: %w", mv.name, err)
		}
	}
	return nil
}

// catchUp copies the entries the old programs made between the copy and
// the switch (flows opened meanwhile) into the maps that replaced theirs.
func (mg *migration) catchUp() error {
	var errs []error
	for _, mv := range mg.moves {
		if mv.fresh != nil && mv.old != nil && mv.want.InnerMap == nil {
			errs = append(errs, copyEntries(mv.old, mv.fresh, mv.conv, true))
		}
	}
	for _, ic := range mg.inners {
		if ic.old != nil && ic.now != ic.old {
			errs = append(errs, copyEntries(ic.old, ic.now, ic.conv, true))
		}
	}
	return errors.Join(errs...)
}

// swapPins puts the new maps and descriptor at the pins of the old ones,
// each by an atomic rename. It returns the undo: the old maps back.
func (mg *migration) swapPins(desc *ebpf.Map) (func(), error) {
	var undo []func()
	revert := func() {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
	}
	put := func(name string, m, was *ebpf.Map) error {
		path := filepath.Join(mg.root, name)
		if err := mg.faults.at("pin " + name); err != nil {
			return fmt.Errorf("pin map %s: %w", name, err)
		}
		if err := repinMap(m, path); err != nil {
			return err
		}
		undo = append(undo, func() {
			if was != nil {
				_ = repinMap(was, path)
			} else {
				_ = os.Remove(path)
			}
		})
		return nil
	}
	for _, mv := range mg.moves {
		if mv.fresh == nil {
			continue
		}
		if err := put(mv.name, mv.fresh, mv.old); err != nil {
			revert()
			return nil, err
		}
	}
	oldDesc, _ := ebpf.LoadPinnedMap(filepath.Join(mg.root, layoutPin), nil)
	err := put(layoutPin, desc, oldDesc)
	if err != nil {
		oldDesc.Close()
		revert()
		return nil, err
	}
	return func() { revert(); oldDesc.Close() }, nil
}

// repinMap pins m at path, replacing whatever was pinned there, by a
// rename so that a reader of the path sees one map or the other.
func repinMap(m *ebpf.Map, path string) error {
	tmp := path + "_new" // bpffs refuses names with a dot
	_ = os.Remove(tmp)
	// A clone: Pin moves the pin a handle was loaded from rather than
	// pinning it again, and the path may hold another map by now.
	c, err := m.Clone()
	if err != nil {
		return fmt.Errorf("pin map at %s: %w", path, err)
	}
	defer c.Close()
	if err := c.Pin(tmp); err != nil {
		return fmt.Errorf("pin map at %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("pin map at %s: %w", path, err)
	}
	return nil
}

// attachedPrograms is every program idcni has attached now, by id, with
// where.
func attachedPrograms(root string) (map[ebpf.ProgramID]string, error) {
	all, err := attachments(root)
	if err != nil {
		return nil, err
	}
	out := map[ebpf.ProgramID]string{}
	for _, a := range all {
		if !a.gone {
			out[a.prog] = a.String()
		}
	}
	return out, nil
}

// gcPins removes the pins under root that this build does not use:
// maps and programs of another layout (removed since, or added by a newer
// build) and staging pins a crashed load left. A pin a program attached
// now still uses stays, and is logged: removing its pin would not free
// it, and a later build may want it back.
func gcPins(root string, keepMaps, keepProgs map[string]bool, log *slog.Logger) error {
	attached, err := attachedPrograms(root)
	if err != nil {
		return fmt.Errorf("garbage-collect pins: %w", err)
	}
	inUse := map[ebpf.MapID]string{}
	usedProg := map[ebpf.ProgramID]string{}
	for id, where := range attached {
		p, err := ebpf.NewProgramFromID(id)
		if err != nil {
			continue
		}
		usedProg[id] = where
		if info, err := p.Info(); err == nil {
			if ids, ok := info.MapIDs(); ok {
				for _, m := range ids {
					inUse[m] = where
				}
			}
		}
		p.Close()
	}
	var errs []error
	gc := func(path, what string, used func() (string, bool)) {
		if where, ok := used(); ok {
			log.Info("keeping pin of another layout: a program attached now uses it", "pin", path, "what", what, "attached", where)
			return
		}
		if err := os.Remove(path); err != nil {
			errs = append(errs, fmt.Errorf("remove unused pin %s: %w", path, err))
			return
		}
		log.Info("removed pin this layout does not use and no attached program uses", "pin", path, "what", what, "layout", LayoutVersion)
	}
	entries, err := os.ReadDir(root)
	if err != nil {
		return fmt.Errorf("list pins under %s: %w", root, err)
	}
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() || keepMaps[name] || name == layoutPin {
			continue
		}
		path := filepath.Join(root, name)
		gc(path, "map", func() (string, bool) {
			m, err := ebpf.LoadPinnedMap(path, nil)
			if err != nil {
				return "", false // not a map: nothing runs on it
			}
			defer m.Close()
			info, err := m.Info()
			if err != nil {
				return "unknown (map info: " + err.Error() + ")", true
			}
			id, _ := info.ID()
			where, ok := inUse[id]
			return where, ok
		})
	}
	progs, _ := os.ReadDir(filepath.Join(root, "progs"))
	for _, e := range progs {
		if keepProgs[e.Name()] {
			continue
		}
		path := filepath.Join(root, "progs", e.Name())
		gc(path, "program", func() (string, bool) {
			p, err := ebpf.LoadPinnedProgram(path, nil)
			if err != nil {
				return "", false
			}
			defer p.Close()
			info, err := p.Info()
			if err != nil {
				return "unknown (program info: " + err.Error() + ")", true
			}
			id, _ := info.ID()
			where, ok := usedProg[id]
			return where, ok
		})
	}
	return errors.Join(errs...)
}

// pinnedMapNames are the maps spec pins by name, sorted.
func pinnedMapNames(spec *ebpf.CollectionSpec) []string {
	var names []string
	for name, m := range spec.Maps {
		if m.Pinning == ebpf.PinByName {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	return names
}

// PinnedLayout is the pin layout the pins under root say they are: the
// descriptor's, 1 for pins without one, 0 when nothing is pinned there.
func PinnedLayout(root string) (int, error) {
	if root == "" {
		root = DefaultRoot
	}
	desc, err := readDescriptor(root)
	if err != nil || desc != nil {
		return pinnedLayoutVersion(desc), err
	}
	if _, err := os.Stat(filepath.Join(root, "progs")); errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	return 1, nil
}

// onOneCPU keeps the calling goroutine on one OS thread bound to the CPU
// set's first CPU until restore is called.
func onOneCPU() (restore func(), err error) {
	runtime.LockOSThread()
	var was unix.CPUSet
	if err := unix.SchedGetaffinity(0, &was); err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("get CPU affinity: %w", err)
	}
	var one unix.CPUSet
	for cpu := 0; cpu < len(was)*64; cpu++ {
		if was.IsSet(cpu) {
			one.Set(cpu)
			break
		}
	}
	if err := unix.SchedSetaffinity(0, &one); err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("bind to one CPU: %w", err)
	}
	return func() {
		_ = unix.SchedSetaffinity(0, &was)
		runtime.UnlockOSThread()
	}, nil
}
