package identity

import (
	"fmt"
	"sync"
)

// MemoryAllocator numbers label sets in memory as a fresh Allocator does:
// one number per distinct LabelSet, handed out from MinLabel upward in order
// of first use. Nothing is persisted and numbers are never freed, so it is
// for offline tools (policyctl simulate) that must number pods exactly as
// the agent would without a state file. It is safe for concurrent use.
type MemoryAllocator struct {
	mu    sync.Mutex
	next  ID
	bySet map[string]ID
	users map[string]ID
}

// NewMemoryAllocator returns an empty in-memory allocator.
func NewMemoryAllocator() *MemoryAllocator {
	return &MemoryAllocator{next: MinLabel, bySet: map[string]ID{}, users: map[string]ID{}}
}

// Acquire returns the number of set, allocating one on first use, and
// records user as holding it, like Allocator.Acquire.
func (m *MemoryAllocator) Acquire(user string, set LabelSet) (ID, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	id, ok := m.bySet[set.s]
	if !ok {
		if m.next > MaxLabel {
			return 0, fmt.Errorf("%w: all %d label numbers are in use", ErrExhausted, int(MaxLabel-MinLabel)+1)
		}
		id = m.next
		m.next++
		m.bySet[set.s] = id
	}
	m.users[user] = id
	return id, nil
}

// Lookup returns the number of set, if it has one. It never allocates.
func (m *MemoryAllocator) Lookup(set LabelSet) (ID, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	id, ok := m.bySet[set.s]
	return id, ok
}
