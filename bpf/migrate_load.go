package bpf

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/cilium/ebpf"
)

// progFields are the programs pinned under <root>/progs, by pin name.
func (d *Datapath) progFields() map[string]**ebpf.Program {
	return map[string]**ebpf.Program{progFromPod: &d.objs.FromPod, progToPod: &d.objs.ToPod, progFromNet: &d.objs.FromNet}
}

// agentMigrates is what a build that must not migrate tells the operator.
const agentMigrates = "idcni-agent of this build migrates them when it starts (the DaemonSet's rollout does that first, on every node); " +
	"until then the plugin and the tools of the build that pinned them work on them"

// load makes the pins under the root this build's, in one transaction
// under the root lock (Load holds it), and opens them:
//
//  1. it plans each pinned map: kept as it is, created, or copied into a
//     map of this layout (planMove); it refuses what it cannot carry over
//     before touching anything;
//  2. it creates the new maps and fills them, unpinned, while the old
//     programs keep running on the old maps;
//  3. it loads this build's programs on the kept and the new maps;
//  4. it pins the new maps, the descriptor and the programs over the old
//     ones (each an atomic rename);
//  5. it moves every attachment to the new programs (tcx link update,
//     cls_bpf replace), so no packet meets a missing program, and no
//     program meets a map that is not filled;
//  6. it copies what the old programs added since step 2 (flows opened
//     meanwhile), and
//  7. only then lets go of the old maps and removes pins no attached
//     program uses.
//
// A failure up to step 5 leaves the old pins and programs in force: steps
// 4 and 5 are undone, and the error says what failed. Only a Replace (the
// agent's start) converts or adds to pins a program runs on; the plugin and
// the tools are told the agent does it.
func (d *Datapath) load(opts Options) (err error) {
	spec, err := d.spec(opts)
	if err != nil {
		return err
	}
	b := thisBuild
	if opts.build != nil {
		b = *opts.build
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	desc, err := readDescriptor(d.root)
	if err != nil {
		return err
	}
	from := pinnedLayoutVersion(desc)
	progsPinned := false
	for name := range d.progFields() {
		if _, err := os.Stat(filepath.Join(d.root, "progs", name)); err == nil {
			progsPinned = true
		}
	}
	mg := &migration{root: d.root, log: log, desc: desc, inners: map[ebpf.MapID]*innerCopy{}, faults: opts.faults}
	defer mg.close()

	// 1. The plan.
	var converted, created []string
	for _, name := range pinnedMapNames(spec) {
		want := spec.Maps[name]
		old, err := ebpf.LoadPinnedMap(filepath.Join(d.root, name), nil)
		if errors.Is(err, os.ErrNotExist) {
			old = nil
		} else if err != nil {
			return fmt.Errorf("open pinned map %s: %w", filepath.Join(d.root, name), err)
		}
		checkSize := opts.Replace || opts.sized(name)
		mv, err := b.planMove(name, filepath.Join(d.root, name), want, old, desc, checkSize)
		if err != nil {
			old.Close()
			return fmt.Errorf("%w; nothing was changed: the pins of layout %d under %s stay in force. "+
				"Run a build that can migrate them (see README \"Upgrading\"), or remove the pins with `idcni-agent --uninstall --force` (running pods lose enforcement until they are re-created)",
				err, from, d.root)
		}
		mg.moves = append(mg.moves, mv)
		switch {
		case mv.keep:
			if !checkSize {
				want.MaxEntries = old.MaxEntries()
			}
		case old == nil:
			created = append(created, name)
		default:
			converted = append(converted, name)
		}
	}
	if !opts.Replace && (len(converted) > 0 || (progsPinned && len(created) > 0)) {
		return fmt.Errorf("%w: the pins under %s are of layout %d and this build is of layout %d (maps to migrate: %s; to create: %s): %s",
			ErrLayoutMismatch, d.root, from, b.version, orNone(converted), orNone(created), agentMigrates)
	}
	if len(converted) > 0 {
		log.Info("migrating pinned maps to this build's layout", "root", d.root, "from", from, "to", b.version, "maps", converted, "new", created)
	}

	progNames := slices.Sorted(maps.Keys(d.progFields()))
	// Described before step 3 takes the pinning off the spec's maps.
	descMap, err := descriptorMap(b.descriptorOf(spec, progNames))
	if err != nil {
		return err
	}
	defer descMap.Close()

	// 2. The new maps, filled.
	began := time.Now()
	if err := mg.fill(); err != nil {
		return fmt.Errorf("migrate pins under %s from layout %d to %d: %w; nothing was changed: the pins and programs of layout %d stay in force", d.root, from, b.version, err, from)
	}

	filled := time.Since(began)

	// 3. This build's programs on them.
	repl := map[string]*ebpf.Map{}
	for _, mv := range mg.moves {
		repl[mv.name] = mv.current()
		spec.Maps[mv.name].Pinning = ebpf.PinNone
	}
	nd := &Datapath{root: d.root, mode: d.mode, ctTable: d.ctTable}
	if err := spec.LoadAndAssign(&nd.objs, &ebpf.CollectionOptions{MapReplacements: repl}); err != nil {
		return fmt.Errorf("load datapath: %w", err)
	}
	fail := func(step string, err error) error {
		nd.Close()
		return fmt.Errorf("migrate pins under %s from layout %d to %d: %s: %w; nothing was changed: the pins and programs of layout %d stay in force", d.root, from, b.version, step, err, from)
	}
	if err := nd.initConfig(); err != nil {
		return fail("initialise config", err)
	}
	if err := nd.initSharedConntrack(); err != nil {
		return fail("install the shared conntrack table", err)
	}

	// 4. The pins.
	undoPins, err := mg.swapPins(descMap)
	if err != nil {
		return fail("pin the new maps", err)
	}
	old := &Datapath{root: d.root, mode: d.mode}
	oldProgs := map[string]*ebpf.Program{}
	for name := range nd.progFields() {
		if p, err := ebpf.LoadPinnedProgram(filepath.Join(d.root, "progs", name), nil); err == nil {
			oldProgs[name] = p
		}
	}
	for name, dst := range old.progFields() {
		*dst = oldProgs[name]
	}
	defer old.Close()
	undoProgs := func() {
		for name := range nd.progFields() {
			path := filepath.Join(d.root, "progs", name)
			if p, ok := oldProgs[name]; ok {
				_ = repin(p, path)
			} else {
				_ = os.Remove(path)
			}
		}
	}
	if err := os.MkdirAll(filepath.Join(d.root, "progs"), 0o700); err != nil {
		undoPins()
		return fail("create program pin directory", err)
	}
	for name, p := range nd.progFields() {
		err := mg.faults.at("pin program " + name)
		if err == nil {
			err = repin(*p, filepath.Join(d.root, "progs", name))
		}
		if err != nil {
			undoProgs()
			undoPins()
			return fail("pin program "+name, err)
		}
	}

	// 5. The switch.
	err = nd.replaceAttachments()
	if err == nil {
		err = mg.faults.at("attach")
	}
	if err != nil {
		step := "move the attachments to this build's programs"
		// Back to the old programs, hook by hook where the old build
		// had one: a hook new in this build had no attachment to move.
		if len(oldProgs) > 0 {
			if rerr := old.replaceAttachments(); rerr != nil {
				err = fmt.Errorf("%w; moving them back to the old programs failed too: %w", err, rerr)
			}
		} else {
			err = fmt.Errorf("%w; no old programs are pinned, so the attachments moved stay on the new ones", err)
		}
		undoProgs()
		undoPins()
		return fail(step, err)
	}

	// Attachments of programs this build does not have (a newer build's,
	// on a rollback) would go on deciding on maps nobody writes.
	var ours []*ebpf.Program
	for _, p := range nd.progFields() {
		ours = append(ours, *p)
	}
	if err := detachForeign(d.root, ours, log); err != nil {
		log.Warn("taking off programs this build does not have failed", "root", d.root, "error", err)
	}

	// 6. What the old programs wrote meanwhile.
	if err := mg.faults.at("catch up"); err != nil {
		log.Warn("skipping the catch-up", "error", err)
	} else if err := mg.catchUp(); err != nil {
		log.Warn("copying the flows opened during the migration failed; those flows are checked again as new", "root", d.root, "error", err)
	}
	if slices.Contains(converted, "local_pods") {
		// Layout 4 appended the pod's conntrack slot; without it a pod's
		// entry still works, through its endpoint.
		if n, err := nd.fillLocalPodSlots(); err != nil {
			log.Warn("giving local pod entries their conntrack slot failed; those pods' packets from other nodes look their endpoint up as before", "root", d.root, "error", err)
		} else if n > 0 {
			log.Info("local pod entries given their conntrack slot", "root", d.root, "pods", n)
		}
	}
	if len(converted) > 0 {
		log.Info("migrated pinned maps; every attachment runs this build's programs", "root", d.root, "from", from, "to", b.version, "maps", converted,
			"copy", filled.Round(time.Millisecond), "total", time.Since(began).Round(time.Millisecond))
	}

	// 7. Pins nobody uses.
	keepMaps := map[string]bool{}
	for _, mv := range mg.moves {
		keepMaps[mv.name] = true
	}
	keepProgs := map[string]bool{}
	for _, name := range progNames {
		keepProgs[name] = true
	}
	if err := gcPins(d.root, keepMaps, keepProgs, log); err != nil {
		log.Warn("removing unused pins failed; they stay until the next start", "root", d.root, "error", err)
	}
	d.objs = nd.objs
	return nil
}

func orNone(names []string) string {
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ", ")
}
