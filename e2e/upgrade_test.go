package e2e

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/vishvananda/netlink"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/cni"
	"github.com/idcni/idcni/e2e/internal/cnitest"
	"github.com/idcni/idcni/internal/pintest"
)

// TestDelWithPinsItCannotReadFreesThePod is issue 14's stranded pod: facing
// pins of another layout, DEL deleted the veth, failed at bpf.Open and kept
// the IPAM lease, so the kubelet retried forever and the address leaked.
// DEL must succeed, the veth must be gone and the address free: with a
// subnet of one address, a new pod gets it once the pins are usable again.
func TestDelWithPinsItCannotReadFreesThePod(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		damage func(t *testing.T, root string)
	}{
		{"endpoints of another layout", func(t *testing.T, root string) { pintest.RepinWider(t, root, "endpoints") }},
		{"policy of another layout", func(t *testing.T, root string) { pintest.RepinWider(t, root, "policy") }},
		{"endpoints map missing", func(t *testing.T, root string) {
			if err := os.Remove(filepath.Join(root, "endpoints")); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			// A /30: host-local hands out one address (the other
			// is the gateway), so the next pod gets it only if DEL
			// gave it back.
			e := cnitest.New(t, cnitest.Options{SubnetBits: 30})
			pod := e.NewPod(t)
			addr := podAddr(t, e.MustAdd(t, pod))
			lease := filepath.Join(e.IPAMDir, e.Network, addr.String())
			if _, err := os.Stat(lease); err != nil {
				t.Fatalf("host-local's lease of %s after ADD: %v", addr, err)
			}
			tc.damage(t, e.BPFRoot)

			if err := e.Del(pod); err != nil {
				t.Fatalf("DEL facing pins it cannot read: %v", err)
			}
			if _, err := os.Stat(lease); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("host-local still holds %s after DEL (%v): the address leaked", addr, err)
			}
			host := cni.HostVethName(pod.ContainerID, pod.IfName)
			if _, err := netlink.LinkByName(host); err == nil {
				t.Fatalf("host veth %s still there after DEL", host)
			}
			// A second DEL (the runtime retries) succeeds too.
			if err := e.Del(pod); err != nil {
				t.Fatalf("second DEL: %v", err)
			}

			// Once the pins are replaced (here: removed, as
			// --uninstall --force does), the next pod gets the address.
			if err := bpf.Unpin(e.BPFRoot); err != nil {
				t.Fatal(err)
			}
			next := e.NewPod(t)
			if got := podAddr(t, e.MustAdd(t, next)); got != addr {
				t.Fatalf("next pod got %s, want the freed %s", got, addr)
			}
			if err := e.Del(next); err != nil {
				t.Fatalf("DEL of the next pod: %v", err)
			}
		})
	}
}

// TestAddRacingAProgramReplacementAttachesTheNewProgram is issue 14's
// unlocked attach: the plugin opened the pinned programs without the root
// lock and attached them later, so an upgrade (the agent's Load with
// Replace, which moves every attachment it finds under the lock) that ran
// in between left the new pod on the old program for good. The window is
// made wide and deterministic with an IPAM plugin that waits for the test:
// the plugin has opened the datapath when it calls IPAM, and attaches
// after. The pod must end up on the programs pinned now.
func TestAddRacingAProgramReplacementAttachesTheNewProgram(t *testing.T) {
	t.Parallel()
	e := cnitest.New(t, cnitest.Options{})
	// The datapath is pinned before the ADD, as on a node with pods.
	first, err := bpf.Load(bpf.Options{Root: e.BPFRoot})
	if err != nil {
		t.Fatal(err)
	}
	first.Close()

	// A bin directory with the real plugins and "gatedipam": host-local
	// once the test opens the gate.
	bin, gate := t.TempDir(), t.TempDir()
	for _, name := range []string{"idcni", "host-local", "loopback"} {
		if err := os.Symlink(filepath.Join(e.BinDir, name), filepath.Join(bin, name)); err != nil {
			t.Fatal(err)
		}
	}
	script := fmt.Sprintf("#!/bin/sh\ntouch %[1]s/called\ni=0\nwhile [ ! -e %[1]s/open ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done\nexec %[2]s/host-local\n", gate, bin)
	if err := os.WriteFile(filepath.Join(bin, "gatedipam"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	e.CNI = cnitest.NewCNIConfig(bin, e.CacheDir)
	plugin := e.PluginConf()
	plugin["ipam"].(map[string]any)["type"] = "gatedipam"
	list, err := libcni.ConfListFromBytes(e.ConfListBytes(e.Version, plugin))
	if err != nil {
		t.Fatal(err)
	}
	openGate := func() { _ = os.WriteFile(filepath.Join(gate, "open"), nil, 0o644) }
	t.Cleanup(openGate) // a failing test must not leave the ADD waiting

	pod := e.NewPod(t)
	added := make(chan error, 1)
	go func() { _, err := e.AddWith(list, pod); added <- err }()
	deadline := time.Now().Add(time.Minute)
	for {
		if _, err := os.Stat(filepath.Join(gate, "called")); err == nil {
			break
		}
		select {
		case err := <-added:
			t.Fatalf("ADD ended before calling IPAM: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("the plugin never called IPAM")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The upgrade, while the plugin holds the programs it opened.
	up, err := bpf.Load(bpf.Options{Root: e.BPFRoot, Replace: true})
	if err != nil {
		t.Fatalf("replace the programs: %v", err)
	}
	up.Close()
	openGate()
	if err := <-added; err != nil {
		t.Fatalf("ADD: %v", err)
	}
	t.Cleanup(func() { _ = e.DelWith(list, pod) })

	dp := e.Datapath(t) // the programs pinned now
	host, err := netlink.LinkByName(cni.HostVethName(pod.ContainerID, pod.IfName))
	if err != nil {
		t.Fatal(err)
	}
	ok, err := dp.Attached(host.Attrs().Name)
	if err != nil {
		t.Fatal(err)
	}
	if !ok {
		t.Fatalf("pod's host veth %s is not on the programs pinned after the replacement: the ADD attached the ones it opened before it", host.Attrs().Name)
	}
}

// TestUninstallRefusesWhilePodsAreAttached is issue 14's silent detach:
// `idcni-agent --uninstall` removed the pins while pods ran, which detached
// their programs, and nothing attached them again. It must refuse, naming
// the pods' veths and what they would lose, and do it only with --force,
// saying so.
func TestUninstallRefusesWhilePodsAreAttached(t *testing.T) {
	t.Parallel()
	e := cnitest.New(t, cnitest.Options{})
	pod := e.NewPod(t)
	e.MustAdd(t, pod)
	t.Cleanup(func() { _ = e.Del(pod) })
	host := cni.HostVethName(pod.ContainerID, pod.IfName)
	confDir := t.TempDir()
	uninstall := func(extra ...string) (string, error) {
		// In a network namespace of its own: --uninstall also removes
		// the agent's routes (protocol 157), and the host's belong to
		// other tests. The tcx pins tell which pods are attached
		// whatever the namespace.
		args := append([]string{"-n", buildAgent(t), "--uninstall", "--cni-conf-dir", confDir, "--bpf-root", e.BPFRoot}, extra...)
		out, err := exec.Command("unshare", args...).CombinedOutput()
		return string(out), err
	}

	out, err := uninstall()
	if err == nil {
		t.Fatalf("--uninstall succeeded while pod %s was attached:\n%s", host, out)
	}
	for _, want := range []string{"refusing", host, "lose enforcement", "--force"} {
		if !strings.Contains(out, want) {
			t.Errorf("refusal does not say %q:\n%s", want, out)
		}
	}
	if _, err := os.Stat(e.BPFRoot); err != nil {
		t.Fatalf("the refused --uninstall removed the pins: %v", err)
	}
	dp := e.Datapath(t)
	if ok, err := dp.Attached(host); err != nil || !ok {
		t.Fatalf("pod no longer attached after a refused --uninstall: %v, %v", ok, err)
	}
	dp.Close()

	out, err = uninstall("--force")
	if err != nil {
		t.Fatalf("--uninstall --force: %v\n%s", err, out)
	}
	if !strings.Contains(out, "warning") || !strings.Contains(out, host) || !strings.Contains(out, "lose enforcement") {
		t.Errorf("--uninstall --force did not warn about %s:\n%s", host, out)
	}
	if _, err := os.Stat(e.BPFRoot); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("pins still there after --uninstall --force: %v", err)
	}

	// With nothing attached it needs no --force.
	if out, err := uninstall(); err != nil {
		t.Fatalf("--uninstall with no pod attached: %v\n%s", err, out)
	}
}
