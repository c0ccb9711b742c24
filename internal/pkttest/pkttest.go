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
