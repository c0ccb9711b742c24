package agent

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Pod traffic to a node that is not on a connected subnet goes through a
// VXLAN tunnel: the kernel's vxlan device, TunnelDevice, one per node.
//
// How a node finds its peers' tunnel endpoints. The kernel's vxlan device
// needs, for each peer, a MAC address for the inner Ethernet header and a
// forwarding entry that says which underlay address that MAC is behind.
// Flannel exchanges each node's device MAC through a Node annotation;
// idcni needs no exchange: every node's device MAC is derived from its
// InternalIP (tunnelMAC: locally administered, deterministic), so each
// node computes every peer's MAC from the Node objects it already watches
// and sets its own device's MAC the same way. Per peer the agent then
// writes three static entries, learning nothing from the wire
// (nolearning: a forged packet cannot teach the device a path):
//
//   - the route   podCIDR via <next hop> dev idcni_vxlan proto 157
//   - a permanent neighbour  <next hop> lladdr tunnelMAC(peer)
//   - a permanent FDB entry  tunnelMAC(peer) dst <peer InternalIP>
//
// The next hop of an IPv4 pod CIDR over an IPv4 underlay is the peer's
// InternalIP itself, "onlink" (it is on no subnet of the device). An IPv6
// pod CIDR needs an IPv6 next hop whatever the underlay: it is the
// link-local address tunnelMAC(peer) gives by EUI-64 (tunnelLinkLocal),
// the very address the peer's kernel puts on its own device; the
// permanent neighbour makes neighbour discovery over the tunnel
// unnecessary. An IPv4 pod CIDR over an IPv6-only underlay would need an
// IPv4 next hop no node has: it is counted as missing.
//
// The alternative, a collect-metadata ("external") device that a BPF
// program feeds with bpf_skb_set_tunnel_key, would move the peer lookup
// into the datapath and a map. It was not chosen: the kernel's routes,
// neighbours and FDB are inspectable with ip(8) and bridge(8), need no new
// program on the hot path, and the routes are what direct routing already
// uses, so the two modes differ only in the device a route names.
const (
	// TunnelDevice is the name of the vxlan device.
	TunnelDevice = "idcni_vxlan"
	// TunnelVNI is the VXLAN network identifier of idcni's tunnel, fixed:
	// every node must use the same one. 157, like RouteProtocol: not 1,
	// Flannel's default, so a node migrating from Flannel can keep both
	// devices on the same UDP port (the kernel tells them apart by VNI).
	TunnelVNI = 157
	// DefaultTunnelPort is the UDP port of the tunnel: 8472, the port the
	// Linux kernel, Flannel and Cilium use for VXLAN (not IANA's 4789).
	DefaultTunnelPort = 8472
	// Encapsulation overhead: outer IP header, UDP (8), VXLAN (8) and the
	// inner Ethernet header (14).
	tunnelOverhead4 = 20 + 8 + 8 + 14
	tunnelOverhead6 = 40 + 8 + 8 + 14
)

// RoutingMode decides how pod traffic reaches other nodes' pod CIDRs.
type RoutingMode string

const (
	// RoutingAuto routes directly to nodes on a connected subnet and
	// through the VXLAN tunnel to the others.
	RoutingAuto RoutingMode = "auto"
	// RoutingDirect only routes directly; nodes elsewhere are unreachable
	// (counted in idcni_node_routes_missing).
	RoutingDirect RoutingMode = "direct"
	// RoutingVXLAN tunnels to every other node, even on the LAN.
	RoutingVXLAN RoutingMode = "vxlan"
)

// ParseRoutingMode reads --routing-mode.
func ParseRoutingMode(s string) (RoutingMode, error) {
	switch m := RoutingMode(s); m {
	case RoutingAuto, RoutingDirect, RoutingVXLAN:
		return m, nil
	}
	return "", fmt.Errorf("bad routing mode %q: want auto, direct or vxlan", s)
}

// tunnelOverhead is the bytes VXLAN adds over an underlay of addr's family.
func tunnelOverhead(underlay netip.Addr) int {
	if underlay.Is4() {
		return tunnelOverhead4
	}
	return tunnelOverhead6
}

// tunnelMAC is the MAC of the vxlan device of the node whose InternalIP is
// addr. Both are locally administered unicast (bit 1 of the first octet
// set, bit 0 clear), so they meet no vendor's MAC. IPv4: 0e:69 and the
// four address bytes, unique per address. IPv6: 16 and five bytes of the
// address's SHA-256 (a collision among a cluster's nodes is about
// n²/2^41: one in a thousand at 50,000 nodes).
func tunnelMAC(addr netip.Addr) net.HardwareAddr {
	if addr.Is4() {
		b := addr.As4()
		return net.HardwareAddr{0x0e, 0x69, b[0], b[1], b[2], b[3]}
	}
	b := addr.As16()
	h := sha256.Sum256(b[:])
	return net.HardwareAddr{0x16, h[0], h[1], h[2], h[3], h[4]}
}

// tunnelLinkLocal is the IPv6 link-local address EUI-64 derives from mac
// (RFC 4291 appendix A), the next hop of IPv6 pod CIDRs through the
// tunnel.
func tunnelLinkLocal(mac net.HardwareAddr) netip.Addr {
	var b [16]byte
	b[0], b[1] = 0xfe, 0x80
	b[8], b[9], b[10] = mac[0]^0x02, mac[1], mac[2]
	b[11], b[12] = 0xff, 0xfe
	b[13], b[14], b[15] = mac[3], mac[4], mac[5]
	return netip.AddrFrom16(b)
}

// tunnelEntry is one static entry on the vxlan device: a neighbour (IP,
// a next hop, resolves to MAC) or, with FDB, a forwarding entry (MAC is
// behind the underlay address IP).
type tunnelEntry struct {
	FDB bool
	IP  netip.Addr
	MAC [6]byte
}

func (e tunnelEntry) String() string {
	if e.FDB {
		return fmt.Sprintf("fdb %s dst %s", net.HardwareAddr(e.MAC[:]), e.IP)
	}
	return fmt.Sprintf("neigh %s lladdr %s", e.IP, net.HardwareAddr(e.MAC[:]))
}

func mac6(m net.HardwareAddr) (out [6]byte) {
	copy(out[:], m)
	return out
}

// tunnelSpec is how the vxlan device must be.
type tunnelSpec struct {
	Local netip.Addr // this node's InternalIP, the underlay source
	Port  uint16
	MTU   int
}

func (s tunnelSpec) mac() net.HardwareAddr { return tunnelMAC(s.Local) }

// EnsureTunnel makes the vxlan device as spec says and up, and returns its
// index. A device of that name that differs in anything but its MTU
// (another VNI, port, local address, MAC, learning, or not vxlan at all)
// is replaced: its routes and entries go with it and the sync writes them
// again.
func (netlinkRoutes) EnsureTunnel(spec tunnelSpec) (int, error) {
	l, err := netlinksafe.LinkByName(TunnelDevice)
	var notFound netlink.LinkNotFoundError
	switch {
	case errors.As(err, &notFound):
		l = nil
	case err != nil:
		return 0, fmt.Errorf("find %s: %w", TunnelDevice, err)
	}
	if l != nil && !tunnelMatches(l, spec) {
		if err := netlink.LinkDel(l); err != nil {
			return 0, fmt.Errorf("replace %s: delete: %w", TunnelDevice, err)
		}
		l = nil
	}
	if l == nil {
		v := &netlink.Vxlan{
			LinkAttrs: netlink.LinkAttrs{Name: TunnelDevice, MTU: spec.MTU, HardwareAddr: spec.mac()},
			VxlanId:   TunnelVNI,
			SrcAddr:   spec.Local.AsSlice(),
			Port:      int(spec.Port),
			Learning:  false,
		}
		if err := netlink.LinkAdd(v); err != nil {
			return 0, fmt.Errorf("create %s (vxlan id %d dstport %d local %s): %w", TunnelDevice, TunnelVNI, spec.Port, spec.Local, err)
		}
		if l, err = netlinksafe.LinkByName(TunnelDevice); err != nil {
			return 0, fmt.Errorf("find %s after creating it: %w", TunnelDevice, err)
		}
	}
	if l.Attrs().MTU != spec.MTU {
		if err := netlink.LinkSetMTU(l, spec.MTU); err != nil {
			return 0, fmt.Errorf("set %s mtu %d: %w", TunnelDevice, spec.MTU, err)
		}
	}
	if l.Attrs().Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(l); err != nil {
			return 0, fmt.Errorf("set %s up: %w", TunnelDevice, err)
		}
	}
	return l.Attrs().Index, nil
}

func tunnelMatches(l netlink.Link, spec tunnelSpec) bool {
	v, ok := l.(*netlink.Vxlan)
	if !ok {
		return false
	}
	local, _ := netip.AddrFromSlice(v.SrcAddr)
	return v.VxlanId == TunnelVNI && v.Port == int(spec.Port) && local.Unmap() == spec.Local && !v.Learning &&
		slices.Equal(v.Attrs().HardwareAddr, spec.mac())
}

// RemoveTunnel deletes the vxlan device, with its routes, neighbours and
// FDB entries; no device is no error.
func (netlinkRoutes) RemoveTunnel() (bool, error) {
	l, err := netlinksafe.LinkByName(TunnelDevice)
	var notFound netlink.LinkNotFoundError
	if errors.As(err, &notFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("find %s: %w", TunnelDevice, err)
	}
	if err := netlink.LinkDel(l); err != nil {
		return false, fmt.Errorf("delete %s: %w", TunnelDevice, err)
	}
	return true, nil
}

// TunnelEntries returns the permanent neighbours and FDB entries of the
// device: the ones the agent writes. Entries the kernel makes on its own
// (a neighbour being resolved, multicast ones) are not the agent's.
func (netlinkRoutes) TunnelEntries(index int) ([]tunnelEntry, error) {
	var out []tunnelEntry
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6, unix.AF_BRIDGE} {
		ns, err := netlink.NeighList(index, fam)
		if err != nil {
			return nil, fmt.Errorf("list %s entries (family %d): %w", TunnelDevice, fam, err)
		}
		for _, n := range ns {
			if n.State&netlink.NUD_PERMANENT == 0 || len(n.HardwareAddr) != 6 {
				continue
			}
			ip, ok := netip.AddrFromSlice(n.IP)
			if !ok {
				continue
			}
			out = append(out, tunnelEntry{FDB: fam == unix.AF_BRIDGE, IP: ip.Unmap(), MAC: mac6(n.HardwareAddr)})
		}
	}
	return out, nil
}

func tunnelNeigh(index int, e tunnelEntry) *netlink.Neigh {
	n := &netlink.Neigh{LinkIndex: index, State: netlink.NUD_PERMANENT, IP: e.IP.AsSlice(), HardwareAddr: net.HardwareAddr(e.MAC[:])}
	switch {
	case e.FDB:
		// bridge fdb ... self: the vxlan device's own table.
		n.Family, n.Flags = unix.AF_BRIDGE, netlink.NTF_SELF
	case e.IP.Is4():
		n.Family = netlink.FAMILY_V4
	default:
		n.Family = netlink.FAMILY_V6
	}
	return n
}

func (netlinkRoutes) AddTunnelEntry(index int, e tunnelEntry) error {
	if err := netlink.NeighSet(tunnelNeigh(index, e)); err != nil {
		return fmt.Errorf("add %s on %s: %w", e, TunnelDevice, err)
	}
	return nil
}

func (netlinkRoutes) DeleteTunnelEntry(index int, e tunnelEntry) error {
	err := netlink.NeighDel(tunnelNeigh(index, e))
	if err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("delete %s on %s: %w", e, TunnelDevice, err)
	}
	return nil
}
