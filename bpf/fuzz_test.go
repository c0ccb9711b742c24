package bpf

import (
	"errors"
	"maps"
	"net/netip"
	"slices"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/idcni/idcni/bpf/reference"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/internal/pkttest"
	"github.com/idcni/idcni/policy"
)

// FuzzDatapath feeds random rule sets and random packet sequences (crafted
// ones that build flows, and raw bytes) to the kernel datapath and the
// reference datapath, and fails on the first packet they decide
// differently.
func FuzzDatapath(f *testing.F) {
	for _, seed := range [][]byte{
		{},
		{3, 0, 0, 1, 2, 0, 0, 0, 1, 1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13},
		{5, 1, 2, 1, 2, 1, 3, 2, 2, 3, 0, 3, 4, 1, 1, 4, 0, 0, 1, 1, 7, 9, 16, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6, 7, 8},
		{2, 2, 1, 0, 1, 1, 4, 5, 2, 8, 16, 32, 64, 128, 255, 1, 3, 5, 7, 11, 13, 17, 19},
		{1, 0, 1, 1, 3, 1, 0, 0, 8, 0x45, 0, 0, 40, 0, 0, 0x20, 0, 64, 17, 0, 0, 10, 13, 0, 2, 10, 13, 0, 3},
		{4, 1, 0, 2, 4, 3, 2, 0, 0, 5, 16, 2, 1, 0, 2, 33, 4, 6, 0, 9, 12, 15, 16, 8, 0, 1, 2, 3},
		{1, 0, 1, 0, 2, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 4, 0, 1, 1},
	} {
		f.Add(seed)
	}
	p := newPair(f, 4, Options{})
	eps := []int{
		p.endpoint(0, Endpoint{Identity: 1001, IPv4: netip.MustParseAddr("10.13.0.2"), IPv6: netip.MustParseAddr("fd13::2")}),
		p.endpoint(1, Endpoint{Identity: 1002, IPv4: netip.MustParseAddr("10.13.0.3"), IPv6: netip.MustParseAddr("fd13::3")}),
		// keeps its flows in the node's shared table, like an
		// endpointctl binding on a veth the plugin did not make
		p.sharedEndpoint(2, Endpoint{Identity: 70000, IPv4: netip.MustParseAddr("10.13.0.4"), IPv6: netip.MustParseAddr("fd13::4")}),
		p.net.ifindex[3], // a veth with programs but no endpoint
	}
	// Two of the three pods take packets from_pod delivers itself; the
	// third is reached through routing.
	p.local(eps[0], netip.MustParseAddr("10.13.0.2"), netip.MustParseAddr("fd13::2"))
	p.local(eps[1], netip.MustParseAddr("10.13.0.3"), netip.MustParseAddr("fd13::3"))
	p.ipcache(netip.MustParsePrefix("10.20.0.0/16"), 16777300)
	p.ipcache(netip.MustParsePrefix("10.20.5.5/32"), 70001)
	p.ipcache(netip.MustParsePrefix("fd20::/64"), 16777301)
	// another node (remote-node) and this node's own address (host),
	// inside a prefix like an ipBlock's
	p.ipcache(netip.MustParsePrefix("10.20.7.1/32"), identity.ID(6))
	p.ipcache(netip.MustParsePrefix("10.20.7.2/32"), identity.Host)
	p.ipcache(netip.MustParsePrefix("fd20::7:1/128"), identity.ID(6))
	// Other nodes' pod ranges: routed in the test netns (the FIB sends
	// their packets out itself), and one that is not (the stack's).
	p.remote(netip.MustParsePrefix("10.30.0.0/16"), netip.MustParsePrefix("fd30::/64"), netip.MustParsePrefix("10.31.0.0/16"))
	p.ipcache(netip.MustParsePrefix("10.30.1.5/32"), 70001)
	fixed := p.ref
	byslot, err := p.d.conntrackTables()
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { closeTables(byslot) })
	tables := slices.Collect(maps.Values(byslot))

	f.Fuzz(func(t *testing.T, data []byte) {
		p.t = t
		resetKernel(t, p.d, tables)
		p.ref = reference.New()
		p.ref.Endpoints, p.ref.IPCache, p.ref.Local, p.ref.Remote = fixed.Endpoints, fixed.IPCache, fixed.Local, fixed.Remote
		in := &fuzzInput{b: data}
		set := in.policySet()
		p.policy(set)
		for n := in.byte() % 4; n > 0; n-- {
			in.service(p)
		}
		for n := 0; n < 64 && in.more(); n++ {
			op := in.byte()
			if op%16 == 0 {
				set = in.mutate(set)
				p.policy(set)
				continue
			}
			if op%16 == 15 {
				in.service(p)
				continue
			}
			frame := in.frame()
			if op%16 == 8 {
				// from_net, on the uplink: what other nodes send
				if !refused(frame) {
					p.sendNet(frame)
				}
				continue
			}
			scope := Scope(op & 1)
			ifindex := eps[int(op>>1)%len(eps)]
			ingress := []int{0, eps[0], eps[1], eps[2], 999}[int(op>>4)%5]
			if scope == ScopeEgress {
				ingress = 0
			}
			if refused(frame) {
				continue
			}
			p.send(frame, scope, ifindex, ingress)
		}
	})
}

// resetKernel empties the state one fuzz input leaves behind: the
// conntrack tables the endpoints use (found once, at setup: listing the
// slots costs more than a whole input), the fragment table and the
// service maps. d's record of the frontend ids in use goes with the
// services map, or every input's frontends would stay counted until the
// map looked full.
func resetKernel(t *testing.T, d *Datapath, tables []*ebpf.Map) {
	for _, m := range append(tables, d.objs.Fragments, d.objs.Services, d.objs.Backends, d.objs.Affinity) {
		if err := clearMap(m); err != nil {
			t.Fatal(err)
		}
	}
	d.svcIDs = nil
}

func clearMap(m *ebpf.Map) error {
	key := make([]byte, m.KeySize())
	var keys [][]byte
	it := m.Iterate()
	val := make([]byte, m.ValueSize())
	for it.Next(&key, &val) {
		keys = append(keys, append([]byte{}, key...))
	}
	if err := it.Err(); err != nil {
		return err
	}
	for _, k := range keys {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return err
		}
	}
	return nil
}

type fuzzInput struct {
	b []byte
	i int
	// sent holds the crafted packets so far, for ICMP errors to quote.
	sent []pkttest.Packet
}

func (in *fuzzInput) more() bool { return in.i < len(in.b) }

func (in *fuzzInput) byte() byte {
	if in.i >= len(in.b) {
		return 0
	}
	in.i++
	return in.b[in.i-1]
}

func pick[T any](in *fuzzInput, xs ...T) T { return xs[int(in.byte())%len(xs)] }

// The addresses crafted packets use, by family: pods (local and routed),
// another node (remote-node), this node (host), prefixes, the world,
// other nodes' pods (the fast path's remote ranges, one unrouted), and
// for IPv6 the link-scoped and unspecified addresses neighbour discovery
// uses.
var (
	fuzzAddrs4 = []netip.Addr{
		netip.MustParseAddr("10.13.0.2"), netip.MustParseAddr("10.13.0.3"), netip.MustParseAddr("10.13.0.4"),
		netip.MustParseAddr("10.20.5.5"), netip.MustParseAddr("10.20.9.9"), netip.MustParseAddr("8.8.8.8"),
		netip.MustParseAddr("10.20.7.1"), netip.MustParseAddr("10.20.7.2"),
		netip.MustParseAddr("10.30.1.5"), netip.MustParseAddr("10.30.2.2"), netip.MustParseAddr("10.31.0.7"),
	}
	fuzzAddrs6 = []netip.Addr{
		netip.MustParseAddr("fd13::2"), netip.MustParseAddr("fd13::3"), netip.MustParseAddr("fd13::4"),
		netip.MustParseAddr("fd20::9"), netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("fd20::7:1"),
		netip.MustParseAddr("fe80::2"), netip.MustParseAddr("ff02::1"), netip.MustParseAddr("ff02::1:ff00:3"),
		netip.MustParseAddr("::"), netip.MustParseAddr("fd30::5"),
	}
	fuzzAddrs = append(slices.Clone(fuzzAddrs4), fuzzAddrs6...)
	// Service frontends, which crafted packets go to too.
	fuzzVIPs4 = []netip.Addr{netip.MustParseAddr("10.96.0.10"), netip.MustParseAddr("10.96.0.11")}
	fuzzVIPs6 = []netip.Addr{netip.MustParseAddr("fd96::10")}
	// Backends, by family: local pods, the routed pod, a remote pod, the
	// world.
	fuzzBackends4 = []netip.Addr{netip.MustParseAddr("10.13.0.2"), netip.MustParseAddr("10.13.0.3"),
		netip.MustParseAddr("10.13.0.4"), netip.MustParseAddr("10.20.5.5"), netip.MustParseAddr("8.8.8.8")}
	fuzzBackends6 = []netip.Addr{netip.MustParseAddr("fd13::2"), netip.MustParseAddr("fd13::3"),
		netip.MustParseAddr("fd13::4"), netip.MustParseAddr("fd20::9")}
	fuzzDsts = append(slices.Clone(fuzzAddrs), append(slices.Clone(fuzzVIPs4), fuzzVIPs6...)...)
)

// service puts a random frontend (or, one time in eight, deletes it): up
// to three distinct backends of its family, with or without session
// affinity (long enough never to time out during an input: the datapath's
// clock runs on).
func (in *fuzzInput) service(p *pair) {
	fe := ServiceFrontend{
		Addr:  pick(in, append(slices.Clone(fuzzVIPs4), fuzzVIPs6...)...),
		Port:  pick(in, uint16(53), 80, 443),
		Proto: pick(in, uint8(pkttest.TCP), pkttest.UDP, pkttest.SCTP),
	}
	how := in.byte()
	if how%8 == 0 {
		p.deleteService(fe)
		return
	}
	pool := fuzzBackends4
	if fe.Addr.Is6() {
		pool = fuzzBackends6
	}
	s := Service{AffinityTimeout: pick(in, uint32(0), 10800)}
	for n := int(how>>3) % 4; n > 0; n-- {
		b := ServiceBackend{Addr: pick(in, pool...), Port: pick(in, uint16(53), 80, 1000, 6000)}
		if !slices.Contains(s.Backends, b) {
			s.Backends = append(s.Backends, b)
		}
	}
	p.service(fe, s)
}

func (in *fuzzInput) rule() policy.Rule {
	r := policy.Rule{
		Subject:   pick(in, identity.ID(1001), 1002, 70000),
		Direction: pick(in, policy.Ingress, policy.Egress),
		Peer:      pick(in, identity.ID(1001), 1002, 70000, 70001, 16777300, 16777301, identity.Any, identity.World, identity.Host, identity.ID(6)),
		Proto:     pick(in, policy.ProtoAny, policy.ProtoTCP, policy.ProtoUDP, policy.ProtoSCTP, policy.ProtoICMP, policy.ProtoICMPv6),
		Action:    pick(in, policy.Allow, policy.Allow, policy.Allow, policy.Deny),
	}
	if r.Proto.HasPorts() {
		r.Ports = pick(in, policy.AnyPort, policy.PortRange{Lo: 53, Hi: 53}, policy.PortRange{Lo: 80, Hi: 80},
			policy.PortRange{Lo: 1, Hi: 1024}, policy.PortRange{Lo: 443, Hi: 6000}, policy.PortRange{Lo: 6000, Hi: 65535})
	}
	return r
}

func (in *fuzzInput) policySet() *policy.Set {
	s := &policy.Set{}
	n := int(in.byte() % 7)
	for i := 0; i < n; i++ {
		s.Rules = append(s.Rules, in.rule())
	}
	if iso := in.byte(); iso&4 != 0 {
		s.Isolation = map[identity.ID]policy.Isolation{70000: {Ingress: iso&1 != 0, Egress: iso&2 != 0}}
	}
	return s
}

// mutate adds or removes one rule; the revision moves on either way.
func (in *fuzzInput) mutate(s *policy.Set) *policy.Set {
	n := &policy.Set{Rules: append([]policy.Rule{}, s.Rules...), Isolation: s.Isolation}
	if len(n.Rules) > 0 && in.byte()&1 == 0 {
		i := int(in.byte()) % len(n.Rules)
		n.Rules = append(n.Rules[:i], n.Rules[i+1:]...)
	} else {
		n.Rules = append(n.Rules, in.rule())
	}
	return n
}

// frame builds a packet likely to meet earlier ones (few addresses and
// ports), or takes raw bytes behind an IP ethertype.
func (in *fuzzInput) frame() []byte {
	kind := in.byte()
	if kind%8 == 0 {
		n := int(in.byte()) % 96
		raw := make([]byte, 0, 14+n)
		raw = append(raw, 2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2)
		raw = append(raw, pick(in, []byte{8, 0}, []byte{0x86, 0xdd}, []byte{8, 6})...)
		for i := 0; i < n; i++ {
			raw = append(raw, in.byte())
		}
		return raw
	}
	if kind%8 == 1 && len(in.sent) > 0 {
		return in.icmpError()
	}
	src, dst := pick(in, fuzzAddrs...), pick(in, fuzzDsts...)
	if src.Is4() != dst.Is4() {
		same := fuzzAddrs4
		if src.Is6() {
			same = fuzzAddrs6
		}
		dst = same[int(kind)%len(same)]
		if kind&4 != 0 {
			dst = fuzzVIPs4[0]
			if src.Is6() {
				dst = fuzzVIPs6[0]
			}
		}
	}
	pkt := pkttest.Packet{
		Src: src, Dst: dst,
		Proto:    pick(in, uint8(pkttest.TCP), pkttest.UDP, pkttest.ICMP, pkttest.ICMPv6, pkttest.SCTP, 47),
		SrcPort:  pick(in, uint16(1000), 1001, 53, 80),
		DstPort:  pick(in, uint16(53), 80, 443, 6000, 1000),
		TCPFlags: pick(in, uint8(pkttest.SYN), pkttest.SYN|pkttest.ACK, pkttest.ACK, pkttest.FIN|pkttest.ACK, pkttest.RST, 0),
		ICMPType: pick(in, uint8(8), 0, 128, 129, 3, 135, 136, 133, 143, 130),
		ICMPID:   pick(in, uint16(1), 2),
		FragID:   uint32(in.byte() % 2),
		HopLimit: pick(in, uint8(64), 255, 1),
	}
	switch kind >> 5 {
	case 1:
		pkt.MoreFragments = true
	case 2:
		pkt.FragOffset = 3
	case 3:
		pkt.FragOffset, pkt.MoreFragments = 2, true
	}
	if kind&16 != 0 {
		pkt.Payload = make([]byte, int(in.byte()%32))
	}
	in.sent = append(in.sent, pkt)
	return pkt.Frame()
}

// icmpError builds an ICMP message quoting an earlier packet (or its
// reply), mostly sent back to that packet's source: errors about flows the
// datapath tracks, and about ones it does not.
func (in *fuzzInput) icmpError() []byte {
	orig := in.sent[int(in.byte())%len(in.sent)]
	if in.byte()&1 != 0 {
		orig = orig.Reverse()
	}
	same := fuzzAddrs4
	if orig.Src.Is6() {
		same = fuzzAddrs6
	}
	src, dst := pick(in, orig.Dst, orig.Dst, same[int(in.byte())%len(same)]), pick(in, orig.Src, orig.Src, orig.Src, orig.Dst)
	f := orig.Frame()
	hlen := 20
	typ := pick(in, uint8(3), 11, 12, 5, 8)
	proto := uint8(pkttest.ICMP)
	if orig.Src.Is6() {
		hlen, proto = 40, pkttest.ICMPv6
		typ = pick(in, uint8(1), 2, 3, 4, 128)
	}
	quote := f[14:min(len(f), 14+hlen+8)]
	if cut := int(in.byte()) % 16; cut < len(quote) && in.byte()&3 == 0 {
		quote = quote[:len(quote)-cut]
	}
	return pkttest.Packet{Src: src, Dst: dst, Proto: proto, HopLimit: 64,
		L4: append([]byte{typ, in.byte(), 0, 0, 0, 0, 0, 0}, quote...)}.Frame()
}
