package agent

import (
	"cmp"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
)

// RouteProtocol is the routing protocol number (rtm_protocol) on every
// route the agent makes, and the only routes it ever changes or removes are
// those with it: a route anyone else made (the administrator's, a routing
// daemon's, the kernel's) is never touched, even to a destination the agent
// wants. 157 is in no list this agent knows of: not the kernel's own 0-4
// (unspec, redirect, kernel, boot, static), not one of iproute2's named
// protocols (rt_protos: 8-18, 42 babel, 99 openr, 186-192 bgp, isis, ospf,
// rip, eigrp), and not the numbers other CNIs mark their routes with.
// `ip route show proto 157` lists them.
const RouteProtocol = 157

// nodeRoute is a route to another node's pod CIDR: directly through that
// node's InternalIP, on the link of this node that is on the same subnet,
// or through the vxlan device (tunnel.go), Onlink for an IPv4 next hop.
type nodeRoute struct {
	Dst       netip.Prefix
	Via       netip.Addr
	LinkIndex int
	Onlink    bool
}

func (r nodeRoute) String() string {
	s := fmt.Sprintf("%s via %s dev #%d", r.Dst, r.Via, r.LinkIndex)
	if r.Onlink {
		s += " onlink"
	}
	return s
}

// tunnelLink stands for the vxlan device's index in a planned route until
// the device exists.
const tunnelLink = -1

// connectedNet is a subnet an address of this node is on: Addr is the
// address, Prefix its subnet, MTU its link's.
type connectedNet struct {
	Prefix    netip.Prefix
	Addr      netip.Addr
	LinkIndex int
	MTU       int
}

// errRouteExists is Add's answer when a route to the destination exists
// already (one the agent did not make: its own it replaces).
var errRouteExists = errors.New("a route to the destination exists")

// routeTable is the agent's view of the main routing table of its netns,
// narrow so the router runs without root in tests.
type routeTable interface {
	// Connected returns the subnets of this node's addresses (global
	// scope, shorter than a host prefix).
	Connected() ([]connectedNet, error)
	// Owned returns the routes of the main table with RouteProtocol.
	Owned() ([]nodeRoute, error)
	// Add adds r with RouteProtocol; errRouteExists when a route to
	// r.Dst is there.
	Add(r nodeRoute) error
	// Replace changes the agent's own route to r.Dst into r.
	Replace(r nodeRoute) error
	// Delete removes r, only if it has RouteProtocol.
	Delete(r nodeRoute) error

	// EnsureTunnel makes the vxlan device as spec says and returns its
	// index; RemoveTunnel deletes it (no device is no error).
	EnsureTunnel(spec tunnelSpec) (int, error)
	RemoveTunnel() (removed bool, err error)
	// TunnelEntries returns the device's permanent neighbours and FDB
	// entries; AddTunnelEntry writes (or replaces) one, DeleteTunnelEntry
	// removes one.
	TunnelEntries(index int) ([]tunnelEntry, error)
	AddTunnelEntry(index int, e tunnelEntry) error
	DeleteTunnelEntry(index int, e tunnelEntry) error
}

// peerNode is what the routes need of another node.
type peerNode struct {
	name  string
	cidrs []netip.Prefix
	addrs []netip.Addr // InternalIPs
}

// nodeAddrsOf returns a Node's addresses of the given types, unmapped;
// unparsable ones are left out.
func nodeAddrsOf(n *corev1.Node, types ...corev1.NodeAddressType) []netip.Addr {
	var out []netip.Addr
	for _, na := range n.Status.Addresses {
		if !slices.Contains(types, na.Type) {
			continue
		}
		if addr, err := netip.ParseAddr(na.Address); err == nil {
			out = append(out, addr.Unmap())
		}
	}
	return out
}

// internalIPs returns a Node's InternalIPs.
func internalIPs(n *corev1.Node) []netip.Addr { return nodeAddrsOf(n, corev1.NodeInternalIP) }

// hostAddrs returns every address a Node names that is the node itself
// (InternalIPs and ExternalIPs).
func hostAddrs(n *corev1.Node) []netip.Addr {
	return nodeAddrsOf(n, corev1.NodeInternalIP, corev1.NodeExternalIP)
}

// peerNodes returns every other node with its pod CIDRs and InternalIPs.
func peerNodes(nodes []*corev1.Node, local string) []peerNode {
	var out []peerNode
	for _, n := range nodes {
		if n.Name == local {
			continue
		}
		out = append(out, peerNode{name: n.Name, cidrs: podCIDRsOf(n), addrs: internalIPs(n)})
	}
	slices.SortFunc(out, func(a, b peerNode) int { return cmp.Compare(a.name, b.name) })
	return out
}

// selfNode is what the routes need of this node.
type selfNode struct {
	cidrs    []netip.Prefix // its pod CIDRs
	addrs    []netip.Addr   // every address its Node names (InternalIP, ExternalIP)
	internal []netip.Addr   // its InternalIPs
}

// tunnelUnderlay is this node's tunnel endpoint among its InternalIPs: the
// IPv4 one if there is one (it carries IPv6 pod CIDRs too, with 20 bytes
// less overhead), else the first IPv6 one; invalid with none.
func tunnelUnderlay(internal []netip.Addr) netip.Addr {
	for _, a := range internal {
		if a.Is4() {
			return a
		}
	}
	for _, a := range internal {
		if a.Is6() {
			return a
		}
	}
	return netip.Addr{}
}

// uplinkOf is the connected subnet holding addr, the link an underlay
// address is on.
func uplinkOf(connected []connectedNet, addr netip.Addr) (connectedNet, bool) {
	for _, c := range connected {
		if c.Addr == addr {
			return c, true
		}
	}
	return connectedNet{}, false
}

// nodeRouter keeps the routes to other nodes' pod CIDRs equal to the
// Nodes: a direct route through the node's InternalIP where that address
// is on a subnet this node is connected to, through the VXLAN tunnel
// (tunnel.go) where it is not, as the routing mode says. It runs in the
// agent's writer loop, when node keys sync; a sync is a few netlink calls.
type nodeRouter struct {
	table   routeTable
	log     *slog.Logger
	metrics *metrics
	mode    RoutingMode
	port    uint16 // the tunnel's UDP port
	// missing is why each pod CIDR without a route has none, as last
	// logged, so a resync does not log it again.
	missing map[netip.Prefix]string
	// conflicts are pod CIDRs two nodes claim, as last logged.
	conflicts map[netip.Prefix]string
	// tunnel is the vxlan device's index as last made, 0 without one.
	tunnel int
	// installed are the routes in place after the last sync, sorted:
	// what the fast path (fastpath.go) is made of.
	installed []nodeRoute
	// releasing, when set, is told the installed routes that stay before
	// sync removes or changes any other.
	releasing func(kept []nodeRoute) error
}

func newNodeRouter(t routeTable, log *slog.Logger, m *metrics, mode RoutingMode, port uint16) *nodeRouter {
	if mode == "" {
		mode = RoutingAuto
	}
	if port == 0 {
		port = DefaultTunnelPort
	}
	return &nodeRouter{table: t, log: log, metrics: m, mode: mode, port: port, missing: map[netip.Prefix]string{}}
}

// routePlan is what planRoutes decides.
type routePlan struct {
	// want are the routes, those through the tunnel with LinkIndex
	// tunnelLink.
	want map[netip.Prefix]nodeRoute
	// missing is why each pod CIDR without a route has none; conflicts
	// are pod CIDRs two nodes claim.
	missing, conflicts map[netip.Prefix]string
	// entries are the tunnel's neighbours and FDB entries; none when no
	// route goes through it, and then there is no device.
	entries map[tunnelEntry]bool
	// tunnel is the device to make (Port aside) when entries has any.
	tunnel tunnelSpec
}

// planRoutes decides the routes: for each other node's pod CIDR, directly
// through its InternalIP of the same family that is on a connected subnet
// (the longest such subnet's link), unless the mode is vxlan; else through
// the tunnel, unless the mode is direct. A CIDR with no route gets the
// reason why. Nodes are taken in name order, so of two claiming one CIDR
// the first wins, on every node alike.
func planRoutes(peers []peerNode, connected []connectedNet, self selfNode, mode RoutingMode) routePlan {
	connected = slices.Clone(connected)
	slices.SortStableFunc(connected, func(a, b connectedNet) int { return cmp.Compare(b.Prefix.Bits(), a.Prefix.Bits()) })
	p := routePlan{want: map[netip.Prefix]nodeRoute{}, missing: map[netip.Prefix]string{}, conflicts: map[netip.Prefix]string{}, entries: map[tunnelEntry]bool{}}
	owner := map[netip.Prefix]string{}
	// Why the tunnel cannot be made, if it cannot.
	underlay := tunnelUnderlay(self.internal)
	var noTunnel string
	if !underlay.IsValid() {
		noTunnel = "this node's Node has no InternalIP to be the VXLAN tunnel's endpoint"
	} else if up, ok := uplinkOf(connected, underlay); !ok {
		noTunnel = fmt.Sprintf("this node's InternalIP %s, the VXLAN tunnel's endpoint, is on none of its links", underlay)
	} else {
		p.tunnel = tunnelSpec{Local: underlay, MTU: up.MTU - tunnelOverhead(underlay)}
	}
	for _, peer := range peers {
	cidrs:
		for _, dst := range peer.cidrs {
			if o, ok := owner[dst]; ok {
				p.conflicts[dst] = fmt.Sprintf("node %s's pod CIDR %s is node %s's too: routed to node %s", peer.name, dst, o, o)
				continue
			}
			for _, l := range self.cidrs {
				if l.Overlaps(dst) {
					p.missing[dst] = fmt.Sprintf("no route: node %s's pod CIDR %s overlaps this node's %s", peer.name, dst, l)
					continue cidrs
				}
			}
			sameFamily := false
			for _, via := range peer.addrs {
				if via.Is4() != dst.Addr().Is4() || mode == RoutingVXLAN {
					continue
				}
				sameFamily = true
				if slices.Contains(self.addrs, via) {
					continue // a stale Node claiming this node's address
				}
				for _, c := range connected {
					if !c.Prefix.IsSingleIP() && c.Prefix.Contains(via) {
						p.want[dst] = nodeRoute{Dst: dst, Via: via, LinkIndex: c.LinkIndex}
						owner[dst] = peer.name
						continue cidrs
					}
				}
			}
			if mode == RoutingDirect {
				if !sameFamily {
					p.missing[dst] = fmt.Sprintf("no route: node %s has no InternalIP of pod CIDR %s's family", peer.name, dst)
				} else {
					p.missing[dst] = fmt.Sprintf("no route: node %s's InternalIP is not on a connected subnet and --routing-mode is direct (pod CIDR %s unreachable from this node's pods)", peer.name, dst)
				}
				continue
			}
			// Through the tunnel.
			if noTunnel != "" {
				p.missing[dst] = fmt.Sprintf("no route: node %s's pod CIDR %s needs the VXLAN tunnel, but %s", peer.name, dst, noTunnel)
				continue
			}
			if dst.Addr().Is4() && underlay.Is6() {
				p.missing[dst] = fmt.Sprintf("no route: node %s's IPv4 pod CIDR %s needs the VXLAN tunnel, which has no IPv4 next hop over this node's IPv6 InternalIP %s", peer.name, dst, underlay)
				continue
			}
			var remote netip.Addr
			for _, a := range peer.addrs {
				if a.Is4() == underlay.Is4() && !slices.Contains(self.addrs, a) {
					remote = a
					break
				}
			}
			if !remote.IsValid() {
				p.missing[dst] = fmt.Sprintf("no route: node %s has no InternalIP of the VXLAN tunnel's family (this node's end is %s), so its pod CIDR %s is unreachable", peer.name, underlay, dst)
				continue
			}
			mac := tunnelMAC(remote)
			r := nodeRoute{Dst: dst, Via: remote, LinkIndex: tunnelLink, Onlink: true}
			if dst.Addr().Is6() {
				r = nodeRoute{Dst: dst, Via: tunnelLinkLocal(mac), LinkIndex: tunnelLink}
			}
			p.want[dst] = r
			owner[dst] = peer.name
			p.entries[tunnelEntry{IP: r.Via, MAC: mac6(mac)}] = true
			p.entries[tunnelEntry{FDB: true, IP: remote, MAC: mac6(mac)}] = true
		}
	}
	return p
}

// sync makes the routes the planned ones: it makes the tunnel when a route
// needs it (and its neighbours and FDB entries the planned ones), removes
// the agent's routes whose destination is no longer another node's pod
// CIDR (or through another next hop), adds the missing ones, removes the
// tunnel no route needs any more, and leaves every route it did not make
// alone. It goes on past a failed route and returns the errors.
func (r *nodeRouter) sync(peers []peerNode, self selfNode) error {
	connected, err := r.table.Connected()
	if err != nil {
		return fmt.Errorf("node routes: %w", err)
	}
	plan := planRoutes(peers, connected, self, r.mode)
	want, missing, conflicts := plan.want, plan.missing, plan.conflicts
	for dst, why := range conflicts {
		if r.conflicts[dst] != why {
			r.log.Error(why, "podCIDR", dst)
		}
	}
	r.conflicts = conflicts
	var errs []error
	// The tunnel before the routes through it.
	tunnel := 0
	if len(plan.entries) > 0 {
		spec := plan.tunnel
		spec.Port = r.port
		idx, err := r.table.EnsureTunnel(spec)
		if err != nil {
			errs = append(errs, err)
			for dst, w := range want {
				if w.LinkIndex == tunnelLink {
					delete(want, dst)
					missing[dst] = fmt.Sprintf("no route: the VXLAN device %s could not be made: %v", TunnelDevice, err)
				}
			}
		} else {
			tunnel = idx
			if idx != r.tunnel {
				r.log.Info("VXLAN device ready", "dev", TunnelDevice, "vni", TunnelVNI, "port", spec.Port, "local", spec.Local, "mtu", spec.MTU)
			}
			for dst, w := range want {
				if w.LinkIndex == tunnelLink {
					w.LinkIndex = idx
					want[dst] = w
				}
			}
			errs = append(errs, r.syncTunnelEntries(idx, plan.entries))
		}
	}
	have, err := r.table.Owned()
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("node routes: %w", err))...)
	}
	// Before a route goes or changes, what uses it lets go: the fast
	// path would otherwise send its destination's packets by whatever
	// route is left (a default route, past the masquerade).
	if r.releasing != nil {
		var kept []nodeRoute
		for _, i := range r.installed {
			if w, ok := want[i.Dst]; ok && w == i && slices.Contains(have, i) {
				kept = append(kept, i)
			}
		}
		if len(kept) != len(r.installed) {
			errs = append(errs, r.releasing(kept))
			r.installed = kept
		}
	}
	// The agent's route to each wanted destination; any other route of
	// its protocol goes.
	owned := map[netip.Prefix]nodeRoute{}
	for _, h := range have {
		if _, ok := want[h.Dst]; ok {
			if _, seen := owned[h.Dst]; !seen {
				owned[h.Dst] = h
				continue
			}
		}
		if err := r.table.Delete(h); err != nil {
			errs = append(errs, fmt.Errorf("delete route %s: %w", h, err))
			continue
		}
		r.log.Info("route to a pod CIDR removed", "route", h.String())
	}
	for _, w := range sortedRoutes(want) {
		cur, ok := owned[w.Dst]
		if ok && cur == w {
			continue
		}
		var err error
		if ok {
			err = r.table.Replace(w)
		} else {
			err = r.table.Add(w)
		}
		switch {
		case errors.Is(err, errRouteExists):
			missing[w.Dst] = fmt.Sprintf("no route: a route to %s that idcni did not make exists; idcni leaves it alone (ip route show %s)", w.Dst, w.Dst)
			delete(want, w.Dst)
		case err != nil:
			errs = append(errs, fmt.Errorf("route %s: %w", w, err))
			delete(want, w.Dst)
		default:
			r.log.Info("route to another node's pod CIDR", "route", w.String())
		}
	}
	if len(plan.entries) == 0 {
		// No route needs the tunnel: the device goes, and with it any
		// entry an earlier run left.
		removed, err := r.table.RemoveTunnel()
		if err != nil {
			errs = append(errs, err)
		} else if removed {
			r.log.Info("VXLAN device removed: no other node needs it", "dev", TunnelDevice)
		}
	}
	r.tunnel = tunnel
	r.installed = sortedRoutes(want)
	for dst, why := range missing {
		if r.missing[dst] != why {
			r.log.Warn(why, "podCIDR", dst)
		}
	}
	for dst := range r.missing {
		if _, still := missing[dst]; !still {
			r.log.Info("pod CIDR no longer without a route", "podCIDR", dst)
		}
	}
	r.missing = missing
	if r.metrics != nil {
		direct, tunnelled := 0, 0
		for _, w := range want {
			if tunnel != 0 && w.LinkIndex == tunnel {
				tunnelled++
			} else {
				direct++
			}
		}
		peers := 0
		if tunnel != 0 {
			for e := range plan.entries {
				if e.FDB {
					peers++
				}
			}
		}
		r.metrics.nodeRoutes.WithLabelValues("direct").Set(float64(direct))
		r.metrics.nodeRoutes.WithLabelValues("vxlan").Set(float64(tunnelled))
		r.metrics.tunnelPeers.Set(float64(peers))
		r.metrics.noRoute.Set(float64(len(missing)))
	}
	return errors.Join(errs...)
}

// syncTunnelEntries makes the vxlan device's permanent neighbours and FDB
// entries the wanted ones: those of nodes gone or moved go.
func (r *nodeRouter) syncTunnelEntries(index int, want map[tunnelEntry]bool) error {
	have, err := r.table.TunnelEntries(index)
	if err != nil {
		return err
	}
	var errs []error
	seen := map[tunnelEntry]bool{}
	for _, h := range have {
		if want[h] {
			seen[h] = true
			continue
		}
		if err := r.table.DeleteTunnelEntry(index, h); err != nil {
			errs = append(errs, err)
			continue
		}
		r.log.Info("VXLAN entry removed", "entry", h.String())
	}
	for _, w := range sortedEntries(want) {
		if seen[w] {
			continue
		}
		if err := r.table.AddTunnelEntry(index, w); err != nil {
			errs = append(errs, err)
			continue
		}
		r.log.Info("VXLAN entry added", "entry", w.String())
	}
	return errors.Join(errs...)
}

func sortedEntries(m map[tunnelEntry]bool) []tunnelEntry {
	out := make([]tunnelEntry, 0, len(m))
	for e := range m {
		out = append(out, e)
	}
	slices.SortFunc(out, func(a, b tunnelEntry) int {
		if a.FDB != b.FDB {
			if a.FDB {
				return 1
			}
			return -1
		}
		if c := a.IP.Compare(b.IP); c != 0 {
			return c
		}
		return slices.Compare(a.MAC[:], b.MAC[:])
	})
	return out
}

func sortedRoutes(m map[netip.Prefix]nodeRoute) []nodeRoute {
	out := make([]nodeRoute, 0, len(m))
	for _, r := range m {
		out = append(out, r)
	}
	slices.SortFunc(out, func(a, b nodeRoute) int {
		if c := a.Dst.Addr().Compare(b.Dst.Addr()); c != 0 {
			return c
		}
		return cmp.Compare(a.Dst.Bits(), b.Dst.Bits())
	})
	return out
}

// RemoveRoutes removes every route the agent made (routes of
// RouteProtocol in the main table) and the VXLAN device with its
// neighbours and FDB entries: `idcni-agent --uninstall`.
func RemoveRoutes() error {
	t := netlinkRoutes{}
	_, err := t.RemoveTunnel()
	rs, lerr := t.Owned()
	if lerr != nil {
		return errors.Join(err, lerr)
	}
	errs := []error{err}
	for _, r := range rs {
		if err := t.Delete(r); err != nil {
			errs = append(errs, fmt.Errorf("delete route %s: %w", r, err))
		}
	}
	return errors.Join(errs...)
}

// netlinkRoutes is the main routing table of the agent's netns (the
// host's: the agent runs on the host network).
type netlinkRoutes struct{}

func (netlinkRoutes) Connected() ([]connectedNet, error) {
	addrs, err := netlinksafe.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	links, err := netlinksafe.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	mtu := map[int]int{}
	for _, l := range links {
		mtu[l.Attrs().Index] = l.Attrs().MTU
	}
	var out []connectedNet
	for _, a := range addrs {
		if a.IPNet == nil || a.Scope != int(netlink.SCOPE_UNIVERSE) {
			continue
		}
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ones, _ := a.Mask.Size()
		// Host prefixes (/32, /128) too: such an address can be a tunnel
		// endpoint, though no other node is on its subnet.
		p := netip.PrefixFrom(ip.Unmap(), ones).Masked()
		out = append(out, connectedNet{Prefix: p, Addr: ip.Unmap(), LinkIndex: a.LinkIndex, MTU: mtu[a.LinkIndex]})
	}
	return out, nil
}

func (netlinkRoutes) Owned() ([]nodeRoute, error) {
	rs, err := netlinksafe.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Protocol: RouteProtocol, Table: unix.RT_TABLE_MAIN},
		netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("list routes of protocol %d: %w", RouteProtocol, err)
	}
	var out []nodeRoute
	for _, r := range rs {
		if r.Dst == nil {
			continue
		}
		ip, _ := netip.AddrFromSlice(r.Dst.IP)
		ones, _ := r.Dst.Mask.Size()
		gw, _ := netip.AddrFromSlice(r.Gw)
		out = append(out, nodeRoute{Dst: netip.PrefixFrom(ip.Unmap(), ones), Via: gw.Unmap(), LinkIndex: r.LinkIndex,
			Onlink: r.Flags&unix.RTNH_F_ONLINK != 0})
	}
	return out, nil
}

func toNetlink(r nodeRoute) *netlink.Route {
	nr := &netlink.Route{Dst: prefixNet(r.Dst), Gw: r.Via.AsSlice(), LinkIndex: r.LinkIndex, Protocol: RouteProtocol, Table: unix.RT_TABLE_MAIN}
	if r.Onlink {
		nr.Flags = unix.RTNH_F_ONLINK
	}
	return nr
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func (netlinkRoutes) Add(r nodeRoute) error {
	err := netlink.RouteAdd(toNetlink(r))
	if errors.Is(err, unix.EEXIST) {
		return errRouteExists
	}
	return err
}

func (netlinkRoutes) Replace(r nodeRoute) error { return netlink.RouteReplace(toNetlink(r)) }

// Delete names the protocol: the kernel removes a route only if it
// matches, so a route anyone else made is never removed.
func (netlinkRoutes) Delete(r nodeRoute) error {
	err := netlink.RouteDel(toNetlink(r))
	if errors.Is(err, unix.ESRCH) {
		return nil
	}
	return err
}
