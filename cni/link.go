package cni

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"

	"github.com/containernetworking/plugins/pkg/ip"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/utils/sysctl"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/idcni/idcni/desired"
)

// The pod's gateway is a link-local address that exists nowhere: the pod
// resolves it to the host veth's MAC through a permanent neighbour entry, so
// every packet the pod sends goes to the host veth, where the TC programs
// see it, without giving the host veth an address of the pod's subnet (the
// scheme Calico uses).
var (
	gatewayV4 = netip.MustParseAddr("169.254.1.1")
	gatewayV6 = netip.MustParseAddr("fe80::1")
)

func gatewayFor(a netip.Addr) netip.Addr {
	if a.Is4() {
		return gatewayV4
	}
	return gatewayV6
}

func family(a netip.Addr) int {
	if a.Is4() {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func isLinkNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, unix.ENODEV)
}

// createVeth makes the veth pair from inside the pod's netns and moves the
// host end out, so the pod end never exists in the host netns under a name
// that could clash. The host end is named in advance; if that name is
// taken, nothing is created.
func createVeth(podNS ns.NetNS, ifName, hostName string, mtu int) (host, pod net.Interface, err error) {
	hostNS, err := ns.GetCurrentNS()
	if err != nil {
		return host, pod, fmt.Errorf("open host netns: %w", err)
	}
	defer hostNS.Close()
	err = podNS.Do(func(ns.NetNS) error {
		var err error
		host, pod, err = ip.SetupVethWithName(ifName, hostName, mtu, "", hostNS)
		return err
	})
	if err != nil {
		return host, pod, fmt.Errorf("create veth pair %s (pod) / %s (host): %w", ifName, hostName, err)
	}
	return host, pod, nil
}

// deleteHostVeth removes the host end of an attachment's veth pair, which
// takes the pod end, and every route and neighbour entry on either end,
// with it. A link that is already gone is not an error: the kernel deletes
// the pair by itself when the pod's netns goes away.
func deleteHostVeth(name string) error {
	link, err := netlinksafe.LinkByName(name)
	if isLinkNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("look up host veth %s: %w", name, err)
	}
	if _, ok := link.(*netlink.Veth); !ok {
		return fmt.Errorf("%s is a %s, not a veth: refusing to delete a link idcni did not create", name, link.Type())
	}
	if err := netlink.LinkDel(link); err != nil && !isLinkNotFound(err) {
		return fmt.Errorf("delete host veth %s: %w", name, err)
	}
	return nil
}

// configureHost sets up the host end: an alias naming the attachment, one
// route per pod address through the veth, and a permanent neighbour entry
// per address so the host never has to resolve the pod (and no ARP has to
// pass the TC programs for host-to-pod traffic to work).
func configureHost(hostName, alias string, podMAC net.HardwareAddr, addrs []netip.Addr) (netlink.Link, error) {
	link, err := netlinksafe.LinkByName(hostName)
	if err != nil {
		return nil, fmt.Errorf("look up host veth %s: %w", hostName, err)
	}
	if err := netlink.LinkSetAlias(link, alias); err != nil {
		return nil, fmt.Errorf("set alias of host veth %s: %w", hostName, err)
	}
	// A pod must not be able to give the node routes: with accept_ra 1
	// (the default while IPv6 forwarding is off, e.g. with IPv4 pods
	// only) or 2, the node would take a router advertisement the pod
	// sends (neighbour discovery passes the datapath) and route its own
	// traffic through the pod. No IPv6 on the link means nothing to do.
	if err := os.WriteFile(ipv6Conf+hostName+"/accept_ra", []byte("0"), 0o644); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("turn router advertisements off on host veth %s: %w", hostName, err)
	}
	for _, a := range addrs {
		if a.Is6() {
			// The kernel may have turned IPv6 off on new links; the
			// neighbour entry below needs it.
			if _, err := sysctl.Sysctl(fmt.Sprintf("net/ipv6/conf/%s/disable_ipv6", hostName), "0"); err != nil {
				return nil, fmt.Errorf("enable IPv6 on host veth %s: %w", hostName, err)
			}
		}
		r := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: ipNet(desired.HostPrefix(a)), Family: family(a)}
		if a.Is4() {
			r.Scope = netlink.SCOPE_LINK
		}
		// RouteAdd, not RouteReplace: an existing route to the address
		// means some other link holds it, and taking it would cut that
		// pod off.
		if err := netlink.RouteAdd(r); err != nil {
			if errors.Is(err, unix.EEXIST) {
				return nil, fmt.Errorf("a route to %s already exists on this host: another pod or a leftover of one holds the address IPAM handed out; find it with `ip route show %s`", desired.HostPrefix(a), a)
			}
			return nil, fmt.Errorf("add route %s dev %s: %w", desired.HostPrefix(a), hostName, err)
		}
		n := &netlink.Neigh{LinkIndex: link.Attrs().Index, Family: family(a), State: netlink.NUD_PERMANENT, IP: a.AsSlice(), HardwareAddr: podMAC}
		if err := netlink.NeighSet(n); err != nil {
			return nil, fmt.Errorf("add neighbour %s lladdr %s dev %s: %w", a, podMAC, hostName, err)
		}
	}
	return link, nil
}

// enableForwarding turns on routing for the families the pod uses; without
// it the host drops everything the pod sends to anyone but the host.
func enableForwarding(addrs []netip.Addr) error {
	if slices.ContainsFunc(addrs, netip.Addr.Is4) {
		if err := ip.EnableIP4Forward(); err != nil {
			return fmt.Errorf("enable net.ipv4.ip_forward: %w", err)
		}
	}
	if slices.ContainsFunc(addrs, netip.Addr.Is6) {
		if err := enableIPv6Forwarding(); err != nil {
			return err
		}
	}
	return nil
}

const ipv6Conf = "/proc/sys/net/ipv6/conf/"

// aliasPrefix starts the alias of every host veth (see linkAlias).
const aliasPrefix = "idcni/"

// enableIPv6Forwarding sets net.ipv6.conf.all.forwarding without taking
// the node's IPv6 default route away.
//
// Turning any IPv6 forwarding switch on (all, or a single interface's)
// makes the kernel delete every route learned from router advertisements
// (rt6_purge_dflt_routers), in the whole netns, on each interface whose
// accept_ra is not 2, and stop accepting advertisements there: a node that
// got its default route by SLAAC loses IPv6 egress, its pods' included.
// The per-interface switch is no way out: it only says whether the
// interface acts as a router (and purges as well); whether the kernel
// forwards is all.forwarding alone, before 6.17, and after it, also a
// per-interface force_forwarding, which would be needed on every interface
// replies to pods come in by (uplinks, tunnels, links added later), which
// the plugin does not know. So: accept_ra=2 ("accept advertisements even
// when forwarding") on every interface that accepts them now, then
// all.forwarding=1. Those interfaces keep their routes and go on taking
// advertisements, as before; an interface with accept_ra 0 stays so.
// Nothing is written when forwarding is on already: writing 1 again
// would purge again, and an operator who turned it on chose already.
func enableIPv6Forwarding() error {
	cur, err := os.ReadFile(ipv6Conf + "all/forwarding")
	if errors.Is(err, os.ErrNotExist) {
		return errors.New("enable IPv6 forwarding: the kernel has no IPv6 (no " + ipv6Conf + "), yet the pod has an IPv6 address")
	}
	if err != nil {
		return fmt.Errorf("read net.ipv6.conf.all.forwarding: %w", err)
	}
	if strings.TrimSpace(string(cur)) == "1" {
		return nil
	}
	links, err := netlinksafe.LinkList()
	if err != nil {
		return fmt.Errorf("list links to keep their router advertisements: %w", err)
	}
	for _, l := range links {
		attrs := l.Attrs()
		// Host veths face pods: a pod must never be a router of the
		// node (configureHost turns advertisements off on them).
		if strings.HasPrefix(attrs.Alias, aliasPrefix) || attrs.Flags&net.FlagLoopback != 0 {
			continue
		}
		path := ipv6Conf + attrs.Name + "/accept_ra"
		v, err := os.ReadFile(path)
		if errors.Is(err, os.ErrNotExist) {
			continue // no IPv6 on this link, or it just went away
		}
		if err != nil {
			return fmt.Errorf("read net.ipv6.conf.%s.accept_ra: %w", attrs.Name, err)
		}
		if strings.TrimSpace(string(v)) != "1" {
			continue
		}
		if err := os.WriteFile(path, []byte("2"), 0o644); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("set net.ipv6.conf.%s.accept_ra=2 before enabling IPv6 forwarding, so the link keeps its router advertisements: %w", attrs.Name, err)
		}
	}
	if err := os.WriteFile(ipv6Conf+"all/forwarding", []byte("1"), 0o644); err != nil {
		return fmt.Errorf("enable net.ipv6.conf.all.forwarding: %w", err)
	}
	return nil
}

// configurePod gives the pod end its addresses (/32, /128), the link-local
// gateway and the routes through it. extra are IPAM's routes besides the
// default one.
func configurePod(podNS ns.NetNS, ifName string, hostMAC net.HardwareAddr, addrs []netip.Addr, extra []netip.Prefix) error {
	return podNS.Do(func(ns.NetNS) error {
		link, err := netlinksafe.LinkByName(ifName)
		if err != nil {
			return fmt.Errorf("look up %s in the pod: %w", ifName, err)
		}
		idx := link.Attrs().Index
		if slices.ContainsFunc(addrs, netip.Addr.Is6) {
			if _, err := sysctl.Sysctl(fmt.Sprintf("net/ipv6/conf/%s/disable_ipv6", ifName), "0"); err != nil {
				return fmt.Errorf("enable IPv6 on %s in the pod: %w", ifName, err)
			}
		}
		if err := netlink.LinkSetUp(link); err != nil {
			return fmt.Errorf("set %s up in the pod: %w", ifName, err)
		}
		for _, a := range addrs {
			addr := &netlink.Addr{IPNet: ipNet(desired.HostPrefix(a))}
			if a.Is6() {
				// The address is the pod's alone; waiting a second for
				// duplicate detection would only delay the pod.
				addr.Flags = unix.IFA_F_NODAD
			}
			if err := netlink.AddrAdd(link, addr); err != nil {
				return fmt.Errorf("add address %s to %s in the pod: %w", desired.HostPrefix(a), ifName, err)
			}
		}
		for _, gw := range gateways(addrs) {
			n := &netlink.Neigh{LinkIndex: idx, Family: family(gw), State: netlink.NUD_PERMANENT, IP: gw.AsSlice(), HardwareAddr: hostMAC}
			if err := netlink.NeighSet(n); err != nil {
				return fmt.Errorf("add neighbour %s lladdr %s dev %s in the pod: %w", gw, hostMAC, ifName, err)
			}
			if gw.Is4() {
				// An IPv4 gateway must be reachable by a route of its
				// own; fe80::/64 already is for IPv6.
				r := &netlink.Route{LinkIndex: idx, Dst: ipNet(desired.HostPrefix(gw)), Scope: netlink.SCOPE_LINK}
				if err := netlink.RouteAdd(r); err != nil {
					return fmt.Errorf("add route %s dev %s in the pod: %w", gw, ifName, err)
				}
			}
		}
		for _, dst := range podRoutes(addrs, extra) {
			gw := gatewayFor(dst.Addr())
			r := &netlink.Route{LinkIndex: idx, Dst: ipNet(dst), Gw: gw.AsSlice(), Family: family(gw)}
			if err := netlink.RouteAdd(r); err != nil {
				return fmt.Errorf("add route %s via %s dev %s in the pod: %w", dst, gw, ifName, err)
			}
		}
		return nil
	})
}

// gateways returns the link-local gateway of each family the pod has.
func gateways(addrs []netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, a := range addrs {
		if gw := gatewayFor(a); !slices.Contains(out, gw) {
			out = append(out, gw)
		}
	}
	return out
}

// podRoutes returns the pod's routes: a default route per family it has,
// plus IPAM's other routes of those families (all through the gateway, as
// the host is the pod's only neighbour).
func podRoutes(addrs []netip.Addr, extra []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, gw := range gateways(addrs) {
		out = append(out, defaultRoute(gw))
	}
	for _, p := range extra {
		p = p.Masked()
		fam := slices.ContainsFunc(addrs, func(a netip.Addr) bool { return a.Is4() == p.Addr().Is4() })
		if fam && !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out
}

// defaultRoute is 0.0.0.0/0 or ::/0, in the family of a.
func defaultRoute(a netip.Addr) netip.Prefix {
	if a.Is4() {
		return netip.PrefixFrom(netip.IPv4Unspecified(), 0)
	}
	return netip.PrefixFrom(netip.IPv6Unspecified(), 0)
}

// hostLinkState is what CHECK and DEL learn about a host veth.
type hostLinkState struct {
	link  netlink.Link
	alias string
}

// lookupHostVeth returns the host veth, or nil if it does not exist.
func lookupHostVeth(name string) (*hostLinkState, error) {
	link, err := netlinksafe.LinkByName(name)
	if isLinkNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("look up host veth %s: %w", name, err)
	}
	return &hostLinkState{link: link, alias: link.Attrs().Alias}, nil
}

// neighbours lists the neighbour entries of a link, retrying dumps the
// kernel interrupted because the table changed under them.
func neighbours(linkIndex, fam int) ([]netlink.Neigh, error) {
	var err error
	for range 5 {
		var ns []netlink.Neigh
		ns, err = netlink.NeighList(linkIndex, fam)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return ns, err
		}
	}
	return nil, err
}

// hasPermanentNeigh reports whether the link has a permanent neighbour entry
// for a resolving to mac.
func hasPermanentNeigh(linkIndex int, a netip.Addr, mac net.HardwareAddr) (bool, error) {
	ns, err := neighbours(linkIndex, family(a))
	if err != nil {
		return false, err
	}
	for _, n := range ns {
		na, _ := netip.AddrFromSlice(n.IP)
		if na.Unmap() == a && n.State&netlink.NUD_PERMANENT != 0 && n.HardwareAddr.String() == mac.String() {
			return true, nil
		}
	}
	return false, nil
}

// hasRoute reports whether the link carries a route to dst (through gw, if
// gw is valid).
func hasRoute(link netlink.Link, dst netip.Prefix, gw netip.Addr) (bool, error) {
	routes, err := netlinksafe.RouteList(link, family(dst.Addr()))
	if err != nil {
		return false, err
	}
	for _, r := range routes {
		var rd netip.Prefix
		if r.Dst == nil {
			rd = defaultRoute(dst.Addr())
		} else {
			a, _ := netip.AddrFromSlice(r.Dst.IP)
			ones, _ := r.Dst.Mask.Size()
			rd = netip.PrefixFrom(a.Unmap(), ones)
		}
		if rd != dst {
			continue
		}
		if !gw.IsValid() {
			return true, nil
		}
		rgw, _ := netip.AddrFromSlice(r.Gw)
		if rgw.Unmap() == gw {
			return true, nil
		}
	}
	return false, nil
}
