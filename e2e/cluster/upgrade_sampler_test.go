package cluster_test

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
)

// TestAttachSampler holds the upgrade test's sampler to what the kernel
// does: on a veth in a netns of its own, programs attached on both sides
// are "attached", one side detached is "unattached" and counted, and every
// change of program shows in the IDs it saw. It waits on the sampler's
// rounds, never on a clock.
func TestAttachSampler(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: a netns, a veth and tcx programs")
	}
	name := fmt.Sprintf("idcni-upg-%d-%08x", os.Getpid(), rand.Uint32())
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	ip("netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v\n%s", name, err, out)
		}
	})
	// Both ends in the netns: the kernel deletes them with it.
	ip("-n", name, "link", "add", "upghost", "type", "veth", "peer", "name", "upgpod")
	ip("-n", name, "link", "set", "upghost", "up")
	netnsPath := "/run/netns/" + name
	nsh, err := ns.GetNS(netnsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer nsh.Close()

	prog := func() *ebpf.Program {
		p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
			Type: ebpf.SchedCLS, License: "GPL",
			// TCX_NEXT: the program decides nothing.
			Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()},
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.Close() })
		return p
	}
	attach := func(p *ebpf.Program, at ebpf.AttachType) link.Link {
		var l link.Link
		// The interface index is the netns's: attach from inside it.
		if err := nsh.Do(func(ns.NetNS) error {
			nl, err := netlink.LinkByName("upghost")
			if err != nil {
				return err
			}
			l, err = link.AttachTCX(link.TCXOptions{Interface: nl.Attrs().Index, Program: p, Attach: at})
			return err
		}); err != nil {
			t.Fatalf("attach %v: %v", at, err)
		}
		return l
	}
	in, out1, out2 := prog(), prog(), prog()
	lin := attach(in, ebpf.AttachTCXIngress)
	defer lin.Close()
	lout := attach(out1, ebpf.AttachTCXEgress)

	stop := make(chan struct{})
	stopped := false
	defer func() {
		if !stopped {
			close(stop)
		}
	}()
	s := sampleAttachments("test", netnsPath, []*podNet{{name: "pod", hostIf: "upghost"}}, time.Millisecond, stop)
	// A few rounds past a change, so each state is sampled.
	waitRounds := func(n int64) {
		t.Helper()
		for from := s.rounds.Load(); s.rounds.Load() < from+n; {
			select {
			case err := <-s.done:
				t.Fatalf("the sampler stopped: %v", err)
			default:
			}
			time.Sleep(time.Millisecond)
		}
	}
	waitRounds(5)
	if err := lout.Close(); err != nil { // egress detached
		t.Fatal(err)
	}
	waitRounds(5)
	lout = attach(out2, ebpf.AttachTCXEgress)
	defer lout.Close()
	waitRounds(5)
	close(stop)
	stopped = true
	if err := s.wait(); err != nil {
		t.Fatal(err)
	}

	p := s.pods[0]
	t.Logf("%d samples, %d unattached (%.1f ms), programs %v, errors %d %s", p.Samples, p.UnattachedSamples, p.UnattachedMs, p.Programs, p.Errors, p.FirstErr)
	if p.Errors > 0 {
		t.Errorf("%d query errors, first: %s", p.Errors, p.FirstErr)
	}
	if p.UnattachedSamples == 0 || p.UnattachedMs <= 0 {
		t.Errorf("egress was detached for 5 rounds, the sampler saw %d unattached samples (%.1f ms)", p.UnattachedSamples, p.UnattachedMs)
	}
	if p.UnattachedSamples >= p.Samples {
		t.Errorf("all %d samples unattached, but both programs were attached before and after", p.Samples)
	}
	id := func(p *ebpf.Program) string {
		info, err := p.Info()
		if err != nil {
			t.Fatal(err)
		}
		n, _ := info.ID()
		return fmt.Sprint(n)
	}
	want := []string{id(in) + "/" + id(out1), id(in) + "/", id(in) + "/" + id(out2)}
	if strings.Join(p.Programs, " ") != strings.Join(want, " ") {
		t.Errorf("programs seen %v, want %v", p.Programs, want)
	}
}
