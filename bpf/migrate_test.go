package bpf

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/idcni/idcni/bpf/reference"
	"github.com/idcni/idcni/internal/pkttest"
	"github.com/idcni/idcni/policy"
)

// grown is a build of layout 2 as the branches in flight will make it:
// the conntrack value (shared table and per-pod tables alike) and the
// endpoint value grow by appended fields whose zero means "not set",
// declared optional so that layout 1 may take the pins back. The
// programs stay this build's: they read the first bytes of each value,
// which the verifier allows in a wider value.
// It also counts two more reasons: counters grows by 2 entries, which
// layout 1 may drop when the tails are declared.
// ctValueSize is this build's conntrack value, which grown widens by 8.
var ctValueSize = uint32(binary.Size(datapathCtValue{}))

// countersSize is this build's counters array, which grown lengthens by 2.
const countersSize = uint32(reasonMax) * 2

// addedMap is the map grown's layout adds.
const addedMap = "grown_added"

func grown(tails bool) (*build, func(*ebpf.CollectionSpec)) {
	b := &build{version: LayoutVersion + 1}
	if tails {
		b.tails = map[string]uint32{"conntrack": ctValueSize, "ct_tables/inner": ctValueSize, "endpoints": uint32(binary.Size(datapathEndpoint{}))}
		b.entries = map[string]uint32{"counters": countersSize}
	}
	return b, func(spec *ebpf.CollectionSpec) {
		spec.Maps["counters"].MaxEntries += 2
		spec.Maps["conntrack"].ValueSize += 8
		spec.Maps["ct_tables"].InnerMap.ValueSize += 8
		spec.Maps["endpoints"].ValueSize += 8
		// A map the layout adds.
		spec.Maps[addedMap] = &ebpf.MapSpec{Name: addedMap, Type: ebpf.LPMTrie, KeySize: 20, ValueSize: 8,
			MaxEntries: 1024, Flags: unix.BPF_F_NO_PREALLOC, Pinning: ebpf.PinByName}
	}
}

// flowSeed is the walkthrough's two pods attached to their veths by tcx,
// A allowed to B on TCP port 80 only, and one TCP flow A -> B set up: B's
// replies pass only as long as conntrack remembers the flow (B may not
// open anything to A). Besides, the maps hold what a node holds: a local
// pod entry, a CIDR in the ipcache, identities with flags.
func flowSeed(t *testing.T, mode AttachMode) (*seed, pkttest.Packet) {
	t.Helper()
	p := newPair(t, 2, Options{Root: testRoot(t), Attach: mode})
	s := &seed{pair: p}
	s.a = p.endpoint(0, Endpoint{Identity: idA, IPv4: ipA, IPv6: ip6A})
	s.b = p.endpoint(1, Endpoint{Identity: idB, IPv4: ipB, IPv6: ip6B})
	p.local(s.b, ip6B) // the flow is IPv4: its packets are judged at both hooks
	p.ipcache(netip.MustParsePrefix("198.51.100.0/24"), 300)
	s.policy(manual(policy.ManualRule{Action: policy.Allow, Src: idA, Dst: idB, Proto: policy.ProtoTCP, Ports: policy.PortRange{Lo: 80, Hi: 80}}))
	var err error
	for _, ifname := range []string{"ep0", "ep1"} {
		p.net.do(func() { err = p.d.Attach(ifname) })
		if err != nil {
			t.Fatal(err)
		}
	}
	syn := pkttest.Packet{Src: ipA, Dst: ipB, Proto: pkttest.TCP, SrcPort: 40000, DstPort: 80, TCPFlags: pkttest.SYN}
	r1, r2 := s.cross(syn, s.a, s.b)
	wantReasons(t, "SYN", r1, r2, ReasonAllowRule, ReasonAllowRule)
	synack := syn.Reverse()
	synack.TCPFlags = pkttest.SYN | pkttest.ACK
	r1, r2 = s.cross(synack, s.b, s.a)
	wantReasons(t, "SYN-ACK", r1, r2, ReasonAllowReply, ReasonAllowReply)
	return s, syn
}

// flowGoesOn sends the flow's next packets both ways through the
// datapath the seed holds: they pass only on the flow's conntrack
// entries (the reference model, fed the same packets, has them).
func flowGoesOn(t *testing.T, s *seed, syn pkttest.Packet) {
	t.Helper()
	ack := syn
	ack.TCPFlags = pkttest.ACK
	r1, r2 := s.cross(ack, s.a, s.b)
	wantReasons(t, "ACK after the migration", r1, r2, ReasonAllowEstablished, ReasonAllowEstablished)
	back := ack.Reverse()
	r1, r2 = s.cross(back, s.b, s.a)
	wantReasons(t, "B's reply after the migration", r1, r2, ReasonAllowReply, ReasonAllowReply)
}

// dumpPins reads every pinned map of the datapath under root, entry by
// entry as raw bytes; a map of maps by index and inner key. Ring buffers
// hold no entries.
func dumpPins(t *testing.T, root string) map[string]map[string][]byte {
	t.Helper()
	out := map[string]map[string][]byte{}
	for _, name := range pinnedMaps() {
		m, err := ebpf.LoadPinnedMap(filepath.Join(root, name), nil)
		if err != nil {
			t.Fatalf("open pinned %s: %v", name, err)
		}
		out[name] = dumpMap(t, m, "")
		m.Close()
	}
	return out
}

func dumpMap(t *testing.T, m *ebpf.Map, prefix string) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	if !hasContent(m.Type()) {
		return out
	}
	key := make([]byte, m.KeySize())
	if m.Type() == ebpf.ArrayOfMaps || m.Type() == ebpf.HashOfMaps {
		var id uint32
		it := m.Iterate()
		for it.Next(key, &id) {
			in, err := ebpf.NewMapFromID(ebpf.MapID(id))
			if err != nil {
				t.Fatal(err)
			}
			for k, v := range dumpMap(t, in, prefix+hex.EncodeToString(key)+"/") {
				out[k] = v
			}
			out[prefix+hex.EncodeToString(key)+"/capacity"] = fmt.Appendf(nil, "%d", in.MaxEntries())
			in.Close()
		}
		if err := it.Err(); err != nil {
			t.Fatal(err)
		}
		return out
	}
	var val any = make([]byte, m.ValueSize())
	if isPerCPU(m.Type()) {
		val = perCPUValues(m.ValueSize()).Interface()
	}
	it := m.Iterate()
	for it.Next(key, val) {
		var b []byte
		if isPerCPU(m.Type()) {
			rv := reflect.ValueOf(val)
			for i := range rv.Len() {
				b = append(b, rv.Index(i).Slice(0, rv.Index(i).Len()).Bytes()...)
			}
		} else {
			b = bytes.Clone(val.([]byte))
		}
		out[prefix+hex.EncodeToString(key)] = b
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// sameEntries fails unless after holds every entry of before and nothing
// else, each value the same up to the shorter one's length and zero
// beyond it: a zero-extension or a cut of an optional tail.
// counts are the maps of packet counters, which move with any packet.
var counts = map[string]bool{"counters": true, "stats": true, "event_loss": true}

func sameEntries(t *testing.T, before, after map[string]map[string][]byte) {
	t.Helper()
	for name, b := range before {
		if counts[name] {
			continue // packets the test's links see meanwhile (neighbour discovery) count there
		}
		a := after[name]
		if len(a) != len(b) {
			t.Errorf("map %s: %d entries before the migration, %d after", name, len(b), len(a))
		}
		for k, bv := range b {
			av, ok := a[k]
			if !ok {
				t.Errorf("map %s: entry %s lost", name, k)
				continue
			}
			n := min(len(av), len(bv))
			if !bytes.Equal(av[:n], bv[:n]) || strings.Trim(string(av[n:]), "\x00") != "" {
				t.Errorf("map %s: entry %s was\n% x\nis\n% x", name, k, bv, av)
			}
		}
	}
}

// pinIDs is the map or program behind every pin under root.
func pinIDs(t *testing.T, root string) map[string]uint32 {
	t.Helper()
	out := map[string]uint32{}
	err := filepath.WalkDir(root, func(path string, e os.DirEntry, err error) error {
		if err != nil || e.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		if strings.HasPrefix(rel, "links") {
			return nil
		}
		if m, err := ebpf.LoadPinnedMap(path, nil); err == nil {
			info, _ := m.Info()
			id, _ := info.ID()
			out[rel] = uint32(id)
			m.Close()
		} else if p, err := ebpf.LoadPinnedProgram(path, nil); err == nil {
			info, _ := p.Info()
			id, _ := info.ID()
			out[rel] = uint32(id)
			p.Close()
		} else {
			out[rel] = 0
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func attachedTo(t *testing.T, s *seed, d *Datapath) bool {
	t.Helper()
	all := true
	for _, ifindex := range []int{s.a, s.b} {
		var ok bool
		var err error
		s.net.do(func() { ok, err = d.AttachedIndex(ifindex) })
		if err != nil {
			t.Fatal(err)
		}
		all = all && ok
	}
	return all
}

func valueSize(t *testing.T, root, name string) uint32 {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(root, name), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	return m.ValueSize()
}

// TestMigrateCarriesEveryEntryAndTheFlow: pins of layout 1 exactly as
// today's main leaves them (no descriptor), with pods attached and a flow
// open, meet a build whose conntrack and endpoint values grew. Its start
// (Load with Replace) must carry every entry of every map over (the
// per-pod conntrack tables with their capacities), move both veths to its
// programs, and the open flow must go on, which it can only on its
// conntrack entries. Then back: layout 1 takes the pins of layout 2 back,
// cutting the tails the descriptor declares optional.
func TestMigrateCarriesEveryEntryAndTheFlow(t *testing.T) {
	for _, mode := range []AttachMode{AttachTCX, AttachLegacy} {
		t.Run(map[AttachMode]string{AttachTCX: "tcx", AttachLegacy: "legacy"}[mode], func(t *testing.T) {
			s, syn := flowSeed(t, mode)
			root := s.d.Root()
			if err := os.Remove(filepath.Join(root, layoutPin)); err != nil {
				t.Fatal(err) // layout 1 pins have none
			}
			before := dumpPins(t, root)
			old := s.d

			b, hook := grown(true)
			var up *Datapath
			var err error
			s.net.do(func() { up, err = Load(Options{Root: root, Replace: true, Attach: mode, build: b, specHook: hook}) })
			if err != nil {
				t.Fatalf("migrate layout 1 -> 2: %v", err)
			}
			t.Cleanup(func() { up.Close() })
			desc, err := readDescriptor(root)
			if err != nil || desc == nil || desc.Layout != LayoutVersion+1 {
				t.Fatalf("descriptor after the migration: %+v, %v", desc, err)
			}
			if got := valueSize(t, root, "conntrack"); got != ctValueSize+8 {
				t.Fatalf("pinned conntrack value is %d bytes after the migration, want %d", got, ctValueSize+8)
			}
			if _, err := os.Stat(filepath.Join(root, addedMap)); err != nil {
				t.Fatalf("the map layout 2 adds is not pinned: %v", err)
			}
			sameEntries(t, before, dumpPins(t, root))
			if !attachedTo(t, s, up) {
				t.Fatal("the veths do not run the new programs after the migration")
			}
			if attachedTo(t, s, old) {
				t.Fatal("the veths still run the old programs")
			}
			// The check of the hooks that opens no map answers on pins
			// this build cannot open.
			for _, ifindex := range s.net.ifindex {
				var missing []string
				s.net.do(func() { missing, err = MissingPinnedHooks(root, ifindex) })
				if err != nil || len(missing) > 0 {
					t.Fatalf("ifindex %d: MissingPinnedHooks on the grown build's pins says %v missing (%v), want none", ifindex, missing, err)
				}
			}
			s.pair.d = up
			flowGoesOn(t, s, syn)

			// A count of a reason only layout 2 has, which layout 1
			// must drop to take the pins back.
			counters, err := ebpf.LoadPinnedMap(filepath.Join(root, "counters"), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer counters.Close()
			if counters.MaxEntries() != countersSize+2 {
				t.Fatalf("pinned counters has %d entries after the migration, want %d", counters.MaxEntries(), countersSize+2)
			}
			val := perCPUValues(counters.ValueSize())
			val.Index(0).Index(0).SetUint(7)
			if err := counters.Update(countersSize+1, val.Interface(), ebpf.UpdateAny); err != nil {
				t.Fatal(err)
			}

			// Back to layout 1, this build as it is.
			mid := dumpPins(t, root)
			var down *Datapath
			s.net.do(func() { down, err = Load(Options{Root: root, Replace: true, Attach: mode}) })
			if err != nil {
				t.Fatalf("roll back layout 2 -> 1: %v", err)
			}
			t.Cleanup(func() { down.Close() })
			if got := valueSize(t, root, "conntrack"); got != ctValueSize {
				t.Fatalf("pinned conntrack value is %d bytes after the rollback, want %d", got, ctValueSize)
			}
			if c, err := ebpf.LoadPinnedMap(filepath.Join(root, "counters"), nil); err != nil || c.MaxEntries() != countersSize {
				t.Fatalf("pinned counters after the rollback: %v, %v; want %d entries", c, err, countersSize)
			} else {
				c.Close()
			}
			if _, err := os.Stat(filepath.Join(root, addedMap)); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("the map only layout 2 has is still pinned after the rollback, with no program using it: %v", err)
			}
			sameEntries(t, mid, dumpPins(t, root))
			if !attachedTo(t, s, down) {
				t.Fatal("the veths do not run layout 1's programs after the rollback")
			}
			s.pair.d = down
			flowGoesOn(t, s, syn)
			for _, e := range mustReadDir(t, root) {
				if strings.HasSuffix(e, "_new") {
					t.Errorf("staging pin %s left under the root", e)
				}
			}
		})
	}
}

func mustReadDir(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

// TestRollbackRefusesWhatItWouldLose: pins whose descriptor does not
// declare the grown tails optional cannot go back to the shorter layout:
// the rollback refuses, names the map, and changes nothing.
func TestRollbackRefusesWhatItWouldLose(t *testing.T) {
	s, syn := flowSeed(t, AttachTCX)
	root := s.d.Root()
	b, hook := grown(false)
	var up *Datapath
	var err error
	s.net.do(func() {
		up, err = Load(Options{Root: root, Replace: true, Attach: AttachTCX, build: b, specHook: hook})
	})
	if err != nil {
		t.Fatalf("migrate 1 -> 2: %v", err)
	}
	t.Cleanup(func() { up.Close() })
	before, ids := dumpPins(t, root), pinIDs(t, root)
	s.net.do(func() { _, err = Load(Options{Root: root, Replace: true, Attach: AttachTCX}) })
	if err == nil {
		t.Fatal("layout 1 took pins of layout 2 whose wider values are not declared optional")
	}
	for _, want := range []string{"conntrack", "optional", "nothing was changed"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("refusal does not say %q: %v", want, err)
		}
	}
	if got := pinIDs(t, root); !reflect.DeepEqual(got, ids) {
		t.Fatalf("the refused rollback changed the pins:\nbefore %v\nafter  %v", ids, got)
	}
	sameEntries(t, before, dumpPins(t, root))
	if !attachedTo(t, s, up) {
		t.Fatal("the refused rollback moved the attachments")
	}
	s.pair.d = up
	flowGoesOn(t, s, syn)
}

// TestRollbackRefusesToDropUndeclaredEntries: an array that shrinks on a
// rollback (counters of reasons the older build does not have) is cut
// only when the pins declare the entries past its size optional;
// otherwise the rollback refuses when it plans, naming the map, before it
// creates anything (a82db2e, which does not plan this, failed half way
// through its copy instead).
func TestRollbackRefusesToDropUndeclaredEntries(t *testing.T) {
	s, syn := flowSeed(t, AttachTCX)
	root := s.d.Root()
	b, hook := grown(true)
	b.entries = nil
	var up *Datapath
	var err error
	s.net.do(func() {
		up, err = Load(Options{Root: root, Replace: true, Attach: AttachTCX, build: b, specHook: hook})
	})
	if err != nil {
		t.Fatalf("migrate up: %v", err)
	}
	t.Cleanup(func() { up.Close() })
	ids := pinIDs(t, root)
	s.net.do(func() { _, err = Load(Options{Root: root, Replace: true, Attach: AttachTCX}) })
	if err == nil {
		t.Fatal("the rollback cut counters whose extra entries the pins do not declare optional")
	}
	for _, want := range []string{"counters", "shrinking the array", "nothing was changed"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("refusal does not say %q: %v", want, err)
		}
	}
	if got := pinIDs(t, root); !reflect.DeepEqual(got, ids) {
		t.Fatalf("the refused rollback changed the pins:\nbefore %v\nafter  %v", ids, got)
	}
	s.pair.d = up
	flowGoesOn(t, s, syn)
}

// TestFailedMigrationLeavesTheOldInForce makes each step of a migration
// fail in turn, from creating a map to moving the attachments: the old
// pins (every map and program the same kernel object), the old programs
// on both veths and the flow must all stay, and the error must say so.
func TestFailedMigrationLeavesTheOldInForce(t *testing.T) {
	for _, step := range []string{"create conntrack", "copy ct_tables", "pin ct_tables", "pin pin_layout", "pin program to_pod", "attach"} {
		t.Run(strings.ReplaceAll(step, " ", "_"), func(t *testing.T) {
			s, syn := flowSeed(t, AttachTCX)
			root := s.d.Root()
			before, ids := dumpPins(t, root), pinIDs(t, root)
			b, hook := grown(true)
			injected := errors.New("injected failure")
			var err error
			s.net.do(func() {
				_, err = Load(Options{Root: root, Replace: true, Attach: AttachTCX, build: b, specHook: hook,
					faults: func(at string) error {
						if at == step {
							return injected
						}
						return nil
					}})
			})
			if !errors.Is(err, injected) {
				t.Fatalf("migration with %q failing: %v", step, err)
			}
			if !strings.Contains(err.Error(), "stay in force") {
				t.Errorf("error does not say the old pins stay in force: %v", err)
			}
			if got := pinIDs(t, root); !reflect.DeepEqual(got, ids) {
				t.Fatalf("pins changed:\nbefore %v\nafter  %v", ids, got)
			}
			sameEntries(t, before, dumpPins(t, root))
			if !attachedTo(t, s, s.d) {
				t.Fatal("the veths no longer run the old programs")
			}
			flowGoesOn(t, s, syn)
		})
	}
}

// TestPluginAndToolsLeaveMigrationToTheAgent: a load without Replace (the
// plugin) and Open (DEL, the tools) facing pins to migrate refuse, say the
// agent migrates them, and change nothing.
func TestPluginAndToolsLeaveMigrationToTheAgent(t *testing.T) {
	s, _ := flowSeed(t, AttachTCX)
	root := s.d.Root()
	b, hook := grown(true)
	var up *Datapath
	var err error
	s.net.do(func() {
		up, err = Load(Options{Root: root, Replace: true, Attach: AttachTCX, build: b, specHook: hook})
	})
	if err != nil {
		t.Fatal(err)
	}
	up.Close()
	ids := pinIDs(t, root)
	for what, open := range map[string]func() error{
		"Load": func() error { d, err := Load(Options{Root: root}); d.closeIfOpen(); return err },
		"Open": func() error { d, err := Open(root); d.closeIfOpen(); return err },
	} {
		err := open()
		if !errors.Is(err, ErrLayoutMismatch) || !strings.Contains(err.Error(), "idcni-agent of this build migrates them") || !strings.Contains(err.Error(), fmt.Sprintf("pin layout %d", LayoutVersion+1)) {
			t.Errorf("%s of this layout on pins of the next: %v", what, err)
		}
	}
	if got := pinIDs(t, root); !reflect.DeepEqual(got, ids) {
		t.Fatalf("pins changed:\nbefore %v\nafter  %v", ids, got)
	}
}

func (d *Datapath) closeIfOpen() {
	if d != nil {
		d.Close()
	}
}

// TestGCRemovesOnlyUnusedPins: after a start, pins this build does not
// use go (a map and a program of another layout nobody runs), and a pin
// of a map an attached program uses stays.
func TestGCRemovesOnlyUnusedPins(t *testing.T) {
	s, _ := flowSeed(t, AttachTCX)
	root := s.d.Root()
	unused, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer unused.Close()
	if err := unused.Pin(filepath.Join(root, addedMap)); err != nil {
		t.Fatal(err)
	}
	// A second pin of a map the attached programs use: in use.
	if err := s.d.objs.Fragments.Pin(filepath.Join(root, "fragments_v0")); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(filepath.Join(root, "fragments_v0")) })
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL", Instructions: returnZero()})
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	if err := prog.Pin(filepath.Join(root, "progs", "from_future")); err != nil {
		t.Fatal(err)
	}
	var d *Datapath
	s.net.do(func() { d, err = Load(Options{Root: root, Replace: true, Attach: AttachTCX}) })
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	for path, want := range map[string]bool{addedMap: false, "progs/from_future": false, "fragments_v0": true, "fragments": true, layoutPin: true} {
		_, err := os.Stat(filepath.Join(root, path))
		if got := err == nil; got != want {
			t.Errorf("pin %s there after the start: %v, want %v", path, got, want)
		}
	}
}

func returnZero() asm.Instructions {
	return asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()}
}

// TestRefreshFollowsAStart: a handle opened before an agent's start (the
// plugin's, opened without the lock) holds the programs that start
// replaced; Refresh under the lock brings it to the ones pinned now, and
// writes go on reaching the maps the programs use. Facing pins of a
// layout it cannot read, Refresh refuses and says the agent migrates
// them.
func TestRefreshFollowsAStart(t *testing.T) {
	s, _ := flowSeed(t, AttachTCX)
	root := s.d.Root()
	h, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	var up *Datapath
	s.net.do(func() { up, err = Load(Options{Root: root, Replace: true, Attach: AttachTCX}) })
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	if h.programsPinnedNow() {
		t.Fatal("a handle opened before the start holds the programs pinned after it: the test cannot tell")
	}
	unlock, err := h.Lock()
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Refresh(); err != nil {
		t.Fatal(err)
	}
	unlock()
	if !h.programsPinnedNow() || !attachedTo(t, s, h) {
		t.Fatal("after Refresh the handle does not hold the programs the veths run")
	}
	ep := Endpoint{Identity: 4242, IPv4: netip.MustParseAddr("10.13.0.99")}
	if err := h.PutEndpoint(7001, ep); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := up.Endpoint(7001); err != nil || !ok {
		t.Fatalf("a write after Refresh did not reach the map the programs use (%v, %v)", ok, err)
	}

	b, hook := grown(true)
	var up2 *Datapath
	s.net.do(func() {
		up2, err = Load(Options{Root: root, Replace: true, Attach: AttachTCX, build: b, specHook: hook})
	})
	if err != nil {
		t.Fatal(err)
	}
	defer up2.Close()
	if err := h.Refresh(); !errors.Is(err, ErrLayoutMismatch) || !strings.Contains(err.Error(), "idcni-agent of this build migrates them") {
		t.Fatalf("Refresh of a layout-1 handle on pins of layout 2: %v", err)
	}
}

// TestMigrationCarriesAFullConntrack migrates a node's shared conntrack
// table holding 100,000 flows and 50 pods' tables of 1,000 flows each,
// and logs how long the start took (no threshold: a number for the
// report). Every flow must be there after it.
func TestMigrationCarriesAFullConntrack(t *testing.T) {
	p := newPair(t, 1, Options{Root: testRoot(t), Attach: AttachTCX})
	fill := func(m *ebpf.Map, n, base int) {
		t.Helper()
		keys := make([]datapathCtKey, n)
		vals := make([]datapathCtValue, n)
		for i := range keys {
			keys[i].Saddr[0], keys[i].Saddr[1], keys[i].Saddr[2], keys[i].Saddr[3] = 10, byte(base), byte(i>>8), byte(i)
			keys[i].Daddr[0], keys[i].Daddr[3] = 10, byte(i>>16)
			keys[i].Sport, keys[i].Dport, keys[i].Proto = uint16(i), 80, 6
			vals[i] = datapathCtValue{Expires: ^uint64(0), Rev: 1, Subject: uint32(base), Peer: uint32(i)}
		}
		if _, err := m.BatchUpdate(keys, vals, nil); err != nil {
			t.Fatal(err)
		}
	}
	fill(p.d.objs.Conntrack, 100000, 0)
	for i := 1; i <= 50; i++ {
		slot, err := p.d.AddConntrackTable(1000)
		if err != nil {
			t.Fatal(err)
		}
		var id uint32
		if err := p.d.objs.CtTables.Lookup(ctIndex(slot, ScopeEgress), &id); err != nil {
			t.Fatal(err)
		}
		m, err := ebpf.NewMapFromID(ebpf.MapID(id))
		if err != nil {
			t.Fatal(err)
		}
		fill(m, 1000, i)
		m.Close()
	}
	root := p.d.Root()
	before := dumpPins(t, root)
	b, hook := grown(true)
	start := time.Now()
	var up *Datapath
	var err error
	p.net.do(func() {
		up, err = Load(Options{Root: root, Replace: true, Attach: AttachTCX, build: b, specHook: hook})
	})
	took := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	after := dumpPins(t, root)
	sameEntries(t, before, after)
	if n := len(after["conntrack"]); n != 100000 {
		t.Fatalf("%d flows in the shared table after the migration, want 100000", n)
	}
	t.Logf("migrated 150,000 flows (100,000 shared, 50 pods x 1,000) to a grown conntrack in %v", took)
}

// TestCopyEntriesOfEveryKind: the generic copy of each kind of map the
// datapath pins (a hash and an LPM trie, which has no batch calls, an
// array, a per-CPU array), grown and cut.
func TestCopyEntriesOfEveryKind(t *testing.T) {
	testRoot(t) // root or skip
	for _, typ := range []ebpf.MapType{ebpf.Hash, ebpf.LRUHash, ebpf.LPMTrie, ebpf.Array, ebpf.PerCPUArray} {
		for _, grow := range []int{8, -4} {
			t.Run(fmt.Sprintf("%s %+d", typ, grow), func(t *testing.T) {
				spec := func(value int) *ebpf.MapSpec {
					s := &ebpf.MapSpec{Type: typ, KeySize: 8, ValueSize: uint32(value), MaxEntries: 64}
					if typ == ebpf.LPMTrie {
						s.Flags = unix.BPF_F_NO_PREALLOC
					}
					if typ == ebpf.Array || typ == ebpf.PerCPUArray {
						s.KeySize = 4
					}
					return s
				}
				src, err := ebpf.NewMap(spec(16))
				if err != nil {
					t.Fatal(err)
				}
				defer src.Close()
				dst, err := ebpf.NewMap(spec(16 + grow))
				if err != nil {
					t.Fatal(err)
				}
				defer dst.Close()
				for i := range 40 {
					k := make([]byte, src.KeySize())
					k[0] = 32 // an LPM prefix length
					k[len(k)-1] = byte(i)
					if src.KeySize() == 4 {
						k = []byte{byte(i), 0, 0, 0}
					}
					v := bytes.Repeat([]byte{byte(i + 1)}, 16)
					var val any = v
					if typ == ebpf.PerCPUArray {
						pv := perCPUValues(16)
						for c := range pv.Len() {
							reflect.Copy(pv.Index(c).Slice(0, 16), reflect.ValueOf(v))
						}
						val = pv.Interface()
					}
					if err := src.Update(k, val, ebpf.UpdateAny); err != nil {
						t.Fatal(err)
					}
				}
				if err := copyEntries(src, dst, nil, false); err != nil {
					t.Fatal(err)
				}
				want, got := dumpMap(t, src, ""), dumpMap(t, dst, "")
				if typ == ebpf.PerCPUArray {
					// One map per CPU's value, each compared alone.
					cpus, _ := ebpf.PossibleCPU()
					split := func(m map[string][]byte) map[string][]byte {
						out := map[string][]byte{}
						for k, v := range m {
							n := len(v) / cpus
							for c := range cpus {
								out[fmt.Sprintf("%s/%d", k, c)] = v[c*n : (c+1)*n]
							}
						}
						return out
					}
					want, got = split(want), split(got)
				}
				sameEntries(t, map[string]map[string][]byte{"m": want}, map[string]map[string][]byte{"m": got})
				if len(got) != len(want) || len(want) < 40 {
					t.Fatalf("%d entries copied of %d", len(got), len(want))
				}
			})
		}
	}
}

// TestCatchUpCarriesFlowsOpenedDuringTheMigration opens a flow through
// the old programs after the new maps were filled and before the
// attachments move (what a pod does during a start): its reply, judged by
// the new programs, must pass on the entry the catch-up copied. The
// control skips the catch-up and the reply is dropped: the test sees a
// lost flow.
func TestCatchUpCarriesFlowsOpenedDuringTheMigration(t *testing.T) {
	for _, skip := range []bool{false, true} {
		t.Run(map[bool]string{false: "caught up", true: "control: no catch-up"}[skip], func(t *testing.T) {
			s, _ := flowSeed(t, AttachTCX)
			old := s.d
			syn := pkttest.Packet{Src: ipA, Dst: ipB, Proto: pkttest.TCP, SrcPort: 40100, DstPort: 80, TCPFlags: pkttest.SYN}
			var sent bool
			var sendErr error
			b, hook := grown(true)
			var up *Datapath
			var err error
			s.net.do(func() {
				up, err = Load(Options{Root: old.Root(), Replace: true, Attach: AttachTCX, build: b, specHook: hook,
					faults: func(step string) error {
						if step == "catch up" && skip {
							return errors.New("skipped by the test")
						}
						if !strings.HasPrefix(step, "pin program") || sent {
							return nil
						}
						// On the namespace's thread already: run the old
						// programs here.
						sent = true
						f := syn.Frame()
						for _, hop := range []struct {
							prog        *ebpf.Program
							scope       Scope
							ifindex, in int
						}{{old.objs.FromPod, ScopeEgress, s.a, 0}, {old.objs.ToPod, ScopeIngress, s.b, s.a}} {
							ret, _, rerr := testRun(hop.prog, f, hop.ifindex, hop.in, 1, nil)
							if rerr != nil || ret == 2 {
								sendErr = fmt.Errorf("SYN through the old %s program: %d, %v", hop.scope, ret, rerr)
							}
							s.ref.Process(f, reference.Scope(hop.scope), hop.ifindex, hop.in)
						}
						return nil
					}})
			})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { up.Close() })
			if !sent || sendErr != nil {
				t.Fatalf("the flow was not opened during the migration: %v", sendErr)
			}
			s.pair.d = up
			synack := syn.Reverse()
			synack.TCPFlags = pkttest.SYN | pkttest.ACK
			if skip {
				if r, err := s.run(synack.Frame(), ScopeEgress, s.b, 0); err != nil || !r.Drop() {
					t.Fatalf("without the catch-up B's SYN-ACK passed (%s, %v): the test cannot see a lost flow", r, err)
				}
				return
			}
			r1, r2 := s.cross(synack, s.b, s.a)
			wantReasons(t, "SYN-ACK of a flow opened during the migration", r1, r2, ReasonAllowReply, ReasonAllowReply)
		})
	}
}

// TestStartDetachesProgramsItDoesNotHave: a newer build's program
// attached through a pin under the root (from_net on a node's device, as
// a rollback finds it) runs on maps no agent of this build writes; the
// start takes it off, and leaves the pods' programs, now its own, on.
func TestStartDetachesProgramsItDoesNotHave(t *testing.T) {
	s, _ := flowSeed(t, AttachTCX)
	root := s.d.Root()
	foreign, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL", Instructions: returnZero()})
	if err != nil {
		t.Fatal(err)
	}
	defer foreign.Close()
	pin := filepath.Join(root, "futurelinks", "ep0")
	if err := os.MkdirAll(filepath.Dir(pin), 0o700); err != nil {
		t.Fatal(err)
	}
	s.net.do(func() {
		var l link.Link
		l, err = link.AttachTCX(link.TCXOptions{Interface: s.net.ifindex[0], Program: foreign, Attach: ebpf.AttachTCXIngress})
		if err == nil {
			err = l.Pin(pin)
			l.Close()
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(pin) })
	info, err := foreign.Info()
	if err != nil {
		t.Fatal(err)
	}
	foreignID, _ := info.ID()
	running := func() bool {
		var on bool
		s.net.do(func() { on, err = attachedByKernel(s.net.ifindex[0], hooks[0], foreignID) })
		if err != nil {
			t.Fatal(err)
		}
		return on
	}
	if !running() {
		t.Fatal("the foreign program is not attached before the start")
	}
	var d *Datapath
	s.net.do(func() { d, err = Load(Options{Root: root, Replace: true, Attach: AttachTCX}) })
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if running() {
		t.Error("the program this build does not have still runs on ep0 after the start")
	}
	if _, err := os.Stat(pin); err == nil {
		t.Error("its link pin is still there")
	}
	for _, ifindex := range s.net.ifindex {
		var missing []string
		s.net.do(func() { missing, err = d.MissingHooks(ifindex) })
		if err != nil || len(missing) > 0 {
			t.Errorf("ifindex %d: hooks %v run no program of this build after the start (%v)", ifindex, missing, err)
		}
	}
}
