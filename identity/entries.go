package identity

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/idcni/idcni/store"
)

// Entry is one allocated label identity as people look it up: its number,
// its label set, who holds it and, when no one does, since when.
type Entry struct {
	ID  ID
	Set LabelSet
	// Users are the allocator users holding the number (for pods,
	// "pod/<namespace>/<name>"), sorted.
	Users []string
	// IdleSince is when the last user let go; zero while in use. An idle
	// number keeps its label set for the grace period, then GC frees it.
	IdleSince time.Time
}

// Entries returns every allocated label identity, sorted by number. Numbers
// whose write is not on disk yet are left out, as ByID does.
func (a *Allocator) Entries() []Entry {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return entriesOf(&a.state, func(e *entry) bool { return e.visible() })
}

// Entry returns the entry of id, if id is allocated.
func (a *Allocator) Entry(id ID) (Entry, bool) {
	a.mu.RLock()
	defer a.mu.RUnlock()
	e := a.byID[id]
	if e == nil || !e.visible() {
		return Entry{}, false
	}
	return entryOf(e, usersOf(&a.state)[e]), true
}

// ReadEntries reads the label identities of a state file without an
// allocator, for tools that look while no agent runs; it only reads, so
// the file may be open read-only (store.OpenReadOnly).
func ReadEntries(db *store.DB) ([]Entry, error) {
	var out []Entry
	err := db.View(func(tx *bolt.Tx) error {
		// The whole label range: the file may hold numbers outside the
		// range an agent was configured with.
		st, err := load(tx, MinLabel, MaxLabel, time.Now())
		if err != nil {
			return err
		}
		out = entriesOf(st, func(*entry) bool { return true })
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read identities of state file %s: %w", db.Path(), err)
	}
	return out, nil
}

func usersOf(st *state) map[*entry][]string {
	m := make(map[*entry][]string, len(st.byID))
	for u, e := range st.users {
		m[e] = append(m[e], u)
	}
	return m
}

func entriesOf(st *state, keep func(*entry) bool) []Entry {
	users := usersOf(st)
	out := make([]Entry, 0, len(st.byID))
	for _, e := range st.byID {
		if keep(e) {
			out = append(out, entryOf(e, users[e]))
		}
	}
	slices.SortFunc(out, func(a, b Entry) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

func entryOf(e *entry, users []string) Entry {
	users = slices.Clone(users)
	slices.SortFunc(users, strings.Compare)
	x := Entry{ID: e.id, Set: e.set, Users: users}
	if e.users == 0 {
		x.IdleSince = e.idleSince
	}
	return x
}
