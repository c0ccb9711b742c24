package cluster_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	plugin "github.com/idcni/idcni/cni"
	"github.com/idcni/idcni/e2e/cluster"
)

// The upgrade test's probes: traffic between pods, made by this process
// from inside the pods' network namespaces (so every packet crosses the
// pods' host veths and the programs on them, as a container's would), and
// a sampler of the programs attached to those veths. kubectl exec cannot
// open fifty connections a second; sockets opened here can, and count
// every one.

// podNet is a pod as the host reaches it: the network namespace and host
// veth the CNI plugin recorded on its node.
type podNet struct {
	name   string
	node   *cluster.Node
	ip     netip.Addr
	netns  ns.NetNS
	hostIf string
}

// openPodNet finds the plugin's record of pod namespace/name on node and
// opens the pod's network namespace.
func openPodNet(node *cluster.Node, namespace, name string, ip netip.Addr) (*podNet, error) {
	// The conflist the agent writes keeps the shipped network name and
	// the plugin's default data directory.
	recs, err := plugin.ReadRecords(node.HostPath(plugin.DefaultDataDir), "idcni")
	if err != nil {
		return nil, fmt.Errorf("the CNI records of node %s: %w", node.Name, err)
	}
	for _, r := range recs {
		if r.PodNamespace != namespace || r.PodName != name || !r.Complete {
			continue
		}
		n, err := ns.GetNS(node.HostPath(r.Netns))
		if err != nil {
			return nil, fmt.Errorf("open the netns %s of pod %s/%s on %s: %w", r.Netns, namespace, name, node.Name, err)
		}
		return &podNet{name: name, node: node, ip: ip, netns: n, hostIf: r.HostIfName}, nil
	}
	return nil, fmt.Errorf("node %s has no complete CNI record of pod %s/%s (%d records)", node.Name, namespace, name, len(recs))
}

// dial connects from the pod: the socket is made inside the pod's netns,
// where it stays whichever thread uses it, and connects from outside, so
// no thread is held in the netns while a SYN waits for its answer (a
// denied one never gets any).
func (p *podNet) dial(to netip.AddrPort, timeout time.Duration) (*net.TCPConn, error) {
	var fd int
	if err := p.netns.Do(func(ns.NetNS) error {
		var err error
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
		return err
	}); err != nil {
		return nil, fmt.Errorf("socket in the netns of %s: %w", p.name, err)
	}
	f := os.NewFile(uintptr(fd), "tcp")
	defer f.Close() // FileConn holds a duplicate
	sa := &unix.SockaddrInet4{Port: int(to.Port()), Addr: to.Addr().As4()}
	if err := unix.Connect(fd, sa); err != nil && !errors.Is(err, unix.EINPROGRESS) {
		return nil, fmt.Errorf("connect to %s: %w", to, err)
	}
	fc, err := net.FileConn(f)
	if err != nil {
		return nil, err
	}
	c := fc.(*net.TCPConn)
	rc, err := c.SyscallConn()
	if err != nil {
		c.Close()
		return nil, err
	}
	// Writable means the handshake ended: connected, or SO_ERROR says
	// why not.
	_ = c.SetWriteDeadline(time.Now().Add(timeout))
	var connErr error
	err = rc.Write(func(fd uintptr) bool {
		if v, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR); err != nil || v != 0 {
			connErr = err
			if v != 0 {
				connErr = unix.Errno(v)
			}
			return true
		}
		_, err := unix.Getpeername(int(fd))
		return !errors.Is(err, unix.ENOTCONN)
	})
	if err == nil {
		err = connErr
	}
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("connect to %s: %w", to, err)
	}
	_ = c.SetWriteDeadline(time.Time{})
	return c, nil
}

func (p *podNet) listen(port uint16) (net.Listener, error) {
	var l net.Listener
	err := p.netns.Do(func(ns.NetNS) error {
		var err error
		l, err = net.Listen("tcp4", fmt.Sprintf(":%d", port))
		return err
	})
	return l, err
}

// lostSegments is what the kernel retransmitted on c and did not learn
// was spurious: a retransmission the receiver reports as a duplicate
// (D-SACK) was not a loss, a tail loss probe after a delayed ACK say.
func lostSegments(c *net.TCPConn) (int64, error) {
	sc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var info *unix.TCPInfo
	var ierr error
	if err := sc.Control(func(fd uintptr) {
		info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	}); err != nil {
		return 0, err
	}
	if ierr != nil {
		return 0, fmt.Errorf("getsockopt TCP_INFO: %w", ierr)
	}
	return max(int64(info.Total_retrans)-int64(info.Dsack_dups), 0), nil
}

// echoServer accepts on a pod's port, echoes every connection and counts
// the connections and lost segments by peer address.
type echoServer struct {
	l  net.Listener
	wg sync.WaitGroup

	mu       sync.Mutex
	accepted map[netip.Addr]int64
	lost     map[netip.Addr]int64
	conns    map[net.Conn]bool
	errs     []string
	// cut is set when close cuts the connections left: their errors
	// are close's doing.
	cut bool
}

func serveEcho(p *podNet, port uint16) (*echoServer, error) {
	l, err := p.listen(port)
	if err != nil {
		return nil, fmt.Errorf("listen on %s:%d: %w", p.name, port, err)
	}
	s := &echoServer{l: l, accepted: map[netip.Addr]int64{}, lost: map[netip.Addr]int64{}, conns: map[net.Conn]bool{}}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return // closed
			}
			peer := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
			s.mu.Lock()
			s.accepted[peer]++
			s.conns[c] = true
			s.mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				_, err := io.Copy(c, c)
				lost, lerr := lostSegments(c.(*net.TCPConn))
				s.mu.Lock()
				s.lost[peer] += lost
				if err != nil && !s.cut {
					s.errs = append(s.errs, fmt.Sprintf("echo to %s: %v", peer, err))
				}
				if lerr != nil && !s.cut {
					s.errs = append(s.errs, lerr.Error())
				}
				delete(s.conns, c)
				s.mu.Unlock()
				c.Close()
			}()
		}
	}()
	return s, nil
}

// close stops accepting, gives the connections their clients are closing
// a moment to end, and cuts the rest.
func (s *echoServer) close() {
	s.l.Close()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		s.mu.Lock()
		n := len(s.conns)
		s.mu.Unlock()
		if n == 0 {
			break
		}
	}
	s.mu.Lock()
	s.cut = true
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// stream is one long-lived connection carrying a sequence number every
// interval; the server echoes each, and the client checks it gets every
// number back, in order.
type stream struct {
	Pair     string  `json:"pair"`
	Sent     int64   `json:"sent"`
	Echoed   int64   `json:"echoed"`
	Gaps     int64   `json:"gaps"`         // echoes out of sequence
	Lost     int64   `json:"lostMessages"` // sent and never echoed
	LostSegs int64   `json:"lostSegments"` // client side retransmissions not found spurious
	MaxStall float64 `json:"maxStallMs"`   // longest wait for the next echo
	Error    string  `json:"error,omitempty"`

	conn *net.TCPConn
	done chan struct{}
}

func startStream(pair string, from *podNet, to netip.AddrPort, interval time.Duration, stop <-chan struct{}) (*stream, error) {
	c, err := from.dial(to, 10*time.Second)
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", pair, err)
	}
	s := &stream{Pair: pair, conn: c, done: make(chan struct{})}
	var sent atomic.Int64
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		// The echoes still on the way once the writer stops get ten
		// seconds: a bound on waiting, not a figure. It also wakes a
		// reader that already has them all.
		defer func() { _ = c.SetReadDeadline(time.Now().Add(10 * time.Second)) }()
		tick := time.NewTicker(interval)
		defer tick.Stop()
		var buf [8]byte
		for seq := uint64(0); ; seq++ {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			binary.BigEndian.PutUint64(buf[:], seq)
			if _, err := c.Write(buf[:]); err != nil {
				return // the reader sees the connection's end too
			}
			sent.Add(1)
		}
	}()
	go func() {
		defer close(s.done)
		// complete tells whether the writer is done and every message it
		// sent came back.
		complete := func() bool {
			select {
			case <-writerDone:
				return s.Echoed >= sent.Load()
			default:
				return false
			}
		}
		var buf [8]byte
		var want uint64
		last := time.Now()
		for !complete() {
			if _, err := io.ReadFull(c, buf[:]); err != nil {
				if !complete() {
					s.Error = err.Error()
				}
				break
			}
			now := time.Now()
			s.MaxStall = max(s.MaxStall, float64(now.Sub(last))/float64(time.Millisecond))
			last = now
			if got := binary.BigEndian.Uint64(buf[:]); got != want {
				s.Gaps++
				want = got
			}
			want++
			s.Echoed++
		}
		s.Sent = sent.Load()
		if lost, err := lostSegments(c); err == nil {
			s.LostSegs = lost
		} else if s.Error == "" {
			s.Error = err.Error()
		}
	}()
	return s, nil
}

// wait returns once the stream ended, and counts what was lost.
func (s *stream) wait() {
	<-s.done
	s.Lost = s.Sent - s.Echoed
	s.conn.Close()
}

// connStream opens a new connection from one pod to another every
// interval, each in a goroutine of its own. On an allowed pair each must
// connect, echo a sequence number and close; on a denied pair none may
// connect.
type connStream struct {
	Pair      string  `json:"pair"`
	Kind      string  `json:"kind"`
	SameNode  bool    `json:"sameNode"`
	Attempts  int64   `json:"attempts"`
	Connected int64   `json:"connected"`
	Failed    int64   `json:"failed"`       // allowed: no connection or no echo
	LostSegs  int64   `json:"lostSegments"` // allowed: client side
	FirstErr  string  `json:"firstError,omitempty"`
	Seconds   float64 `json:"seconds"`

	attempts, connected, failed, lostSegs atomic.Int64
	errOnce                               sync.Once
	wg                                    sync.WaitGroup
	done                                  chan struct{}
}

// Dial timeouts. An allowed connection whose SYN is dropped once
// connects at the retransmission a second later, and is counted as lost
// segments, not failed. A denied dial waits as long, so that a SYN the
// server's node delivers is counted even when a loaded machine answers it
// late; its retransmission is one more packet to deny.
const (
	allowedDialTimeout = 5 * time.Second
	deniedDialTimeout  = 3 * time.Second
)

func startConnStream(pair, kind string, from *podNet, to netip.AddrPort, sameNode bool, interval time.Duration, stop <-chan struct{}) *connStream {
	s := &connStream{Pair: pair, Kind: kind, SameNode: sameNode, done: make(chan struct{})}
	allowed := kind == "allowed"
	fail := func(err error) {
		s.failed.Add(1)
		s.errOnce.Do(func() { s.FirstErr = err.Error() })
	}
	attempt := func(seq uint64) {
		defer s.wg.Done()
		timeout := deniedDialTimeout
		if allowed {
			timeout = allowedDialTimeout
		}
		c, err := from.dial(to, timeout)
		if err != nil {
			if allowed {
				fail(err)
			}
			return
		}
		defer c.Close()
		s.connected.Add(1)
		if !allowed {
			return
		}
		var out, in [8]byte
		binary.BigEndian.PutUint64(out[:], seq)
		_ = c.SetDeadline(time.Now().Add(allowedDialTimeout))
		if _, err := c.Write(out[:]); err != nil {
			fail(err)
			return
		}
		if _, err := io.ReadFull(c, in[:]); err != nil {
			fail(err)
			return
		}
		if in != out {
			fail(fmt.Errorf("echo %x, want %x", in, out))
			return
		}
		lost, err := lostSegments(c)
		if err != nil {
			fail(err)
			return
		}
		s.lostSegs.Add(lost)
	}
	go func() {
		defer close(s.done)
		start := time.Now()
		tick := time.NewTicker(interval)
		defer tick.Stop()
		var seq uint64
		for {
			select {
			case <-stop:
				s.Seconds = time.Since(start).Seconds()
				s.wg.Wait()
				s.Attempts, s.Connected, s.Failed, s.LostSegs = s.attempts.Load(), s.connected.Load(), s.failed.Load(), s.lostSegs.Load()
				return
			case <-tick.C:
			}
			// A ticker drops the ticks a busy machine misses: the
			// attempts due by now are made up, so the rate holds on
			// average.
			for due := uint64(time.Since(start) / interval); seq < due; seq++ {
				s.attempts.Add(1)
				s.wg.Add(1)
				go attempt(seq)
			}
		}
	}()
	return s
}

// podAttach is what the sampler saw on one pod's host veth.
type podAttach struct {
	Pod               string   `json:"pod"`
	Node              string   `json:"node"`
	HostIf            string   `json:"hostIf"`
	Samples           int      `json:"samples"`
	UnattachedSamples int      `json:"unattachedSamples"`
	UnattachedMs      float64  `json:"unattachedMs"`
	Programs          []string `json:"programs"` // ingress/egress program IDs, in the order first seen
	Errors            int      `json:"errors"`
	FirstErr          string   `json:"firstError,omitempty"`

	ifindex   int
	seen      map[string]bool
	lastAt    time.Time
	unattNow  bool
	unattTime time.Duration
}

// attachSampler asks the kernel, every interval, which programs run on
// each pod's host veth, from a thread inside the veth's node netns.
type attachSampler struct {
	pods   []*podAttach
	maxGap time.Duration
	done   chan error
	// rounds counts the rounds of samples taken, for a test of the
	// sampler to wait on instead of sleeping.
	rounds atomic.Int64
}

// sampleAttachments starts sampling the host veths of pods, in the netns
// of the node called node (netnsPath), until stop is closed.
func sampleAttachments(node, netnsPath string, pods []*podNet, interval time.Duration, stop <-chan struct{}) *attachSampler {
	s := &attachSampler{done: make(chan error, 1)}
	for _, p := range pods {
		s.pods = append(s.pods, &podAttach{Pod: p.name, Node: node, HostIf: p.hostIf, seen: map[string]bool{}})
	}
	ready := make(chan error, 1)
	go func() {
		// The thread stays locked and in the node's netns until the
		// goroutine ends, and goes back to its own netns then. The
		// runtime ends a thread left locked, but not the process's
		// main thread, which would stay in the node's netns (and keep
		// it) for the rest of the test binary's life.
		runtime.LockOSThread()
		own, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			ready <- err
			return
		}
		defer func() {
			if unix.Setns(int(own.Fd()), unix.CLONE_NEWNET) == nil {
				runtime.UnlockOSThread()
			}
			own.Close()
		}()
		f, err := os.Open(netnsPath)
		if err != nil {
			ready <- err
			return
		}
		err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
		f.Close()
		if err != nil {
			ready <- fmt.Errorf("enter the netns of node %s: %w", node, err)
			return
		}
		for _, p := range s.pods {
			l, err := netlink.LinkByName(p.HostIf)
			if err != nil {
				ready <- fmt.Errorf("host veth %s of pod %s on %s: %w", p.HostIf, p.Pod, node, err)
				return
			}
			p.ifindex = l.Attrs().Index
		}
		ready <- nil
		tick := time.NewTicker(interval)
		defer tick.Stop()
		var last time.Time
		for {
			now := time.Now()
			if !last.IsZero() {
				s.maxGap = max(s.maxGap, now.Sub(last))
			}
			last = now
			for _, p := range s.pods {
				p.sample(now)
			}
			s.rounds.Add(1)
			select {
			case <-stop:
				end := time.Now()
				for _, p := range s.pods {
					p.finish(end)
				}
				s.done <- nil
				return
			case <-tick.C:
			}
		}
	}()
	if err := <-ready; err != nil {
		s.done <- err
	}
	return s
}

func (p *podAttach) sample(now time.Time) {
	if p.unattNow {
		p.unattTime += now.Sub(p.lastAt)
	}
	p.lastAt = now
	p.Samples++
	var ids []string
	attached := true
	for _, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
		res, err := link.QueryPrograms(link.QueryOptions{Target: p.ifindex, Attach: at})
		if err != nil {
			p.Errors++
			if p.FirstErr == "" {
				p.FirstErr = fmt.Sprintf("query %v of ifindex %d: %v", at, p.ifindex, err)
			}
			attached = false
			continue
		}
		var progs []string
		for _, prog := range res.Programs {
			progs = append(progs, fmt.Sprint(prog.ID))
		}
		if len(progs) == 0 && hasLegacyFilter(p.ifindex, at) {
			progs = append(progs, "legacy")
		}
		if len(progs) == 0 {
			attached = false
		}
		ids = append(ids, strings.Join(progs, "+"))
	}
	key := strings.Join(ids, "/")
	if !p.seen[key] {
		p.seen[key] = true
		p.Programs = append(p.Programs, key)
	}
	p.unattNow = !attached
	if !attached {
		p.UnattachedSamples++
	}
}

// finish counts the time from the last sample to the end of sampling.
func (p *podAttach) finish(end time.Time) {
	if p.unattNow {
		p.unattTime += end.Sub(p.lastAt)
	}
	p.UnattachedMs = float64(p.unattTime) / float64(time.Millisecond)
}

// hasLegacyFilter tells whether a cls_bpf filter sits on the clsact hook
// of ifindex that at names: a build that falls back to legacy TC is
// attached too.
func hasLegacyFilter(ifindex int, at ebpf.AttachType) bool {
	parent := uint32(netlink.HANDLE_MIN_INGRESS)
	if at == ebpf.AttachTCXEgress {
		parent = netlink.HANDLE_MIN_EGRESS
	}
	l, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return false
	}
	filters, err := netlink.FilterList(l, parent)
	if err != nil {
		return false
	}
	for _, f := range filters {
		if _, ok := f.(*netlink.BpfFilter); ok {
			return true
		}
	}
	return false
}

// wait returns the sampler's error once it stopped.
func (s *attachSampler) wait() error { return <-s.done }

// sortedPods orders results for the report.
func sortedPods(all []*podAttach) []*podAttach {
	sort.Slice(all, func(i, j int) bool { return all[i].Pod < all[j].Pod })
	return all
}
