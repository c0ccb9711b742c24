package cni

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"

	"github.com/idcni/idcni/bpf"
)

// CmdGC implements GC: every attachment of this network that the runtime
// does not list in cni.dev/valid-attachments is torn down as DEL would,
// whether the plugin knows it from a record or only from a link's alias.
// Endpoint entries whose host veth no longer exists are removed too, and
// finally IPAM gets the GC request so it can free reservations it holds for
// attachments the plugin never recorded.
func CmdGC(args *skel.CmdArgs) error {
	conf, err := LoadNetConf(args.StdinData)
	if err != nil {
		return err
	}
	valid := make(map[types.GCAttachment]bool, len(conf.ValidAttachments))
	for _, a := range conf.ValidAttachments {
		valid[a] = true
	}

	// Exclusive: an ADD in flight is not in the runtime's list yet, and
	// must not be judged stale.
	records, err := openRecords(conf.DataDir, conf.Name, true)
	if err != nil {
		return fmt.Errorf("idcni: %w", err)
	}
	defer records.Close()

	var errs []error
	recs, err := records.List()
	if err != nil {
		errs = append(errs, err)
	}
	done := make(map[types.GCAttachment]bool)
	for _, rec := range recs {
		att := types.GCAttachment{ContainerID: rec.ContainerID, IfName: rec.IfName}
		done[att] = true
		if valid[att] {
			continue
		}
		if err := teardown(conf, rec, func() error { return ipamDel(conf, args, rec) }); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := records.Delete(rec.ContainerID, rec.IfName); err != nil {
			errs = append(errs, err)
		}
	}

	// Links whose record was lost (a wiped data directory): the alias says
	// whose they are.
	links, err := netlinksafe.LinkList()
	if err != nil {
		errs = append(errs, fmt.Errorf("list links: %w", err))
	}
	for _, l := range links {
		cid, ifName, ok := parseLinkAlias(conf.Name, l.Attrs().Alias)
		att := types.GCAttachment{ContainerID: cid, IfName: ifName}
		if !ok || valid[att] || done[att] {
			continue
		}
		rec := &Record{Network: conf.Name, ContainerID: cid, IfName: ifName, HostIfName: l.Attrs().Name}
		if err := teardown(conf, rec, func() error { return ipamDel(conf, args, rec) }); err != nil {
			errs = append(errs, err)
		}
	}

	if err := gcOrphans(conf); err != nil {
		errs = append(errs, err)
	}

	if len(errs) > 0 {
		// IPAM's own GC would free the addresses of the attachments that
		// failed to tear down, while the datapath still names them.
		return fmt.Errorf("idcni: GC of network %q: %w", conf.Name, errors.Join(errs...))
	}
	if err := invoke.DelegateGC(context.Background(), conf.IPAM.Type, args.StdinData, nil); err != nil {
		return withPrefix(err, fmt.Sprintf("idcni: GC of IPAM plugin %q", conf.IPAM.Type))
	}
	return nil
}

// ipamDel releases a stale attachment's addresses. GC runs without
// CNI_CONTAINERID and CNI_IFNAME, so they are set for the IPAM plugin here.
func ipamDel(conf *NetConf, args *skel.CmdArgs, rec *Record) error {
	path, err := invoke.FindInPath(conf.IPAM.Type, filepath.SplitList(os.Getenv("CNI_PATH")))
	if err != nil {
		return fmt.Errorf("find IPAM plugin %q: %w", conf.IPAM.Type, err)
	}
	return invoke.ExecPluginWithoutResult(context.Background(), path, args.StdinData, &invoke.Args{
		Command:     "DEL",
		ContainerID: rec.ContainerID,
		IfName:      rec.IfName,
		Path:        os.Getenv("CNI_PATH"),
	}, nil)
}

// gcOrphans removes endpoint entries whose host veth is gone, with the
// ipcache entries of their addresses that no live endpoint holds, and the
// attachment pins of idcni veths that are gone. Such state is left when DEL
// never came for a pod whose netns disappeared and whose record was lost.
func gcOrphans(conf *NetConf) error {
	dp, err := bpf.Open(conf.BPFRoot)
	if errors.Is(err, bpf.ErrNotLoaded) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open the datapath under %s: %w", conf.BPFRoot, err)
	}
	defer dp.Close()
	// ADD creates a pod's conntrack table before its endpoint names it:
	// without the lock, GC could take that table for a leftover.
	unlock, err := dp.Lock()
	if err != nil {
		return err
	}
	defer unlock()
	eps, err := dp.Endpoints()
	if err != nil {
		return fmt.Errorf("list datapath endpoints: %w", err)
	}
	orphans := make(map[int]bpf.Endpoint)
	for idx, ep := range eps {
		if _, err := netlink.LinkByIndex(idx); isLinkNotFound(err) {
			orphans[idx] = ep
		}
	}
	var errs []error
	names, err := dp.AttachedInterfaces()
	if err != nil {
		errs = append(errs, err)
	}
	for _, name := range names {
		// Only idcni's own veths: a pin on another interface is someone
		// else's business.
		if !strings.HasPrefix(name, HostVethPrefix) {
			continue
		}
		if _, err := netlink.LinkByName(name); isLinkNotFound(err) {
			if err := dp.Detach(name); err != nil {
				errs = append(errs, err)
			}
		}
	}
	var gone []netip.Addr
	for idx, ep := range orphans {
		if err := dp.DeleteEndpoint(idx); err != nil {
			errs = append(errs, fmt.Errorf("delete orphaned endpoint entry of ifindex %d: %w", idx, err))
			continue
		}
		delete(eps, idx)
		gone = append(gone, ep.Addrs()...)
	}
	// The same rule as DEL's: a manual binding outlives its pod.
	if err := forgetAddrs(dp, eps, gone); err != nil {
		errs = append(errs, err)
	}
	// Conntrack tables no endpoint names: an ADD that died between
	// creating its table and writing its endpoint, or an endpoint deleted
	// by someone other than DEL.
	slots, err := dp.ConntrackSlots()
	if err != nil {
		errs = append(errs, err)
	}
	named := map[uint32]bool{}
	for _, ep := range eps {
		named[ep.ConntrackSlot] = true
	}
	for _, slot := range slots {
		if slot != 0 && !named[slot] {
			if err := dp.DeleteConntrackTable(slot); err != nil {
				errs = append(errs, err)
			}
		}
	}
	// Local pod entries whose endpoint is gone, or no longer holds the
	// address.
	locals, err := dp.LocalPods()
	if err != nil {
		errs = append(errs, err)
	}
	for a, lp := range locals {
		if ep, ok := eps[lp.Ifindex]; ok && ep.HoldsAny([]netip.Addr{a}) {
			continue
		}
		if err := dp.DeleteLocalPod(a, lp.Ifindex); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
