package identity

import (
	"errors"
	"testing"
	"time"

	"github.com/idcni/idcni/store"
)

// A failed write must not leave memory ahead of the file: the change is
// reported as failed, forgotten, and the allocator goes on working.
func TestFailedCommitIsForgotten(t *testing.T) {
	path := statePath(t)
	a := open(t, path, Config{})
	web, api := podSet(t, "web", "ns"), podSet(t, "api", "ns")
	webID, err := a.Acquire("ep-web", web)
	if err != nil {
		t.Fatal(err)
	}

	disk := errors.New("disk full")
	a.failCommit = func() error { return disk }
	if _, err := a.Acquire("ep-api", api); !errors.Is(err, disk) {
		t.Fatalf("Acquire with failing disk: %v", err)
	}
	if err := a.Release("ep-web"); !errors.Is(err, disk) {
		t.Fatalf("Release with failing disk: %v", err)
	}
	if _, ok := a.Lookup(api); ok {
		t.Fatal("failed allocation is visible")
	}
	if got := a.Users(); len(got) != 1 || got["ep-web"] != webID {
		t.Fatalf("users after failed writes: %v", got)
	}
	checkDisk(t, a)

	a.failCommit = nil
	apiID, err := a.Acquire("ep-api", api)
	if err != nil {
		t.Fatal(err)
	}
	if id, ok := a.Lookup(api); !ok || id != apiID {
		t.Fatalf("Lookup after recovery: %d, %v", id, ok)
	}
	checkDisk(t, a)
}

// If the file cannot even be read back, the allocator stops taking changes
// rather than guess.
func TestUnreadableFileStopsAllocator(t *testing.T) {
	db, err := store.Open(statePath(t), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	a, err := NewAllocator(db, Config{})
	if err != nil {
		t.Fatal(err)
	}
	set := podSet(t, "web", "ns")
	id, err := a.Allocate(set)
	if err != nil {
		t.Fatal(err)
	}
	_ = db.Close() // behind the allocator's back
	if _, err := a.Allocate(podSet(t, "api", "ns")); err == nil {
		t.Fatal("allocation on a closed file succeeded")
	}
	if _, err := a.Allocate(podSet(t, "db", "ns")); err == nil {
		t.Fatal("allocator kept taking changes after it lost its file")
	}
	if got, ok := a.Lookup(set); !ok || got != id {
		t.Fatalf("Lookup of a committed set: %d, %v", got, ok)
	}
	if _, ok := a.Lookup(podSet(t, "api", "ns")); ok {
		t.Fatal("uncommitted set is visible")
	}
}
