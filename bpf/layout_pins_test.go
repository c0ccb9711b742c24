package bpf

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/idcni/idcni/internal/pintest"
)

// TestOpenRefusesEveryLayoutMismatch is issue 14's layout defect: the open
// path (the plugin's fast path, DEL, the CLIs) accepted a policy,
// conntrack or ipcache map of any layout unless a size was asked for. A
// mismatch of any pinned map must be refused, naming the map.
func TestOpenRefusesEveryLayoutMismatch(t *testing.T) {
	for _, name := range []string{"policy", "conntrack", "ipcache", "endpoints"} {
		t.Run(name, func(t *testing.T) {
			d := loadTest(t, Options{})
			root := d.Root()
			d.Close()
			pintest.RepinWider(t, root, name)
			path := filepath.Join(root, name)
			if d, err := Open(root); err == nil {
				d.Close()
				t.Fatalf("Open accepted %s with a value 8 bytes wider than this build's", path)
			} else if !strings.Contains(err.Error(), path) {
				t.Fatalf("Open's error does not name %s: %v", path, err)
			} else {
				t.Logf("Open: %v", err)
			}
			if d, err := Load(Options{Root: root}); err == nil {
				d.Close()
				t.Fatalf("Load (the plugin's path) accepted %s with a value 8 bytes wider than this build's", path)
			} else if !strings.Contains(err.Error(), path) {
				t.Fatalf("Load's error does not name %s: %v", path, err)
			}
		})
	}
}

// TestAttachedIndexAsksTheKernel: AttachedIndex must see what the kernel
// runs, not what the pins say: a tcx link whose pin went is detached, and
// a handle whose programs were replaced is not what runs. ReopenPrograms
// brings a handle to the programs pinned now (what the plugin does under
// the root lock before it attaches).
func TestAttachedIndexAsksTheKernel(t *testing.T) {
	for _, mode := range []AttachMode{AttachTCX, AttachLegacy} {
		t.Run(map[AttachMode]string{AttachTCX: "tcx", AttachLegacy: "legacy"}[mode], func(t *testing.T) {
			root := testRoot(t)
			d := loadTest(t, Options{Root: root, Attach: mode})
			n := newTestNet(t, 1)
			ifindex := n.ifindex[0]
			attached := func(d *Datapath) bool {
				t.Helper()
				var ok bool
				var err error
				n.do(func() { ok, err = d.AttachedIndex(ifindex) })
				if err != nil {
					t.Fatal(err)
				}
				return ok
			}
			if attached(d) {
				t.Fatal("attached before Attach")
			}
			var err error
			n.do(func() { err = d.Attach("ep0") })
			if err != nil {
				t.Fatal(err)
			}
			if !attached(d) {
				t.Fatal("not attached after Attach")
			}
			// An upgrade elsewhere: d's programs are not what runs.
			var up *Datapath
			n.do(func() { up, err = Load(Options{Root: root, Replace: true, Attach: mode}) })
			if err != nil {
				t.Fatal(err)
			}
			defer up.Close()
			if attached(d) {
				t.Fatal("a handle of the replaced programs reports them attached")
			}
			if err := d.ReopenPrograms(); err != nil {
				t.Fatal(err)
			}
			if !attached(d) {
				t.Fatal("after ReopenPrograms the handle does not see the current programs attached")
			}
			if mode != AttachTCX {
				return
			}
			// Removing the link pins detaches (the kernel lets go of the
			// link shortly after).
			for _, s := range []string{"ingress", "egress"} {
				if err := os.Remove(filepath.Join(root, "links", "ep0_"+s)); err != nil {
					t.Fatal(err)
				}
			}
			deadline := time.Now().Add(5 * time.Second)
			for attached(d) {
				if time.Now().After(deadline) {
					t.Fatal("still attached 5s after its link pins went")
				}
				time.Sleep(20 * time.Millisecond)
			}
			var names []string
			names, err = AttachedLinks(root)
			if err != nil || len(names) != 0 {
				t.Fatalf("AttachedLinks after the detach = %v, %v", names, err)
			}
		})
	}
}
