package bpf

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/idcni/idcni/identity"
)

// The ipcache is an LPM trie, which refuses an insert past max_entries with
// ENOSPC where hash maps say E2BIG: both must read as "map full", with the
// way out (issue 11).
func TestIPCacheFullSaysSo(t *testing.T) {
	const capacity = 8
	d := loadTest(t, Options{IPCacheEntries: capacity})
	if got := d.IPCacheCapacity(); got != capacity {
		t.Fatalf("IPCacheCapacity = %d, want %d", got, capacity)
	}
	pfx := func(i int) netip.Prefix {
		return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 98, byte(i >> 8), byte(i)}), 32)
	}
	for i := range capacity {
		if err := d.PutIPCache(pfx(i), identity.ID(1000+i)); err != nil {
			t.Fatalf("put %d of %d: %v", i+1, capacity, err)
		}
	}
	err := d.PutIPCache(pfx(capacity), identity.ID(3000))
	if err == nil {
		t.Fatalf("put past capacity %d succeeded", capacity)
	}
	if !errors.Is(err, unix.ENOSPC) {
		t.Errorf("put past capacity: %v, want the kernel's ENOSPC kept", err)
	}
	if !errors.Is(err, ErrMapFull) || !strings.Contains(err.Error(), "IPCacheEntries") {
		t.Errorf("put past capacity: %q, want ErrMapFull naming the ipcache's size option", err)
	}
	if err := d.DeleteIPCache(pfx(1)); err != nil {
		t.Fatal(err)
	}
	if err := d.PutIPCache(pfx(capacity), identity.ID(3000)); err != nil {
		t.Fatalf("put after a delete made room: %v", err)
	}
}

func TestMapFullErrnos(t *testing.T) {
	for _, tc := range []struct {
		errno unix.Errno
		name  string
		full  bool
		want  string
	}{
		{unix.E2BIG, "policy", true, "PolicyEntries"},
		{unix.ENOSPC, "ipcache", true, "IPCacheEntries"},
		{unix.E2BIG, "local_pods", true, "max_entries"},
		{unix.EINVAL, "ipcache", false, ""},
	} {
		in := fmt.Errorf("update: %w", tc.errno)
		err := mapFull(in, tc.name)
		if got := errors.Is(err, ErrMapFull); got != tc.full {
			t.Errorf("mapFull(%v, %s) full = %v, want %v (%v)", tc.errno, tc.name, got, tc.full, err)
		}
		if !errors.Is(err, tc.errno) {
			t.Errorf("mapFull(%v, %s) = %v, lost the errno", tc.errno, tc.name, err)
		}
		if !strings.Contains(err.Error(), tc.want) || (tc.full && !strings.Contains(err.Error(), tc.name+" map is full")) {
			t.Errorf("mapFull(%v, %s) = %q, want it to name the map and %q", tc.errno, tc.name, err, tc.want)
		}
	}
}
