package cni

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/desired"
)

// CmdCheck implements CHECK: it verifies that everything ADD set up is still
// in place, and lists every problem it finds, not only the first, so one
// run tells the person all that needs fixing.
func CmdCheck(args *skel.CmdArgs) error {
	conf, err := LoadNetConf(args.StdinData)
	if err != nil {
		return err
	}
	// The attachment first: a runtime that has none has no prevResult
	// either, and "no such attachment" is the news.
	records, err := openRecords(conf.DataDir, conf.Name, false)
	if err != nil {
		return fmt.Errorf("idcni: %w", err)
	}
	defer records.Close()
	rec, err := records.Get(args.ContainerID, args.IfName)
	if err != nil {
		return fmt.Errorf("idcni: %w", err)
	}
	if rec == nil || !rec.Complete {
		return types.NewError(types.ErrUnknownContainer,
			fmt.Sprintf("idcni: container %s has no interface %s in network %q: ADD never completed, or DEL already removed it", args.ContainerID, args.IfName, conf.Name), "")
	}

	if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
		return types.NewError(types.ErrDecodingFailure, "idcni: cannot parse prevResult", err.Error())
	}
	if conf.PrevResult == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "idcni: CHECK needs the prevResult of the ADD it checks, and the configuration has none", "")
	}
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, "idcni: cannot convert prevResult", err.Error())
	}

	if err := invoke.DelegateCheck(context.Background(), conf.IPAM.Type, args.StdinData, nil); err != nil {
		return withPrefix(err, fmt.Sprintf("idcni: IPAM plugin %q", conf.IPAM.Type))
	}

	c := &checker{conf: conf, rec: rec}
	c.comparePrevResult(prev)
	hostMAC, podMAC := c.checkHost(prev)
	c.checkPod(args.Netns, hostMAC, podMAC)
	c.checkDatapath(hostMAC, podMAC)
	if len(c.problems) > 0 {
		return types.NewError(types.ErrInternal,
			fmt.Sprintf("idcni: CHECK of container %s interface %s failed: %s", args.ContainerID, args.IfName, strings.Join(c.problems, "; ")),
			"delete and re-create the pod to repair its network")
	}
	return nil
}

type checker struct {
	conf     *NetConf
	rec      *Record
	problems []string
}

func (c *checker) fail(format string, a ...any) {
	c.problems = append(c.problems, fmt.Sprintf(format, a...))
}

// comparePrevResult checks that the runtime's idea of the attachment is the
// one the plugin recorded.
func (c *checker) comparePrevResult(prev *current.Result) {
	var got []netip.Addr
	for _, ipc := range prev.IPs {
		if a, ok := netip.AddrFromSlice(ipc.Address.IP); ok {
			got = append(got, a.Unmap())
		}
	}
	slices.SortFunc(got, netip.Addr.Compare)
	want := slices.SortedFunc(slices.Values(c.rec.Addresses), netip.Addr.Compare)
	if !slices.Equal(got, want) {
		c.fail("prevResult has addresses %v, but the plugin gave the pod %v", got, want)
	}
}

// macOf finds the MAC of an interface in prevResult.
func macOf(prev *current.Result, name, sandbox string) net.HardwareAddr {
	for _, i := range prev.Interfaces {
		if i.Name == name && i.Sandbox == sandbox {
			if m, err := net.ParseMAC(i.Mac); err == nil {
				return m
			}
		}
	}
	return nil
}

func (c *checker) checkHost(prev *current.Result) (hostMAC, podMAC net.HardwareAddr) {
	rec := c.rec
	podMAC = macOf(prev, rec.IfName, rec.Netns)
	st, err := lookupHostVeth(rec.HostIfName)
	if err != nil {
		c.fail("%v", err)
		return nil, podMAC
	}
	if st == nil {
		c.fail("host veth %s is missing", rec.HostIfName)
		return nil, podMAC
	}
	attrs := st.link.Attrs()
	hostMAC = attrs.HardwareAddr
	if want := linkAlias(c.conf.Name, rec.ContainerID, rec.IfName); st.alias != want {
		c.fail("host veth %s has alias %q, want %q: the link belongs to another attachment", rec.HostIfName, st.alias, want)
	}
	if attrs.Index != rec.HostIfIndex {
		c.fail("host veth %s has ifindex %d, but the datapath knows it as %d: it was re-created behind the plugin's back", rec.HostIfName, attrs.Index, rec.HostIfIndex)
	}
	if attrs.Flags&net.FlagUp == 0 {
		c.fail("host veth %s is down", rec.HostIfName)
	}
	if m := macOf(prev, rec.HostIfName, ""); m != nil && m.String() != hostMAC.String() {
		c.fail("host veth %s has MAC %s, prevResult says %s", rec.HostIfName, hostMAC, m)
	}
	for _, a := range rec.Addresses {
		if ok, err := hasRoute(st.link, desired.HostPrefix(a), netip.Addr{}); err != nil {
			c.fail("list routes of %s: %v", rec.HostIfName, err)
		} else if !ok {
			c.fail("host route %s dev %s is missing", desired.HostPrefix(a), rec.HostIfName)
		}
		if podMAC == nil {
			continue
		}
		if ok, err := hasPermanentNeigh(attrs.Index, a, podMAC); err != nil {
			c.fail("list neighbours of %s: %v", rec.HostIfName, err)
		} else if !ok {
			c.fail("permanent neighbour %s lladdr %s dev %s is missing on the host", a, podMAC, rec.HostIfName)
		}
	}
	return hostMAC, podMAC
}

func (c *checker) checkPod(netns string, hostMAC, podMAC net.HardwareAddr) {
	rec := c.rec
	podNS, err := ns.GetNS(netns)
	if err != nil {
		c.fail("cannot open the pod's netns %s: %v", netns, err)
		return
	}
	defer podNS.Close()
	err = podNS.Do(func(ns.NetNS) error {
		link, err := netlinksafe.LinkByName(rec.IfName)
		if err != nil {
			c.fail("%s is missing in the pod: %v", rec.IfName, err)
			return nil
		}
		attrs := link.Attrs()
		if attrs.Flags&net.FlagUp == 0 {
			c.fail("%s is down in the pod", rec.IfName)
		}
		if podMAC != nil && attrs.HardwareAddr.String() != podMAC.String() {
			c.fail("%s in the pod has MAC %s, prevResult says %s", rec.IfName, attrs.HardwareAddr, podMAC)
		}
		have, err := netlinksafe.AddrList(link, netlink.FAMILY_ALL)
		if err != nil {
			c.fail("list addresses of %s in the pod: %v", rec.IfName, err)
		}
		for _, a := range rec.Addresses {
			found := slices.ContainsFunc(have, func(h netlink.Addr) bool {
				ha, _ := netip.AddrFromSlice(h.IP)
				ones, _ := h.Mask.Size()
				return ha.Unmap() == a && ones == a.BitLen()
			})
			if !found {
				c.fail("address %s is missing on %s in the pod", desired.HostPrefix(a), rec.IfName)
			}
		}
		for _, gw := range gateways(rec.Addresses) {
			if hostMAC != nil {
				if ok, err := hasPermanentNeigh(attrs.Index, gw, hostMAC); err != nil {
					c.fail("list neighbours of %s in the pod: %v", rec.IfName, err)
				} else if !ok {
					c.fail("permanent neighbour %s lladdr %s (the gateway) is missing on %s in the pod", gw, hostMAC, rec.IfName)
				}
			}
			if ok, err := hasRoute(link, defaultRoute(gw), gw); err != nil {
				c.fail("list routes of %s in the pod: %v", rec.IfName, err)
			} else if !ok {
				c.fail("default route via %s dev %s is missing in the pod", gw, rec.IfName)
			}
		}
		return nil
	})
	if err != nil {
		c.fail("enter the pod's netns %s: %v", netns, err)
	}
}

// checkDatapath checks the attachment and the map entries. hostMAC is nil
// when the host veth is missing: then there is no attachment to look at.
func (c *checker) checkDatapath(hostMAC, podMAC net.HardwareAddr) {
	rec := c.rec
	dp, err := bpf.Open(c.conf.BPFRoot)
	if errors.Is(err, bpf.ErrNotLoaded) {
		c.fail("the datapath is not loaded under %s, so nothing polices the pod", c.conf.BPFRoot)
		return
	}
	if err != nil {
		c.fail("open the datapath under %s: %v", c.conf.BPFRoot, err)
		return
	}
	defer dp.Close()

	if hostMAC != nil {
		// The kernel, not the pins: a link unpinned, a filter removed or
		// a program replaced by someone else shows only there.
		if missing, err := dp.MissingHooks(rec.HostIfIndex); err != nil {
			c.fail("ask the kernel which programs run on %s: %v", rec.HostIfName, err)
		} else if len(missing) > 0 {
			c.fail("the idcni TC programs are not attached to host veth %s: the kernel runs no current idcni program (tcx or cls_bpf) at its %s hook, so the pod's traffic is not policed", rec.HostIfName, strings.Join(missing, " and "))
		}
	}

	ep, ok, err := dp.Endpoint(rec.HostIfIndex)
	switch {
	case err != nil:
		c.fail("read endpoint entry of ifindex %d: %v", rec.HostIfIndex, err)
		return
	case !ok:
		c.fail("the datapath has no endpoint entry for host veth %s (ifindex %d)", rec.HostIfName, rec.HostIfIndex)
		return
	}
	if got, want := ep.Addrs(), rec.Addresses; !slices.Equal(slices.SortedFunc(slices.Values(got), netip.Addr.Compare), slices.SortedFunc(slices.Values(want), netip.Addr.Compare)) {
		c.fail("the endpoint entry of ifindex %d has addresses %v, want %v", rec.HostIfIndex, got, want)
	}
	c.checkLocal(dp, ep.ConntrackSlot, hostMAC, podMAC)
	for _, a := range rec.Addresses {
		id, ok, err := dp.IPCacheLookup(a)
		switch {
		case err != nil:
			c.fail("look up %s in the ipcache: %v", a, err)
		case !ok:
			c.fail("the ipcache has no entry for %s", a)
		case id != ep.Identity:
			c.fail("the ipcache maps %s to identity %s, but its endpoint has identity %s", a, id, ep.Identity)
		}
	}
}

// checkLocal checks the local pod entries of the pod's addresses: with
// direct local delivery each names the host veth, both MAC addresses
// (where CHECK knows them) and the endpoint's conntrack slot (or none, as
// pin layout 3 wrote them); with routed delivery none names the pod.
func (c *checker) checkLocal(dp *bpf.Datapath, slot uint32, hostMAC, podMAC net.HardwareAddr) {
	rec := c.rec
	locals, err := dp.LocalPods()
	if err != nil {
		c.fail("%v", err)
		return
	}
	for _, a := range rec.Addresses {
		lp, ok := locals[a]
		if c.conf.LocalDelivery == LocalRouted {
			if ok && lp.Ifindex == rec.HostIfIndex {
				c.fail("the datapath delivers packets for %s directly to host veth %s, but this network routes them", a, rec.HostIfName)
			}
			continue
		}
		switch {
		case !ok:
			c.fail("the datapath has no local pod entry for %s, so pods of this node reach it only through routing", a)
		case lp.Ifindex != rec.HostIfIndex:
			c.fail("the local pod entry of %s names ifindex %d, not host veth %s (ifindex %d)", a, lp.Ifindex, rec.HostIfName, rec.HostIfIndex)
		case hostMAC != nil && lp.HostMAC.String() != hostMAC.String():
			c.fail("the local pod entry of %s has host MAC %s, host veth %s has %s", a, lp.HostMAC, rec.HostIfName, hostMAC)
		case podMAC != nil && lp.MAC.String() != podMAC.String():
			c.fail("the local pod entry of %s has pod MAC %s, prevResult says %s", a, lp.MAC, podMAC)
		case lp.ConntrackSlot != 0 && lp.ConntrackSlot != slot:
			c.fail("the local pod entry of %s names conntrack slot %d, but its endpoint's is %d: packets from other nodes would miss the pod's flows", a, lp.ConntrackSlot, slot)
		}
	}
}
