package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"

	"github.com/idcni/idcni/bpf"
)

// fastPathDatapath is what the fast path does to the datapath; narrow so
// its planning and bookkeeping run without root in tests. *bpf.Datapath
// implements it.
type fastPathDatapath interface {
	SetRemoteCIDRs([]netip.Prefix) error
	AttachNet(ifname string) error
	DetachNet(ifname string) error
	AttachedNetIndex(ifindex int) (bool, error)
	NetLinks() ([]string, error)
	Lock() (unlock func(), err error)
	ReopenPrograms() error
}

var _ fastPathDatapath = (*bpf.Datapath)(nil)

// fastPath keeps the datapath's fast path between this node's pods and
// other nodes' equal to the routes the router has in place: their
// destinations are the remote pod ranges (remote_cidrs), the devices they
// name (the uplinks, idcni_vxlan) carry from_net. A range with no route
// is not in the map: from_pod would send its packets out by whatever
// route the FIB has, the default one included, past the masquerade.
// Owned by the writer loop.
type fastPath struct {
	dp    fastPathDatapath
	links hostLinks
	log   *slog.Logger
	// on is --fast-path; off, sync empties the map and detaches from_net
	// from every device an earlier run put it on.
	on bool
	// devices are the links from_net is on, by ifindex, as last synced:
	// what the attachment audit checks.
	devices map[int]string
	cidrs   []netip.Prefix
}

func newFastPath(dp fastPathDatapath, links hostLinks, log *slog.Logger, on bool) *fastPath {
	return &fastPath{dp: dp, links: links, log: log, on: on, devices: map[int]string{}}
}

// planFastPath is the fast path of the routes in place: their
// destinations, sorted, and the links they go out of.
func planFastPath(routes []nodeRoute) ([]netip.Prefix, []int) {
	var cidrs []netip.Prefix
	var devs []int
	for _, r := range routes {
		cidrs = append(cidrs, r.Dst)
		if !slices.Contains(devs, r.LinkIndex) {
			devs = append(devs, r.LinkIndex)
		}
	}
	slices.SortFunc(cidrs, comparePrefix)
	slices.Sort(devs)
	return cidrs, devs
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}

// sync makes the fast path the one of routes. from_net goes on the
// devices before the ranges go in the map, and the ranges out of it
// before from_net comes off a device: from_net takes a packet only from
// a range in the map, so one map write turns both directions of a node
// on or off at once, and netfilter never sees one direction of a flow
// without the other.
func (f *fastPath) sync(routes []nodeRoute) error {
	if !f.on {
		routes = nil
	}
	cidrs, idxs := planFastPath(routes)
	var errs []error
	devices := map[int]string{}
	for _, idx := range idxs {
		l, ok, err := f.links.ByIndex(idx)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if !ok {
			continue // gone since the routes were made; the next sync knows
		}
		if f.devices[idx] == l.Name {
			// On it since the last sync: the audit checks it is still
			// there, a Node event need not.
			devices[idx] = l.Name
			continue
		}
		if err := f.attach(l.Name); err != nil {
			errs = append(errs, fmt.Errorf("fast path: %w", err))
			continue
		}
		if _, had := f.devices[idx]; !had {
			f.log.Info("fast path: from_net attached", "dev", l.Name, "ifindex", idx)
		}
		devices[idx] = l.Name
	}
	// A range whose device has no from_net would be fast on this side
	// only: its route stays with the stack in both directions.
	kept := cidrs[:0:0]
	for _, r := range routes {
		if _, ok := devices[r.LinkIndex]; ok && !slices.Contains(kept, r.Dst) {
			kept = append(kept, r.Dst)
		}
	}
	slices.SortFunc(kept, comparePrefix)
	if err := f.dp.SetRemoteCIDRs(kept); err != nil {
		errs = append(errs, fmt.Errorf("fast path: %w", err))
	} else if !slices.Equal(kept, f.cidrs) {
		f.log.Info("fast path: remote pod ranges", "cidrs", kept)
		f.cidrs = kept
	}
	pinned, err := f.dp.NetLinks()
	if err != nil {
		errs = append(errs, fmt.Errorf("fast path: %w", err))
	}
	for _, name := range pinned {
		if slices.Contains(mapValues(devices), name) {
			continue
		}
		if err := f.dp.DetachNet(name); err != nil {
			errs = append(errs, fmt.Errorf("fast path: %w", err))
			continue
		}
		f.log.Info("fast path: from_net detached: the device carries no route to another node any more", "dev", name)
	}
	f.devices = devices
	return errors.Join(errs...)
}

func mapValues(m map[int]string) []string {
	out := make([]string, 0, len(m))
	for _, v := range m {
		out = append(out, v)
	}
	return out
}

// attach puts the programs pinned now on ifname under the root lock, as
// the pods' re-attachment does: a program replacement in between must not
// leave the device on the program it replaced.
func (f *fastPath) attach(ifname string) error {
	unlock, err := f.dp.Lock()
	if err != nil {
		return err
	}
	defer unlock()
	if err := f.dp.ReopenPrograms(); err != nil {
		return fmt.Errorf("open the current programs: %w", err)
	}
	return f.dp.AttachNet(ifname)
}

// audit checks that from_net is still on every device it was put on,
// asking the kernel, and attaches it again where it is not (a detach by
// hand, the pins removed, the device made again under its name); it
// returns how many it repaired and the devices it could not.
func (f *fastPath) audit() (repaired int, failed []string) {
	var byName map[string]int
	for idx, name := range f.devices {
		ok, err := f.dp.AttachedNetIndex(idx)
		if err == nil && ok {
			continue
		}
		if byName == nil {
			byName = map[string]int{}
			ls, err := f.links.List()
			if err != nil {
				f.log.Warn("fast path audit: list links", "err", err)
				return repaired, failed
			}
			for _, l := range ls {
				byName[l.Name] = l.Index
			}
		}
		now, exists := byName[name]
		if !exists {
			// Gone: its routes went with it, and the next route sync
			// takes its ranges out of the map.
			delete(f.devices, idx)
			continue
		}
		if err := f.attach(name); err != nil {
			f.log.Error("fast path: from_net is not on a device that carries routes to other nodes, and attaching it failed: packets from other nodes' pods go through the node's forwarding", "dev", name, "err", err)
			failed = append(failed, name)
			continue
		}
		delete(f.devices, idx)
		f.devices[now] = name
		f.log.Warn("fast path: from_net was not attached; attached it again", "dev", name, "ifindex", now)
		repaired++
	}
	return repaired, failed
}
