package cni

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestRecordStore(t *testing.T) {
	dir := t.TempDir()
	s, err := openRecords(dir, "net", false)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	if r, err := s.Get("c1", "eth0"); r != nil || err != nil {
		t.Fatalf("Get of a missing record = %v, %v", r, err)
	}
	r := &Record{Network: "net", ContainerID: "c1", IfName: "eth0", HostIfName: HostVethName("c1", "eth0"),
		HostIfIndex: 7, Addresses: []netip.Addr{netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("fd00::2")}}
	if err := s.Put(r); err != nil {
		t.Fatal(err)
	}
	// Interface names and container IDs may share characters; the two
	// attachments must not share a file.
	if err := s.Put(&Record{Network: "net", ContainerID: "c1-eth", IfName: "0"}); err != nil {
		t.Fatal(err)
	}
	got, err := s.Get("c1", "eth0")
	if err != nil || got == nil || got.HostIfIndex != 7 || !slices.Equal(got.Addresses, r.Addresses) {
		t.Fatalf("Get = %+v, %v", got, err)
	}
	all, err := s.List()
	if err != nil || len(all) != 2 {
		t.Fatalf("List = %v, %v", all, err)
	}
	if err := s.Delete("c1", "eth0"); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete("c1", "eth0"); err != nil {
		t.Fatalf("second Delete: %v", err)
	}
	if r, _ := s.Get("c1", "eth0"); r != nil {
		t.Fatal("record survived Delete")
	}
	entries, _ := os.ReadDir(filepath.Join(dir, "net"))
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".tmp") {
			t.Errorf("temporary file %s left behind", e.Name())
		}
	}
}

func TestRecordStoreCorruptRecordIsReported(t *testing.T) {
	dir := t.TempDir()
	s, err := openRecords(dir, "net", false)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := os.WriteFile(filepath.Join(dir, "net", "c2:eth0.json"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get("c2", "eth0"); err == nil || !strings.Contains(err.Error(), "corrupt") {
		t.Errorf("Get of a corrupt record = %v, want an error saying so", err)
	}
	if _, err := s.List(); err == nil {
		t.Error("List skipped a corrupt record silently")
	}
}

// GC's exclusive lock waits for every ADD/DEL holding the shared one.
func TestRecordStoreLockExcludesGC(t *testing.T) {
	dir := t.TempDir()
	shared, err := openRecords(dir, "net", false)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan struct{})
	go func() {
		s, err := openRecords(dir, "net", true)
		if err == nil {
			s.Close()
		}
		close(got)
	}()
	select {
	case <-got:
		t.Fatal("exclusive lock taken while a shared one is held")
	case <-time.After(200 * time.Millisecond):
	}
	shared.Close()
	select {
	case <-got:
	case <-time.After(5 * time.Second):
		t.Fatal("exclusive lock not taken after the shared one was released")
	}
}

func TestUndoRunsInReverseAndPastFailures(t *testing.T) {
	var u undo
	var order []string
	u.push("a", func() error { order = append(order, "a"); return nil })
	u.push("b", func() error { order = append(order, "b"); return errors.New("stuck") })
	u.push("c", func() error { order = append(order, "c"); return nil })
	err := u.run()
	if !slices.Equal(order, []string{"c", "b", "a"}) {
		t.Errorf("undo order = %v, want c b a", order)
	}
	if err == nil || !strings.Contains(err.Error(), "undo b: stuck") {
		t.Errorf("undo error = %v, want it to name step b", err)
	}
	if err := u.run(); err != nil || len(order) != 3 {
		t.Error("undo ran steps twice")
	}
}

func TestPodRoutes(t *testing.T) {
	v4 := netip.MustParseAddr("10.0.0.2")
	v6 := netip.MustParseAddr("fd00::2")
	got := podRoutes([]netip.Addr{v4, v6}, []netip.Prefix{netip.MustParsePrefix("192.168.0.0/16"), netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("fd01::/64")})
	want := []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0"), netip.MustParsePrefix("192.168.0.0/16"), netip.MustParsePrefix("fd01::/64")}
	if !slices.Equal(got, want) {
		t.Errorf("podRoutes = %v, want %v", got, want)
	}
	// Routes of a family the pod lacks are dropped.
	if got := podRoutes([]netip.Addr{v4}, []netip.Prefix{netip.MustParsePrefix("fd01::/64")}); !slices.Equal(got, want[:1]) {
		t.Errorf("podRoutes v4-only = %v", got)
	}
}

// The agent reads the records without the plugin's lock; a network that
// never had a record is no records, not an error, and nothing is created.
func TestReadRecords(t *testing.T) {
	dir := t.TempDir()
	if recs, err := ReadRecords(dir, "none"); err != nil || len(recs) != 0 {
		t.Fatalf("ReadRecords of a missing network = %v, %v", recs, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "none")); !os.IsNotExist(err) {
		t.Errorf("ReadRecords created the network's directory: %v", err)
	}
	s, err := openRecords(dir, "net", false)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	want := &Record{Network: "net", ContainerID: "c1", IfName: "eth0", HostIfName: "h1", HostIfIndex: 7,
		Addresses: []netip.Addr{netip.MustParseAddr("10.1.0.2")}, PodNamespace: "ns", PodName: "p", Complete: true}
	if err := s.Put(want); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "net", "bad:eth0.json"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	recs, err := ReadRecords(dir, "net")
	if err == nil {
		t.Error("a corrupt record was not reported")
	}
	if len(recs) != 1 || !reflect.DeepEqual(recs[0], want) {
		t.Errorf("ReadRecords = %+v, want the readable record %+v", recs, want)
	}
}
