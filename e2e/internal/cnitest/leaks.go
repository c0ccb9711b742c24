package cnitest

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/cni"
)

// Leaks lists everything of the Env still on the node that a pod could have
// left: links (by alias and by the host veth names of pods), host routes and
// neighbour entries into the subnet, datapath endpoints and ipcache entries
// in the subnet, attachment pins, IPAM reservations and plugin records.
// Pass the pods the test used so their deterministic host veth names are
// checked too.
func (e *Env) Leaks(pods ...*Pod) []string {
	var out []string
	add := func(format string, a ...any) { out = append(out, fmt.Sprintf(format, a...)) }

	names := map[string]bool{}
	for _, p := range pods {
		names[cni.HostVethName(p.ContainerID, p.IfName)] = true
	}
	links, err := netlinksafe.LinkList()
	if err != nil {
		add("list links: %v", err)
	}
	for _, l := range links {
		a := l.Attrs()
		if strings.HasPrefix(a.Alias, "idcni/"+e.Network+"/") || names[a.Name] {
			add("link %s (alias %q)", a.Name, a.Alias)
		}
	}

	routes, err := netlinksafe.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{}, 0)
	if err != nil {
		add("list routes: %v", err)
	}
	for _, r := range routes {
		if r.Dst == nil {
			continue
		}
		a, _ := netip.AddrFromSlice(r.Dst.IP)
		if e.Contains(a.Unmap()) {
			add("route %s", r.Dst)
		}
	}
	var neighs []netlink.Neigh
	for range 5 {
		// Other tests change the table; an interrupted dump is retried.
		if neighs, err = netlink.NeighList(0, netlink.FAMILY_ALL); !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	if err != nil {
		add("list neighbours: %v", err)
	}
	for _, n := range neighs {
		if a, ok := netip.AddrFromSlice(n.IP); ok && e.Contains(a.Unmap()) && n.State&netlink.NUD_PERMANENT != 0 {
			add("permanent neighbour %s on ifindex %d", a, n.LinkIndex)
		}
	}

	out = append(out, e.datapathLeaks()...)

	// host-local keeps one file per reserved address, named by it.
	ipamNet := filepath.Join(e.IPAMDir, e.Network)
	if entries, err := os.ReadDir(ipamNet); err == nil {
		for _, ent := range entries {
			if _, err := netip.ParseAddr(ent.Name()); err == nil {
				add("IPAM reservation %s", filepath.Join(ipamNet, ent.Name()))
			}
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		add("read IPAM directory: %v", err)
	}

	recDir := filepath.Join(e.DataDir, e.Network)
	if entries, err := os.ReadDir(recDir); err == nil {
		for _, ent := range entries {
			if ent.Name() != "lock" {
				add("plugin record %s", filepath.Join(recDir, ent.Name()))
			}
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		add("read record directory: %v", err)
	}
	return out
}

func (e *Env) datapathLeaks() []string {
	var out []string
	add := func(format string, a ...any) { out = append(out, fmt.Sprintf(format, a...)) }
	dp, err := bpf.Open(e.BPFRoot)
	if errors.Is(err, bpf.ErrNotLoaded) {
		return nil
	}
	if err != nil {
		return []string{fmt.Sprintf("open datapath: %v", err)}
	}
	defer dp.Close()
	eps, err := dp.Endpoints()
	if err != nil {
		add("list endpoints: %v", err)
	}
	for idx, ep := range eps {
		// The root is private to the Env, so every endpoint is a leak.
		add("endpoint ifindex %d %+v", idx, ep)
	}
	ipc, err := dp.IPCache()
	if err != nil {
		add("list ipcache: %v", err)
	}
	for p, id := range ipc {
		if e.overlaps(p) {
			add("ipcache %s -> %s", p, id)
		}
	}
	locals, err := dp.LocalPods()
	if err != nil {
		add("list local pods: %v", err)
	}
	for a, lp := range locals {
		add("local pod %s -> ifindex %d", a, lp.Ifindex)
	}
	ifs, err := dp.AttachedInterfaces()
	if err != nil {
		add("list attachments: %v", err)
	}
	for _, name := range ifs {
		add("attachment pin of %s", name)
	}
	flows, err := dp.Conntrack()
	if err != nil {
		add("list conntrack: %v", err)
	}
	for _, f := range flows {
		if e.Contains(f.Src) || e.Contains(f.Dst) {
			add("conntrack flow %s -> %s", f.Src, f.Dst)
		}
	}
	// Every pod's own conntrack table goes with it; the shared one (slot
	// 0) stays with the datapath.
	slots, err := dp.ConntrackSlots()
	if err != nil {
		add("list conntrack tables: %v", err)
	}
	for _, slot := range slots {
		if slot != 0 {
			add("conntrack table in slot %d", slot)
		}
	}
	return out
}

// AssertNoLeaks fails the test with every leftover Leaks finds.
func (e *Env) AssertNoLeaks(t testing.TB, pods ...*Pod) {
	t.Helper()
	if l := e.Leaks(pods...); len(l) > 0 {
		t.Errorf("left behind:\n  %s", strings.Join(l, "\n  "))
	}
}
