package bpf

import (
	"errors"
	"fmt"
	"log/slog"

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
	all, err := attachments(root)
	if err != nil {
		return err
	}
	var errs []error
	for _, a := range all {
		if own[a.prog] {
			continue
		}
		if a.filter != nil {
			if err := netlink.FilterDel(a.filter); err != nil {
				errs = append(errs, fmt.Errorf("delete %s: %w", a, err))
				continue
			}
			log.Warn("deleted a cls_bpf filter of a program this build does not have", "filter", a.filter.Name, "link", a.onLink)
			continue
		}
		l, err := link.LoadPinnedLink(a.pin, nil)
		if err != nil {
			continue // unpinned meanwhile
		}
		err = l.Unpin()
		l.Close()
		if err != nil {
			errs = append(errs, fmt.Errorf("unpin %s: %w", a.pin, err))
			continue
		}
		log.Warn("detached a program this build does not have: its packets take the stack and the pods' programs", "link", a.pin, "program", a.prog)
	}
	return errors.Join(errs...)
}
