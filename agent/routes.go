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

// nodeRoute is a route to another node's pod CIDR through that node's
// InternalIP, on the link of this node that is on the same subnet.
type nodeRoute struct {
	Dst       netip.Prefix
	Via       netip.Addr
	LinkIndex int
}

func (r nodeRoute) String() string {
	return fmt.Sprintf("%s via %s dev #%d", r.Dst, r.Via, r.LinkIndex)
}

// connectedNet is a subnet an address of this node is on.
type connectedNet struct {
	Prefix    netip.Prefix
	LinkIndex int
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
}

// peerNode is what the routes need of another node.
type peerNode struct {
	name  string
	cidrs []netip.Prefix
	addrs []netip.Addr // InternalIPs
}

// peerNodes returns every other node with its pod CIDRs and InternalIPs.
func peerNodes(nodes []*corev1.Node, local string) []peerNode {
	var out []peerNode
	for _, n := range nodes {
		if n.Name == local {
			continue
		}
		p := peerNode{name: n.Name, cidrs: podCIDRsOf(n)}
		for _, na := range n.Status.Addresses {
			if na.Type != corev1.NodeInternalIP {
				continue
			}
			if addr, err := netip.ParseAddr(na.Address); err == nil {
				p.addrs = append(p.addrs, addr.Unmap())
			}
		}
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b peerNode) int { return cmp.Compare(a.name, b.name) })
	return out
}

// nodeRouter keeps the routes to other nodes' pod CIDRs equal to the
// Nodes: a direct route through the node's InternalIP where that address
// is on a subnet this node is connected to. It runs in the agent's writer
// loop, when node keys sync; a sync is a few netlink calls.
type nodeRouter struct {
	table   routeTable
	log     *slog.Logger
	metrics *metrics
	// missing is why each pod CIDR without a route has none, as last
	// logged, so a resync does not log it again.
	missing map[netip.Prefix]string
	// conflicts are pod CIDRs two nodes claim, as last logged.
	conflicts map[netip.Prefix]string
}

func newNodeRouter(t routeTable, log *slog.Logger, m *metrics) *nodeRouter {
	return &nodeRouter{table: t, log: log, metrics: m, missing: map[netip.Prefix]string{}}
}

// plan decides the routes: for each other node's pod CIDR, through its
// InternalIP of the same family that is on a connected subnet (the longest
// such subnet's link). A CIDR with no route gets the reason why. Nodes are
// taken in name order, so of two claiming one CIDR the first wins, on
// every node alike.
func planRoutes(peers []peerNode, connected []connectedNet, local []netip.Prefix, localAddrs []netip.Addr) (want map[netip.Prefix]nodeRoute, missing, conflicts map[netip.Prefix]string) {
	slices.SortStableFunc(connected, func(a, b connectedNet) int { return cmp.Compare(b.Prefix.Bits(), a.Prefix.Bits()) })
	want = map[netip.Prefix]nodeRoute{}
	owner := map[netip.Prefix]string{}
	missing = map[netip.Prefix]string{}
	conflicts = map[netip.Prefix]string{}
	for _, p := range peers {
	cidrs:
		for _, dst := range p.cidrs {
			if o, ok := owner[dst]; ok {
				conflicts[dst] = fmt.Sprintf("node %s's pod CIDR %s is node %s's too: routed to node %s", p.name, dst, o, o)
				continue
			}
			for _, l := range local {
				if l.Overlaps(dst) {
					missing[dst] = fmt.Sprintf("no route: node %s's pod CIDR %s overlaps this node's %s", p.name, dst, l)
					continue cidrs
				}
			}
			sameFamily := false
			for _, via := range p.addrs {
				if via.Is4() != dst.Addr().Is4() {
					continue
				}
				sameFamily = true
				if slices.Contains(localAddrs, via) {
					continue // a stale Node claiming this node's address
				}
				for _, c := range connected {
					if c.Prefix.Contains(via) {
						want[dst] = nodeRoute{Dst: dst, Via: via, LinkIndex: c.LinkIndex}
						owner[dst] = p.name
						delete(missing, dst)
						continue cidrs
					}
				}
			}
			if !sameFamily {
				missing[dst] = fmt.Sprintf("no route: node %s has no InternalIP of pod CIDR %s's family", p.name, dst)
			} else {
				missing[dst] = fmt.Sprintf("no route: node %s's InternalIP is not on a connected subnet; VXLAN is not implemented yet (pod CIDR %s unreachable from this node's pods)", p.name, dst)
			}
		}
	}
	return want, missing, conflicts
}

// sync makes the routes the planned ones: it removes the agent's routes
// whose destination is no longer another node's pod CIDR (or through
// another gateway), adds the missing ones, and leaves every route it did
// not make alone. It goes on past a failed route and returns the errors.
func (r *nodeRouter) sync(peers []peerNode, local []netip.Prefix, localAddrs []netip.Addr) error {
	connected, err := r.table.Connected()
	if err != nil {
		return fmt.Errorf("node routes: %w", err)
	}
	have, err := r.table.Owned()
	if err != nil {
		return fmt.Errorf("node routes: %w", err)
	}
	want, missing, conflicts := planRoutes(peers, connected, local, localAddrs)
	for dst, why := range conflicts {
		if r.conflicts[dst] != why {
			r.log.Error(why, "podCIDR", dst)
		}
	}
	r.conflicts = conflicts
	var errs []error
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
		r.metrics.nodeRoutes.Set(float64(len(want)))
		r.metrics.noRoute.Set(float64(len(missing)))
	}
	return errors.Join(errs...)
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
// RouteProtocol in the main table): `idcni-agent --uninstall`.
func RemoveRoutes() error {
	t := netlinkRoutes{}
	rs, err := t.Owned()
	if err != nil {
		return err
	}
	var errs []error
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
		p := netip.PrefixFrom(ip.Unmap(), ones).Masked()
		if p.Bits() >= p.Addr().BitLen() {
			continue
		}
		out = append(out, connectedNet{Prefix: p, LinkIndex: a.LinkIndex})
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
		out = append(out, nodeRoute{Dst: netip.PrefixFrom(ip.Unmap(), ones), Via: gw.Unmap(), LinkIndex: r.LinkIndex})
	}
	return out, nil
}

func toNetlink(r nodeRoute) *netlink.Route {
	return &netlink.Route{Dst: prefixNet(r.Dst), Gw: r.Via.AsSlice(), LinkIndex: r.LinkIndex, Protocol: RouteProtocol, Table: unix.RT_TABLE_MAIN}
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
