package reference

import "encoding/binary"

type parseResult uint8

const (
	parseOK parseResult = iota
	parseNonIP
	parseND
	parseMalformed
	parseFragUnknown
)

type pkt struct {
	saddr, daddr [16]byte
	sport, dport uint16
	proto        uint8
	family       uint8
	tcpFlags     uint8
	ttl          uint8 // or hop limit
	// An ICMP error (related): the flow of the packet it quotes.
	related                bool
	innerSaddr, innerDaddr [16]byte
	innerSport, innerDport uint16
	innerProto             uint8
	echoReply              bool
	// A first fragment with more to come: its ports are remembered under
	// fragID once the packet passes.
	fragFirst bool
	fragID    uint32
	// fragLater: a fragment without its L4 header.
	fragLater bool
	// What a Service translation changed (1 the destination, 2 the
	// source), and what it was.
	xlated   uint8
	origAddr [16]byte
	origPort uint16
}

// wire is the packet's tuple as it came, before any translation.
func (p *pkt) wire() (saddr, daddr [16]byte, sport, dport uint16) {
	saddr, daddr, sport, dport = p.saddr, p.daddr, p.sport, p.dport
	switch p.xlated {
	case 1:
		daddr, dport = p.origAddr, p.origPort
	case 2:
		saddr, sport = p.origAddr, p.origPort
	}
	return
}

const (
	ethHLen    = 14
	maxIPv6Ext = 4
	protoICMP  = 1
	protoTCP   = 6
	protoUDP   = 17
	protoICMP6 = 58
	protoSCTP  = 132
	extHop     = 0
	extRouting = 43
	extFrag    = 44
	extAH      = 51
	extDst     = 60
)

func isExt(h uint8) bool {
	return h == extHop || h == extRouting || h == extDst || h == extFrag || h == extAH
}

func (d *Datapath) parse(f []byte, p *pkt) parseResult {
	if len(f) < ethHLen {
		return parseMalformed
	}
	switch binary.BigEndian.Uint16(f[12:14]) {
	case 0x0800:
		return d.parseIPv4(f, p)
	case 0x86dd:
		return d.parseIPv6(f, p)
	}
	return parseNonIP
}

func (d *Datapath) parseIPv4(f []byte, p *pkt) parseResult {
	ip := f[ethHLen:]
	if len(ip) < 20 {
		return parseMalformed
	}
	if ip[0]>>4 != 4 || ip[0]&0xf < 5 {
		return parseMalformed
	}
	hlen := uint32(ip[0]&0xf) * 4
	tot := uint32(binary.BigEndian.Uint16(ip[2:4]))
	if tot < hlen || tot+ethHLen > uint32(len(f)) {
		return parseMalformed
	}
	p.family = 4
	p.proto = ip[9]
	p.ttl = ip[8]
	p.saddr[10], p.saddr[11] = 0xff, 0xff
	copy(p.saddr[12:], ip[12:16])
	p.daddr[10], p.daddr[11] = 0xff, 0xff
	copy(p.daddr[12:], ip[16:20])
	frag := binary.BigEndian.Uint16(ip[6:8])
	id := uint32(binary.BigEndian.Uint16(ip[4:6]))
	if frag&0x1fff != 0 {
		return d.fragLater(p, id)
	}
	var l4 []byte
	if uint32(len(ip)) > hlen {
		l4 = ip[hlen:]
	}
	res := parseL4(p, l4, tot-hlen, 0)
	p.fragFirst, p.fragID = res == parseOK && frag&0x2000 != 0, id
	return res
}

func (d *Datapath) parseIPv6(f []byte, p *pkt) parseResult {
	ip6 := f[ethHLen:]
	if len(ip6) < 40 {
		return parseMalformed
	}
	if ip6[0]>>4 != 6 {
		return parseMalformed
	}
	payload := uint32(binary.BigEndian.Uint16(ip6[4:6]))
	if payload == 0 || payload+40+ethHLen > uint32(len(f)) {
		return parseMalformed
	}
	p.family = 6
	p.ttl = ip6[7]
	copy(p.saddr[:], ip6[8:24])
	copy(p.daddr[:], ip6[24:40])
	next := ip6[6]
	off := uint32(40)
	isFrag, fragMore := false, false
	var fragID uint32
	for i := 0; i < maxIPv6Ext; i++ {
		if !isExt(next) {
			break
		}
		if off > 40+maxIPv6Ext*2048 {
			return parseMalformed
		}
		if off+8 > uint32(len(ip6)) || off+8 > payload+40 {
			return parseMalformed
		}
		h := ip6[off:]
		if next == extFrag {
			if isFrag {
				return parseMalformed
			}
			fo := binary.BigEndian.Uint16(h[2:4])
			isFrag, fragMore = true, fo&1 != 0
			fragID = binary.BigEndian.Uint32(h[4:8])
			next = h[0]
			off += 8
			if fo>>3 != 0 {
				p.proto = next
				return d.fragLater(p, fragID)
			}
			continue
		}
		var l uint32
		if next == extAH {
			l = (uint32(h[1]) + 2) * 4
		} else {
			l = (uint32(h[1]) + 1) * 8
		}
		next = h[0]
		off += l
	}
	if isExt(next) {
		return parseMalformed
	}
	if off > payload+40 || off > 40+maxIPv6Ext*2048 {
		return parseMalformed
	}
	p.proto = next
	var l4 []byte
	if uint32(len(ip6)) > off {
		l4 = ip6[off:]
	}
	res := parseL4(p, l4, payload+40-off, ip6[7])
	p.fragFirst, p.fragID = res == parseOK && isFrag && fragMore, fragID
	return res
}

// parseL4 mirrors parse_l4: l4 is what the frame holds from the L4 header
// on, l4len what the IP header says the payload is.
func parseL4(p *pkt, l4 []byte, l4len uint32, hopLimit uint8) parseResult {
	need := func(n int) bool { return l4len >= uint32(n) && len(l4) >= n }
	switch p.proto {
	case protoTCP:
		if !need(20) {
			return parseMalformed
		}
		if l4[12]>>4 < 5 || uint32(l4[12]>>4)*4 > l4len {
			return parseMalformed
		}
		p.tcpFlags = l4[13]
	case protoUDP:
		if !need(8) {
			return parseMalformed
		}
	case protoSCTP:
		if !need(12) {
			return parseMalformed
		}
	case protoICMP, protoICMP6:
		if !need(8) {
			return parseMalformed
		}
		if isEcho(p.family, p.proto, l4[0]) {
			p.sport = binary.BigEndian.Uint16(l4[4:6])
			p.dport = p.sport
			p.echoReply = l4[0] == 0 || l4[0] == 129
		}
		if (p.family == 4 && p.proto == protoICMP && (l4[0] == 3 || l4[0] == 11 || l4[0] == 12)) ||
			(p.family == 6 && p.proto == protoICMP6 && l4[0] >= 1 && l4[0] <= 4) {
			parseQuoted(p, l4[8:], l4len-8)
		}
		if p.family == 6 && p.proto == protoICMP6 && linkScoped(p.daddr) &&
			((l4[0] >= 133 && l4[0] <= 137 && hopLimit == 255) || ((l4[0] >= 130 && l4[0] <= 132) || l4[0] == 143) && hopLimit == 1) {
			return parseND
		}
		return parseOK
	default:
		return parseOK
	}
	p.sport = binary.BigEndian.Uint16(l4[0:2])
	p.dport = binary.BigEndian.Uint16(l4[2:4])
	return parseOK
}

// linkScoped: fe80::/10 or ff02::/16, addresses no router forwards.
func linkScoped(a [16]byte) bool {
	return (a[0] == 0xfe && a[1]&0xc0 == 0x80) || (a[0] == 0xff && a[1] == 0x02)
}

func isEcho(family, proto, typ uint8) bool {
	return (family == 4 && proto == protoICMP && (typ == 8 || typ == 0)) ||
		(family == 6 && proto == protoICMP6 && (typ == 128 || typ == 129))
}

// parseQuoted mirrors parse_quoted: q is what the frame holds of the quoted
// packet, qlen what the outer header says it is.
func parseQuoted(p *pkt, q []byte, qlen uint32) {
	var l4 []byte
	if p.family == 4 {
		if len(q) < 20 || q[0]>>4 != 4 || q[0]&0xf < 5 {
			return
		}
		hlen := uint32(q[0]&0xf) * 4
		if qlen < hlen+8 || binary.BigEndian.Uint16(q[6:8])&0x1fff != 0 {
			return
		}
		p.innerSaddr, p.innerDaddr = [16]byte{10: 0xff, 11: 0xff}, [16]byte{10: 0xff, 11: 0xff}
		copy(p.innerSaddr[12:], q[12:16])
		copy(p.innerDaddr[12:], q[16:20])
		p.innerProto = q[9]
		if uint32(len(q)) < hlen+8 {
			return
		}
		l4 = q[hlen:]
	} else {
		if len(q) < 40 || q[0]>>4 != 6 || qlen < 48 {
			return
		}
		copy(p.innerSaddr[:], q[8:24])
		copy(p.innerDaddr[:], q[24:40])
		p.innerProto = q[6]
		if len(q) < 48 {
			return
		}
		l4 = q[40:]
	}
	switch p.innerProto {
	case protoTCP, protoUDP, protoSCTP:
		p.innerSport = binary.BigEndian.Uint16(l4[0:2])
		p.innerDport = binary.BigEndian.Uint16(l4[2:4])
	case protoICMP, protoICMP6:
		if isEcho(p.family, p.innerProto, l4[0]) {
			p.innerSport = binary.BigEndian.Uint16(l4[4:6])
			p.innerDport = p.innerSport
		}
	default:
		return
	}
	p.related = true
}

// fragFirst remembers a first fragment's ports under its tuple as it came
// (before a Service translation): its followers come so.
func (d *Datapath) fragFirst(p *pkt) {
	s, dst, sport, dport := p.wire()
	d.frags[fragKey{s, dst, p.fragID, p.proto}] = [2]uint16{sport, dport}
}

func (d *Datapath) fragLater(p *pkt, id uint32) parseResult {
	p.fragLater = true
	ports, ok := d.frags[fragKey{p.saddr, p.daddr, id, p.proto}]
	if !ok {
		return parseFragUnknown
	}
	p.sport, p.dport = ports[0], ports[1]
	return parseOK
}
