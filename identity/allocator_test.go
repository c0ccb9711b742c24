package identity

import (
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"sync"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// fakeClock is a clock tests move by hand.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
	return c.t
}

func statePath(t testing.TB) string { return filepath.Join(t.TempDir(), "state.db") }

func open(t testing.TB, path string, cfg Config) *Allocator {
	t.Helper()
	a, err := OpenAllocator(path, time.Second, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Close() })
	return a
}

func podSet(t testing.TB, app, ns string) LabelSet {
	t.Helper()
	s, err := FromPod(map[string]string{"app": app, "pod-template-hash": "h-" + app}, ns,
		map[string]string{"kubernetes.io/metadata.name": ns}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// checkDisk fails unless the allocator's memory matches what the file says.
func checkDisk(t testing.TB, a *Allocator) {
	t.Helper()
	a.mu.RLock()
	defer a.mu.RUnlock()
	var disk *state
	err := a.db.View(func(tx *bolt.Tx) error {
		var err error
		disk, err = load(tx, a.first, a.last, time.Time{})
		return err
	})
	if err != nil {
		t.Fatalf("reading back the file: %v", err)
	}
	summary := func(st *state) (map[string]ID, map[string]ID, map[ID]int64) {
		sets, users, idle := map[string]ID{}, map[string]ID{}, map[ID]int64{}
		for s, e := range st.bySet {
			sets[s] = e.id
		}
		for u, e := range st.users {
			users[u] = e.id
		}
		for id, e := range st.idle {
			idle[id] = e.idleSince.UnixNano()
		}
		return sets, users, idle
	}
	ms, mu, mi := summary(&a.state)
	ds, du, di := summary(disk)
	if !maps.Equal(ms, ds) || !maps.Equal(mu, du) || !maps.Equal(mi, di) {
		t.Fatalf("memory and file differ:\nsets  %v\n      %v\nusers %v\n      %v\nidle  %v\n      %v", ms, ds, mu, du, mi, di)
	}
	if disk.inRange != a.inRange {
		t.Fatalf("in-range count: memory %d, file %d", a.inRange, disk.inRange)
	}
}

func TestAllocateLookupByID(t *testing.T) {
	a := open(t, statePath(t), Config{})
	web, db := podSet(t, "web", "shop"), podSet(t, "db", "shop")

	if _, ok := a.Lookup(web); ok {
		t.Fatal("Lookup found a set before it was allocated")
	}
	id1, err := a.Allocate(web)
	if err != nil {
		t.Fatal(err)
	}
	if !id1.IsLabel() {
		t.Fatalf("allocated %d, outside the label range", id1)
	}
	id2, err := a.Allocate(db)
	if err != nil {
		t.Fatal(err)
	}
	if id2 == id1 {
		t.Fatal("two sets, one number")
	}
	again, err := a.Allocate(podSet(t, "web", "shop"))
	if err != nil || again != id1 {
		t.Fatalf("same set again: %d, %v; want %d", again, err, id1)
	}
	if id, ok := a.Lookup(web); !ok || id != id1 {
		t.Fatalf("Lookup = %d, %v", id, ok)
	}
	if set, ok := a.ByID(id2); !ok || !set.Equal(db) {
		t.Fatalf("ByID = %v, %v", set, ok)
	}
	if _, ok := a.ByID(MaxLabel); ok {
		t.Fatal("ByID found an unallocated number")
	}
	if a.Len() != 2 {
		t.Fatalf("Len = %d", a.Len())
	}
	checkDisk(t, a)
}

func TestAllocatorConfig(t *testing.T) {
	for _, cfg := range []Config{
		{First: MaxManual, Last: MinLabel + 10},
		{First: MinLabel + 10, Last: MinLabel},
		{First: MinLabel, Last: MinCIDR},
		{First: MinLabel},
		{Grace: -time.Second},
	} {
		if a, err := OpenAllocator(statePath(t), time.Second, cfg); err == nil {
			_ = a.Close()
			t.Errorf("config %+v accepted", cfg)
		}
	}
}

func TestNumbersSurviveRestart(t *testing.T) {
	path := statePath(t)
	clock := newFakeClock()
	cfg := Config{Clock: clock.Now}
	a := open(t, path, cfg)
	want := map[string]ID{}
	var sets []LabelSet
	for i := range 50 {
		set := podSet(t, fmt.Sprintf("app-%d", i), fmt.Sprintf("ns-%d", i%3))
		sets = append(sets, set)
		id, err := a.Acquire(fmt.Sprintf("endpoint-%d", i), set)
		if err != nil {
			t.Fatal(err)
		}
		want[set.String()] = id
	}
	for i := range 10 {
		if err := a.Release(fmt.Sprintf("endpoint-%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	users := a.Users()
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}

	b := open(t, path, cfg)
	for _, set := range sets {
		id, ok := b.Lookup(set)
		if !ok || id != want[set.String()] {
			t.Fatalf("after restart %s has %d (%v), want %d", set, id, ok, want[set.String()])
		}
		if back, ok := b.ByID(id); !ok || !back.Equal(set) {
			t.Fatalf("after restart ByID(%d) = %v", id, back)
		}
	}
	if got := b.Users(); !maps.Equal(got, users) {
		t.Fatalf("users after restart: %v, want %v", got, users)
	}
	// A new set does not reuse a number of the old ones.
	id, err := b.Acquire("endpoint-new", podSet(t, "new", "ns-0"))
	if err != nil {
		t.Fatal(err)
	}
	for _, old := range want {
		if old == id {
			t.Fatalf("new set got %d, already in use", id)
		}
	}
	// Released numbers keep their grace period across the restart.
	freed, err := b.GC(clock.Now().Add(DefaultGrace - time.Second))
	if err != nil || len(freed) != 0 {
		t.Fatalf("GC inside the grace period freed %v (%v)", freed, err)
	}
	freed, err = b.GC(clock.Now().Add(DefaultGrace))
	if err != nil {
		t.Fatal(err)
	}
	if len(freed) != 10 {
		t.Fatalf("GC after the grace period freed %d numbers, want the 10 released", len(freed))
	}
	checkDisk(t, b)
}

func TestAcquireRelease(t *testing.T) {
	clock := newFakeClock()
	a := open(t, statePath(t), Config{Clock: clock.Now})
	web, api := podSet(t, "web", "shop"), podSet(t, "api", "shop")

	w1, err := a.Acquire("pod-1", web)
	if err != nil {
		t.Fatal(err)
	}
	if again, err := a.Acquire("pod-1", web); err != nil || again != w1 {
		t.Fatalf("repeated Acquire: %d, %v", again, err)
	}
	if w2, _ := a.Acquire("pod-2", web); w2 != w1 {
		t.Fatalf("second user of the same set got %d, want %d", w2, w1)
	}
	if a.entryUsers(w1) != 2 {
		t.Fatalf("users of %d: %d, want 2", w1, a.entryUsers(w1))
	}
	// pod-1's labels change: it moves to another number.
	ap, err := a.Acquire("pod-1", api)
	if err != nil || ap == w1 {
		t.Fatalf("relabelled pod got %d, %v", ap, err)
	}
	if a.entryUsers(w1) != 1 || a.entryUsers(ap) != 1 {
		t.Fatalf("users after relabel: web %d, api %d", a.entryUsers(w1), a.entryUsers(ap))
	}
	if err := a.Release("pod-2"); err != nil {
		t.Fatal(err)
	}
	if err := a.Release("pod-2"); err != nil {
		t.Fatalf("second Release: %v", err)
	}
	if err := a.Release("never-seen"); err != nil {
		t.Fatalf("Release of an unknown user: %v", err)
	}
	if got, want := a.Users(), map[string]ID{"pod-1": ap}; !maps.Equal(got, want) {
		t.Fatalf("Users = %v, want %v", got, want)
	}
	if _, err := a.Acquire("", web); err == nil {
		t.Fatal("empty user key accepted")
	}
	checkDisk(t, a)
}

func (a *Allocator) entryUsers(id ID) int {
	a.mu.RLock()
	defer a.mu.RUnlock()
	if e := a.byID[id]; e != nil {
		return e.users
	}
	return -1
}

func TestExhaustion(t *testing.T) {
	path := statePath(t)
	clock := newFakeClock()
	cfg := Config{First: MinLabel + 100, Last: MinLabel + 103, Clock: clock.Now}
	a := open(t, path, cfg)
	got := map[ID]bool{}
	for i := range 4 {
		id, err := a.Acquire(fmt.Sprint("ep", i), podSet(t, fmt.Sprint("app", i), "ns"))
		if err != nil {
			t.Fatal(err)
		}
		if id < cfg.First || id > cfg.Last || got[id] {
			t.Fatalf("allocation %d: %d", i, id)
		}
		got[id] = true
	}
	_, err := a.Allocate(podSet(t, "one-too-many", "ns"))
	if !errors.Is(err, ErrExhausted) {
		t.Fatalf("5th set in a range of 4: %v, want ErrExhausted", err)
	}
	t.Logf("exhaustion error: %v", err)
	// Known sets still resolve, and a failed batch allocation keeps what it got.
	if id, err := a.Allocate(podSet(t, "app0", "ns")); err != nil || !got[id] {
		t.Fatalf("known set when exhausted: %d, %v", id, err)
	}
	// A released number is not free until its grace period is over.
	if err := a.Release("ep2"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Allocate(podSet(t, "new", "ns")); !errors.Is(err, ErrExhausted) {
		t.Fatalf("allocation during grace: %v", err)
	}
	freed, err := a.GC(clock.Advance(DefaultGrace))
	if err != nil || len(freed) != 1 {
		t.Fatalf("GC: %v, %v", freed, err)
	}
	id, err := a.Allocate(podSet(t, "new", "ns"))
	if err != nil || id != freed[0] {
		t.Fatalf("after GC: %d, %v; want the freed %d", id, err, freed[0])
	}
	// The same holds after a restart.
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	b := open(t, path, cfg)
	if _, err := b.Allocate(podSet(t, "newer", "ns")); !errors.Is(err, ErrExhausted) {
		t.Fatalf("after restart: %v, want ErrExhausted", err)
	}
	checkDisk(t, b)
}

func TestAllocateAllStopsAtExhaustion(t *testing.T) {
	a := open(t, statePath(t), Config{First: MinLabel, Last: MinLabel + 2})
	sets := []LabelSet{podSet(t, "a", "ns"), podSet(t, "b", "ns"), podSet(t, "c", "ns"), podSet(t, "d", "ns")}
	if _, err := a.AllocateAll(sets); !errors.Is(err, ErrExhausted) {
		t.Fatalf("AllocateAll beyond the range: %v", err)
	}
	for _, s := range sets[:3] {
		if _, ok := a.Lookup(s); !ok {
			t.Fatalf("%s was allocated before the failure but is not found", s)
		}
	}
	checkDisk(t, a)
}

func TestCursorDoesNotReuseFreedNumbersEarly(t *testing.T) {
	clock := newFakeClock()
	a := open(t, statePath(t), Config{First: MinLabel, Last: MinLabel + 9, Clock: clock.Now})
	first, _ := a.Allocate(podSet(t, "first", "ns"))
	if freed, _ := a.GC(clock.Advance(DefaultGrace)); len(freed) != 1 || freed[0] != first {
		t.Fatalf("GC freed %v", freed)
	}
	// The next allocations walk on; the freed number comes back only after
	// the cursor wraps.
	for i := 1; i < 10; i++ {
		id, err := a.Allocate(podSet(t, fmt.Sprint("s", i), "ns"))
		if err != nil {
			t.Fatal(err)
		}
		if id == first {
			t.Fatalf("freed number reused at allocation %d", i)
		}
	}
	id, err := a.Allocate(podSet(t, "wrapped", "ns"))
	if err != nil || id != first {
		t.Fatalf("after wrapping: %d, %v; want %d", id, err, first)
	}
}

func TestConcurrentUse(t *testing.T) {
	clock := newFakeClock()
	a := open(t, statePath(t), Config{Clock: clock.Now})
	const workers, rounds, distinct = 8, 200, 20
	sets := make([]LabelSet, distinct)
	for i := range sets {
		sets[i] = podSet(t, fmt.Sprint("app", i), "ns")
	}
	var seen sync.Map // set string -> ID; every goroutine must agree
	agree := func(set LabelSet, id ID) error {
		if prev, loaded := seen.LoadOrStore(set.String(), id); loaded && prev.(ID) != id {
			return fmt.Errorf("%s: %d and %d", set, prev, id)
		}
		return nil
	}
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			for r := range rounds {
				set := sets[(w*7+r)%distinct]
				user := fmt.Sprintf("w%d-ep%d", w, r%5)
				var id ID
				var err error
				switch r % 5 {
				case 0, 1:
					id, err = a.Acquire(user, set)
				case 2:
					id, err = a.Allocate(set)
				case 3:
					err = a.Release(user)
				case 4:
					if got, ok := a.Lookup(set); ok {
						id = got
						if back, ok := a.ByID(got); ok && !back.Equal(set) {
							err = fmt.Errorf("ByID(%d) = %s, want %s", got, back, set)
						}
					}
				}
				if err == nil && id != 0 {
					err = agree(set, id)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Go(func() {
		// GC inside the grace period must free nothing.
		for range 50 {
			if freed, err := a.GC(clock.Now()); err != nil || len(freed) > 0 {
				errs <- fmt.Errorf("GC freed %v (%v)", freed, err)
				return
			}
		}
	})
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	checkDisk(t, a)
	// Reference counts equal the users recorded.
	counts := map[ID]int{}
	for _, id := range a.Users() {
		counts[id]++
	}
	for _, set := range sets {
		id, ok := a.Lookup(set)
		if !ok {
			t.Fatalf("%s lost", set)
		}
		if a.entryUsers(id) != counts[id] {
			t.Fatalf("identity %d: %d users counted, %d recorded", id, a.entryUsers(id), counts[id])
		}
	}
}

// Callers that arrive while a commit runs share the next one.
func TestConcurrentAllocationsShareCommits(t *testing.T) {
	a := open(t, statePath(t), Config{})
	var commits int
	var mu sync.Mutex
	a.failCommit = func() error { mu.Lock(); commits++; mu.Unlock(); return nil }
	const n = 200
	sets := make([]LabelSet, n)
	for i := range sets {
		sets[i] = podSet(t, fmt.Sprint("app", i), "ns")
	}
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			if _, err := a.Allocate(sets[i]); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	t.Logf("%d allocations in %d commits", n, commits)
	if a.Len() != n {
		t.Fatalf("Len = %d, want %d", a.Len(), n)
	}
	checkDisk(t, a)
}

func TestClosed(t *testing.T) {
	a, err := OpenAllocator(statePath(t), time.Second, Config{})
	if err != nil {
		t.Fatal(err)
	}
	set := podSet(t, "web", "ns")
	id, _ := a.Allocate(set)
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := a.Allocate(set); !errors.Is(err, ErrClosed) {
		t.Fatalf("Allocate after Close: %v", err)
	}
	if _, err := a.GC(time.Now()); !errors.Is(err, ErrClosed) {
		t.Fatalf("GC after Close: %v", err)
	}
	if got, ok := a.Lookup(set); !ok || got != id {
		t.Fatalf("Lookup after Close: %d, %v", got, ok)
	}
}
