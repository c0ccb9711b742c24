package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// AttachMode chooses how programs are attached to a veth.
type AttachMode uint8

const (
	// AttachAuto uses tcx where the kernel has it (6.6+), else legacy.
	AttachAuto AttachMode = iota
	// AttachTCX uses tcx links, pinned under <root>/links.
	AttachTCX
	// AttachLegacy uses a clsact qdisc with direct-action cls_bpf filters.
	AttachLegacy
)

// ParseAttachMode accepts "", "auto", "tcx" and "legacy".
func ParseAttachMode(s string) (AttachMode, error) {
	switch s {
	case "", "auto":
		return AttachAuto, nil
	case "tcx":
		return AttachTCX, nil
	case "legacy":
		return AttachLegacy, nil
	}
	return AttachAuto, fmt.Errorf("unknown attach mode %q: want auto, tcx or legacy", s)
}

// Names of the legacy filters, so they can be found again.
const (
	legacyFilterPrefix = "idcni-"
	legacyPriority     = 1
	legacyHandle       = 1
)

type hook struct {
	suffix string
	tcx    ebpf.AttachType
	parent uint32 // legacy clsact parent
	prog   func(d *Datapath) *ebpf.Program
	name   string
}

var hooks = []hook{
	{"ingress", ebpf.AttachTCXIngress, netlink.HANDLE_MIN_INGRESS, func(d *Datapath) *ebpf.Program { return d.objs.FromPod }, progFromPod},
	{"egress", ebpf.AttachTCXEgress, netlink.HANDLE_MIN_EGRESS, func(d *Datapath) *ebpf.Program { return d.objs.ToPod }, progToPod},
}

// netHook is from_net on a device that carries routes to other nodes. Its
// links are pinned apart from the pods' (<root>/netlinks/<ifname>): they
// are not pods, so what lists attached pods (GC, --uninstall's refusal)
// does not see them.
var netHook = hook{"net", ebpf.AttachTCXIngress, netlink.HANDLE_MIN_INGRESS, func(d *Datapath) *ebpf.Program { return d.objs.FromNet }, progFromNet}

func (d *Datapath) linkPin(ifname, suffix string) string {
	if suffix == netHook.suffix {
		return filepath.Join(d.root, "netlinks", ifname)
	}
	return filepath.Join(d.root, "links", ifname+"_"+suffix)
}

// Attach puts from_pod on the TC ingress and to_pod on the TC egress of the
// host veth ifname. It is idempotent: an existing attachment is moved to the
// current programs in place, with no moment without a program.
func (d *Datapath) Attach(ifname string) error {
	return d.attach(ifname, hooks)
}

// AttachNet puts from_net on the TC ingress of ifname, a device that
// carries routes to other nodes' pods (the uplink, idcni_vxlan): packets
// from their pods to pods here are checked and delivered without the
// node's forwarding. Idempotent like Attach.
func (d *Datapath) AttachNet(ifname string) error {
	return d.attach(ifname, []hook{netHook})
}

func (d *Datapath) attach(ifname string, hs []hook) error {
	l, err := netlink.LinkByName(ifname)
	if err != nil {
		return fmt.Errorf("attach to %s: %w", ifname, err)
	}
	ifindex := l.Attrs().Index
	if d.mode != AttachLegacy {
		err := d.attachTCX(ifname, ifindex, hs)
		if err == nil || d.mode == AttachTCX || !errors.Is(err, ebpf.ErrNotSupported) {
			return err
		}
	}
	return d.attachLegacy(ifname, ifindex, hs)
}

func (d *Datapath) attachTCX(ifname string, ifindex int, hs []hook) error {
	for _, h := range hs {
		if err := os.MkdirAll(filepath.Dir(d.linkPin(ifname, h.suffix)), 0o700); err != nil {
			return fmt.Errorf("create link pin directory: %w", err)
		}
		pin := d.linkPin(ifname, h.suffix)
		if l, err := link.LoadPinnedLink(pin, nil); err == nil {
			info, ierr := l.Info()
			if ierr == nil && info.TCX() != nil && int(info.TCX().Ifindex) == ifindex {
				err := l.Update(h.prog(d))
				l.Close()
				if err != nil {
					return fmt.Errorf("update tcx %s program on %s: %w", h.suffix, ifname, err)
				}
				continue
			}
			// A pin left from an earlier interface of the same name.
			_ = l.Unpin()
			l.Close()
		}
		l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: h.prog(d), Attach: h.tcx})
		if err != nil {
			return fmt.Errorf("attach tcx %s to %s: %w", h.suffix, ifname, err)
		}
		err = l.Pin(pin)
		l.Close()
		if err != nil {
			return fmt.Errorf("pin tcx %s link of %s: %w", h.suffix, ifname, err)
		}
	}
	return nil
}

func (d *Datapath) attachLegacy(ifname string, ifindex int, hs []hook) error {
	qdisc := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}
	if err := netlink.QdiscReplace(qdisc); err != nil {
		return fmt.Errorf("add clsact qdisc to %s: %w", ifname, err)
	}
	for _, h := range hs {
		if err := netlink.FilterReplace(legacyFilter(ifindex, h, h.prog(d))); err != nil {
			return fmt.Errorf("attach cls_bpf %s to %s: %w", h.suffix, ifname, err)
		}
	}
	return nil
}

func legacyFilter(ifindex int, h hook, p *ebpf.Program) *netlink.BpfFilter {
	return &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex, Parent: h.parent, Handle: legacyHandle,
			Protocol: unix.ETH_P_ALL, Priority: legacyPriority,
		},
		Fd: p.FD(), Name: legacyFilterPrefix + h.name, DirectAction: true,
	}
}

// Detach removes the programs from ifname. It succeeds when nothing is
// attached and when the interface is already gone.
func (d *Datapath) Detach(ifname string) error {
	return d.detach(ifname, hooks)
}

// DetachNet removes from_net from ifname; like Detach, it succeeds when
// nothing is attached and when the device is gone.
func (d *Datapath) DetachNet(ifname string) error {
	return d.detach(ifname, []hook{netHook})
}

func (d *Datapath) detach(ifname string, hs []hook) error {
	var errs []error
	for _, h := range hs {
		pin := d.linkPin(ifname, h.suffix)
		l, err := link.LoadPinnedLink(pin, nil)
		if err == nil {
			errs = append(errs, l.Unpin())
			l.Close()
		} else if !errors.Is(err, os.ErrNotExist) {
			// An unreadable pin still must not outlive the pod.
			errs = append(errs, os.Remove(pin))
		}
	}
	if l, err := netlink.LinkByName(ifname); err == nil {
		for _, h := range hs {
			if f := findLegacy(l.Attrs().Index, h); f != nil {
				errs = append(errs, netlink.FilterDel(f))
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("detach from %s: %w", ifname, err)
	}
	return nil
}

func findLegacy(ifindex int, h hook) netlink.Filter {
	l := &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: ifindex}}
	filters, err := netlink.FilterList(l, h.parent)
	if err != nil {
		return nil
	}
	for _, f := range filters {
		if bf, ok := f.(*netlink.BpfFilter); ok && bf.Name == legacyFilterPrefix+h.name {
			return f
		}
	}
	return nil
}

// Attached reports whether both programs of this datapath are attached to
// ifname (by tcx or legacy).
func (d *Datapath) Attached(ifname string) (bool, error) {
	l, err := netlink.LinkByName(ifname)
	if err != nil {
		return false, fmt.Errorf("look up %s: %w", ifname, err)
	}
	ifindex := l.Attrs().Index
	for _, h := range hooks {
		wantID, err := programID(h.prog(d))
		if err != nil {
			return false, err
		}
		ok, err := d.attachedHook(ifname, ifindex, h, wantID)
		if err != nil || !ok {
			return false, err
		}
	}
	return true, nil
}

func (d *Datapath) attachedHook(ifname string, ifindex int, h hook, wantID ebpf.ProgramID) (bool, error) {
	if l, err := link.LoadPinnedLink(d.linkPin(ifname, h.suffix), nil); err == nil {
		defer l.Close()
		info, err := l.Info()
		if err != nil {
			return false, fmt.Errorf("tcx link info of %s: %w", ifname, err)
		}
		return info.TCX() != nil && int(info.TCX().Ifindex) == ifindex && info.Program == wantID, nil
	}
	f := findLegacy(ifindex, h)
	if f == nil {
		return false, nil
	}
	return f.(*netlink.BpfFilter).Id == int(wantID), nil
}

// AttachedInterfaces lists the interfaces with tcx pins under the root
// (legacy attachments leave no pins and go away with their veth).
func (d *Datapath) AttachedInterfaces() ([]string, error) {
	entries, err := os.ReadDir(filepath.Join(d.root, "links"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list link pins: %w", err)
	}
	seen := map[string]bool{}
	var out []string
	for _, e := range entries {
		name, _, ok := strings.Cut(e.Name(), "_")
		if ok && !seen[name] {
			seen[name] = true
			out = append(out, name)
		}
	}
	return out, nil
}

// replaceAttachments moves every tcx attachment under the root, and every
// legacy filter of ours, to the newly loaded programs: the kernel swaps the
// program atomically, so no packet passes unchecked during an upgrade.
func (d *Datapath) replaceAttachments() error {
	names, err := d.AttachedInterfaces()
	if err != nil {
		return err
	}
	for _, ifname := range names {
		for _, h := range hooks {
			if h.prog(d) == nil {
				continue // a handle of a build without this hook's program (a migration's undo)
			}
			if err := movePinnedLink(d.linkPin(ifname, h.suffix), h.prog(d)); err != nil {
				return fmt.Errorf("move tcx %s of %s to the new program: %w", h.suffix, ifname, err)
			}
		}
	}
	nets, err := d.NetLinks()
	if err != nil {
		return err
	}
	for _, ifname := range nets {
		// FromNet is nil in a handle of a build without it (a
		// migration's undo): the link stays as it is.
		if err := movePinnedLink(d.linkPin(ifname, netHook.suffix), d.objs.FromNet); err != nil {
			return fmt.Errorf("move tcx from_net of %s to the new program: %w", ifname, err)
		}
	}
	links, err := listLinks()
	if err != nil {
		return err
	}
	for _, l := range links {
		for _, h := range append(hooks[:len(hooks):len(hooks)], netHook) {
			if h.prog(d) == nil || findLegacy(l.Attrs().Index, h) == nil {
				continue
			}
			if err := netlink.FilterReplace(legacyFilter(l.Attrs().Index, h, h.prog(d))); err != nil {
				return fmt.Errorf("move cls_bpf %s of %s to the new program: %w", h.suffix, l.Attrs().Name, err)
			}
		}
	}
	return nil
}

// movePinnedLink moves the tcx link pinned at pin to p. A missing pin is
// nothing to move; the pin of a link whose device is gone is all that is
// left of it and goes; a nil p leaves a live link as it is.
func movePinnedLink(pin string, p *ebpf.Program) error {
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		return nil
	}
	defer l.Close()
	if info, err := l.Info(); err == nil && info.TCX() != nil && info.TCX().Ifindex == 0 {
		_ = l.Unpin()
		return nil
	}
	if p == nil {
		return nil
	}
	return l.Update(p)
}

// listLinks lists every link, retrying when the kernel interrupts the dump
// because links changed meanwhile (other pods come and go).
func listLinks() ([]netlink.Link, error) {
	var err error
	for try := 0; try < 10; try++ {
		var links []netlink.Link
		links, err = netlink.LinkList()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			if err != nil {
				return nil, fmt.Errorf("list links: %w", err)
			}
			return links, nil
		}
	}
	return nil, fmt.Errorf("list links: %w", err)
}

// ReopenPrograms makes this handle's programs the ones pinned now. A
// handle opened before an upgrade (Load with Replace, in the agent) holds
// the programs it replaced, and attaching those would leave a veth on the
// old program for good: the upgrade moved only the attachments it saw.
// Call it holding the root lock (Lock), which such an upgrade holds from
// its load to its last re-pin, and attach before letting go.
func (d *Datapath) ReopenPrograms() error {
	fresh := map[string]*ebpf.Program{}
	for _, name := range []string{progFromPod, progToPod, progFromNet} {
		p, err := ebpf.LoadPinnedProgram(filepath.Join(d.root, "progs", name), nil)
		if err != nil {
			for _, q := range fresh {
				q.Close()
			}
			return fmt.Errorf("open pinned program %s: %w", name, err)
		}
		fresh[name] = p
	}
	d.objs.FromPod.Close()
	d.objs.ToPod.Close()
	d.objs.FromNet.Close()
	d.objs.FromPod, d.objs.ToPod, d.objs.FromNet = fresh[progFromPod], fresh[progToPod], fresh[progFromNet]
	return nil
}

// AttachedIndex reports whether both programs of this handle are attached
// to the link at ifindex, asking the kernel rather than the pins: a tcx
// link detached or unpinned by someone else, or a legacy filter removed,
// shows here as missing, whatever the pins say.
func (d *Datapath) AttachedIndex(ifindex int) (bool, error) {
	missing, err := d.MissingHooks(ifindex)
	return err == nil && len(missing) == 0, err
}

// MissingHooks names the hooks ("ingress", "egress") of the link at
// ifindex where the kernel does not run this handle's program, by tcx or
// cls_bpf: empty when both run it.
func (d *Datapath) MissingHooks(ifindex int) ([]string, error) {
	return d.missingHooks(ifindex, hooks)
}

// AttachedNetIndex reports whether this handle's from_net is attached to
// the link at ifindex, asking the kernel like AttachedIndex.
func (d *Datapath) AttachedNetIndex(ifindex int) (bool, error) {
	missing, err := d.missingHooks(ifindex, []hook{netHook})
	return err == nil && len(missing) == 0, err
}

// NetLinks lists the devices from_net is pinned on under the root (tcx),
// whether or not they still exist: what the agent detaches when a device
// no longer carries routes to other nodes, or on --fast-path=false.
func (d *Datapath) NetLinks() ([]string, error) {
	entries, err := os.ReadDir(filepath.Join(d.root, "netlinks"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list from_net link pins: %w", err)
	}
	out := make([]string, 0, len(entries))
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out, nil
}

func (d *Datapath) missingHooks(ifindex int, hs []hook) ([]string, error) {
	return missingHooks(ifindex, hs, func(h hook) (ebpf.ProgramID, error) { return programID(h.prog(d)) })
}

// MissingPinnedHooks is MissingHooks for the pod programs pinned under
// root, whatever the layout of the pins: it opens no map, so it answers
// on the pins of another build too (a rollback's), which no Datapath of
// this build may open.
func MissingPinnedHooks(root string, ifindex int) ([]string, error) {
	if root == "" {
		root = DefaultRoot
	}
	return missingHooks(ifindex, hooks, func(h hook) (ebpf.ProgramID, error) {
		p, err := ebpf.LoadPinnedProgram(filepath.Join(root, "progs", h.name), nil)
		if err != nil {
			return 0, fmt.Errorf("open pinned program %s: %w", h.name, err)
		}
		defer p.Close()
		return programID(p)
	})
}

func programID(p *ebpf.Program) (ebpf.ProgramID, error) {
	info, err := p.Info()
	if err != nil {
		return 0, fmt.Errorf("program info: %w", err)
	}
	id, _ := info.ID()
	return id, nil
}

// missingHooks lists the hooks of hs at ifindex that do not run the
// program whose id want gives for them.
func missingHooks(ifindex int, hs []hook, want func(hook) (ebpf.ProgramID, error)) ([]string, error) {
	var missing []string
	for _, h := range hs {
		id, err := want(h)
		if err != nil {
			return nil, err
		}
		ok, err := attachedByKernel(ifindex, h, id)
		if err != nil {
			return nil, err
		}
		if !ok {
			missing = append(missing, h.suffix)
		}
	}
	return missing, nil
}

func attachedByKernel(ifindex int, h hook, want ebpf.ProgramID) (bool, error) {
	res, qerr := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: h.tcx})
	if qerr == nil {
		for _, p := range res.Programs {
			if p.ID == want {
				return true, nil
			}
		}
	}
	// A kernel without tcx (legacy mode) fails the query: the legacy
	// filter answers then, and the query's error only matters when it
	// does not.
	if f := findLegacy(ifindex, h); f != nil && f.(*netlink.BpfFilter).Id == int(want) {
		return true, nil
	}
	if qerr != nil && !errors.Is(qerr, ebpf.ErrNotSupported) {
		return false, fmt.Errorf("query tcx %s programs of ifindex %d: %w", h.suffix, ifindex, qerr)
	}
	return false, nil
}

// AttachedLinks lists the links that idcni programs under root are
// attached to now: tcx links pinned under root whose link still exists,
// and links with idcni's legacy filters. It needs no map of the datapath,
// so it answers for pins of any layout: what `--uninstall` detaches.
func AttachedLinks(root string) ([]string, error) {
	if root == "" {
		root = DefaultRoot
	}
	all, err := attachments(root)
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var out []string
	for _, a := range all {
		if a.pod && !a.gone && !seen[a.device] {
			seen[a.device] = true
			out = append(out, a.device)
		}
	}
	return out, nil
}

// RemoveNetFilters removes idcni's legacy from_net filters from every
// link. tcx attachments of from_net go with the pins (Unpin); legacy
// filters hold their program on the uplink until removed, so
// `--uninstall` calls this before removing the pins.
func RemoveNetFilters() error {
	links, err := listLinks()
	if err != nil {
		return err
	}
	var errs []error
	for _, l := range links {
		if f := findLegacy(l.Attrs().Index, netHook); f != nil {
			if err := netlink.FilterDel(f); err != nil {
				errs = append(errs, fmt.Errorf("remove from_net filter of %s: %w", l.Attrs().Name, err))
			}
		}
	}
	return errors.Join(errs...)
}
