package bpf

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
)

// detachForeign takes off every idcni attachment whose program is not one
// of this build's, once the switch moved every attachment this build
// knows: what is left was attached by a build with a program this one does
// not have (a newer build's, after a rollback). Such a program goes on
// running on the maps it was loaded with, which no agent writes any more,
// so its policy would freeze where the other build left it. Taken off, the
// packets it handled take the node's stack and the pods' own programs,
// which this build runs. A link pinned under the root is unpinned (the pin
// is its last reference); a cls_bpf filter of ours is deleted.
func detachForeign(root string, ours []*ebpf.Program, log *slog.Logger) error {
	own := map[ebpf.ProgramID]bool{}
	for _, p := range ours {
		if p == nil {
			continue
		}
		info, err := p.Info()
		if err != nil {
			return fmt.Errorf("program info: %w", err)
		}
		if id, ok := info.ID(); ok {
			own[id] = true
		}
	}
	var errs []error
	walkErr := filepath.WalkDir(root, func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			return nil // a directory that went meanwhile: nothing to detach there
		}
		if e.IsDir() {
			if path != root && e.Name() == "progs" {
				return filepath.SkipDir
			}
			return nil
		}
		l, err := link.LoadPinnedLink(path, nil)
		if err != nil {
			return nil // a map, a program or the descriptor
		}
		defer l.Close()
		info, err := l.Info()
		if err != nil || own[info.Program] {
			return nil
		}
		if err := l.Unpin(); err != nil {
			errs = append(errs, fmt.Errorf("unpin %s: %w", path, err))
			return nil
		}
		log.Warn("detached a program this build does not have: its packets take the stack and the pods' programs", "link", path, "program", info.Program)
		return nil
	})
	if walkErr != nil {
		errs = append(errs, walkErr)
	}
	links, err := listLinks()
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, l := range links {
		for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
			filters, err := netlink.FilterList(l, parent)
			if err != nil {
				continue
			}
			for _, f := range filters {
				bf, ok := f.(*netlink.BpfFilter)
				if !ok || !strings.HasPrefix(bf.Name, legacyFilterPrefix) || own[ebpf.ProgramID(bf.Id)] {
					continue
				}
				if err := netlink.FilterDel(f); err != nil {
					errs = append(errs, fmt.Errorf("delete cls_bpf %s on %s: %w", bf.Name, l.Attrs().Name, err))
					continue
				}
				log.Warn("deleted a cls_bpf filter of a program this build does not have", "filter", bf.Name, "link", l.Attrs().Name)
			}
		}
	}
	return errors.Join(errs...)
}
