package identity

import (
	"errors"
	"fmt"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/idcni/idcni/store"
)

// DefaultGrace is how long a number stays reserved for its label set after
// its last user is gone. A pod that is re-created (a rollout, a node drain, an
// agent restart racing pod events) gets its old number back, so the datapath
// and every other node see no change.
const DefaultGrace = 10 * time.Minute

var (
	// ErrExhausted means every number of the configured range is taken.
	ErrExhausted = errors.New("identity: no free label identity")
	// ErrCorrupt means the identity records of the state file contradict
	// each other or are not in our format.
	ErrCorrupt = errors.New("corrupt identity records")
	// ErrClosed is returned by changes after Close.
	ErrClosed = errors.New("identity: allocator is closed")
)

// Config tunes an Allocator. The zero value is the production setting.
type Config struct {
	// Grace is how long an unused number keeps its label set before GC
	// frees it. 0 means DefaultGrace.
	Grace time.Duration
	// First and Last bound the numbers handed out (inclusive). Both 0 means
	// the whole label range MinLabel..MaxLabel; a narrower range is for
	// tests. Numbers already in the file outside it stay valid.
	First, Last ID
	// Clock is the time source for release times. nil means time.Now.
	Clock func() time.Time
}

// Allocator maps label sets to label-derived identities and back, persisted in
// the state file. It keeps the whole mapping in memory: lookups never touch
// the disk, and changes wait only for their group commit.
//
// A number is in use while at least one user (an endpoint key) holds it, see
// Acquire and Release. A number with no users is idle: it keeps its label set
// for the grace period, then GC frees it. Allocate alone makes an idle number.
//
// Numbers, users and idle times are all in the file, so a restarted agent
// finds every number still held; see persist.go for why references are
// persisted rather than rebuilt.
//
// An Allocator is safe for concurrent use.
type Allocator struct {
	db          *store.DB
	ownDB       bool
	first, last ID
	grace       time.Duration
	clock       func() time.Time
	failCommit  func() error // tests: make commits fail

	flushMu sync.Mutex // one commit at a time, see batch.go

	mu sync.RWMutex // guards everything below
	state
	cur    *batch // open batch: changes made in memory, not yet on disk
	closed bool
	broken error // set when memory can no longer be trusted to match disk
}

type entry struct {
	id        ID
	set       LabelSet
	users     int
	idleSince time.Time // when users dropped to 0; meaningless while users > 0
	created   *batch    // batch that wrote the number; nil if loaded from disk
}

// visible reports whether readers may see the entry: its number is on disk.
func (e *entry) visible() bool { return e.created == nil || e.created.durable() }

// OpenAllocator opens (or creates) the state file at path and loads its
// identities. The allocator owns the file: Close closes it. A file that is
// corrupt, not idcni's, of a newer schema, or has inconsistent identity
// records is refused with an error naming it, and is not modified.
func OpenAllocator(path string, lockTimeout time.Duration, cfg Config) (*Allocator, error) {
	db, err := store.Open(path, lockTimeout)
	if err != nil {
		return nil, fmt.Errorf("identity allocator: %w", err)
	}
	a, err := NewAllocator(db, cfg)
	if err != nil {
		_ = db.Close()
		return nil, err
	}
	a.ownDB = true
	return a, nil
}

// NewAllocator loads the identities of an open state file, which others (the
// manual endpoints, the policy store) may share. Loading only reads.
func NewAllocator(db *store.DB, cfg Config) (*Allocator, error) {
	a := &Allocator{db: db, first: cfg.First, last: cfg.Last, grace: cfg.Grace, clock: cfg.Clock, cur: newBatch()}
	if a.first == 0 && a.last == 0 {
		a.first, a.last = MinLabel, MaxLabel
	}
	if !a.first.IsLabel() || !a.last.IsLabel() || a.first > a.last {
		return nil, fmt.Errorf("identity allocator: range %d-%d is not within the label range %d-%d", a.first, a.last, MinLabel, MaxLabel)
	}
	if a.grace == 0 {
		a.grace = DefaultGrace
	}
	if a.grace < 0 {
		return nil, fmt.Errorf("identity allocator: negative grace period %v", a.grace)
	}
	if a.clock == nil {
		a.clock = time.Now
	}
	err := db.View(func(tx *bolt.Tx) error {
		st, err := load(tx, a.first, a.last, a.clock())
		if st != nil {
			a.state = *st
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("identity allocator: state file %s: %w", db.Path(), err)
	}
	return a, nil
}

// Close waits for pending writes and, if the allocator opened the file,
// closes it. Reads keep working on the last state; changes return ErrClosed.
func (a *Allocator) Close() error {
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		return nil
	}
	a.closed = true
	b := a.cur
	a.mu.Unlock()
	err := a.commit(b)
	if a.ownDB {
		if cerr := a.db.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("identity allocator: close state file: %w", cerr)
		}
	}
	return err
}

// usableLocked returns why no change may be made now, if any.
func (a *Allocator) usableLocked() error {
	if a.closed {
		return ErrClosed
	}
	return a.broken
}

// Allocate returns the number of set, allocating one from the label range if
// set has none. It adds no user: if no one Acquires the number, it is idle
// from now and GC frees it after the grace period. Allocating a set that is
// idle restarts its grace period.
func (a *Allocator) Allocate(set LabelSet) (ID, error) {
	ids, err := a.AllocateAll([]LabelSet{set})
	if err != nil {
		return 0, err
	}
	return ids[0], nil
}

// AllocateAll is Allocate for many sets, written in one transaction: the way
// to load thousands of sets without paying one disk sync each. On error, the
// sets before the failing one may have been allocated.
func (a *Allocator) AllocateAll(sets []LabelSet) ([]ID, error) {
	a.mu.Lock()
	if err := a.usableLocked(); err != nil {
		a.mu.Unlock()
		return nil, err
	}
	now := a.clock()
	b := a.cur
	n := len(b.ops)
	wait := false
	ids := make([]ID, len(sets))
	var err error
	for i, set := range sets {
		var e *entry
		if e, err = a.ensureLocked(set, b); err != nil {
			break
		}
		if e.users == 0 {
			e.idleSince = now
			b.ops = append(b.ops, opPutIdle(e.id, now))
		}
		wait = wait || !e.visible()
		ids[i] = e.id
	}
	wait = wait || len(b.ops) > n
	a.mu.Unlock()
	if wait {
		// Also covers entries created by a batch still being committed:
		// b commits after it.
		if cerr := a.commit(b); cerr != nil {
			return nil, cerr
		}
	}
	if err != nil {
		return nil, err
	}
	return ids, nil
}

// Acquire records that user (an endpoint key, unique per endpoint) holds the
// number of set, allocating it if needed, and returns it. A user holds one
// number: acquiring another set for the same user (its pod's labels changed)
// releases the old one. Acquiring the same set again is a no-op. On error the
// user keeps what it held.
func (a *Allocator) Acquire(user string, set LabelSet) (ID, error) {
	if user == "" || len(user) > bolt.MaxKeySize {
		return 0, fmt.Errorf("identity: invalid user key of %d bytes", len(user))
	}
	a.mu.Lock()
	if err := a.usableLocked(); err != nil {
		a.mu.Unlock()
		return 0, err
	}
	b := a.cur
	old := a.users[user]
	if old != nil && old.set.s == set.s {
		wait := !old.visible()
		a.mu.Unlock()
		if wait {
			if err := a.commit(b); err != nil {
				return 0, err
			}
		}
		return old.id, nil
	}
	e, err := a.ensureLocked(set, b)
	if err != nil {
		a.mu.Unlock()
		return 0, err
	}
	now := a.clock()
	if e.users == 0 {
		delete(a.idle, e.id)
		b.ops = append(b.ops, opDelIdle(e.id))
	}
	e.users++
	a.users[user] = e
	b.ops = append(b.ops, opPutUser(user, e.id))
	if old != nil {
		a.unrefLocked(old, now, b)
	}
	a.mu.Unlock()
	if err := a.commit(b); err != nil {
		return 0, err
	}
	return e.id, nil
}

// Release drops user's hold on its number. When it was the last user, the
// number's grace period starts. Releasing an unknown user is a no-op, so
// Release is safe to repeat (like CNI DEL).
func (a *Allocator) Release(user string) error {
	a.mu.Lock()
	if err := a.usableLocked(); err != nil {
		a.mu.Unlock()
		return err
	}
	e := a.users[user]
	if e == nil {
		a.mu.Unlock()
		return nil
	}
	b := a.cur
	delete(a.users, user)
	b.ops = append(b.ops, opDelUser(user))
	a.unrefLocked(e, a.clock(), b)
	a.mu.Unlock()
	return a.commit(b)
}

func (a *Allocator) unrefLocked(e *entry, now time.Time, b *batch) {
	e.users--
	if e.users == 0 {
		e.idleSince = now
		a.idle[e.id] = e
		b.ops = append(b.ops, opPutIdle(e.id, now))
	}
}

// ensureLocked returns the entry of set, creating it with a fresh number
// (and no users, idle in memory only: callers decide what to record).
func (a *Allocator) ensureLocked(set LabelSet, b *batch) (*entry, error) {
	if e := a.bySet[set.s]; e != nil {
		return e, nil
	}
	id, err := a.pickLocked()
	if err != nil {
		return nil, err
	}
	e := &entry{id: id, set: set, created: b}
	a.bySet[set.s], a.byID[id], a.idle[id] = e, e, e
	a.inRange++
	b.ops = append(b.ops, opPutID(e), opPutNext(a.next))
	return e, nil
}

// pickLocked takes the first free number at or after the cursor, wrapping
// around. Walking forward rather than reusing the lowest free number keeps a
// freed number unused for as long as possible, so a stale reference to it
// somewhere (another node's ipcache, a conntrack entry) is unlikely to meet a
// different label set.
func (a *Allocator) pickLocked() (ID, error) {
	if a.inRange >= int(a.last-a.first)+1 {
		return 0, fmt.Errorf("%w: all %d numbers of %d-%d are in use or in their grace period",
			ErrExhausted, int(a.last-a.first)+1, a.first, a.last)
	}
	id := a.next
	if id < a.first || id > a.last {
		id = a.first
	}
	for a.byID[id] != nil {
		if id++; id > a.last {
			id = a.first
		}
	}
	a.next = id + 1
	if a.next > a.last {
		a.next = a.first
	}
	return id, nil
}

// Lookup returns the number of set, if it has one. It never allocates.
func (a *Allocator) Lookup(set LabelSet) (ID, bool) {
	a.mu.RLock()
	defer a.mu.RUnlock()
	if e := a.bySet[set.s]; e != nil && e.visible() {
		return e.id, true
	}
	return 0, false
}

// ByID returns the label set of id, if id is allocated.
func (a *Allocator) ByID(id ID) (LabelSet, bool) {
	a.mu.RLock()
	defer a.mu.RUnlock()
	if e := a.byID[id]; e != nil && e.visible() {
		return e.set, true
	}
	return LabelSet{}, false
}

// Users returns a snapshot of who holds which number. After a restart the
// agent releases the users that no longer exist.
func (a *Allocator) Users() map[string]ID {
	a.mu.RLock()
	defer a.mu.RUnlock()
	m := make(map[string]ID, len(a.users))
	for u, e := range a.users {
		m[u] = e.id
	}
	return m
}

// Len returns how many numbers are allocated, idle ones included.
func (a *Allocator) Len() int {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return len(a.byID)
}
