package bpf

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// DefaultRoot is where the datapath is pinned unless Options.Root or
// IDCNI_BPF_ROOT says otherwise.
const DefaultRoot = "/sys/fs/bpf/idcni"

// ErrNotLoaded means no datapath is pinned under the root yet.
var ErrNotLoaded = errors.New("datapath not loaded: the idcni CNI plugin loads it on the first pod ADD, or idcni-agent on start")

// Pinned program names under <root>/progs.
const (
	progFromPod = "from_pod"
	progToPod   = "to_pod"
	progFromNet = "from_net"
)

// Options tune Load. Zero values mean defaults.
type Options struct {
	// Root is the bpffs directory everything is pinned under.
	Root string
	// Map sizes; zero keeps the size compiled into the object. A pinned map
	// of another size is refused (ErrMapIncompatible), never resized.
	PolicyEntries    uint32
	ConntrackEntries uint32
	IPCacheEntries   uint32
	// Replace loads the embedded programs even when programs are pinned,
	// and moves every attachment to them (an upgrade).
	Replace bool
	// Attach chooses tcx or legacy cls_bpf; AttachAuto prefers tcx.
	Attach AttachMode
	// Logger gets what a Replace does to pins of another layout
	// (migrated, kept, removed); nil: slog.Default().
	Logger *slog.Logger

	// Tests stand in for builds of other layouts (build), shape the
	// object as such a build would have it (specHook), and make a step
	// of a migration fail (faults).
	build    *build
	specHook func(*ebpf.CollectionSpec)
	faults   migrationFaults
}

// Datapath is the pinned datapath: programs, maps and attachments.
type Datapath struct {
	root   string
	mode   AttachMode
	objs   datapathObjects
	closed bool
	// cfgMu serialises this handle's config read-modify-writes (see
	// updateConfig).
	cfgMu sync.Mutex
	// svcMu serialises this handle's Service writes: a frontend's id and
	// backend slots are read-modify-written (see PutService).
	svcMu  sync.Mutex
	svcIDs *serviceIDs
	// ctTable is the embedded object's conntrack table, the template of
	// every pod's (AddConntrackTable), kept from the parse that opened d.
	ctTable *ebpf.MapSpec
}

// RootFromEnv returns IDCNI_BPF_ROOT, or DefaultRoot.
func RootFromEnv() string {
	if r := os.Getenv("IDCNI_BPF_ROOT"); r != "" {
		return r
	}
	return DefaultRoot
}

// Load opens the datapath pinned under opts.Root, loading and pinning it
// first when nothing is pinned. Concurrent loaders in other processes wait
// for each other. Pinned maps whose layout differs from this build are
// refused with an error naming the map, never overwritten.
func Load(opts Options) (*Datapath, error) {
	root := opts.Root
	if root == "" {
		root = DefaultRoot
	}
	if err := ensureBPFFS(root); err != nil {
		return nil, err
	}
	d := &Datapath{root: root, mode: opts.Attach}
	// Fast path without the lock: pins are created whole (programs last),
	// so whoever sees the programs pinned sees a complete datapath, and 50
	// plugin instances at once do not queue behind each other.
	// Any other failure is tried again under the lock: an agent may be
	// migrating the pins right now, and under the lock they are whole.
	if !opts.Replace {
		if err := d.openPinned(opts); err == nil {
			return d, nil
		}
	}
	unlock, err := lockDir(root)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if !opts.Replace {
		err := d.openPinned(opts)
		if err == nil {
			return d, nil
		}
		if !errors.Is(err, ErrNotLoaded) {
			return nil, err
		}
	}
	if err := d.load(opts); err != nil {
		return nil, err
	}
	return d, nil
}

// Open opens an already pinned datapath and fails with ErrNotLoaded when
// there is none. Tools that must not load programs (endpointctl, policyctl)
// use it.
func Open(root string) (*Datapath, error) {
	if root == "" {
		root = DefaultRoot
	}
	d := &Datapath{root: root}
	if err := d.openPinned(Options{Root: root}); err != nil {
		return nil, err
	}
	return d, nil
}

func (d *Datapath) spec(opts Options) (*ebpf.CollectionSpec, error) {
	spec, err := loadDatapath()
	if err != nil {
		return nil, fmt.Errorf("parse embedded datapath object: %w", err)
	}
	for name, n := range map[string]uint32{"policy": opts.PolicyEntries, "conntrack": opts.ConntrackEntries, "ipcache": opts.IPCacheEntries} {
		if n != 0 {
			spec.Maps[name].MaxEntries = n
		}
	}
	if opts.specHook != nil {
		opts.specHook(spec)
	}
	d.ctTable = spec.Maps["ct_tables"].InnerMap
	return spec, nil
}

// openPinned opens every pinned map and program, checking each map against
// the embedded layout.
func (d *Datapath) openPinned(opts Options) error {
	spec, err := d.spec(opts)
	if err != nil {
		return err
	}
	for name, dst := range d.progFields() {
		p, err := ebpf.LoadPinnedProgram(filepath.Join(d.root, "progs", name), nil)
		if errors.Is(err, os.ErrNotExist) {
			d.discard()
			return fmt.Errorf("%w (nothing pinned at %s)", ErrNotLoaded, d.root)
		}
		if err != nil {
			d.discard()
			return fmt.Errorf("open pinned program %s: %w", name, err)
		}
		*dst = p
	}
	maps := d.mapFields()
	for name, dst := range maps {
		m, err := ebpf.LoadPinnedMap(filepath.Join(d.root, name), nil)
		if errors.Is(err, os.ErrNotExist) {
			// The programs are pinned, so a datapath is: one of
			// another layout, which did not have this map.
			d.discard()
			return fmt.Errorf("%w: map %s is not pinned under %s, though programs are: the pins are of another layout (%s); %s",
				ErrLayoutMismatch, name, d.root, pinnedLayoutName(d.root), agentMigrates)
		}
		if err != nil {
			d.discard()
			return fmt.Errorf("open pinned map %s: %w", name, err)
		}
		*dst = m
		if err := checkLayout(d.root, name, spec.Maps[name], m, opts.sized(name)); err != nil {
			d.discard()
			return err
		}
	}
	return nil
}

// sized reports whether the caller asked for a size of the named map: when
// it did not, a pinned map's size is accepted whatever it is, so tools work
// with a datapath loaded with non-default sizes. Only the size: its type,
// key, value and flags are checked on every path (checkLayout).
func (o Options) sized(name string) bool {
	switch name {
	case "policy":
		return o.PolicyEntries != 0
	case "conntrack":
		return o.ConntrackEntries != 0
	case "ipcache":
		return o.IPCacheEntries != 0
	}
	return true
}

func (d *Datapath) mapFields() map[string]**ebpf.Map {
	m := &d.objs.datapathMaps
	return map[string]**ebpf.Map{
		"config": &m.Config, "conntrack": &m.Conntrack, "counters": &m.Counters,
		"endpoints": &m.Endpoints, "events": &m.Events, "fragments": &m.Fragments,
		"identities": &m.Identities, "ipcache": &m.Ipcache, "local_pods": &m.LocalPods, "policy": &m.Policy,
		"stats": &m.Stats, "ct_tables": &m.CtTables, "ep_states": &m.EpStates, "event_loss": &m.EventLoss,
		"services": &m.Services, "backends": &m.Backends, "affinity": &m.Affinity,
		"remote_cidrs": &m.RemoteCidrs,
	}
}

// repin pins p at path, replacing whatever was pinned there. The rename
// makes the switch atomic for readers of the pin.
func repin(p *ebpf.Program, path string) error {
	tmp := path + "_new" // bpffs refuses names with a dot
	_ = os.Remove(tmp)
	// A clone: Pin moves the pin a handle was loaded from rather than
	// pinning it again, and the path may hold another program by now.
	p, err := p.Clone()
	if err != nil {
		return fmt.Errorf("pin program at %s: %w", path, err)
	}
	defer p.Close()
	if err := p.Pin(tmp); err != nil {
		return fmt.Errorf("pin program at %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("pin program at %s: %w", path, err)
	}
	return nil
}

// initConfig starts the policy revision at 1 on a fresh map: conntrack
// entries use 0 for "never checked".
func (d *Datapath) initConfig() error {
	var cfg datapathConfig
	if err := d.objs.Config.Lookup(uint32(0), &cfg); err != nil {
		return fmt.Errorf("read config map: %w", err)
	}
	if cfg.Rev != 0 {
		return nil
	}
	cfg.Rev = 1
	if err := d.objs.Config.Update(uint32(0), &cfg, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write config map: %w", err)
	}
	return nil
}

// Refresh makes this handle's programs and maps the ones pinned now.
// A handle opened before a migration (the agent's Load with Replace)
// holds the maps and programs it replaced: writing those would lose the
// write, attaching those would leave a veth on the old program for good.
// Call it holding the root lock (Lock), which a migration holds from its
// plan to its last re-pin, and write or attach before letting go.
func (d *Datapath) Refresh() error {
	// Every load re-pins the programs, so programs still the ones
	// pinned mean maps still the ones pinned: the common case costs a
	// look at two pins, not a parse of the object.
	if d.programsPinnedNow() {
		return nil
	}
	nd := &Datapath{root: d.root, mode: d.mode}
	if err := nd.openPinned(Options{Root: d.root}); err != nil {
		return err
	}
	old := d.objs
	d.objs, d.ctTable = nd.objs, nd.ctTable
	_ = old.Close()
	return nil
}

// programsPinnedNow reports whether this handle holds the programs pinned
// now.
func (d *Datapath) programsPinnedNow() bool {
	for name, held := range d.progFields() {
		if *held == nil {
			return false
		}
		p, err := ebpf.LoadPinnedProgram(filepath.Join(d.root, "progs", name), nil)
		if err != nil {
			return false
		}
		pinned, perr := p.Info()
		p.Close()
		mine, merr := (*held).Info()
		if perr != nil || merr != nil {
			return false
		}
		a, _ := pinned.ID()
		b, _ := mine.ID()
		if a != b {
			return false
		}
	}
	return true
}

// discard closes whatever a failed open got so far, leaving d reusable.
func (d *Datapath) discard() {
	_ = d.objs.Close()
	d.objs = datapathObjects{}
}

// Root returns the bpffs directory of the datapath.
func (d *Datapath) Root() string { return d.root }

// Close releases the file descriptors; pins and attachments stay.
func (d *Datapath) Close() error {
	if d.closed {
		return nil
	}
	d.closed = true
	return d.objs.Close()
}

// Unpin removes every pin of the datapath (programs, maps, links), which
// detaches all tcx attachments. Used by uninstall and by tests.
func Unpin(root string) error {
	if root == "" {
		root = DefaultRoot
	}
	if err := os.RemoveAll(root); err != nil {
		return fmt.Errorf("remove pins under %s: %w", root, err)
	}
	return nil
}

// ensureBPFFS makes sure root lives on a bpffs, mounting one at /sys/fs/bpf
// when the machine has none there.
func ensureBPFFS(root string) error {
	var st unix.Statfs_t
	parent := filepath.Dir(root)
	if err := unix.Statfs(parent, &st); err == nil && st.Type == unix.BPF_FS_MAGIC {
		return os.MkdirAll(root, 0o700)
	}
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", parent, err)
	}
	if err := unix.Mount("bpf", parent, "bpf", 0, ""); err != nil {
		return fmt.Errorf("%s is not on a bpf filesystem and mounting one failed (are you root?): %w", root, err)
	}
	return os.MkdirAll(root, 0o700)
}

// lockDir takes an exclusive flock on dir so that loaders and writers in
// other processes (50 plugin instances at once) take turns.
func lockDir(dir string) (func(), error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("open %s for locking: %w", dir, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return func() { _ = unix.Flock(int(f.Fd()), unix.LOCK_UN); f.Close() }, nil
}
