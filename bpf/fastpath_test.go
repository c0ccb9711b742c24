package bpf

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/internal/pkttest"
	"github.com/idcni/idcni/policy"
	"github.com/vishvananda/netlink"
)

// Other nodes' pod ranges in the fast path's tests: remote4 and remote6
// are routed in the test netns (fibRoutes), unrouted4 is not.
var (
	remote4   = netip.MustParseAddr("10.30.1.5")
	remote6   = netip.MustParseAddr("fd30::5")
	unrouted4 = netip.MustParseAddr("10.31.0.7")
)

// newRemoteSeed is the walkthrough's pods, local, with other nodes' pods
// in the ipcache as world (no identity of their own), and A allowed to
// and from the world.
func newRemoteSeed(t *testing.T) *seed {
	s := newLocalSeed(t)
	s.remote(netip.MustParsePrefix("10.30.0.0/16"), netip.MustParsePrefix("fd30::/64"), netip.MustParsePrefix("10.31.0.0/16"))
	s.policy(aWithWorld())
	return s
}

func aWithWorld(rules ...policy.Rule) *policy.Set {
	return &policy.Set{Rules: append([]policy.Rule{
		{Subject: idA, Direction: policy.Egress, Peer: identity.World, Action: policy.Allow},
		{Subject: idA, Direction: policy.Ingress, Peer: identity.World, Action: policy.Allow},
	}, rules...)}
}

// hopped is frame as routing forwards it: one off the TTL or hop limit
// (the IPv4 checksum updated), the Ethernet addresses aside.
func hopped(frame []byte) []byte {
	want := append([]byte{}, frame...)
	if binary.BigEndian.Uint16(frame[12:14]) == 0x0800 {
		want[14+8]--
		binary.BigEndian.PutUint16(want[14+10:], 0)
		binary.BigEndian.PutUint16(want[14+10:], ipv4Checksum(want[14:34]))
	} else {
		want[14+7]--
	}
	return want
}

// A local pod's packet for another node's pod goes out through the FIB's
// next hop, past the node's forwarding, with the Ethernet header and hop
// count forwarding would give it; the reply comes in through from_net.
func TestFastPathToRemotePods(t *testing.T) {
	s := newRemoteSeed(t)
	for _, pkt := range []pkttest.Packet{
		{Src: ipA, Dst: remote4, Proto: pkttest.TCP, SrcPort: 40000, DstPort: 80, TCPFlags: pkttest.SYN},
		{Src: ip6A, Dst: remote6, Proto: pkttest.UDP, SrcPort: 40000, DstPort: 53, HopLimit: 9},
	} {
		frame := pkt.Frame()
		o := s.sendFull(frame, ScopeEgress, s.a, 0)
		if !o.forwarded || o.reason != ReasonAllowRule {
			t.Fatalf("%s -> %s: got %s, want rule, forwarded past the stack", pkt.Src, pkt.Dst, o)
		}
		if !bytes.Equal(o.out[0:6], nextHopMAC) || !bytes.Equal(o.out[6:12], uplinkMAC) {
			t.Fatalf("%s -> %s: sent with Ethernet addresses %x -> %x, want the FIB's %s -> %s", pkt.Src, pkt.Dst, o.out[6:12], o.out[0:6], uplinkMAC, nextHopMAC)
		}
		if want := hopped(frame); !bytes.Equal(o.out[12:], want[12:]) {
			t.Fatalf("%s -> %s: sent\n% x\nwant\n% x", pkt.Src, pkt.Dst, o.out[12:], want[12:])
		}
	}
	// The SYN-ACK from the remote pod, through from_net, as a reply.
	back := pkttest.Packet{Src: remote4, Dst: ipA, Proto: pkttest.TCP, SrcPort: 80, DstPort: 40000, TCPFlags: pkttest.SYN | pkttest.ACK}.Frame()
	o := s.sendNet(back)
	if !o.delivered || o.ingress != ReasonAllowReply {
		t.Fatalf("SYN-ACK from %s: from_net %s, want reply, delivered", remote4, o)
	}
	if !bytes.Equal(o.out[0:6], podMAC(s.a)) || !bytes.Equal(o.out[6:12], hostMAC(s.a)) {
		t.Fatalf("SYN-ACK delivered with Ethernet addresses %x -> %x, want %s -> %s", o.out[6:12], o.out[0:6], hostMAC(s.a), podMAC(s.a))
	}
	if want := hopped(back); !bytes.Equal(o.out[12:], want[12:]) {
		t.Fatalf("SYN-ACK delivered\n% x\nwant\n% x", o.out[12:], want[12:])
	}
}

// What the fast path must leave to the stack, it does: a destination in
// no other node's range (the world: masquerade's), a remote range the
// FIB has no route for, a hop limit running out, a packet over the path
// MTU (the stack answers with "fragmentation needed"). A drop by the
// pod's egress is a drop.
func TestFastPathLeavesTheRestToTheStack(t *testing.T) {
	s := newRemoteSeed(t)
	for _, c := range []struct {
		name string
		pkt  pkttest.Packet
	}{
		{"outside the cluster", pkttest.Packet{Src: ipA, Dst: netip.MustParseAddr("8.8.8.8"), Proto: pkttest.UDP, SrcPort: 4000, DstPort: 53}},
		{"no route", pkttest.Packet{Src: ipA, Dst: unrouted4, Proto: pkttest.UDP, SrcPort: 4000, DstPort: 53}},
		{"ttl 1", pkttest.Packet{Src: ipA, Dst: remote4, Proto: pkttest.UDP, SrcPort: 4001, DstPort: 53, HopLimit: 1}},
		{"over the MTU", pkttest.Packet{Src: ipA, Dst: remote4, Proto: pkttest.UDP, SrcPort: 4002, DstPort: 53, Payload: make([]byte, uplinkMTU)}},
		{"over the MTU, IPv6", pkttest.Packet{Src: ip6A, Dst: remote6, Proto: pkttest.UDP, SrcPort: 4002, DstPort: 53, Payload: make([]byte, uplinkMTU)}},
	} {
		o := s.sendFull(c.pkt.Frame(), ScopeEgress, s.a, 0)
		if o.forwarded || o.reason.Drop() {
			t.Errorf("%s: got %s, want passed to the stack", c.name, o)
		}
	}
	s.policy(&policy.Set{})
	o := s.sendFull(pkttest.Packet{Src: ipA, Dst: remote4, Proto: pkttest.UDP, SrcPort: 4003, DstPort: 53}.Frame(), ScopeEgress, s.a, 0)
	if o.forwarded || o.reason != ReasonDropNoRule {
		t.Errorf("a pod whose egress allows nothing, to a remote pod: got %s, want no-rule", o)
	}
}

// from_net decides a remote pod's packet by the local pod's ingress, as
// to_pod would, and leaves everything else untouched: a source in no
// other node's range (the world, another node itself), a destination that
// is no local pod, what it cannot parse.
func TestFromNet(t *testing.T) {
	s := newRemoteSeed(t)
	s.policy(aWithWorld(
		policy.Rule{Subject: idB, Direction: policy.Ingress, Peer: identity.World, Proto: policy.ProtoTCP, Ports: policy.PortRange{Lo: 80, Hi: 80}, Action: policy.Allow},
		policy.Rule{Subject: idB, Direction: policy.Egress, Peer: identity.World, Action: policy.Allow},
	))
	for _, c := range []struct {
		name      string
		frame     []byte
		ingress   Reason
		delivered bool
	}{
		{"allowed", pkttest.Packet{Src: remote4, Dst: ipB, Proto: pkttest.TCP, SrcPort: 5000, DstPort: 80, TCPFlags: pkttest.SYN}.Frame(), ReasonAllowRule, true},
		{"established", pkttest.Packet{Src: remote4, Dst: ipB, Proto: pkttest.TCP, SrcPort: 5000, DstPort: 80, TCPFlags: pkttest.ACK}.Frame(), ReasonAllowEstablished, true},
		{"no rule", pkttest.Packet{Src: remote4, Dst: ipB, Proto: pkttest.TCP, SrcPort: 5000, DstPort: 81, TCPFlags: pkttest.SYN}.Frame(), ReasonDropNoRule, false},
		{"IPv6", pkttest.Packet{Src: remote6, Dst: ip6A, Proto: pkttest.TCP, SrcPort: 5000, DstPort: 22, TCPFlags: pkttest.SYN}.Frame(), ReasonAllowRule, true},
		// Not a bare SYN, of no known flow: maybe a reply the node must
		// translate back; the stack's, then to_pod's.
		{"new UDP", pkttest.Packet{Src: remote6, Dst: ip6A, Proto: pkttest.UDP, SrcPort: 5000, DstPort: 53}.Frame(), noCheck, false},
		{"unknown SYN-ACK", pkttest.Packet{Src: remote4, Dst: ipB, Proto: pkttest.TCP, SrcPort: 80, DstPort: 6000, TCPFlags: pkttest.SYN | pkttest.ACK}.Frame(), noCheck, false},
		{"from the world", pkttest.Packet{Src: netip.MustParseAddr("8.8.8.8"), Dst: ipB, Proto: pkttest.TCP, SrcPort: 5000, DstPort: 80, TCPFlags: pkttest.SYN}.Frame(), noCheck, false},
		{"to no local pod", pkttest.Packet{Src: remote4, Dst: netip.MustParseAddr("10.13.0.99"), Proto: pkttest.TCP, SrcPort: 5000, DstPort: 80, TCPFlags: pkttest.SYN}.Frame(), noCheck, false},
		{"ttl 1", pkttest.Packet{Src: remote4, Dst: ipB, Proto: pkttest.TCP, SrcPort: 5001, DstPort: 80, TCPFlags: pkttest.SYN, HopLimit: 1}.Frame(), noCheck, false},
		{"malformed", pkttest.Packet{Src: remote4, Dst: ipB, Proto: pkttest.TCP, SrcPort: 5000, DstPort: 80, L4: []byte{1, 2, 3}}.Frame(), noCheck, false},
		{"not IP", append(make([]byte, 12), 0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1), noCheck, false},
	} {
		o := s.sendNet(c.frame)
		if o.ingress != c.ingress || o.delivered != c.delivered {
			t.Errorf("%s: from_net %s, want %s (delivered %t)", c.name, o, c.ingress, c.delivered)
		}
	}
	// The pod's reply goes back the fast way.
	o := s.sendFull(pkttest.Packet{Src: ipB, Dst: remote4, Proto: pkttest.TCP, SrcPort: 80, DstPort: 5000, TCPFlags: pkttest.SYN | pkttest.ACK}.Frame(), ScopeEgress, s.b, 0)
	if o.reason != ReasonAllowReply || !o.forwarded {
		t.Errorf("B's SYN-ACK to %s: got %s, want reply, forwarded", remote4, o)
	}
}

// A's connection to a Service address the node translates to a pod on
// another node: the node's stack sends it (the address is no pod range),
// and the backend's replies, which carry the backend's address, must go
// to the stack to be translated back. from_net leaves them there, and
// to_pod then finds them the replies of A's flow.
func TestFromNetLeavesServiceRepliesToTheStack(t *testing.T) {
	s := newRemoteSeed(t)
	vip := netip.MustParseAddr("10.96.0.10")
	o := s.sendFull(pkttest.Packet{Src: ipA, Dst: vip, Proto: pkttest.TCP, SrcPort: 41000, DstPort: 80, TCPFlags: pkttest.SYN}.Frame(), ScopeEgress, s.a, 0)
	if o.forwarded || o.reason != ReasonAllowRule {
		t.Fatalf("A's SYN to the Service address: got %s, want rule, to the stack", o)
	}
	for _, flags := range []uint8{pkttest.SYN | pkttest.ACK, pkttest.ACK} {
		n := s.sendNet(pkttest.Packet{Src: remote4, Dst: ipA, Proto: pkttest.TCP, SrcPort: 80, DstPort: 41000, TCPFlags: flags}.Frame())
		if n.ingress != noCheck {
			t.Fatalf("the backend's reply (flags %#x) untranslated: from_net %s, want left to the stack", flags, n)
		}
	}
	if r := s.send(pkttest.Packet{Src: vip, Dst: ipA, Proto: pkttest.TCP, SrcPort: 80, DstPort: 41000, TCPFlags: pkttest.SYN | pkttest.ACK}.Frame(), ScopeIngress, s.a, 999); r != ReasonAllowReply {
		t.Fatalf("the reply translated back, at to_pod: %s, want reply", r)
	}
}

// Packets to another node's pod range go out by the next hop the FIB gave
// for the range, kept in its remote_cidrs entry for about a second and
// shared by every flow to the range: a packet larger than the one the
// path MTU was checked for asks the FIB again (and goes to the stack when
// over it), a new flow's first packet asks nothing, and once the kept
// answer has aged, a changed neighbour is followed.
func TestFastPathKeepsTheNextHop(t *testing.T) {
	s := newRemoteSeed(t)
	pkt := pkttest.Packet{Src: ipA, Dst: remote4, Proto: pkttest.TCP, SrcPort: 40100, DstPort: 80, TCPFlags: pkttest.SYN}
	send := func(p pkttest.Packet, dmac net.HardwareAddr) {
		t.Helper()
		frame := p.Frame()
		o := s.sendFull(frame, ScopeEgress, s.a, 0)
		if !o.forwarded || o.reason.Drop() {
			t.Fatalf("%d bytes to %s: got %s, want forwarded past the stack", len(frame), p.Dst, o)
		}
		if !bytes.Equal(o.out[0:6], dmac) || !bytes.Equal(o.out[6:12], uplinkMAC) {
			t.Fatalf("%d bytes to %s: sent with Ethernet addresses %x -> %x, want %s -> %s", len(frame), p.Dst, o.out[6:12], o.out[0:6], uplinkMAC, dmac)
		}
		if want := hopped(frame); !bytes.Equal(o.out[12:], want[12:]) {
			t.Fatalf("%d bytes to %s: sent\n% x\nwant\n% x", len(frame), p.Dst, o.out[12:], want[12:])
		}
	}
	if nh := s.nexthop(t, remote4); nh.ifindex != 0 {
		t.Fatalf("a range the agent has just written keeps next hop %+v, want none", nh)
	}
	send(pkt, nextHopMAC)
	pkt.TCPFlags = pkttest.ACK
	send(pkt, nextHopMAC)
	var up0 int
	s.net.do(func() {
		if l, err := netlink.LinkByName("up0"); err == nil {
			up0 = l.Attrs().Index
		}
	})
	if nh := s.nexthop(t, remote4); nh.ifindex != up0 || !bytes.Equal(nh.dmac, nextHopMAC) || !bytes.Equal(nh.smac, uplinkMAC) || nh.maxLen != uint16(len(pkt.Frame())-14) {
		t.Fatalf("the range keeps next hop %+v, want ifindex %d, %s -> %s, checked for %d bytes", nh, up0, uplinkMAC, nextHopMAC, len(pkt.Frame())-14)
	}
	pkt.Payload = make([]byte, 200)
	send(pkt, nextHopMAC) // larger: the FIB again, and the memo holds for it
	if nh := s.nexthop(t, remote4); nh.maxLen != uint16(len(pkt.Frame())-14) {
		t.Fatalf("after a larger packet the range's next hop is checked for %d bytes, want %d", nh.maxLen, len(pkt.Frame())-14)
	}
	big := pkt
	big.Payload = make([]byte, uplinkMTU)
	if o := s.sendFull(big.Frame(), ScopeEgress, s.a, 0); o.forwarded || o.reason.Drop() {
		t.Fatalf("a packet of the flow over the path MTU: got %s, want passed to the stack", o)
	}

	moved := net.HardwareAddr{0x02, 0xcc, 0, 0, 0, 9}
	s.net.do(func() {
		err := netlink.NeighSet(&netlink.Neigh{LinkIndex: up0, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT, IP: net.ParseIP("192.0.2.2"), HardwareAddr: moved})
		if err != nil {
			t.Errorf("move the next hop to %s: %v", moved, err)
		}
	})
	// Another flow to the range, to another of its pods, within the
	// second: it goes by the kept answer (the old neighbour) without
	// asking the FIB, which would have named the moved one.
	other := pkttest.Packet{Src: ipA, Dst: remote4.Next(), Proto: pkttest.TCP, SrcPort: 40200, DstPort: 80, TCPFlags: pkttest.SYN}
	send(other, nextHopMAC)
	time.Sleep(1100 * time.Millisecond) // NEXTHOP_FOR, and the coarse clock's tick
	send(pkt, moved)
	send(other, moved)
}

type nexthopMemo struct {
	ifindex    int
	dmac, smac net.HardwareAddr
	maxLen     uint16
}

// nexthop is the next hop kept in the remote_cidrs entry of the range
// dst is in.
func (p *pair) nexthop(t *testing.T, dst netip.Addr) nexthopMemo {
	t.Helper()
	k := ipcacheKey(netip.PrefixFrom(dst, dst.BitLen()))
	var v datapathRemoteRange
	if err := p.d.objs.RemoteCidrs.Lookup(&k, &v); err != nil {
		t.Fatalf("the range of %s in remote_cidrs: %v", dst, err)
	}
	return nexthopMemo{ifindex: int(v.Nh.Ifindex), dmac: v.Nh.Dmac[:], smac: v.Nh.Smac[:], maxLen: v.Nh.MaxLen}
}

// A local pod entry carries its endpoint's conntrack slot, by which
// from_net (and from_pod's delivery) find the pod's flows without the
// endpoint: a known flow's packet under the current policy needs nothing
// else of it. PutLocalPod copies the slot, and refuses a pod whose
// endpoint is not in place yet; an entry without one (as pin layout 3
// wrote them) still works, through the endpoint, until the migration
// fills it in; and deleting the endpoint deletes its entries first, so no
// entry outlives it.
func TestLocalPodEntryCarriesItsEndpointsSlot(t *testing.T) {
	s := newRemoteSeed(t)
	epA, _, err := s.d.Endpoint(s.a)
	if err != nil || epA.ConntrackSlot == 0 {
		t.Fatalf("A's endpoint: %+v, %v; want one with a table of its own", epA, err)
	}
	slotOf := func(a netip.Addr) (uint32, bool) {
		t.Helper()
		lps, err := s.d.LocalPods()
		if err != nil {
			t.Fatal(err)
		}
		lp, ok := lps[a]
		return lp.ConntrackSlot, ok
	}
	if slot, _ := slotOf(ipA); slot != epA.ConntrackSlot {
		t.Fatalf("A's local pod entry names slot %d, want its endpoint's, %d", slot, epA.ConntrackSlot)
	}
	stray := netip.MustParseAddr("10.13.0.77")
	if err := s.d.PutLocalPod(stray, LocalPod{Ifindex: 9999, MAC: podMAC(1), HostMAC: hostMAC(1)}); err == nil || !strings.Contains(err.Error(), "write the endpoint first") {
		t.Fatalf("a local pod without an endpoint: %v, want refused", err)
	}

	syn := pkttest.Packet{Src: remote4, Dst: ipA, Proto: pkttest.TCP, SrcPort: 5000, DstPort: 22, TCPFlags: pkttest.SYN}
	ack := syn
	ack.TCPFlags = pkttest.ACK
	want := func(what string, frame []byte, reason Reason, delivered bool) {
		t.Helper()
		if o := s.sendNet(frame); o.ingress != reason || o.delivered != delivered {
			t.Fatalf("%s: from_net %s, want %s (delivered %t)", what, o, reason, delivered)
		}
	}
	want("SYN", syn.Frame(), ReasonAllowRule, true)
	want("ACK", ack.Frame(), ReasonAllowEstablished, true)

	// Without the endpoint in the map (a state the Datapath never leaves,
	// see DeleteEndpoint), the known flow's packet still goes by the
	// slot, and a new one, which needs the endpoint's identity, is dropped.
	k := addr16(ipA)
	var raw datapathEndpoint
	if err := s.d.objs.Endpoints.Lookup(uint32(s.a), &raw); err != nil {
		t.Fatal(err)
	}
	if err := s.d.objs.Endpoints.Delete(uint32(s.a)); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		what      string
		frame     []byte
		reason    Reason
		delivered bool
	}{
		{"known flow, no endpoint", ack.Frame(), ReasonAllowEstablished, true},
		{"new flow, no endpoint", pkttest.Packet{Src: remote4, Dst: ipA, Proto: pkttest.TCP, SrcPort: 5001, DstPort: 22, TCPFlags: pkttest.SYN}.Frame(), ReasonDropNoEndpoint, false},
	} {
		o, err := s.execNet(c.frame)
		if err != nil || o.ingress != c.reason || o.delivered != c.delivered {
			t.Fatalf("%s: from_net %s (%v), want %s (delivered %t)", c.what, o, err, c.reason, c.delivered)
		}
	}
	if err := s.d.objs.Endpoints.Put(uint32(s.a), &raw); err != nil {
		t.Fatal(err)
	}

	// The entry as pin layout 3 wrote it, without the slot: the endpoint
	// gives it, and the flow is the same one.
	var lp datapathLocalPod
	if err := s.d.objs.LocalPods.Lookup(&k, &lp); err != nil {
		t.Fatal(err)
	}
	lp.CtSlot = 0
	if err := s.d.objs.LocalPods.Put(&k, &lp); err != nil {
		t.Fatal(err)
	}
	want("ACK by an entry without the slot", ack.Frame(), ReasonAllowEstablished, true)
	if n, err := s.d.fillLocalPodSlots(); err != nil || n != 1 {
		t.Fatalf("filling the slots: %d entries, %v; want 1", n, err)
	}
	if slot, _ := slotOf(ipA); slot != epA.ConntrackSlot {
		t.Fatalf("after the fill A's entry names slot %d, want %d", slot, epA.ConntrackSlot)
	}
	want("ACK after the fill", ack.Frame(), ReasonAllowEstablished, true)

	if err := s.d.DeleteEndpoint(s.a); err != nil {
		t.Fatal(err)
	}
	delete(s.ref.Endpoints, s.a)
	for _, a := range []netip.Addr{ipA, ip6A} {
		if _, ok := slotOf(a); ok {
			t.Fatalf("A's local pod entry for %s outlived its endpoint", a)
		}
	}
	if _, ok := slotOf(ipB); !ok {
		t.Fatal("deleting A's endpoint took B's local pod entry")
	}
	want("ACK after the endpoint is gone", ack.Frame(), noCheck, false)
}
