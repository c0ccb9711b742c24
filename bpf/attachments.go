package bpf

import (
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
)

// attachment is one idcni program attached now: a tcx link pinned under
// the root, or a legacy cls_bpf filter named with idcni's prefix.
type attachment struct {
	prog ebpf.ProgramID
	// device is the host veth or, for from_net, the uplink or tunnel:
	// the pin's name for a tcx link (the caller may be in another
	// network namespace than the device), the link's for a filter.
	device string
	// pod: on a pod's host veth (from_pod, to_pod), not from_net.
	pod bool
	// gone: a pinned tcx link whose device no longer exists; only its
	// pin keeps it.
	gone bool
	// pin is a tcx link's pin; filter and onLink a legacy filter's.
	pin    string
	filter *netlink.BpfFilter
	onLink string
}

func (a attachment) String() string {
	if a.pin != "" {
		return "tcx link " + a.pin
	}
	return "cls_bpf filter " + a.filter.Name + " on " + a.onLink
}

// attachments lists every idcni attachment: the tcx links pinned anywhere
// under root (progs aside), whatever build pinned them, and the legacy
// filters on every link of this network namespace. It reads no map of the
// datapath, so it answers for pins of any layout. Everything that asks
// what idcni has attached (--uninstall's refusal, the pins' garbage
// collection, taking off another build's programs) asks it.
func attachments(root string) ([]attachment, error) {
	var out []attachment
	err := filepath.WalkDir(root, func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			return nil // went meanwhile: nothing attached there
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
		info, err := l.Info()
		l.Close()
		if err != nil || info.TCX() == nil {
			return nil
		}
		rel, _ := filepath.Rel(root, path)
		dir, name := filepath.Split(rel)
		a := attachment{prog: info.Program, pin: path, gone: info.TCX().Ifindex == 0, device: name}
		// Pods' links are <root>/links/<veth>_<hook>; from_net's are
		// <root>/netlinks/<device>.
		if dir == "links/" {
			a.pod = true
			a.device, _, _ = strings.Cut(name, "_")
		}
		out = append(out, a)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list link pins under %s: %w", root, err)
	}
	links, err := listLinks()
	if err != nil {
		return nil, err
	}
	for _, l := range links {
		for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
			filters, err := netlink.FilterList(l, parent)
			if err != nil {
				continue // no clsact qdisc
			}
			for _, f := range filters {
				bf, ok := f.(*netlink.BpfFilter)
				if !ok || !strings.HasPrefix(bf.Name, legacyFilterPrefix) {
					continue
				}
				hook := strings.TrimPrefix(bf.Name, legacyFilterPrefix)
				out = append(out, attachment{
					prog: ebpf.ProgramID(bf.Id), device: l.Attrs().Name, filter: bf, onLink: l.Attrs().Name,
					pod: hook == progFromPod || hook == progToPod,
				})
			}
		}
	}
	return out, nil
}
