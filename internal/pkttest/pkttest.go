// Package pkttest builds Ethernet frames for datapath tests: IPv4 and IPv6
// with TCP, UDP, SCTP or ICMP, fragments and extension headers, and ARP.
package pkttest

import (
	"encoding/binary"
	"net/netip"
)

// TCP flags.
const (
	FIN = 0x01
	SYN = 0x02
	RST = 0x04
	PSH = 0x08
	ACK = 0x10
)

// IP protocol numbers.
const (
	ICMP   = 1
	TCP    = 6
	UDP    = 17
	ICMPv6 = 58
	SCTP   = 132
)

// Packet describes one frame. Zero fields get sensible values.
type Packet struct {
	Src, Dst         netip.Addr
	Proto            uint8
	SrcPort, DstPort uint16
	TCPFlags         uint8
	ICMPType         uint8
	ICMPID           uint16
	// Fragmentation: FragOffset in 8-byte units. For IPv6 a fragment
	// header is added when either is set.
	FragOffset    uint16
	MoreFragments bool
	FragID        uint32
	HopLimit      uint8 // IPv4 TTL or IPv6 hop limit; 0 means 64
	// L4 is used verbatim instead of a built L4 header when not nil.
	L4      []byte
	Payload []byte
}

// Frame encodes p as an Ethernet frame.
func (p Packet) Frame() []byte {
	l4 := p.L4
	if l4 == nil && !(p.FragOffset != 0) {
		l4 = p.l4Header()
	}
	l4 = append(append([]byte{}, l4...), p.Payload...)
	if p.Src.Is4() {
		return append(eth(0x0800), p.ipv4(l4)...)
	}
	return append(eth(0x86dd), p.ipv6(l4)...)
}

func eth(ethertype uint16) []byte {
	b := make([]byte, 14)
	copy(b[0:6], []byte{0x02, 0, 0, 0, 0, 1})
	copy(b[6:12], []byte{0x02, 0, 0, 0, 0, 2})
	binary.BigEndian.PutUint16(b[12:], ethertype)
	return b
}

func (p Packet) l4Header() []byte {
	switch p.Proto {
	case TCP:
		b := make([]byte, 20)
		binary.BigEndian.PutUint16(b[0:], p.SrcPort)
		binary.BigEndian.PutUint16(b[2:], p.DstPort)
		b[12] = 5 << 4
		b[13] = p.TCPFlags
		binary.BigEndian.PutUint16(b[14:], 65535)
		return b
	case UDP:
		b := make([]byte, 8)
		binary.BigEndian.PutUint16(b[0:], p.SrcPort)
		binary.BigEndian.PutUint16(b[2:], p.DstPort)
		binary.BigEndian.PutUint16(b[4:], uint16(8+len(p.Payload)))
		return b
	case SCTP:
		b := make([]byte, 12)
		binary.BigEndian.PutUint16(b[0:], p.SrcPort)
		binary.BigEndian.PutUint16(b[2:], p.DstPort)
		return b
	case ICMP, ICMPv6:
		b := make([]byte, 8)
		b[0] = p.ICMPType
		binary.BigEndian.PutUint16(b[4:], p.ICMPID)
		return b
	}
	return nil
}

func (p Packet) ipv4(l4 []byte) []byte {
	b := make([]byte, 20, 20+len(l4))
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:], uint16(20+len(l4)))
	binary.BigEndian.PutUint16(b[4:], uint16(p.FragID))
	fo := p.FragOffset & 0x1fff
	if p.MoreFragments {
		fo |= 0x2000
	}
	binary.BigEndian.PutUint16(b[6:], fo)
	b[8] = p.HopLimit
	if b[8] == 0 {
		b[8] = 64
	}
	b[9] = p.Proto
	s, d := p.Src.As4(), p.Dst.As4()
	copy(b[12:], s[:])
	copy(b[16:], d[:])
	binary.BigEndian.PutUint16(b[10:], checksum(b))
	return append(b, l4...)
}

func (p Packet) ipv6(l4 []byte) []byte {
	var ext []byte
	next := p.Proto
	if p.FragOffset != 0 || p.MoreFragments {
		ext = make([]byte, 8)
		ext[0] = p.Proto
		fo := p.FragOffset << 3
		if p.MoreFragments {
			fo |= 1
		}
		binary.BigEndian.PutUint16(ext[2:], fo)
		binary.BigEndian.PutUint32(ext[4:], p.FragID)
		next = 44
	}
	b := make([]byte, 40, 40+len(ext)+len(l4))
	b[0] = 0x60
	binary.BigEndian.PutUint16(b[4:], uint16(len(ext)+len(l4)))
	b[6] = next
	b[7] = p.HopLimit
	if b[7] == 0 {
		b[7] = 64
	}
	s, d := p.Src.As16(), p.Dst.As16()
	copy(b[8:], s[:])
	copy(b[24:], d[:])
	return append(append(b, ext...), l4...)
}

func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// ARP returns an ARP request frame.
func ARP() []byte {
	b := append(eth(0x0806), make([]byte, 28)...)
	binary.BigEndian.PutUint16(b[14:], 1)
	binary.BigEndian.PutUint16(b[16:], 0x0800)
	b[18], b[19] = 6, 4
	binary.BigEndian.PutUint16(b[20:], 1)
	return b
}

// Reverse returns the reply direction of p (addresses and ports swapped;
// echo requests become echo replies).
func (p Packet) Reverse() Packet {
	r := p
	r.Src, r.Dst = p.Dst, p.Src
	r.SrcPort, r.DstPort = p.DstPort, p.SrcPort
	switch {
	case p.Proto == ICMP && p.ICMPType == 8:
		r.ICMPType = 0
	case p.Proto == ICMPv6 && p.ICMPType == 128:
		r.ICMPType = 129
	}
	return r
}

// WithChecksums returns a copy of an IPv4 or IPv6 frame (no IPv6 extension
// headers) with its TCP, UDP, ICMP or ICMPv6 checksum filled in, so a test
// can tell whether a rewrite kept it right (see ChecksumsOK).
func WithChecksums(frame []byte) []byte {
	f := append([]byte{}, frame...)
	l4, off, ok := checksumField(f)
	if !ok {
		return f
	}
	binary.BigEndian.PutUint16(l4[off:], 0)
	sum := l4Sum(f, l4)
	if sum == 0 && l4Proto(f) == UDP {
		sum = 0xffff
	}
	binary.BigEndian.PutUint16(l4[off:], sum)
	return f
}

// ChecksumsOK reports whether a frame's IPv4 header checksum and its TCP,
// UDP, ICMP or ICMPv6 checksum (with the pseudo-header where it has one)
// are right. An IPv4 UDP checksum of 0 (none) is right.
func ChecksumsOK(frame []byte) bool {
	if len(frame) >= 34 && binary.BigEndian.Uint16(frame[12:14]) == 0x0800 {
		hlen := int(frame[14]&0xf) * 4
		if len(frame) < 14+hlen || checksum(frame[14:14+hlen]) != 0 {
			return false
		}
	}
	l4, off, ok := checksumField(frame)
	if !ok {
		return true
	}
	if l4Proto(frame) == UDP && frame[12] == 0x08 && binary.BigEndian.Uint16(l4[off:]) == 0 {
		return true
	}
	return l4Sum(frame, l4) == 0
}

func l4Proto(f []byte) uint8 {
	if binary.BigEndian.Uint16(f[12:14]) == 0x0800 {
		return f[14+9]
	}
	return f[14+6]
}

// checksumField finds a frame's L4 part and where its checksum is.
func checksumField(f []byte) (l4 []byte, off int, ok bool) {
	if len(f) < 14 {
		return nil, 0, false
	}
	switch binary.BigEndian.Uint16(f[12:14]) {
	case 0x0800:
		if len(f) < 34 || binary.BigEndian.Uint16(f[14+6:])&0x3fff != 0 {
			return nil, 0, false
		}
		hlen := int(f[14]&0xf) * 4
		tot := int(binary.BigEndian.Uint16(f[14+2:]))
		if tot > len(f)-14 || tot < hlen {
			return nil, 0, false
		}
		l4 = f[14+hlen : 14+tot]
	case 0x86dd:
		if len(f) < 54 {
			return nil, 0, false
		}
		n := int(binary.BigEndian.Uint16(f[14+4:]))
		if n > len(f)-54 {
			return nil, 0, false
		}
		l4 = f[54 : 54+n]
	default:
		return nil, 0, false
	}
	switch l4Proto(f) {
	case TCP:
		off = 16
	case UDP:
		off = 6
	case ICMP, ICMPv6:
		off = 2
	default:
		return nil, 0, false
	}
	return l4, off, len(l4) >= off+2
}

// l4Sum is the internet checksum of l4 with the pseudo-header of its
// protocol (none for ICMP).
func l4Sum(f, l4 []byte) uint16 {
	var ph []byte
	proto := l4Proto(f)
	if binary.BigEndian.Uint16(f[12:14]) == 0x0800 {
		if proto != ICMP {
			ph = append(append([]byte{}, f[14+12:14+20]...), 0, proto, byte(len(l4)>>8), byte(len(l4)))
		}
	} else {
		ph = append(append([]byte{}, f[14+8:14+40]...), 0, 0, byte(len(l4)>>8), byte(len(l4)), 0, 0, 0, proto)
	}
	b := append(ph, l4...)
	if len(b)%2 == 1 {
		b = append(b, 0)
	}
	return checksum(b)
}
