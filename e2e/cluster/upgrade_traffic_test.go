package cluster_test

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// TestTrafficProbes holds the upgrade test's traffic probes to what the
// kernel delivers, between two netns joined by a veth: a stream and new
// connections to a server arrive and are counted, connections to an
// address nobody answers are not, and a "denied" pair that is in fact
// delivered is counted as delivered (the figure the upgrade test fails
// on). No clock decides anything: the probes run until a number of
// attempts is made.
func TestTrafficProbes(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: two netns and a veth")
	}
	suffix := fmt.Sprintf("%d-%08x", os.Getpid(), rand.Uint32())
	client, server := "idcni-upgc-"+suffix, "idcni-upgs-"+suffix
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	open := func(name, addr string) *podNet {
		ip("netns", "add", name)
		t.Cleanup(func() {
			if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
				t.Errorf("ip netns del %s: %v\n%s", name, err, out)
			}
		})
		n, err := ns.GetNS("/run/netns/" + name)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { n.Close() })
		return &podNet{name: name, ip: netip.MustParseAddr(addr), netns: n}
	}
	// TEST-NET-1 addresses, inside the two netns only.
	c, s := open(client, "192.0.2.1"), open(server, "192.0.2.2")
	ip("-n", client, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", server)
	ip("-n", client, "addr", "add", "192.0.2.1/29", "dev", "eth0")
	ip("-n", server, "addr", "add", "192.0.2.2/29", "dev", "eth0")
	ip("-n", client, "link", "set", "eth0", "up")
	ip("-n", server, "link", "set", "eth0", "up")

	srv, err := serveEcho(s, 8080)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.close()
	to := netip.AddrPortFrom(s.ip, 8080)
	nobody := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.3"), 8080)
	stop := make(chan struct{})
	st, err := startStream("stream", c, to, time.Millisecond, stop)
	if err != nil {
		close(stop)
		t.Fatal(err)
	}
	allowed := startConnStream("allowed", "allowed", c, to, false, time.Millisecond, stop)
	unanswered := startConnStream("nobody", "denied-in", c, nobody, false, time.Millisecond, stop)
	delivered := startConnStream("delivered", "denied-in", c, to, false, time.Millisecond, stop)
	for allowed.attempts.Load() < 50 || unanswered.attempts.Load() < 50 || delivered.attempts.Load() < 50 {
		time.Sleep(time.Millisecond)
	}
	close(stop)
	st.wait()
	for _, cs := range []*connStream{allowed, unanswered, delivered} {
		<-cs.done
		t.Logf("%s: %d attempts, %d connected, %d failed, %d lost segments %s", cs.Pair, cs.Attempts, cs.Connected, cs.Failed, cs.LostSegs, cs.FirstErr)
	}
	srv.close()
	t.Logf("stream: %d sent, %d echoed, %d gaps, %d lost segments, error %q", st.Sent, st.Echoed, st.Gaps, st.LostSegs, st.Error)

	if st.Sent == 0 || st.Lost != 0 || st.Gaps != 0 || st.Error != "" {
		t.Errorf("stream: %d sent, %d lost, %d gaps, error %q; want every message back in order", st.Sent, st.Lost, st.Gaps, st.Error)
	}
	if allowed.Failed != 0 || allowed.Connected != allowed.Attempts {
		t.Errorf("allowed: %d of %d connected, %d failed (%s)", allowed.Connected, allowed.Attempts, allowed.Failed, allowed.FirstErr)
	}
	if unanswered.Connected != 0 {
		t.Errorf("%d connections to %s, where nobody answers", unanswered.Connected, nobody)
	}
	if delivered.Connected != delivered.Attempts {
		t.Errorf("a reachable server counted %d of %d connections delivered", delivered.Connected, delivered.Attempts)
	}
	if got, want := srv.accepted[c.ip], 1+allowed.Attempts+delivered.Attempts; got != want {
		t.Errorf("the server accepted %d connections from %s, want %d (the stream and every connection made)", got, c.ip, want)
	}
	if len(srv.errs) > 0 {
		t.Errorf("server: %v", srv.errs)
	}
}
