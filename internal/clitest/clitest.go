// Package clitest runs the real endpointctl and policyctl binaries against a
// real datapath loaded under a private bpffs root, with a private state file
// and agent socket, the way an operator runs them on a node. Everything a
// test creates is removed in t.Cleanup, failed test or not.
package clitest

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// Bins builds endpointctl and policyctl once per test process and returns
// their directory; the package's TestMain removes it with RemoveBins.
// Building from the working tree every time means a test never runs a
// stale binary.
func Bins() (string, error) {
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "idcni-clitest-bin-")
		if buildErr == nil {
			buildErr = build(binDir)
		}
	})
	return binDir, buildErr
}

func build(dir string) error {
	// Readable by everyone: one test runs the tools as nobody.
	if err := os.Chmod(dir, 0o755); err != nil {
		return err
	}
	for _, name := range []string{"endpointctl", "policyctl"} {
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, name), "github.com/idcni/idcni/cmd/"+name)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go build %s: %v\n%s", name, err, out)
		}
	}
	return nil
}

// RemoveBins deletes what Bins built; TestMain calls it.
func RemoveBins() {
	if binDir != "" {
		os.RemoveAll(binDir)
	}
}

// RequireRoot skips tests that load BPF programs.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: loads BPF programs and pins them")
	}
}

// Env is one private node: a bpffs root, a state file and an agent socket
// path nothing listens on (unless a test serves it).
type Env struct {
	t       testing.TB
	Bin     string
	BPFRoot string
	State   string
	Socket  string
}

// NewEmpty returns an Env whose datapath is not loaded: its bpffs root does
// not exist yet.
func NewEmpty(t testing.TB) *Env {
	t.Helper()
	RequireRoot(t)
	bin, err := Bins()
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	tmp := t.TempDir()
	e := &Env{
		t:       t,
		Bin:     bin,
		BPFRoot: "/sys/fs/bpf/idcni-test-" + hex.EncodeToString(b),
		State:   filepath.Join(tmp, "lib", "state.db"),
		Socket:  filepath.Join(tmp, "agent.sock"),
	}
	t.Cleanup(func() {
		if err := bpf.Unpin(e.BPFRoot); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return e
}

// New returns an Env with the datapath loaded, as the CNI plugin loads it
// on the first pod, and an open handle to it for checking the maps.
func New(t testing.TB) (*Env, *bpf.Datapath) {
	t.Helper()
	e := NewEmpty(t)
	return e, e.Load()
}

// Load loads the datapath under the Env's root (again, after Wipe).
func (e *Env) Load() *bpf.Datapath {
	e.t.Helper()
	d, err := bpf.Load(bpf.Options{Root: e.BPFRoot})
	if err != nil {
		e.t.Fatalf("load datapath: %v", err)
	}
	e.t.Cleanup(func() { d.Close() })
	return d
}

// Wipe removes every pin, as a reboot empties bpffs.
func (e *Env) Wipe(d *bpf.Datapath) {
	e.t.Helper()
	d.Close()
	if err := bpf.Unpin(e.BPFRoot); err != nil {
		e.t.Fatal(err)
	}
}

// Result is what a command did.
type Result struct {
	Args   []string
	Stdout string
	Stderr string
	Code   int
}

func (r Result) String() string {
	return fmt.Sprintf("%s: exit %d\nstdout:\n%s\nstderr:\n%s", strings.Join(r.Args, " "), r.Code, r.Stdout, r.Stderr)
}

// Run runs a tool with the Env's paths in the environment (IDCNI_BPF_ROOT,
// IDCNI_STATE, IDCNI_AGENT_SOCKET), so tests run exactly the words an
// operator types.
func (e *Env) Run(tool string, args ...string) Result {
	return e.run(nil, tool, args...)
}

// RunAs runs a tool as another user.
func (e *Env) RunAs(uid, gid uint32, tool string, args ...string) Result {
	return e.run(&syscall.Credential{Uid: uid, Gid: gid}, tool, args...)
}

func (e *Env) run(cred *syscall.Credential, tool string, args ...string) Result {
	e.t.Helper()
	cmd := exec.Command(filepath.Join(e.Bin, tool), args...)
	cmd.Env = append(os.Environ(), "IDCNI_BPF_ROOT="+e.BPFRoot, "IDCNI_STATE="+e.State, "IDCNI_AGENT_SOCKET="+e.Socket)
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Start()
	if err != nil {
		e.t.Fatalf("start %s: %v", tool, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-time.After(time.Minute):
		_ = cmd.Process.Kill()
		<-done
		e.t.Fatalf("%s %s did not finish in a minute", tool, strings.Join(args, " "))
	}
	r := Result{Args: append([]string{tool}, args...), Stdout: stdout.String(), Stderr: stderr.String()}
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		r.Code = ee.ExitCode()
	case err != nil:
		e.t.Fatalf("run %s: %v", tool, err)
	}
	return r
}

// MustRun runs a tool and fails the test unless it exits 0.
func (e *Env) MustRun(tool string, args ...string) Result {
	e.t.Helper()
	r := e.Run(tool, args...)
	if r.Code != 0 {
		e.t.Fatalf("%s", r)
	}
	return r
}

// MustFail runs a tool and fails the test unless it exits 1 with one line
// on stderr containing want. With usage set, the usage must follow the
// line; without, nothing may.
func (e *Env) MustFail(want string, usage bool, tool string, args ...string) Result {
	e.t.Helper()
	r := e.Run(tool, args...)
	if r.Code != 1 {
		e.t.Errorf("want exit 1, got:\n%s", r)
		return r
	}
	first, rest, _ := strings.Cut(r.Stderr, "\n")
	if !strings.HasPrefix(first, "Error: ") || !strings.Contains(first, want) {
		e.t.Errorf("want one error line containing %q, got:\n%s", want, r)
	}
	if usage && !strings.Contains(rest, "Usage:") {
		e.t.Errorf("want the usage after the error, got:\n%s", r)
	}
	if !usage && rest != "" {
		e.t.Errorf("want nothing after the error line, got:\n%s", r)
	}
	if r.Stdout != "" {
		e.t.Errorf("a failed command wrote to stdout:\n%s", r)
	}
	return r
}

// HostVeth creates a veth pair in the host namespace whose first end
// stands for a pod's host veth, and deletes it after the test. Nothing is
// attached to it and no packet goes through it.
func HostVeth(t testing.TB) (name string, ifindex int) {
	t.Helper()
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	name = "idct" + hex.EncodeToString(b)
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: "idcp" + hex.EncodeToString(b)}); err != nil {
		t.Fatalf("add veth %s: %v", name, err)
	}
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(name); err == nil {
			_ = netlink.LinkDel(l)
		}
	})
	l, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	return name, l.Attrs().Index
}

// PutPod enters a pod into the maps as the CNI plugin does at ADD: its
// endpoint and ipcache entries, as the unresolved identity.
func PutPod(t testing.TB, d *bpf.Datapath, ifindex int, addrs ...netip.Addr) {
	t.Helper()
	ep := bpf.Endpoint{Identity: identity.Unresolved}
	for _, a := range addrs {
		if a.Is4() {
			ep.IPv4 = a
		} else {
			ep.IPv6 = a
		}
		if err := d.PutIPCache(netip.PrefixFrom(a, a.BitLen()), identity.Unresolved); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.PutEndpoint(ifindex, ep); err != nil {
		t.Fatal(err)
	}
}

// ForRoot returns an Env on a datapath someone else owns (an e2e network
// whose plugin loads it): the bpffs root is theirs to remove, the state
// file is a private one. The binaries are built into the test's own
// temporary directory, as the caller's package has no TestMain of ours to
// remove a shared one.
func ForRoot(t testing.TB, bpfRoot, socket string) *Env {
	t.Helper()
	RequireRoot(t)
	tmp := t.TempDir()
	bin := filepath.Join(tmp, "bin")
	if err := os.Mkdir(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := build(bin); err != nil {
		t.Fatal(err)
	}
	return &Env{t: t, Bin: bin, BPFRoot: bpfRoot, State: filepath.Join(tmp, "state.db"), Socket: socket}
}

// Proc is a tool running in the background (policyctl monitor).
type Proc struct {
	cmd    *exec.Cmd
	lines  chan string
	stderr *lockedBuffer
	done   chan error
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Start runs a tool in the background; its stdout comes line by line from
// Lines. It is killed after the test if still running.
func (e *Env) Start(tool string, args ...string) *Proc {
	e.t.Helper()
	cmd := exec.Command(filepath.Join(e.Bin, tool), args...)
	cmd.Env = append(os.Environ(), "IDCNI_BPF_ROOT="+e.BPFRoot, "IDCNI_STATE="+e.State, "IDCNI_AGENT_SOCKET="+e.Socket)
	p := &Proc{cmd: cmd, lines: make(chan string, 4096), stderr: &lockedBuffer{}, done: make(chan error, 1)}
	cmd.Stderr = p.stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		e.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		e.t.Fatalf("start %s: %v", tool, err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
		close(p.lines)
		p.done <- cmd.Wait()
	}()
	e.t.Cleanup(func() { _ = cmd.Process.Kill() })
	return p
}

// Lines delivers the tool's stdout lines; closed when it exits.
func (p *Proc) Lines() <-chan string { return p.lines }

// Stderr is what the tool wrote to stderr so far.
func (p *Proc) Stderr() string { return p.stderr.String() }

// WaitStderr waits until stderr contains s.
func (p *Proc) WaitStderr(s string, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if strings.Contains(p.Stderr(), s) {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

// Interrupt sends SIGINT, as Ctrl-C does, and returns the stdout lines not
// yet read from Lines and the exit code, once the tool has exited.
func (p *Proc) Interrupt(timeout time.Duration) (rest []string, code int, err error) {
	// A tool that ended by itself (monitor -c) is simply waited for.
	if err := p.cmd.Process.Signal(os.Interrupt); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return nil, -1, err
	}
	deadline := time.After(timeout)
	for {
		select {
		case l, ok := <-p.lines:
			if ok {
				rest = append(rest, l)
				continue
			}
			err := <-p.done
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				return rest, ee.ExitCode(), nil
			}
			return rest, 0, err
		case <-deadline:
			return rest, -1, fmt.Errorf("did not exit within %s of SIGINT", timeout)
		}
	}
}

// Maps is everything the CLIs and the agent write to the datapath, as one
// value a test compares before and after.
type Maps struct {
	Endpoints map[int]bpf.Endpoint
	IPCache   map[netip.Prefix]identity.ID
	LocalPods map[netip.Addr]bpf.LocalPod
	Policy    *policy.MapState
	Revision  uint32
	Debug     bool
}

// SnapshotMaps reads Maps off d.
func SnapshotMaps(t testing.TB, d *bpf.Datapath) Maps {
	t.Helper()
	var s Maps
	var err error
	if s.Endpoints, err = d.Endpoints(); err != nil {
		t.Fatal(err)
	}
	if s.IPCache, err = d.IPCache(); err != nil {
		t.Fatal(err)
	}
	if s.LocalPods, err = d.LocalPods(); err != nil {
		t.Fatal(err)
	}
	if s.Policy, err = d.Policy(); err != nil {
		t.Fatal(err)
	}
	if s.Revision, err = d.Revision(); err != nil {
		t.Fatal(err)
	}
	if s.Debug, err = d.Debug(); err != nil {
		t.Fatal(err)
	}
	return s
}
