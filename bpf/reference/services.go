package reference

import (
	"net/netip"
	"time"
)

// Frontend is a Service's ClusterIP, port and protocol.
type Frontend struct {
	Addr  netip.Addr
	Port  uint16
	Proto uint8
}

// Backend is one endpoint of a frontend.
type Backend struct {
	Addr netip.Addr
	Port uint16
}

// Service is a frontend's backends, in slot order, and its session
// affinity timeout in seconds (0: none).
type Service struct {
	Backends        []Backend
	AffinityTimeout uint32
}

type svcEntry struct {
	id uint32
	Service
}

type affKey struct {
	id     uint32
	client [16]byte
}

type affEntry struct {
	lastUsed time.Duration
	backend  Backend
	slot     int
}

// PutService makes new flows to fe go to s's backends. The frontend keeps
// its id; a new one gets the lowest free id, as bpf.PutService gives it:
// affinity is kept by id, so ids must agree.
func (d *Datapath) PutService(fe Frontend, s Service) {
	e, ok := d.services[fe]
	if !ok {
		used := map[uint32]bool{}
		for _, o := range d.services {
			used[o.id] = true
		}
		e.id = 1
		for used[e.id] {
			e.id++
		}
	}
	e.Service = Service{Backends: append([]Backend(nil), s.Backends...), AffinityTimeout: s.AffinityTimeout}
	d.services[fe] = e
}

// DeleteService removes a frontend.
func (d *Datapath) DeleteService(fe Frontend) { delete(d.services, fe) }

// svcPick is a new flow's backend pick, remembered once the flow is
// admitted.
type svcPick struct {
	picked   bool
	id       uint32
	slot     int
	affinity bool
}

func frontendOf(p *pkt) Frontend {
	return Frontend{Addr: netip.AddrFrom16(p.daddr).Unmap(), Port: p.dport, Proto: p.proto}
}

// pick chooses the backend of a client's new flow to a frontend: the one
// of the client's affinity while it holds and that backend is still in its
// slot, else Pick's.
func (d *Datapath) pick(p *pkt, e svcEntry) int {
	if e.AffinityTimeout != 0 {
		a, ok := d.affinity[affKey{e.id, p.saddr}]
		if ok && d.now()-a.lastUsed <= time.Duration(e.AffinityTimeout)*time.Second &&
			a.slot < len(e.Backends) && e.Backends[a.slot] == a.backend {
			return a.slot
		}
	}
	slot := 0
	if d.Pick != nil {
		slot = d.Pick(frontendOf(p), e.Backends)
	}
	if slot < 0 || slot >= len(e.Backends) {
		slot = 0
	}
	return slot
}

func (d *Datapath) now() time.Duration {
	if d.Now == nil {
		return 0
	}
	return d.Now()
}

// translate is where a Service's address becomes a backend's, before
// policy: a pod's packet of a flow with a backend goes to it, a new flow
// to a frontend gets one (or, without backends, is rejected). Conntrack is
// asked again for the translated tuple, whose entry is the flow's policy
// memo.
func (d *Datapath) translate(p *pkt, scope Scope, st ctStatus, f *flow, x *svcPick) ctStatus {
	if scope != Egress {
		return st
	}
	if st == ctEstablished {
		if f.ct.nat == nil || !f.ct.nat.orig {
			return st
		}
		f.ct.touch(p, false)
		p.rewriteDst(f.ct.nat.addr, f.ct.nat.port)
		return d.retrack(p, f)
	}
	if st != ctNew || p.related || p.fragLater || !hasPorts(p.proto) {
		return st
	}
	e, ok := d.services[frontendOf(p)]
	if !ok {
		return st
	}
	if len(e.Backends) == 0 {
		return ctNoBackend
	}
	slot := d.pick(p, e)
	*x = svcPick{picked: true, id: e.id, slot: slot, affinity: e.AffinityTimeout != 0}
	b := e.Backends[slot]
	p.rewriteDst(addr16(b.Addr), b.Port)
	d.retrack(p, f)
	*f = flow{key: f.key}
	return ctNew
}

// retrack looks the translated tuple up among the pod's own flows; a
// translated packet is a forward one.
func (d *Datapath) retrack(p *pkt, f *flow) ctStatus {
	k := ctKey{f.key.slot, p.saddr, p.daddr, p.sport, p.dport, p.proto, Egress}
	bareSYN := p.proto == protoTCP && p.tcpFlags&(tcpSYN|tcpACK) == tcpSYN
	if ct := d.ct[k]; ct != nil && !(ct.flags&ctClosing != 0 && bareSYN) {
		*f = found(k, ct)
		return ctEstablished
	}
	*f = flow{key: k}
	return ctNew
}

// remember keeps a new flow's backend once its translated entry nct is in:
// an entry keyed by the tuple the pod sent, and the client's affinity.
func (d *Datapath) remember(p *pkt, slot uint32, nct *ctEntry, x *svcPick) {
	o := *nct
	o.flags = ctSeenReply
	o.nat = &natInfo{orig: true, addr: p.daddr, port: p.dport}
	d.ct[ctKey{slot, p.saddr, p.origAddr, p.sport, p.origPort, p.proto, Egress}] = &o
	if x.affinity {
		d.affinity[affKey{x.id, p.saddr}] = affEntry{
			lastUsed: d.now(),
			backend:  Backend{Addr: netip.AddrFrom16(p.daddr).Unmap(), Port: p.dport},
			slot:     x.slot,
		}
	}
}

// natInfo is a conntrack entry's translation: with orig, the entry is
// keyed by the pod's tuple and addr:port is the backend; without, it is
// keyed by the translated tuple and addr:port is the frontend its replies
// come from.
type natInfo struct {
	orig bool
	addr [16]byte
	port uint16
}

func (p *pkt) rewriteDst(a [16]byte, port uint16) {
	if p.xlated == 0 {
		p.xlated, p.origAddr, p.origPort = 1, p.daddr, p.dport
	}
	p.daddr, p.dport = a, port
}

func (p *pkt) rewriteSrc(a [16]byte, port uint16) {
	if p.xlated == 0 {
		p.xlated, p.origAddr, p.origPort = 2, p.saddr, p.sport
	}
	p.saddr, p.sport = a, port
}

func hasPorts(proto uint8) bool { return proto == protoTCP || proto == protoUDP || proto == protoSCTP }

func addr16(a netip.Addr) [16]byte { return netip.AddrFrom16(a.As16()).As16() }

// AgeAffinity moves every client's last use of its affinity back by age,
// as tests do to the datapath's entries to time an affinity out.
func (d *Datapath) AgeAffinity(age time.Duration) {
	for k, a := range d.affinity {
		a.lastUsed -= age
		d.affinity[k] = a
	}
}

// hairpin takes a pod's packet to itself through its own Service, allowed
// as its egress, through its ingress and back into it: a forward packet
// comes from the frontend's address (and the client's port), the answer
// to it goes back to the pod's own address before the pod's check as the
// client, which gives it the frontend's address as its source. The
// ingress check's peer is the pod itself.
func (d *Datapath) hairpin(p *pkt, ep Endpoint, ifindex int, v Verdict) Verdict {
	reply := v.Reason == AllowReply
	if reply {
		p.rewriteDst(p.saddr, p.dport)
	} else {
		p.rewriteSrc(p.origAddr, p.sport)
	}
	in := d.check(p, Ingress, ep, false, reply, !reply)
	if in == toStack {
		d.pass(p)
		return v
	}
	if !in.Drop() {
		d.pass(p)
	}
	v.To, v.Ingress = ifindex, in
	return v
}
