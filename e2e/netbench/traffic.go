package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// The workloads run on OS threads that joined a pod's netns and use
// blocking sockets through plain system calls, as netperf does: Go's
// netpoller would add an epoll round and a wake-up to every transaction,
// user-space time that would hide part of what the datapath costs.

// metric is one workload.
type metric struct {
	name string // rr, crr, stream
	desc string
	unit string
	run  func(ctx context.Context, w workload) (sample, error)
}

var metrics = []metric{
	{"rr", "TCP request/response, 1 byte each way, one connection", "trans/s", runRR},
	{"crr", "TCP connect, 1-byte request/response, close; a new connection each", "trans/s", runCRR},
	{"stream", "TCP stream, one connection, 128 KiB writes", "Gbit/s", runStream},
}

func metricByName(name string) (metric, bool) {
	for _, m := range metrics {
		if m.name == name {
			return m, true
		}
	}
	return metric{}, false
}

// workload says where and how long to run.
type workload struct {
	clientNS, serverNS   string // netns paths
	server               netip.AddrPort
	warmup, duration     time.Duration
	clientCPU, serverCPU int    // -1: not pinned
	sched                string // fifo, nice or none: see -sched
	// listenPort is the server's port when the client dials another
	// (a Service's port, translated to it on the way); 0: server's.
	listenPort int
}

// tune pins the calling thread to cpu and sets its scheduling class. On
// Linux both apply to the calling thread alone, and the thread dies with
// the workload.
func tune(cpu int, sched string) error {
	if cpu >= 0 {
		var set unix.CPUSet
		set.Set(cpu)
		if err := unix.SchedSetaffinity(0, &set); err != nil {
			return fmt.Errorf("pin thread to CPU %d: %w", cpu, err)
		}
	}
	switch sched {
	case "fifo":
		// The lowest real-time priority: enough to run the moment a
		// packet wakes the thread. The kernel's real-time throttling
		// (sched_rt_runtime_us) still leaves the CPU to others for a
		// part of every second.
		attr := &unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_FIFO, Priority: 1}
		if err := unix.SchedSetAttr(0, attr, 0); err != nil {
			return fmt.Errorf("set SCHED_FIFO: %w", err)
		}
	case "nice":
		if err := unix.Setpriority(unix.PRIO_PROCESS, unix.Gettid(), -20); err != nil {
			return fmt.Errorf("set nice -20: %w", err)
		}
	}
	return nil
}

// sample is one measured window.
type sample struct {
	Value   float64       `json:"value"`
	Ops     int64         `json:"ops"` // transactions, or bytes for stream
	Elapsed time.Duration `json:"elapsed_ns"`
}

// ioTimeout bounds every blocking socket call: a packet the datapath drops
// turns into an error, not a hang.
const ioTimeout = 5 * time.Second

// inNetns runs fn on a new OS thread that has joined the netns at path.
// The thread stays locked and dies with the goroutine, so no other
// goroutine ever runs in the pod's netns; sockets fn creates belong to the
// pod's netns for good.
func inNetns(path string, fn func() error) <-chan error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// No UnlockOSThread: the runtime discards the thread.
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			done <- fmt.Errorf("open netns %s: %w", path, err)
			return
		}
		err = unix.Setns(fd, unix.CLONE_NEWNET)
		unix.Close(fd)
		if err != nil {
			done <- fmt.Errorf("enter netns %s: %w", path, err)
			return
		}
		done <- fn()
	}()
	return done
}

// fdSet lets the controller wake threads blocked on sockets (shutdown)
// without racing their close.
type fdSet struct {
	mu   sync.Mutex
	fds  map[int]bool
	shut bool
}

func (s *fdSet) add(fd int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fds == nil {
		s.fds = map[int]bool{}
	}
	s.fds[fd] = true
	if s.shut {
		_ = unix.Shutdown(fd, unix.SHUT_RDWR)
	}
}

func (s *fdSet) close(fd int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.fds, fd)
	unix.Close(fd)
}

// shutdownAll wakes every blocked accept, read and write.
func (s *fdSet) shutdownAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.shut = true
	for fd := range s.fds {
		_ = unix.Shutdown(fd, unix.SHUT_RDWR)
	}
}

func setTimeouts(fd int, d time.Duration) error {
	tv := unix.NsecToTimeval(d.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return err
	}
	return unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
}

// listen opens a blocking listening socket on port in the current netns.
func listen(port int) (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		unix.Close(fd)
		return -1, err
	}
	if err := setTimeouts(fd, ioTimeout); err != nil { // inherited by accepted sockets
		unix.Close(fd)
		return -1, err
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Port: port}); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("bind port %d: %w", port, err)
	}
	if err := unix.Listen(fd, 1024); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("listen: %w", err)
	}
	return fd, nil
}

func accept(lfd int) (int, error) {
	for {
		fd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
		if err == unix.EINTR || err == unix.ECONNABORTED {
			continue
		}
		return fd, err
	}
}

// dial connects a blocking socket in the current netns. A signal during
// connect (EINTR) leaves the handshake running; wait for it with poll.
func dial(dst netip.AddrPort, timeout time.Duration, nodelay bool) (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	if err := setTimeouts(fd, timeout); err != nil {
		unix.Close(fd)
		return -1, err
	}
	if nodelay {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
			unix.Close(fd)
			return -1, err
		}
	}
	err = unix.Connect(fd, &unix.SockaddrInet4{Port: int(dst.Port()), Addr: dst.Addr().As4()})
	if err == unix.EINTR {
		err = waitConnected(fd, timeout)
	}
	if err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

func waitConnected(fd int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return unix.ETIMEDOUT
		}
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		n, err := unix.Poll(pfd, int(left.Milliseconds())+1)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return unix.ETIMEDOUT
		}
		soerr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
		if err != nil {
			return err
		}
		if soerr != 0 {
			return unix.Errno(soerr)
		}
		return nil
	}
}

func read(fd int, b []byte) (int, error) {
	for {
		n, err := unix.Read(fd, b)
		if err == unix.EINTR {
			continue
		}
		return n, err
	}
}

func writeAll(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := unix.Write(fd, b)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

// window runs the warm-up, then samples counter over the measured window,
// then tells the workload to stop.
func window(ctx context.Context, w workload, counter *atomic.Int64, failed <-chan struct{}) (sample, error) {
	wait := func(d time.Duration) error {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		case <-failed:
			return errors.New("workload failed")
		}
	}
	if err := wait(w.warmup); err != nil {
		return sample{}, err
	}
	c0, t0 := counter.Load(), time.Now()
	if err := wait(w.duration); err != nil {
		return sample{}, err
	}
	c1, t1 := counter.Load(), time.Now()
	return sample{Ops: c1 - c0, Elapsed: t1.Sub(t0)}, nil
}

// harness starts a server and a client thread, measures, stops both and
// joins them, returning the first real error.
type harness struct {
	stop    atomic.Bool
	fds     fdSet
	failed  chan struct{}
	failOne sync.Once
}

func newHarness() *harness { return &harness{failed: make(chan struct{})} }

func (h *harness) fail() { h.failOne.Do(func() { close(h.failed) }) }

// guard marks the harness failed when fn returns an error before stop.
func (h *harness) guard(fn func() error) func() error {
	return func() error {
		err := fn()
		if err != nil && !h.stop.Load() {
			h.fail()
			return err
		}
		return nil
	}
}

func (h *harness) finish(s sample, werr error, server, client <-chan error) (sample, error) {
	h.stop.Store(true)
	cerr := <-client
	h.fds.shutdownAll()
	serr := <-server
	return s, errors.Join(cerr, serr, ignoreFailed(werr, cerr, serr))
}

// ignoreFailed drops the window's "workload failed" when the thread's own
// error says more.
func ignoreFailed(werr, cerr, serr error) error {
	if werr != nil && werr.Error() == "workload failed" && (cerr != nil || serr != nil) {
		return nil
	}
	return werr
}

// startServer listens in the server netns and runs serve on each accepted
// connection until stop. ready is closed once it listens.
func (h *harness) startServer(w workload, once bool, serve func(fd int) error) (<-chan error, error) {
	ready := make(chan error, 1)
	done := inNetns(w.serverNS, h.guard(func() error {
		if err := tune(w.serverCPU, w.sched); err != nil {
			ready <- err
			return err
		}
		port := int(w.server.Port())
		if w.listenPort != 0 {
			port = w.listenPort
		}
		lfd, err := listen(port)
		ready <- err
		if err != nil {
			return err
		}
		h.fds.add(lfd)
		defer h.fds.close(lfd)
		for !h.stop.Load() {
			fd, err := accept(lfd)
			if err != nil {
				if h.stop.Load() {
					return nil
				}
				return fmt.Errorf("server accept: %w", err)
			}
			h.fds.add(fd)
			err = serve(fd)
			h.fds.close(fd)
			if err != nil {
				return err
			}
			if once {
				return nil
			}
		}
		return nil
	}))
	select {
	case err := <-ready:
		if err != nil {
			<-done
			return nil, err
		}
		return done, nil
	case err := <-done:
		if err == nil {
			err = errors.New("server exited before listening")
		}
		return nil, err
	}
}

// runRR: one connection, the client sends one byte and waits for one back.
func runRR(ctx context.Context, w workload) (sample, error) {
	h := newHarness()
	server, err := h.startServer(w, true, func(fd int) error {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
			return err
		}
		b := make([]byte, 1)
		for {
			n, err := read(fd, b)
			if n == 0 || err != nil {
				if err != nil && !h.stop.Load() {
					return fmt.Errorf("rr server read: %w", err)
				}
				return nil
			}
			if err := writeAll(fd, b); err != nil {
				if h.stop.Load() {
					return nil
				}
				return fmt.Errorf("rr server write: %w", err)
			}
		}
	})
	if err != nil {
		return sample{}, err
	}
	var trans atomic.Int64
	client := inNetns(w.clientNS, h.guard(func() error {
		if err := tune(w.clientCPU, w.sched); err != nil {
			return err
		}
		fd, err := dial(w.server, ioTimeout, true)
		if err != nil {
			return fmt.Errorf("rr connect to %s: %w", w.server, err)
		}
		h.fds.add(fd)
		defer h.fds.close(fd)
		b := []byte{'x'}
		for !h.stop.Load() {
			if err := writeAll(fd, b); err != nil {
				return fmt.Errorf("rr write: %w", err)
			}
			n, err := read(fd, b)
			if err != nil || n != 1 {
				return fmt.Errorf("rr read: %d bytes, %v", n, err)
			}
			trans.Add(1)
		}
		return nil
	}))
	s, werr := window(ctx, w, &trans, h.failed)
	s, err = h.finish(s, werr, server, client)
	s.Value = float64(s.Ops) / s.Elapsed.Seconds()
	return s, err
}

// runCRR: a new connection per transaction: connect, one byte each way,
// close. The server closes first, as an HTTP server does, and the client
// closes once it sees the server's FIN: TIME_WAIT then stays on the
// server, where it costs a hash lookup, instead of piling up in the client,
// where it would slow every connect's port search more as the run goes on
// and make a later configuration look slower than an earlier one.
func runCRR(ctx context.Context, w workload) (sample, error) {
	h := newHarness()
	server, err := h.startServer(w, false, func(fd int) error {
		b := make([]byte, 1)
		n, err := read(fd, b)
		if n != 1 || err != nil {
			if h.stop.Load() {
				return nil
			}
			return fmt.Errorf("crr server read: %d bytes, %v", n, err)
		}
		if err := writeAll(fd, b); err != nil && !h.stop.Load() {
			return fmt.Errorf("crr server write: %w", err)
		}
		return nil // the caller closes
	})
	if err != nil {
		return sample{}, err
	}
	var trans atomic.Int64
	client := inNetns(w.clientNS, h.guard(func() error {
		if err := tune(w.clientCPU, w.sched); err != nil {
			return err
		}
		b := []byte{'x'}
		for !h.stop.Load() {
			fd, err := dial(w.server, ioTimeout, false)
			if err != nil {
				return fmt.Errorf("crr connect to %s: %w", w.server, err)
			}
			h.fds.add(fd)
			err = writeAll(fd, b)
			var n, eof int
			if err == nil {
				n, err = read(fd, b)
			}
			if err == nil && n == 1 {
				eof, err = read(fd, b)
			}
			h.fds.close(fd)
			if err != nil || n != 1 || eof != 0 {
				return fmt.Errorf("crr request/response/close: %d bytes, then %d, %v", n, eof, err)
			}
			trans.Add(1)
		}
		return nil
	}))
	s, werr := window(ctx, w, &trans, h.failed)
	s, err = h.finish(s, werr, server, client)
	s.Value = float64(s.Ops) / s.Elapsed.Seconds()
	return s, err
}

const streamWrite = 128 << 10

// runStream: one connection, the client writes as fast as it can, the
// server reads and counts.
func runStream(ctx context.Context, w workload) (sample, error) {
	h := newHarness()
	var bytes atomic.Int64
	server, err := h.startServer(w, true, func(fd int) error {
		b := make([]byte, 256<<10)
		for {
			n, err := read(fd, b)
			if n <= 0 || err != nil {
				if err != nil && !h.stop.Load() {
					return fmt.Errorf("stream server read: %w", err)
				}
				return nil
			}
			bytes.Add(int64(n))
		}
	})
	if err != nil {
		return sample{}, err
	}
	client := inNetns(w.clientNS, h.guard(func() error {
		if err := tune(w.clientCPU, w.sched); err != nil {
			return err
		}
		fd, err := dial(w.server, ioTimeout, false)
		if err != nil {
			return fmt.Errorf("stream connect to %s: %w", w.server, err)
		}
		h.fds.add(fd)
		defer h.fds.close(fd)
		b := make([]byte, streamWrite)
		for i := range b {
			b[i] = byte(i)
		}
		for !h.stop.Load() {
			if err := writeAll(fd, b); err != nil {
				return fmt.Errorf("stream write: %w", err)
			}
		}
		return nil
	}))
	s, werr := window(ctx, w, &bytes, h.failed)
	s, err = h.finish(s, werr, server, client)
	s.Value = float64(s.Ops) * 8 / s.Elapsed.Seconds() / 1e9
	return s, err
}

// probe tries to connect from the client pod to dst and says what
// happened: "connected", "refused" (a RST came back: nothing filtered the
// SYN) or "timeout" (the SYN or its answer was dropped).
func probe(clientNS string, dst netip.AddrPort, timeout time.Duration) (string, error) {
	var outcome string
	err := <-inNetns(clientNS, func() error {
		fd, err := dial(dst, timeout, false)
		switch {
		case err == nil:
			unix.Close(fd)
			outcome = "connected"
		case errors.Is(err, unix.ECONNREFUSED):
			outcome = "refused"
		case errors.Is(err, unix.EINPROGRESS), errors.Is(err, unix.ETIMEDOUT), errors.Is(err, unix.EAGAIN):
			outcome = "timeout"
		default:
			return fmt.Errorf("probe %s: %w", dst, err)
		}
		return nil
	})
	return outcome, err
}
