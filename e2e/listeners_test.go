package e2e

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/e2e/internal/cnitest"
)

// slowClientBound is how long a test waits for the agent to close a
// connection that stalls in the middle of a request. It is no measure of
// the agent: it only keeps a regression from hanging the test. Anything
// under it passes; without server deadlines the connection is never closed.
const slowClientBound = 3 * time.Minute

// The agent's two listeners, the metrics port (reachable by everything
// that reaches the node, pods included) and the local API socket, close a
// connection whose request stalls (slowloris), refuse headers over their
// bound, and the socket refuses bodies over its bound: a client can hold
// neither connections nor memory. Against the real agent binary, in a
// network namespace of its own with no API server (the listeners serve
// before the informers sync, and none of this needs them).
func TestAgentListenersBoundSlowAndLargeRequests(t *testing.T) {
	t.Parallel()
	a := startLoneAgent(t)
	listeners := []struct{ name, network, addr string }{
		{"metrics", "tcp", a.metrics},
		{"socket", "unix", a.socket},
	}
	// A group, so the check below runs once its parallel subtests are done.
	t.Run("group", func(t *testing.T) {
		for _, l := range listeners {
			t.Run(l.name+"/slowloris", func(t *testing.T) {
				t.Parallel()
				c, err := a.dial(l.network, l.addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				// Half a request line and one header, then silence, as a
				// slowloris client keeps it.
				if _, err := io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: idcni\r\n"); err != nil {
					t.Fatal(err)
				}
				waitClosed(t, c)
			})
			t.Run(l.name+"/slow-body", func(t *testing.T) {
				t.Parallel()
				c, err := a.dial(l.network, l.addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				// Complete headers announcing a body that never comes:
				// the header deadline is met, the request deadline is not.
				req := "PUT " + api.PathEndpoints + "slow HTTP/1.1\r\nHost: idcni\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
				if _, err := io.WriteString(c, req); err != nil {
					t.Fatal(err)
				}
				waitClosed(t, c)
			})
			t.Run(l.name+"/large-header", func(t *testing.T) {
				t.Parallel()
				hc := a.httpClient(l.network, l.addr)
				req, err := http.NewRequest(http.MethodGet, "http://idcni/healthz", nil)
				if err != nil {
					t.Fatal(err)
				}
				// Under Go's default (1 MiB), which the agent used to have.
				req.Header.Set("X-Padding", strings.Repeat("a", 256<<10))
				resp, err := hc.Do(req)
				if err != nil {
					t.Fatalf("request with a 256 KiB header: %v", err)
				}
				resp.Body.Close()
				if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
					t.Errorf("request with a 256 KiB header: %s, want 431", resp.Status)
				}
			})
		}
		t.Run("socket/large-body", func(t *testing.T) {
			t.Parallel()
			hc := a.httpClient("unix", a.socket)
			// Valid JSON, which a decoder without a bound reads to the
			// end whatever its size: an endpoint request with 8 MiB of
			// padding (and no pod, so nothing would be registered).
			body := fmt.Sprintf(`{"padding":"%s"}`, strings.Repeat("a", 8<<20))
			req, err := http.NewRequest(http.MethodPut, "http://idcni"+api.PathEndpoints+"large", strings.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			// The agent answers before it has read the whole body and
			// closes the connection; Go's client returns that answer.
			resp, err := hc.Do(req)
			if err != nil {
				t.Fatalf("8 MiB request: %v", err)
			}
			msg, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusRequestEntityTooLarge {
				t.Errorf("8 MiB request: %s %s, want 413", resp.Status, bytes.TrimSpace(msg))
			}
		})
	})
	// The agent still serves after all that.
	t.Run("still-serving", func(t *testing.T) {
		for _, l := range listeners {
			resp, err := a.httpClient(l.network, l.addr).Get("http://idcni/healthz")
			if err != nil {
				t.Fatalf("%s: %v", l.name, err)
			}
			resp.Body.Close()
		}
	})
}

// waitClosed reads from c until the agent closes it; any bytes it answers
// with first (an HTTP error) are fine.
func waitClosed(t *testing.T, c net.Conn) {
	t.Helper()
	if err := c.SetReadDeadline(time.Now().Add(slowClientBound)); err != nil {
		t.Fatal(err)
	}
	_, err := io.Copy(io.Discard, bufio.NewReader(c))
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the agent kept a stalled connection open for %s: no read deadline", slowClientBound)
	}
	// io.Copy returns nil at EOF; a reset is a close too.
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read: %v", err)
	}
}

// loneAgent is an idcni-agent binary in a network namespace of its own,
// with a kubeconfig naming an API server that is not there.
type loneAgent struct {
	netns   string // path
	metrics string
	socket  string
	bpfRoot string // the test's own pins
	state   string // state file
}

func startLoneAgent(t *testing.T) *loneAgent {
	t.Helper()
	cnitest.RequireRoot(t)
	var bin string
	if d := os.Getenv("IDCNI_E2E_BIN"); d != "" {
		bin = filepath.Join(d, "idcni-agent")
	} else {
		bin = buildAgent(t)
	}
	dir := t.TempDir()
	name := "idct-agent-" + cnitest.RandHex(8)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up in %s: %v: %s", name, err, out)
	}
	// Port 1 of the namespace's own loopback: nothing listens, nothing
	// leaves the namespace.
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte(`apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}}]
users: [{name: none, user: {token: none}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
`), 0o600); err != nil {
		t.Fatal(err)
	}
	a := &loneAgent{netns: "/run/netns/" + name, metrics: "127.0.0.1:9965", socket: filepath.Join(dir, "agent.sock")}
	bpfRoot := "/sys/fs/bpf/idcni-test-" + cnitest.RandHex(8)
	a.bpfRoot, a.state = bpfRoot, filepath.Join(dir, "state.db")
	logPath := filepath.Join(dir, "agent.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	// nsenter --net, not ip netns exec: that one also gives the agent a
	// mount namespace with a bpffs of its own, so its pins would be out of
	// the test's sight (and cleanup's).
	cmd := exec.Command("nsenter", "--net="+a.netns, "--", bin, "--kubeconfig", kubeconfig, "--node-name", "lone",
		"--bpf-root", bpfRoot, "--state", a.state, "--socket", a.socket,
		"--metrics-addr", a.metrics, "--cni-conf-dir", "")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
		if err := bpf.Unpin(bpfRoot); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("agent log:\n%s", b)
		}
	})
	waitFor(t, 60*time.Second, "the agent serves /healthz", func() bool {
		select {
		case <-exited:
			b, _ := os.ReadFile(logPath)
			t.Fatalf("the agent exited:\n%s", b)
		default:
		}
		resp, err := a.httpClient("tcp", a.metrics).Get("http://idcni/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return a
}

// dial connects to the agent from inside its network namespace.
func (a *loneAgent) dial(network, addr string) (net.Conn, error) {
	var c net.Conn
	err := ns.WithNetNSPath(a.netns, func(ns.NetNS) error {
		var err error
		c, err = net.Dial(network, addr)
		return err
	})
	return c, err
}

// httpClient talks to the agent's metrics address or socket, one
// connection a request.
func (a *loneAgent) httpClient(network, addr string) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(context.Context, string, string) (net.Conn, error) {
			return a.dial(network, addr)
		},
	}}
}
