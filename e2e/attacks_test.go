package e2e

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/cni"
	"github.com/idcni/idcni/e2e/internal/cnitest"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/internal/clitest"
	"github.com/idcni/idcni/policy"
)

// Four tenant attacks of issue 10 on the real kernel: network namespaces
// as pods, plugged through the real plugin binary by libcni, no agent (the
// seed's setting: a new pod is unresolved, identity 5, isolated both
// ways), manual identities and rules through the real endpointctl and
// policyctl. Each attack is the one that worked against the datapath of
// 45c6ced; the tests assert that it no longer does.
//
// The attackers build their packets by hand and send them out of the
// pod's eth0 with an AF_PACKET socket, so the pod's own stack neither
// refuses nor rewrites them (a hop limit of 255 on a routed packet, a
// foreign source address, fragments in an order of the test's choosing).
// Every packet goes to an address of a namespace the test created.

// attackNet is one private network, its datapath and the CLIs on it.
type attackNet struct {
	t   *testing.T
	net *cnitest.Env
	ctl *clitest.Env
	dp  *bpf.Datapath
}

func newAttackNet(t *testing.T, dualStack bool) *attackNet {
	t.Helper()
	e := cnitest.New(t, cnitest.Options{DualStack: dualStack})
	t.Logf("network %s, subnet %s, bpffs root %s", e.Network, e.Subnet, e.BPFRoot)
	// Nothing listens on the Env's agent socket: the CLIs write the maps.
	return &attackNet{t: t, net: e, ctl: clitest.ForRoot(t, e.BPFRoot, e.Socket)}
}

// attackPod is a pod of an attack test.
type attackPod struct {
	*cnitest.Pod
	v4, v6 netip.Addr // v6 only on a dual-stack network
	// hostMAC is the MAC of the pod's host veth: frames the pod sends to
	// its gateway go there.
	hostMAC net.HardwareAddr
}

// pod creates a pod through the plugin and registers its DEL.
func (a *attackNet) pod() *attackPod {
	t := a.t
	t.Helper()
	p := &attackPod{Pod: a.net.NewPod(t)}
	r := a.net.MustAdd(t, p.Pod)
	t.Cleanup(func() {
		if err := a.net.Del(p.Pod); err != nil {
			t.Errorf("DEL %s: %v", p.Name, err)
		}
	})
	for _, ipc := range r.IPs {
		if ad, ok := netip.AddrFromSlice(ipc.Address.IP); ok {
			if ad = ad.Unmap(); ad.Is4() {
				p.v4 = ad
			} else {
				p.v6 = ad
			}
		}
	}
	if !p.v4.IsValid() {
		t.Fatalf("no IPv4 address in ADD result %+v", r)
	}
	l, err := netlink.LinkByName(cni.HostVethName(p.ContainerID, p.IfName))
	if err != nil {
		t.Fatalf("host veth of %s: %v", p.Name, err)
	}
	p.hostMAC = l.Attrs().HardwareAddr
	if a.dp == nil {
		// The plugin loaded the datapath on the first ADD.
		a.dp = a.net.Datapath(t)
	}
	return p
}

// bind gives the pod's addresses a manual identity with endpointctl.
func (a *attackNet) bind(p *attackPod, id int) {
	a.t.Helper()
	for _, ad := range []netip.Addr{p.v4, p.v6} {
		if ad.IsValid() {
			a.ctl.MustRun("endpointctl", "add", "--ip", ad.String(), "--identity", fmt.Sprint(id))
		}
	}
}

// counters reads the datapath's packet counters.
func (a *attackNet) counters() map[bpf.CounterKey]bpf.Counter {
	a.t.Helper()
	c, err := a.dp.Counters()
	if err != nil {
		a.t.Fatalf("read counters: %v", err)
	}
	return c
}

// drops lists the drop counters that grew between two readings, for the
// logs.
func drops(before, after map[bpf.CounterKey]bpf.Counter) string {
	var out []string
	for k, c := range after {
		if d := c.Packets - before[k].Packets; d > 0 && k.Reason.Drop() {
			out = append(out, fmt.Sprintf("%s/%s +%d", k.Reason, k.Scope, d))
		}
	}
	if len(out) == 0 {
		return "none"
	}
	return strings.Join(out, ", ")
}

// frameSender sends IP packets built by the test out of a pod's eth0,
// addressed to the pod's host veth, past the pod's own stack.
type frameSender struct {
	fd int
	to unix.SockaddrLinklayer
}

func (p *attackPod) sender(t *testing.T) *frameSender {
	t.Helper()
	s := &frameSender{fd: -1}
	err := ns.WithNetNSPath(p.NSPath, func(ns.NetNS) error {
		l, err := netlink.LinkByName(p.IfName)
		if err != nil {
			return err
		}
		// Protocol 0: the socket sends and never receives.
		s.fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("AF_PACKET socket: %w", err)
		}
		s.to = unix.SockaddrLinklayer{Ifindex: l.Attrs().Index, Halen: 6}
		copy(s.to.Addr[:], p.hostMAC)
		return nil
	})
	if err != nil {
		t.Fatalf("packet socket in %s: %v", p.Name, err)
	}
	t.Cleanup(func() { unix.Close(s.fd) })
	return s
}

// send sends one IPv4 or IPv6 packet. A veth whose peer's backlog is full
// refuses a frame with ENOBUFS before any program saw it; the frame is
// sent again, so every packet the test counts reached the datapath.
func (s *frameSender) send(pkt []byte) error {
	to := s.to
	to.Protocol = htons(unix.ETH_P_IP)
	if pkt[0]>>4 == 6 {
		to.Protocol = htons(unix.ETH_P_IPV6)
	}
	for {
		err := unix.Sendto(s.fd, pkt, 0, &to)
		if !errors.Is(err, unix.ENOBUFS) {
			if err != nil {
				return fmt.Errorf("send %d-byte frame: %w", len(pkt), err)
			}
			return nil
		}
		runtime.Gosched()
	}
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// checksum is the Internet checksum of the concatenated parts (each of
// even length but the last).
func checksum(parts ...[]byte) uint16 {
	var sum uint32
	for _, b := range parts {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(b[i])<<8 | uint32(b[i+1])
		}
		if len(b)%2 == 1 {
			sum += uint32(b[len(b)-1]) << 8
		}
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// ipv4Packet builds an IPv4 packet. frag is the flags and fragment offset
// field: 0x2000 is "more fragments", the low 13 bits the offset in units
// of 8 bytes.
func ipv4Packet(src, dst netip.Addr, proto byte, id, frag uint16, payload []byte) []byte {
	b := make([]byte, 20+len(payload))
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:], uint16(len(b)))
	binary.BigEndian.PutUint16(b[4:], id)
	binary.BigEndian.PutUint16(b[6:], frag)
	b[8] = 64
	b[9] = proto
	s, d := src.As4(), dst.As4()
	copy(b[12:16], s[:])
	copy(b[16:20], d[:])
	binary.BigEndian.PutUint16(b[10:], checksum(b[:20]))
	copy(b[20:], payload)
	return b
}

// udpHeader is a UDP header claiming length bytes of datagram, without a
// checksum (allowed over IPv4).
func udpHeader(sport, dport uint16, length int) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint16(b[0:], sport)
	binary.BigEndian.PutUint16(b[2:], dport)
	binary.BigEndian.PutUint16(b[4:], uint16(length))
	return b
}

// icmpv6Packet builds an IPv6 packet carrying one ICMPv6 message with a
// correct checksum, which the receiving stack verifies.
func icmpv6Packet(src, dst netip.Addr, hopLimit, typ byte, body []byte) []byte {
	msg := append([]byte{typ, 0, 0, 0}, body...)
	s, d := src.As16(), dst.As16()
	pseudo := make([]byte, 40)
	copy(pseudo[0:], s[:])
	copy(pseudo[16:], d[:])
	binary.BigEndian.PutUint32(pseudo[32:], uint32(len(msg)))
	pseudo[39] = unix.IPPROTO_ICMPV6
	binary.BigEndian.PutUint16(msg[2:], checksum(pseudo, msg))
	b := make([]byte, 40+len(msg))
	b[0] = 0x60
	binary.BigEndian.PutUint16(b[4:], uint16(len(msg)))
	b[6] = unix.IPPROTO_ICMPV6
	b[7] = hopLimit
	copy(b[8:], s[:])
	copy(b[24:], d[:])
	copy(b[40:], msg)
	return b
}

// onCPU runs fn on a thread pinned to cpu. The datapath runs in the
// softirq of the CPU that sends a frame, and a BPF LRU map keeps each
// CPU's newest entries on a list of that CPU's own, out of reach of
// another CPU's evictions: attacker and victim sending from one CPU is
// what makes an eviction certain rather than likely. The thread is locked
// until the goroutine ends, so the pinned thread dies with it.
func onCPU(cpu int, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		var set unix.CPUSet
		set.Set(cpu)
		if err := unix.SchedSetaffinity(0, &set); err != nil {
			errc <- fmt.Errorf("pin to CPU %d: %w", cpu, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// icmpv6Sink collects the ICMPv6 messages a pod receives (a raw socket
// gets a copy of each one before the stack handles it).
type icmpv6Sink struct {
	mu   sync.Mutex
	msgs [][]byte
}

func (p *attackPod) icmpv6Sink(t *testing.T) *icmpv6Sink {
	t.Helper()
	var fd int
	err := ns.WithNetNSPath(p.NSPath, func(ns.NetNS) error {
		var err error
		fd, err = unix.Socket(unix.AF_INET6, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMPV6)
		if err != nil {
			return fmt.Errorf("raw ICMPv6 socket: %w", err)
		}
		// A read wakes up now and then to see whether the test is over.
		return unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 200_000})
	})
	if err != nil {
		t.Fatalf("ICMPv6 sink in %s: %v", p.Name, err)
	}
	s := &icmpv6Sink{}
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65536)
		for {
			select {
			case <-stop:
				return
			default:
			}
			n, _, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				continue
			}
			s.mu.Lock()
			s.msgs = append(s.msgs, bytes.Clone(buf[:n]))
			s.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		close(stop)
		<-done
		unix.Close(fd)
	})
	return s
}

// got waits up to wait for a message holding marker.
func (s *icmpv6Sink) got(marker []byte, wait time.Duration) bool {
	for end := time.Now().Add(wait); ; {
		s.mu.Lock()
		for _, m := range s.msgs {
			if bytes.Contains(m, marker) {
				s.mu.Unlock()
				return true
			}
		}
		s.mu.Unlock()
		if time.Now().After(end) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// arrivalWait is how long a packet that should arrive is waited for;
// within a node it takes well under a millisecond.
const arrivalWait = 2 * time.Second

// TestAttackNDBypass: a deny-all pod dressed its packets up as IPv6
// neighbour discovery (ICMPv6 type 135, hop limit 255), which the old
// datapath passed before the endpoint lookup, the spoof check and policy,
// whatever the destination. Sent to a global address routed through the
// node, such a packet reached another pod, with the pod's own source
// address or a forged one. The target here is a pod no ingress policy
// selects (ingress-open, as most pods in a cluster are): what kept the
// attacker from it was the attacker's own egress isolation.
func TestAttackNDBypass(t *testing.T) {
	t.Parallel()
	a := newAttackNet(t, true)
	attacker, target, peer := a.pod(), a.pod(), a.pod()
	a.bind(peer, 1001)
	a.bind(target, 1002)
	a.ctl.MustRun("policyctl", "allow", "--src", "1001", "--dst", "1002", "--symmetric")
	// 1002 becomes ingress-open, like a pod no NetworkPolicy selects for
	// ingress; manual identities are isolated both ways, so the flag is
	// cleared in the identities map directly.
	ms, err := a.dp.Policy()
	if err != nil {
		t.Fatal(err)
	}
	f, ok := ms.Identities[1002]
	if !ok {
		t.Fatalf("no identity flags for 1002 after policyctl allow: %v", ms.Identities)
	}
	ms.Identities[1002] = f &^ policy.FlagIsolatedIngress
	if err := a.dp.ApplyPolicy(ms); err != nil {
		t.Fatalf("open 1002's ingress: %v", err)
	}

	// The attacker is deny-all: even an ingress-open pod is out of its
	// reach by ordinary means.
	if got, out := ping(t, attacker.Pod, target.v6, 2); got != 0 {
		t.Fatalf("unresolved attacker pinged %s: %d replies\n%s", target.v6, got, out)
	}

	sink := target.icmpv6Sink(t)
	sender := attacker.sender(t)
	// A spoofed source: an address of the subnet no pod has.
	spoof := a.net.Subnet6.Addr().As16()
	spoof[14], spoof[15] = 0xde, 0xad
	for _, c := range []struct {
		what string
		src  netip.Addr
	}{
		{"from the attacker's own address", attacker.v6},
		{"from a forged global address", netip.AddrFrom16(spoof)},
	} {
		before := a.counters()
		marker := []byte("idcni-nd-bypass-" + cnitest.RandHex(12))
		// A neighbour solicitation: 4 reserved bytes, the target
		// address, then what the attacker wants delivered.
		tgt := target.v6.As16()
		body := append(append(make([]byte, 4), tgt[:]...), marker...)
		for range 3 {
			if err := sender.send(icmpv6Packet(c.src, target.v6, 255, 135, body)); err != nil {
				t.Fatal(err)
			}
		}
		if sink.got(marker, arrivalWait) {
			t.Errorf("ND-shaped packet %s (%s -> %s, hop limit 255) reached the target pod; drops: %s",
				c.what, c.src, target.v6, drops(before, a.counters()))
		} else {
			t.Logf("ND-shaped packet %s dropped; drops: %s", c.what, drops(before, a.counters()))
		}
	}

	// Real neighbour discovery still works. Pods know their gateway
	// fe80::1 from the plugin and the node its pods (permanent entries),
	// so the pods' kernels are made to resolve something: the host veth's
	// own link-local address. The solicitation goes from the pod's
	// link-local address to a solicited-node multicast address, the
	// advertisement back to the pod's link-local address; the ping that
	// follows is the pod's and meets policy (and is dropped: no pod here
	// may reach the node).
	for _, p := range []*attackPod{peer, attacker} {
		ll := hostLinkLocal(t, p)
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		_, _ = p.Exec(ctx, "ping", "-n", "-c", "1", "-W", "1", ll.String()+"%"+p.IfName)
		out, err := p.Exec(ctx, "ip", "-6", "neigh", "show", ll.String(), "dev", p.IfName)
		cancel()
		if err != nil {
			t.Fatalf("ip -6 neigh in %s: %v\n%s", p.Name, err, out)
		}
		if m := resolved.FindSubmatch(out); m == nil || !strings.EqualFold(string(m[1]), p.hostMAC.String()) {
			t.Errorf("%s did not resolve the host veth's %s to %s by neighbour discovery: %q", p.Name, ll, p.hostMAC, out)
		} else {
			t.Logf("%s resolved by neighbour discovery: %s", p.Name, bytes.TrimSpace(out))
		}
	}
	if got, out := ping(t, peer.Pod, target.v6, 3); got != 3 {
		t.Errorf("allowed ping6 %s -> %s: %d/3 replies\n%s", peer.v6, target.v6, got, out)
	}
}

// resolved matches a neighbour entry the kernel resolved and holds.
var resolved = regexp.MustCompile(`lladdr ([0-9a-f:]{17}) .*(REACHABLE|STALE|DELAY|PROBE)`)

// hostLinkLocal is the link-local address of the pod's host veth.
func hostLinkLocal(t *testing.T, p *attackPod) netip.Addr {
	t.Helper()
	l, err := netlink.LinkByName(cni.HostVethName(p.ContainerID, p.IfName))
	if err != nil {
		t.Fatalf("host veth of %s: %v", p.Name, err)
	}
	addrs, err := netlink.AddrList(l, netlink.FAMILY_V6)
	if err != nil {
		t.Fatalf("addresses of %s: %v", l.Attrs().Name, err)
	}
	for _, ad := range addrs {
		if a, ok := netip.AddrFromSlice(ad.IP); ok && a.IsLinkLocalUnicast() {
			return a
		}
	}
	t.Fatalf("host veth %s has no link-local address: %v", l.Attrs().Name, addrs)
	return netip.Addr{}
}

// tcpPair opens a TCP connection from client to server:port with
// keepalives off on both ends: a keepalive probe from the client would
// open its flow again and hide that conntrack lost it.
func tcpPair(t *testing.T, client, server *attackPod, port int) (cc, sc net.Conn) {
	t.Helper()
	var l net.Listener
	err := ns.WithNetNSPath(server.NSPath, func(ns.NetNS) error {
		var err error
		l, err = (&net.ListenConfig{KeepAlive: -1}).Listen(context.Background(), "tcp4", fmt.Sprintf(":%d", port))
		return err
	})
	if err != nil {
		t.Fatalf("listen in %s: %v", server.Name, err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	err = ns.WithNetNSPath(client.NSPath, func(ns.NetNS) error {
		var err error
		cc, err = (&net.Dialer{KeepAlive: -1, Timeout: arrivalWait}).Dial("tcp4", netip.AddrPortFrom(server.v4, uint16(port)).String())
		return err
	})
	if err != nil {
		t.Fatalf("connect %s -> %s:%d: %v", client.Name, server.v4, port, err)
	}
	t.Cleanup(func() { cc.Close() })
	select {
	case sc = <-accepted:
	case <-time.After(arrivalWait):
	}
	if sc == nil {
		t.Fatalf("%s accepted no connection", server.Name)
	}
	t.Cleanup(func() { sc.Close() })
	return cc, sc
}

// readLine reads len(want) bytes from c within arrivalWait and compares.
func readLine(c net.Conn, want string) error {
	if err := c.SetReadDeadline(time.Now().Add(arrivalWait)); err != nil {
		return err
	}
	buf := make([]byte, len(want))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != want {
		return fmt.Errorf("read %q, want %q", buf, want)
	}
	return nil
}

// TestAttackConntrackEviction: the old datapath kept every flow of the
// node in one LRU table of 262,144 entries. A pod opening a few hundred
// thousand flows pushed out other pods' idle connections, whose next
// packets then met policy as new flows: a server's push on a connection
// its client opened (allowed one way only) was dropped. With a table per
// pod, the flood evicts only the flooder's own flows.
func TestAttackConntrackEviction(t *testing.T) {
	t.Parallel()
	a := newAttackNet(t, false)
	victim, server, flooder, sink := a.pod(), a.pod(), a.pod(), a.pod()
	a.bind(victim, 1001)
	a.bind(server, 1002)
	a.bind(flooder, 1003)
	a.bind(sink, 1004)
	// The victim may open connections to the server, not the reverse: the
	// server's packets to the victim pass only as replies of the flow.
	a.ctl.MustRun("policyctl", "allow", "--src", "1001", "--dst", "1002", "--port", "8080")
	a.ctl.MustRun("policyctl", "allow", "--src", "1003", "--dst", "1004", "--proto", "udp", "--port", "1024-65535")

	cc, sc := tcpPair(t, victim, server, 8080)
	if _, err := cc.Write([]byte("hello\n")); err != nil {
		t.Fatal(err)
	}
	if err := readLine(sc, "hello\n"); err != nil {
		t.Fatalf("victim -> server before the flood: %v", err)
	}
	if _, err := sc.Write([]byte("early\n")); err != nil {
		t.Fatal(err)
	}
	if err := readLine(cc, "early\n"); err != nil {
		t.Fatalf("server -> victim before the flood: %v", err)
	}

	// The flood: distinct UDP flows from the flooder to the sink, the
	// old shared table's size and more, each flow two packets (an LRU
	// entry used twice is kept over one used once, so single packets
	// would mostly evict each other). The ports make the flows: 600
	// destination ports times 500 source ports.
	const flows, dports = 300_000, 600
	workers := runtime.NumCPU() * 2
	senders := make([]*frameSender, workers)
	for i := range senders {
		senders[i] = flooder.sender(t)
	}
	before := a.counters()
	start := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Spread over every CPU, so each CPU's own LRU list
			// (where the victim's entries may sit) is cycled too.
			errs[w] = onCPU(w%runtime.NumCPU(), func() error {
				pkt := ipv4Packet(flooder.v4, sink.v4, unix.IPPROTO_UDP, 0, 0, append(udpHeader(0, 0, 16), make([]byte, 8)...))
				for i := w; i < flows; i += workers {
					binary.BigEndian.PutUint16(pkt[20:], uint16(20000+i/dports))
					binary.BigEndian.PutUint16(pkt[22:], uint16(2000+i%dports))
					for range 2 {
						if err := senders[w].send(pkt); err != nil {
							return err
						}
					}
				}
				return nil
			})
		}()
	}
	wg.Wait()
	took := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	t.Logf("flood: %d UDP flows, %d packets in %v (%.0f packets/s, %d senders)",
		flows, 2*flows, took.Round(time.Millisecond), float64(2*flows)/took.Seconds(), workers)
	after := a.counters()
	if got := after[bpf.CounterKey{Reason: bpf.ReasonAllowRule, Scope: bpf.ScopeEgress}].Packets -
		before[bpf.CounterKey{Reason: bpf.ReasonAllowRule, Scope: bpf.ScopeEgress}].Packets; got < flows {
		t.Fatalf("the flood opened %d flows, want %d: it did not test eviction; drops: %s", got, flows, drops(before, after))
	}

	// The server pushes on the idle connection; the victim must get it.
	before = a.counters()
	if _, err := sc.Write([]byte("push after the flood\n")); err != nil {
		t.Fatal(err)
	}
	if err := readLine(cc, "push after the flood\n"); err != nil {
		t.Errorf("server -> victim after another pod's flood: %v; drops since the push: %s", err, drops(before, a.counters()))
	} else {
		t.Logf("the push arrived; drops since the push: %s", drops(before, a.counters()))
	}
	t.Logf("conntrack tables that evicted flows: %s", evictions(t, a.dp))
}

// evictions lists the conntrack tables that evicted flows, for the logs:
// the flooder's own table, and its sink's.
func evictions(t *testing.T, dp *bpf.Datapath) string {
	t.Helper()
	us, err := dp.ConntrackUsage()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, u := range us {
		if u.Evicted() > 0 {
			out = append(out, fmt.Sprintf("slot %d (%d flows a table): opened %d created, %d evicted; admitted %d created, %d evicted",
				u.Slot, u.Capacity, u.Opened.Created, u.Opened.Evicted, u.Admitted.Created, u.Admitted.Evicted))
		}
	}
	return strings.Join(out, "; ")
}

// TestAttackEventFlood: the old datapath sent an event for every drop into
// one 1 MiB ring, first come first served: a pod spraying denied packets
// filled it, and every other pod's drops went unreported while it did.
// Each endpoint now has a budget of events per second; what it holds back
// is counted and told.
//
// The ring is read only after the spray: a reader slower than the spray
// is the case the limit exists for, and reading after makes it certain
// rather than a race with the reader's polling.
func TestAttackEventFlood(t *testing.T) {
	t.Parallel()
	a := newAttackNet(t, false)
	flooder, victim, target := a.pod(), a.pod(), a.pod()
	// All three are unresolved: deny-all, every packet a drop and an
	// event.
	fs, vs := flooder.sender(t), victim.sender(t)
	const spray, mine = 60_000, 5
	half := make(chan struct{})
	sprayed := make(chan error, 1)
	start := time.Now()
	go func() {
		pkt := ipv4Packet(flooder.v4, target.v4, unix.IPPROTO_UDP, 0, 0, append(udpHeader(0, 9, 16), make([]byte, 8)...))
		for i := range spray {
			binary.BigEndian.PutUint16(pkt[20:], uint16(10000+i%50000))
			if err := fs.send(pkt); err != nil {
				sprayed <- err
				return
			}
			if i == spray/2 {
				close(half)
			}
		}
		sprayed <- nil
	}()
	// The victim's few denied packets, in the middle of the spray.
	select {
	case <-half:
	case err := <-sprayed:
		t.Fatalf("the spray stopped before half of it: %v", err)
	}
	for i := range mine {
		pkt := ipv4Packet(victim.v4, target.v4, unix.IPPROTO_UDP, 0, 0, append(udpHeader(40000, uint16(7001+i), 16), make([]byte, 8)...))
		if err := vs.send(pkt); err != nil {
			t.Fatal(err)
		}
	}
	if err := <-sprayed; err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	t.Logf("spray: %d denied packets in %v (%.0f packets/s)", spray, took.Round(time.Millisecond), float64(spray)/took.Seconds())

	rd, err := a.dp.Events()
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	rd.SetDeadline(time.Now().Add(3 * time.Second))
	var fromFlooder, maxSuppressed int
	victimPorts := map[uint16]bool{}
	for {
		ev, err := rd.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			break
		}
		if err != nil {
			t.Fatalf("read events: %v", err)
		}
		switch {
		case ev.SrcAddr == victim.v4 && !ev.Allowed:
			if ev.Src != identity.Unresolved || ev.Reason != bpf.ReasonDropNoRule {
				t.Errorf("victim's drop event %v, want unresolved, no rule", ev)
			}
			victimPorts[ev.DstPort] = true
		case ev.SrcAddr == flooder.v4:
			fromFlooder++
			maxSuppressed = max(maxSuppressed, suppressedOf(ev))
		}
	}
	t.Logf("events read: %d of the flooder's (largest suppressed count %d), %d of the victim's %d drops",
		fromFlooder, maxSuppressed, len(victimPorts), mine)
	if len(victimPorts) != mine {
		t.Errorf("the victim's drops reported: %d of %d (ports %v); the flooder's spray took the rest", len(victimPorts), mine, victimPorts)
	}
	// What the limit held back is counted, by reason.
	if held := heldBack(t, a.dp, bpf.ReasonDropNoRule); held == 0 {
		t.Errorf("no no-rule event counted as held back by the rate limit after a spray of %d", spray)
	} else {
		t.Logf("no-rule events held back by the rate limit: %d", held)
	}
}

// suppressedOf is how many events of its endpoint the rate limit held
// back just before ev.
func suppressedOf(ev bpf.Event) int { return int(ev.Suppressed) }

// heldBack is how many events of the reason the datapath's rate limit
// held back.
func heldBack(t *testing.T, dp *bpf.Datapath, r bpf.Reason) uint64 {
	t.Helper()
	l, err := dp.EventLosses()
	if err != nil {
		t.Fatal(err)
	}
	return l[r].Suppressed
}

// TestAttackFragmentTable: the old datapath remembered a first fragment's
// ports (for the fragments that follow, which carry none) while parsing,
// before the spoof check and policy, in one node-wide LRU table of 8,192
// entries. A deny-all pod sending distinct first fragments, all dropped,
// pushed out an allowed flow's entries, and that flow's later fragments
// were then dropped as fragments of nothing known. Fragments are crafted
// by hand so the order is the test's: the allowed pod's first fragment,
// the attacker's 20,000 first fragments, the allowed pod's last fragment.
func TestAttackFragmentTable(t *testing.T) {
	t.Parallel()
	a := newAttackNet(t, false)
	client, server, attacker := a.pod(), a.pod(), a.pod()
	a.bind(client, 1001)
	a.bind(server, 1002)
	a.ctl.MustRun("policyctl", "allow", "--src", "1001", "--dst", "1002", "--proto", "udp", "--port", "4000")

	var srv net.PacketConn
	err := ns.WithNetNSPath(server.NSPath, func(ns.NetNS) error {
		var err error
		srv, err = net.ListenPacket("udp4", ":4000")
		return err
	})
	if err != nil {
		t.Fatalf("listen in %s: %v", server.Name, err)
	}
	defer srv.Close()
	// receive waits for a datagram holding marker.
	receive := func(marker []byte) error {
		buf := make([]byte, 65536)
		for {
			if err := srv.SetReadDeadline(time.Now().Add(arrivalWait)); err != nil {
				return err
			}
			n, _, err := srv.ReadFrom(buf)
			if err != nil {
				return err
			}
			if bytes.Contains(buf[:n], marker) {
				return nil
			}
		}
	}

	// The allowed flow works with the kernel's own fragments: 3000 bytes
	// over a 1500-byte MTU.
	var cl net.Conn
	err = ns.WithNetNSPath(client.NSPath, func(ns.NetNS) error {
		var err error
		cl, err = net.Dial("udp4", netip.AddrPortFrom(server.v4, 4000).String())
		return err
	})
	if err != nil {
		t.Fatalf("dial in %s: %v", client.Name, err)
	}
	defer cl.Close()
	big := bytes.Repeat([]byte("x"), 3000)
	copy(big, "kernel-fragmented")
	if _, err := cl.Write(big); err != nil {
		t.Fatal(err)
	}
	if err := receive([]byte("kernel-fragmented")); err != nil {
		t.Fatalf("a fragmented datagram of the allowed flow did not arrive before the attack: %v", err)
	}

	// A 2000-byte datagram in two fragments: the UDP header and 1472
	// bytes (1480, a multiple of 8), then the rest at offset 1480.
	marker := []byte("idcni-frag-" + cnitest.RandHex(12))
	dgram := append(udpHeader(40000, 4000, 2008), bytes.Repeat([]byte("y"), 2000)...)
	copy(dgram[1600:], marker)
	const id = 0xbeef
	first := ipv4Packet(client.v4, server.v4, unix.IPPROTO_UDP, id, 0x2000, dgram[:1480])
	last := ipv4Packet(client.v4, server.v4, unix.IPPROTO_UDP, id, 1480/8, dgram[1480:])
	cs, as := client.sender(t), attacker.sender(t)

	const flood = 20_000
	before := a.counters()
	var took time.Duration
	err = onCPU(0, func() error {
		if err := cs.send(first); err != nil {
			return err
		}
		// Distinct first fragments: the IP ID varies, "more fragments"
		// is set, each holds a UDP header.
		start := time.Now()
		pkt := ipv4Packet(attacker.v4, server.v4, unix.IPPROTO_UDP, 0, 0x2000, append(udpHeader(40000, 4000, 1008), make([]byte, 8)...))
		for i := range flood {
			binary.BigEndian.PutUint16(pkt[4:], uint16(i))
			binary.BigEndian.PutUint16(pkt[10:], 0)
			binary.BigEndian.PutUint16(pkt[10:], checksum(pkt[:20]))
			if err := as.send(pkt); err != nil {
				return err
			}
		}
		took = time.Since(start)
		return cs.send(last)
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("flood: %d first fragments in %v (%.0f packets/s)", flood, took.Round(time.Millisecond), float64(flood)/took.Seconds())
	if err := receive(marker); err != nil {
		t.Errorf("the allowed flow's fragmented datagram after the attacker's first fragments: %v; drops: %s",
			err, drops(before, a.counters()))
	} else {
		t.Logf("the datagram arrived; drops: %s", drops(before, a.counters()))
	}
	after := a.counters()
	if d := after[bpf.CounterKey{Reason: bpf.ReasonDropFrag, Scope: bpf.ScopeEgress}].Packets -
		before[bpf.CounterKey{Reason: bpf.ReasonDropFrag, Scope: bpf.ScopeEgress}].Packets; d != 0 {
		t.Errorf("%d fragments dropped as %s at egress during the attack, want 0", d, bpf.ReasonDropFrag)
	}
	if d := after[bpf.CounterKey{Reason: bpf.ReasonDropNoRule, Scope: bpf.ScopeEgress}].Packets -
		before[bpf.CounterKey{Reason: bpf.ReasonDropNoRule, Scope: bpf.ScopeEgress}].Packets; d < flood {
		t.Errorf("%d of the attacker's %d first fragments dropped by policy: the flood did not reach the datapath", d, flood)
	}
}
