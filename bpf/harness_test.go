package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/idcni/idcni/bpf/reference"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// testNet is a private network namespace, held by one locked OS thread,
// with veths whose ifindexes stand for host veths. BPF_PROG_TEST_RUN
// resolves the ifindex of its context in the caller's namespace, so every
// run goes through that thread. The namespace dies with the thread.
type testNet struct {
	ifindex []int
	calls   chan func()
}

func newTestNet(t testing.TB, links int) *testNet {
	t.Helper()
	n := &testNet{calls: make(chan func())}
	ready := make(chan error)
	go func() {
		runtime.LockOSThread()
		// Never unlocked: the thread exits with the goroutine, taking the
		// namespace with it.
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			ready <- fmt.Errorf("unshare netns: %w", err)
			return
		}
		// Links that are up send IPv6 neighbour discovery and MLD of
		// their own (link-local addresses, duplicate address detection,
		// router solicitations), which the programs would count next to
		// the test's packets: none here, so every count is the test's.
		for _, f := range []string{"addr_gen_mode=1", "accept_dad=0", "dad_transmits=0", "router_solicitations=0"} {
			name, val, _ := strings.Cut(f, "=")
			if err := os.WriteFile("/proc/sys/net/ipv6/conf/default/"+name, []byte(val), 0o644); err != nil {
				ready <- fmt.Errorf("sysctl ipv6 default %s: %w", name, err)
				return
			}
		}
		for i := 0; i < links; i++ {
			l := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: fmt.Sprintf("ep%d", i)}, PeerName: fmt.Sprintf("pe%d", i)}
			if err := netlink.LinkAdd(l); err != nil {
				ready <- fmt.Errorf("add veth: %w", err)
				return
			}
			got, err := netlink.LinkByName(l.Name)
			if err != nil {
				ready <- err
				return
			}
			n.ifindex = append(n.ifindex, got.Attrs().Index)
		}
		if err := setupUplink(); err != nil {
			ready <- fmt.Errorf("uplink of the test netns: %w", err)
			return
		}
		ready <- nil
		for f := range n.calls {
			f()
		}
	}()
	if err := <-ready; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { close(n.calls) })
	return n
}

// The test netns routes other nodes' pod ranges (fibRoutes) through up0
// to a next hop with a permanent neighbour entry, forwarding on: the
// answer bpf_fib_lookup gives from_pod under BPF_PROG_TEST_RUN, which
// runs it against the caller's netns. A remote range outside fibRoutes
// has no route there (there is no default route either), and the FIB
// leaves its packets to the stack. All of it stays in the private netns.
var (
	fibRoutes  = []netip.Prefix{netip.MustParsePrefix("10.30.0.0/16"), netip.MustParsePrefix("fd30::/64")}
	nextHopMAC = net.HardwareAddr{0x02, 0xcc, 0, 0, 0, 2}
	uplinkMAC  = net.HardwareAddr{0x02, 0xcc, 0, 0, 0, 1}
)

// uplinkMTU is up0's: the FIB sends a larger packet to the stack.
const uplinkMTU = 1500

func setupUplink() error {
	for _, f := range []string{"/proc/sys/net/ipv4/conf/all/forwarding", "/proc/sys/net/ipv6/conf/all/forwarding"} {
		if err := os.WriteFile(f, []byte("1"), 0o644); err != nil {
			return err
		}
	}
	up := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "up0", HardwareAddr: uplinkMAC, MTU: uplinkMTU}, PeerName: "upp"}
	if err := netlink.LinkAdd(up); err != nil {
		return err
	}
	links, err := netlink.LinkList()
	if err != nil {
		return err
	}
	for _, l := range links {
		if err := netlink.LinkSetUp(l); err != nil {
			return err
		}
	}
	l, err := netlink.LinkByName("up0")
	if err != nil {
		return err
	}
	idx := l.Attrs().Index
	for _, a := range []struct{ local, via string }{{"192.0.2.1/24", "192.0.2.2"}, {"2001:db8:ff::1/64", "2001:db8:ff::2"}} {
		addr, err := netlink.ParseAddr(a.local)
		if err != nil {
			return err
		}
		addr.Flags = unix.IFA_F_NODAD
		if err := netlink.AddrAdd(l, addr); err != nil {
			return err
		}
		via := net.ParseIP(a.via)
		family := netlink.FAMILY_V4
		if via.To4() == nil {
			family = netlink.FAMILY_V6
		}
		if err := netlink.NeighSet(&netlink.Neigh{LinkIndex: idx, Family: family, State: netlink.NUD_PERMANENT, IP: via, HardwareAddr: nextHopMAC}); err != nil {
			return err
		}
		for _, r := range fibRoutes {
			if r.Addr().Is4() != (family == netlink.FAMILY_V4) {
				continue
			}
			dst := &net.IPNet{IP: r.Addr().AsSlice(), Mask: net.CIDRMask(r.Bits(), r.Addr().BitLen())}
			if err := netlink.RouteAdd(&netlink.Route{LinkIndex: idx, Dst: dst, Gw: via}); err != nil {
				return err
			}
		}
	}
	return nil
}

// fibRouted reports whether the test netns's FIB sends a frame for dst
// out of up0 itself: routed, and within up0's MTU.
func fibRouted(frame []byte, dst netip.Addr) bool {
	if len(frame)-14 > uplinkMTU {
		return false
	}
	for _, r := range fibRoutes {
		if r.Contains(dst) {
			return true
		}
	}
	return false
}

// do runs f on the namespace's thread.
func (n *testNet) do(f func()) {
	done := make(chan struct{})
	n.calls <- func() { f(); close(done) }
	<-done
}

// skbCtx is struct __sk_buff up to the fields BPF_PROG_TEST_RUN accepts.
type skbCtx struct {
	Len            uint32
	PktType        uint32
	Mark           uint32
	QueueMapping   uint32
	Protocol       uint32
	VlanPresent    uint32
	VlanTci        uint32
	VlanProto      uint32
	Priority       uint32
	IngressIfindex uint32
	Ifindex        uint32
	TcIndex        uint32
	Cb             [5]uint32
	Hash           uint32
	TcClassid      uint32
	Data           uint32
	DataEnd        uint32
	NapiID         uint32
	Family         uint32
	RemoteIP4      uint32
	LocalIP4       uint32
	RemoteIP6      [4]uint32
	LocalIP6       [4]uint32
	RemotePort     uint32
	LocalPort      uint32
	DataMeta       uint32
	FlowKeys       uint64
	Tstamp         uint64
	WireLen        uint32
	GsoSegs        uint32
	Sk             uint64
	GsoSize        uint32
	TstampType     uint8
	_              [3]byte
	Hwtstamp       uint64
}

// progRunAttr is the BPF_PROG_TEST_RUN part of union bpf_attr.
type progRunAttr struct {
	progFd      uint32
	retval      uint32
	dataSizeIn  uint32
	dataSizeOut uint32
	dataIn      uint64
	dataOut     uint64
	repeat      uint32
	duration    uint32
	ctxSizeIn   uint32
	ctxSizeOut  uint32
	ctxIn       uint64
	ctxOut      uint64
	flags       uint32
	cpu         uint32
	batchSize   uint32
	_           uint32
}

// testRun runs prog on frame as if it arrived on ifindex (having come in on
// ingressIfindex), repeat times, and returns the program's return value and
// the kernel's own time per run. Unlike ebpf.Program.Benchmark it takes a
// context, which the datapath needs for the ifindex. The frame as the
// program left it goes to out, when out is not nil.
func testRun(prog *ebpf.Program, frame []byte, ifindex, ingressIfindex int, repeat uint32, out *[]byte) (uint32, uint32, error) {
	ctx := skbCtx{Ifindex: uint32(ifindex), IngressIfindex: uint32(ingressIfindex)}
	buf := make([]byte, len(frame)+256)
	attr := progRunAttr{
		progFd:      uint32(prog.FD()),
		dataSizeIn:  uint32(len(frame)),
		dataSizeOut: uint32(len(buf)),
		dataIn:      uint64(uintptr(unsafe.Pointer(&frame[0]))),
		dataOut:     uint64(uintptr(unsafe.Pointer(&buf[0]))),
		repeat:      repeat,
		ctxSizeIn:   uint32(unsafe.Sizeof(ctx)),
		ctxIn:       uint64(uintptr(unsafe.Pointer(&ctx))),
	}
	for {
		_, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_PROG_TEST_RUN, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
		runtime.KeepAlive(frame)
		runtime.KeepAlive(buf)
		runtime.KeepAlive(&ctx)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return 0, 0, fmt.Errorf("BPF_PROG_TEST_RUN: %w", errno)
		}
		if out != nil {
			*out = buf[:attr.dataSizeOut]
		}
		return attr.retval, attr.duration, nil
	}
}

// pair is a datapath and its reference model fed the same state, with
// endpoints on dummy links in a private namespace.
type pair struct {
	t   testing.TB
	d   *Datapath
	ref *reference.Datapath
	net *testNet
}

func newPair(t testing.TB, links int, opts Options) *pair {
	t.Helper()
	ref := reference.New()
	ref.Now = coarseNow
	return &pair{t: t, d: loadTest(t, opts), ref: ref, net: newTestNet(t, links)}
}

// coarseNow is the datapath's conntrack clock, the one session affinity
// is timed by.
func coarseNow() time.Duration {
	n, err := monotonicNow(unix.CLOCK_MONOTONIC_COARSE)
	if err != nil {
		panic(err)
	}
	return time.Duration(n)
}

// service puts a frontend in both implementations.
func (p *pair) service(fe ServiceFrontend, s Service) {
	p.t.Helper()
	if err := p.d.PutService(fe, s); err != nil {
		p.t.Fatal(err)
	}
	rs := reference.Service{AffinityTimeout: s.AffinityTimeout}
	for _, b := range s.Backends {
		rs.Backends = append(rs.Backends, reference.Backend{Addr: b.Addr, Port: b.Port})
	}
	p.ref.PutService(reference.Frontend{Addr: fe.Addr, Port: fe.Port, Proto: fe.Proto}, rs)
}

// deleteService removes a frontend from both.
func (p *pair) deleteService(fe ServiceFrontend) {
	p.t.Helper()
	if err := p.d.DeleteService(fe); err != nil {
		p.t.Fatal(err)
	}
	p.ref.DeleteService(reference.Frontend{Addr: fe.Addr, Port: fe.Port, Proto: fe.Proto})
}

// endpoint puts an endpoint on the i-th veth with a conntrack table of its
// own, as the CNI plugin does (the one it has, when it has one).
func (p *pair) endpoint(i int, ep Endpoint) int {
	p.t.Helper()
	return p.endpointTable(i, ep, 0)
}

// endpointTable is endpoint with a table of capacity flows (0: the
// plugin's default).
func (p *pair) endpointTable(i int, ep Endpoint, capacity uint32) int {
	p.t.Helper()
	if old, ok, err := p.d.Endpoint(p.net.ifindex[i]); err == nil && ok && old.ConntrackSlot != 0 {
		ep.ConntrackSlot = old.ConntrackSlot
	} else if ep.ConntrackSlot, err = p.d.AddConntrackTable(capacity); err != nil {
		p.t.Fatal(err)
	}
	return p.put(i, ep)
}

// sharedEndpoint puts an endpoint that keeps its flows in the node's
// shared table, as one endpointctl wrote for a veth the plugin did not
// make.
func (p *pair) sharedEndpoint(i int, ep Endpoint) int {
	p.t.Helper()
	ep.ConntrackSlot = 0
	return p.put(i, ep)
}

func (p *pair) put(i int, ep Endpoint) int {
	p.t.Helper()
	ifindex := p.net.ifindex[i]
	if err := p.d.PutEndpoint(ifindex, ep); err != nil {
		p.t.Fatal(err)
	}
	got, _, err := p.d.Endpoint(ifindex)
	if err != nil {
		p.t.Fatal(err)
	}
	p.ref.Endpoints[ifindex] = reference.Endpoint{Identity: ep.Identity, IPv4: ep.IPv4, IPv6: ep.IPv6, Slot: got.ConntrackSlot}
	for _, a := range []netip.Addr{ep.IPv4, ep.IPv6} {
		if a.IsValid() {
			p.ipcache(netip.PrefixFrom(a, a.BitLen()), ep.Identity)
		}
	}
	return ifindex
}

// local makes the endpoint on ifindex a local pod that from_pod delivers
// to, at each of its addresses, as the CNI plugin does.
func (p *pair) local(ifindex int, addrs ...netip.Addr) {
	p.t.Helper()
	for _, a := range addrs {
		if err := p.d.PutLocalPod(a, LocalPod{Ifindex: ifindex, MAC: podMAC(ifindex), HostMAC: hostMAC(ifindex)}); err != nil {
			p.t.Fatal(err)
		}
		p.ref.Local[a] = ifindex
	}
}

// podMAC and hostMAC are the MAC addresses the tests give a local pod's
// interface and its host veth.
func podMAC(ifindex int) net.HardwareAddr {
	return net.HardwareAddr{0x02, 0xaa, 0, 0, 0, byte(ifindex)}
}
func hostMAC(ifindex int) net.HardwareAddr {
	return net.HardwareAddr{0x02, 0xbb, 0, 0, 0, byte(ifindex)}
}

func (p *pair) ipcache(pfx netip.Prefix, id identity.ID) {
	p.t.Helper()
	if err := p.d.PutIPCache(pfx, id); err != nil {
		p.t.Fatal(err)
	}
	p.ref.IPCache[pfx] = id
}

func (p *pair) policy(s *policy.Set) {
	p.t.Helper()
	ms, err := s.Compile()
	if err != nil {
		p.t.Fatal(err)
	}
	if err := p.d.ApplyPolicy(ms); err != nil {
		p.t.Fatal(err)
	}
	p.ref.SetPolicy(s)
}

// send runs frame through the hook on the endpoint's veth in both
// implementations and fails the test when they disagree. It returns the
// reason both gave.
func (p *pair) send(frame []byte, scope Scope, ifindex, ingressIfindex int) Reason {
	p.t.Helper()
	return p.sendFull(frame, scope, ifindex, ingressIfindex).reason
}

// sendFull is send, with the local pod's ingress check that from_pod may
// have made too.
func (p *pair) sendFull(frame []byte, scope Scope, ifindex, ingressIfindex int) outcome {
	p.t.Helper()
	got, err := p.exec(frame, scope, ifindex, ingressIfindex)
	if err != nil {
		p.t.Fatal(err)
	}
	// The datapath picks a new Service flow's backend at random: the
	// model takes the one the datapath's packet went to, when it is one of
	// the frontend's (and slot 0, which disagrees, when not).
	out, _ := parseTuple(got.out)
	p.ref.Pick = func(_ reference.Frontend, bs []reference.Backend) int {
		for i, b := range bs {
			if addr16(b.Addr) == out.dst && b.Port == out.dport {
				return i
			}
		}
		return 0
	}
	v := p.ref.Process(frame, reference.Scope(scope), ifindex, ingressIfindex)
	want := outcome{reason: Reason(v.Reason), ingress: noCheck}
	if v.To != 0 {
		want.ingress = Reason(v.Ingress)
	}
	want.delivered = v.Delivered()
	want.forwarded = v.Forward && fibRouted(frame, frameDst(frame))
	if got.reason != want.reason || got.ingress != want.ingress || got.delivered != want.delivered || got.forwarded != want.forwarded {
		p.t.Fatalf("datapath says %s, reference says %s for %s packet on ifindex %d (from %d):\n% x", got, want, scope, ifindex, ingressIfindex, frame)
	}
	if !got.reason.Drop() && got.reason != ReasonAllowNonIP && got.reason != ReasonAllowND && (got.ingress == noCheck || !got.ingress.Drop()) {
		wantT := tuple{src: v.Src, dst: v.Dst, sport: v.SrcPort, dport: v.DstPort}
		if in, ports := parseTuple(frame); !ports {
			wantT.sport, wantT.dport = in.sport, in.dport
		}
		if out != wantT {
			p.t.Fatalf("%s: the datapath's packet goes %s, the reference's %s; in:\n% x\nout:\n% x", got, out, wantT, frame, got.out)
		}
	}
	return got
}

// tuple is a packet's addresses and ports as its headers say.
type tuple struct {
	src, dst     [16]byte
	sport, dport uint16
}

func (t tuple) String() string {
	return fmt.Sprintf("%s -> %s", netip.AddrPortFrom(addrFrom16(t.src), t.sport), netip.AddrPortFrom(addrFrom16(t.dst), t.dport))
}

// parseTuple reads a frame's addresses and, for TCP, UDP and SCTP with
// their header in the frame, ports (ports reports whether it did): enough
// to see what a translation did. Extension headers are not followed.
func parseTuple(f []byte) (t tuple, ports bool) {
	if len(f) < 14 {
		return t, false
	}
	var l4 []byte
	var proto uint8
	switch binary.BigEndian.Uint16(f[12:14]) {
	case 0x0800:
		ip := f[14:]
		if len(ip) < 20 {
			return t, false
		}
		t.src, t.dst = addr16(netip.AddrFrom4([4]byte(ip[12:16]))), addr16(netip.AddrFrom4([4]byte(ip[16:20])))
		hlen := int(ip[0]&0xf) * 4
		if binary.BigEndian.Uint16(ip[6:8])&0x1fff != 0 || hlen < 20 || len(ip) < hlen {
			return t, false
		}
		proto, l4 = ip[9], ip[hlen:]
	case 0x86dd:
		ip := f[14:]
		if len(ip) < 40 {
			return t, false
		}
		t.src, t.dst = [16]byte(ip[8:24]), [16]byte(ip[24:40])
		proto, l4 = ip[6], ip[40:]
	default:
		return t, false
	}
	if (proto != 6 && proto != 17 && proto != 132) || len(l4) < 4 {
		return t, false
	}
	t.sport, t.dport = binary.BigEndian.Uint16(l4[0:2]), binary.BigEndian.Uint16(l4[2:4])
	return t, true
}

// errRefused means BPF_PROG_TEST_RUN does not take the frame: it wants a
// whole IPv4 or IPv6 header behind those ethertypes.
var errRefused = errors.New("BPF_PROG_TEST_RUN refuses frames this short")

func refused(frame []byte) bool {
	if len(frame) < 14 {
		return true
	}
	switch binary.BigEndian.Uint16(frame[12:14]) {
	case 0x0800:
		return len(frame) < 14+20
	case 0x86dd:
		return len(frame) < 14+40
	}
	return false
}

// outcome is what one run of a program did, as its return value and the
// counters tell.
type outcome struct {
	reason Reason // the hook's own check
	// ingress is the local pod's ingress check from_pod made on the way
	// to it, noCheck when it made none.
	ingress   Reason
	delivered bool // handed to the local pod (TC_ACT_REDIRECT)
	forwarded bool // sent to another node's pod past the stack (TC_ACT_REDIRECT)
	out       []byte
}

const noCheck Reason = 255

func (o outcome) String() string {
	if o.ingress == noCheck {
		if o.forwarded {
			return o.reason.String() + ", forwarded past the stack"
		}
		return o.reason.String()
	}
	return fmt.Sprintf("%s, then %s at the local pod (delivered %t)", o.reason, o.ingress, o.delivered)
}

// run runs the kernel program and returns the reason it counted for the
// hook's own check.
func (p *pair) run(frame []byte, scope Scope, ifindex, ingressIfindex int) (Reason, error) {
	o, err := p.exec(frame, scope, ifindex, ingressIfindex)
	return o.reason, err
}

// exec runs the kernel program and reads what it did from its return value
// and the counters of both scopes.
func (p *pair) exec(frame []byte, scope Scope, ifindex, ingressIfindex int) (outcome, error) {
	o := outcome{reason: noCheck, ingress: noCheck}
	if refused(frame) {
		return o, errRefused
	}
	prog := p.d.objs.FromPod
	if scope == ScopeIngress {
		prog = p.d.objs.ToPod
	}
	before, err := p.d.Counters()
	if err != nil {
		return o, err
	}
	var ret uint32
	var runErr error
	p.net.do(func() { ret, _, runErr = testRun(prog, frame, ifindex, ingressIfindex, 1, &o.out) })
	if runErr != nil {
		return o, runErr
	}
	after, err := p.d.Counters()
	if err != nil {
		return o, err
	}
	for k, c := range after {
		if c.Packets == before[k].Packets || (k.Reason == ReasonAllowND && !maybeND(frame)) {
			continue
		}
		if k.Scope == scope {
			o.reason = k.Reason
		} else {
			o.ingress = k.Reason
		}
	}
	const tcActRedirect = 7
	wantRet := uint32(0)
	switch {
	case o.reason == ReasonDropNoBackend:
		wantRet = tcActRedirect // the packet goes back as the rejection
	case o.reason.Drop() || (o.ingress != noCheck && o.ingress.Drop()):
		wantRet = 2
	case o.ingress != noCheck:
		wantRet = tcActRedirect
		o.delivered = true
	case ret == tcActRedirect && scope == ScopeEgress:
		// from_pod's fast path to another node's pod: no second check
		wantRet = tcActRedirect
		o.forwarded = true
	}
	if ret != wantRet {
		return o, fmt.Errorf("program returned %d but counted %s", int32(ret), o)
	}
	return o, nil
}

// frameDst is the destination address of an IPv4 or IPv6 frame, invalid
// for anything else.
func frameDst(frame []byte) netip.Addr {
	if len(frame) < 14 {
		return netip.Addr{}
	}
	switch binary.BigEndian.Uint16(frame[12:14]) {
	case 0x0800:
		if len(frame) >= 14+20 {
			return netip.AddrFrom4([4]byte(frame[30:34]))
		}
	case 0x86dd:
		if len(frame) >= 14+40 {
			return netip.AddrFrom16([16]byte(frame[38:54]))
		}
	}
	return netip.Addr{}
}

// remote makes pfx another node's pod range in both implementations.
func (p *pair) remote(pfx ...netip.Prefix) {
	p.t.Helper()
	if err := p.d.SetRemoteCIDRs(pfx); err != nil {
		p.t.Fatal(err)
	}
	p.ref.Remote = pfx
}

// netOutcome is what one run of from_net did.
type netOutcome struct {
	// ingress is the local pod's ingress check, noCheck when from_net
	// left the frame to the stack.
	ingress   Reason
	delivered bool
	out       []byte
}

func (o netOutcome) String() string {
	if o.ingress == noCheck {
		return "left to the stack"
	}
	return fmt.Sprintf("%s at the local pod (delivered %t)", o.ingress, o.delivered)
}

// sendNet runs frame through from_net, as arrived on the uplink, in both
// implementations and fails the test when they disagree.
func (p *pair) sendNet(frame []byte) netOutcome {
	p.t.Helper()
	got, err := p.execNet(frame)
	if err != nil {
		p.t.Fatal(err)
	}
	v := p.ref.ProcessNet(frame)
	want := netOutcome{ingress: noCheck}
	if v.To != 0 {
		want.ingress, want.delivered = Reason(v.Ingress), v.Delivered()
	}
	if got.ingress != want.ingress || got.delivered != want.delivered {
		p.t.Fatalf("from_net says %s, reference says %s:\n% x", got, want, frame)
	}
	return got
}

// execNet runs from_net on the test netns's uplink and reads what it did
// from its return value and the counters.
func (p *pair) execNet(frame []byte) (netOutcome, error) {
	o := netOutcome{ingress: noCheck}
	if refused(frame) {
		return o, errRefused
	}
	before, err := p.d.Counters()
	if err != nil {
		return o, err
	}
	var ret uint32
	var runErr error
	p.net.do(func() {
		l, err := netlink.LinkByName("up0")
		if err != nil {
			runErr = err
			return
		}
		ret, _, runErr = testRun(p.d.objs.FromNet, frame, l.Attrs().Index, l.Attrs().Index, 1, &o.out)
	})
	if runErr != nil {
		return o, runErr
	}
	after, err := p.d.Counters()
	if err != nil {
		return o, err
	}
	for k, c := range after {
		if c.Packets != before[k].Packets {
			if k.Scope != ScopeIngress || o.ingress != noCheck {
				return o, fmt.Errorf("from_net counted %s at scope %d", k.Reason, k.Scope)
			}
			o.ingress = k.Reason
		}
	}
	const tcActRedirect = 7
	wantRet := uint32(0)
	switch {
	case o.ingress == noCheck:
	case o.ingress.Drop():
		wantRet = 2
	default:
		wantRet = tcActRedirect
		o.delivered = true
	}
	if ret != wantRet {
		return o, fmt.Errorf("from_net returned %d but counted %s", int32(ret), o)
	}
	return o, nil
}

// maybeND reports whether frame could be IPv6 neighbour discovery or MLD,
// which the datapath counts as link control: the test netns's own links
// send such packets (MLD reports when forwarding makes them join the
// all-routers group), and the counters are the node's, so a count of it
// is the test packet's only when the packet could be one.
func maybeND(frame []byte) bool {
	if len(frame) < 14+40 || frame[12] != 0x86 || frame[13] != 0xdd {
		return false
	}
	// ND may come after extension headers, a first fragment's included:
	// the datapath reads through up to four (fragmented ND is the pod
	// kernel's to drop, RFC 6980).
	next, l4 := frame[14+6], 14+40
	for range 4 {
		if len(frame) < l4+8 {
			break
		}
		switch next {
		case 43, 60: // routing, destination options
			next, l4 = frame[l4], l4+(int(frame[l4+1])+1)*8
			continue
		case 51: // authentication
			next, l4 = frame[l4], l4+(int(frame[l4+1])+2)*4
			continue
		case 44: // fragment: only the first has the ICMPv6 header
			if binary.BigEndian.Uint16(frame[l4+2:])&0xfff8 == 0 {
				next, l4 = frame[l4], l4+8
				continue
			}
		}
		break
	}
	switch next {
	case 0: // hop-by-hop options: MLD carries a router alert
		return true
	case 58:
		return len(frame) > l4 && frame[l4] >= 130 && frame[l4] <= 143
	}
	return false
}
