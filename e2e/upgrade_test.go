package e2e

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/cni"
	"github.com/idcni/idcni/e2e/internal/cnitest"
)

// repinIncompatible replaces the pin of the named map under root with a
// map of the same kind but a value 8 bytes wider: the pins an idcni build
// of another layout leaves for this one (issue 14).
func repinIncompatible(t *testing.T, root, name string) {
	t.Helper()
	path := filepath.Join(root, name)
	old, err := ebpf.LoadPinnedMap(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	spec := &ebpf.MapSpec{Name: name, Type: old.Type(), KeySize: old.KeySize(), ValueSize: old.ValueSize() + 8,
		MaxEntries: old.MaxEntries(), Flags: old.Flags()}
	old.Close()
	m, err := ebpf.NewMap(spec)
	if err != nil {
		t.Fatalf("create an incompatible %s: %v", name, err)
	}
	defer m.Close()
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := m.Pin(path); err != nil {
		t.Fatal(err)
	}
}

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
		{"endpoints of another layout", func(t *testing.T, root string) { repinIncompatible(t, root, "endpoints") }},
		{"policy of another layout", func(t *testing.T, root string) { repinIncompatible(t, root, "policy") }},
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
