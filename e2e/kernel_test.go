package e2e

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/netlinksafe"

	"github.com/idcni/idcni/cni"
	"github.com/idcni/idcni/e2e/internal/cnitest"
	"github.com/idcni/idcni/internal/kernel"
)

// oldKernel is what the binaries are told the node runs: 5.10 has no
// bpf_ktime_get_coarse_ns, which the datapath's conntrack uses.
const oldKernel = "5.10.0-32-amd64"

// On a kernel older than 5.11 the plugin's ADD, CHECK and STATUS and the
// agent refuse at once with a message naming the running kernel and the
// minimum, and create nothing; DEL still runs, so such a node can be
// cleaned up. The real binaries, told the kernel's release through
// IDCNI_KERNEL_RELEASE (this machine's kernel is new enough).
func TestOldKernelRefused(t *testing.T) {
	t.Parallel()
	e := cnitest.New(t, cnitest.Options{})
	pod := e.NewPod(t)
	conf := e.PluginConfBytes(e.PluginConf())
	wantMsg := func(t *testing.T, what string, msg string) {
		t.Helper()
		if !strings.Contains(msg, "Linux >= 5.11") || !strings.Contains(msg, "this node runs "+oldKernel) {
			t.Errorf("%s: %q, want the minimum (Linux >= 5.11) and the running kernel (%s) named", what, msg, oldKernel)
		}
	}
	plugin := func(command string) error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		args := &invoke.Args{Command: command, Path: e.BinDir, ContainerID: pod.ContainerID, NetNS: pod.NSPath, IfName: pod.IfName}
		env := append(args.AsEnv(), kernel.ReleaseEnv+"="+oldKernel)
		_, err := (&invoke.RawExec{Stderr: os.Stderr}).ExecPlugin(ctx, filepath.Join(e.BinDir, "idcni"), conf, env)
		return err
	}

	for _, tc := range []struct {
		command string
		code    uint
	}{
		{"ADD", types.ErrInternal},
		{"CHECK", types.ErrInternal},
		{"STATUS", types.ErrPluginNotAvailable},
	} {
		err := plugin(tc.command)
		var te *types.Error
		if !errors.As(err, &te) {
			t.Errorf("%s on %s: %v, want a CNI error", tc.command, oldKernel, err)
			continue
		}
		if te.Code != tc.code {
			t.Errorf("%s on %s: code %d, want %d", tc.command, oldKernel, te.Code, tc.code)
		}
		wantMsg(t, tc.command, te.Msg)
	}
	// Nothing was made: no datapath, no host veth, no pod interface.
	if _, err := os.Stat(e.BPFRoot); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the refused commands left %s: %v", e.BPFRoot, err)
	}
	if _, err := netlinksafe.LinkByName(cni.HostVethName(pod.ContainerID, pod.IfName)); err == nil {
		t.Errorf("the refused ADD left host veth %s", cni.HostVethName(pod.ContainerID, pod.IfName))
	}
	assertPodEmpty(t, pod)
	if err := plugin("DEL"); err != nil {
		t.Errorf("DEL on %s: %v; DEL must always be able to clean up", oldKernel, err)
	}

	t.Run("agent", func(t *testing.T) {
		bin := filepath.Join(e.BinDir, "idcni-agent")
		if _, err := os.Stat(bin); err != nil {
			bin = buildAgent(t)
		}
		dir := t.TempDir()
		bpfRoot := "/sys/fs/bpf/idcni-test-" + cnitest.RandHex(8)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		// The kubeconfig does not exist: an agent that got past the
		// kernel check would fail on it (and name it) instead.
		cmd := exec.CommandContext(ctx, bin, "--kubeconfig", filepath.Join(dir, "no-kubeconfig"), "--node-name", "old",
			"--bpf-root", bpfRoot, "--state", filepath.Join(dir, "state.db"), "--socket", filepath.Join(dir, "agent.sock"),
			"--metrics-addr", "", "--cni-conf-dir", "")
		cmd.Env = append(os.Environ(), kernel.ReleaseEnv+"="+oldKernel)
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("idcni-agent on %s: %v, want it to exit with an error\n%s", oldKernel, err, out)
		}
		wantMsg(t, "idcni-agent", string(out))
		for _, p := range []string{bpfRoot, filepath.Join(dir, "state.db"), filepath.Join(dir, "agent.sock")} {
			if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the refused agent left %s: %v", p, err)
			}
		}
	})
}
