package identity

import (
	"fmt"

	bolt "go.etcd.io/bbolt"
)

// Writes go through a group commit. Every change is made in memory under
// a.mu and its ops appended to the open batch a.cur; the caller then waits
// for that batch to be durable. One waiter at a time (flushMu) closes the
// open batch and commits it in one bbolt transaction, so callers that arrive
// while a commit (and its fsync) runs share the next one.
//
// bbolt's own DB.Batch coalesces too, but it runs the queued functions in
// whatever order they arrived, which need not be the order the changes were
// made in memory; here the file sees the changes in exactly that order.

type batch struct {
	ops  []op
	done chan struct{} // closed once err is set
	err  error
}

func newBatch() *batch { return &batch{done: make(chan struct{})} }

func (b *batch) finished() bool {
	select {
	case <-b.done:
		return true
	default:
		return false
	}
}

// durable reports whether the batch committed. Until it has, an entry it
// created is not shown to readers.
func (b *batch) durable() bool { return b.finished() && b.err == nil }

// commit returns once b is committed or has failed.
func (a *Allocator) commit(b *batch) error {
	if b.finished() {
		return b.err
	}
	a.flushMu.Lock()
	defer a.flushMu.Unlock()
	if b.finished() {
		return b.err
	}
	// Batches before b are finished (each flush finishes the one it takes
	// before releasing flushMu), so b is the open one.
	a.mu.Lock()
	a.cur = newBatch()
	a.mu.Unlock()

	var err error
	if len(b.ops) > 0 {
		err = a.db.Update(func(tx *bolt.Tx) error {
			if a.failCommit != nil {
				if err := a.failCommit(); err != nil {
					return err
				}
			}
			return apply(tx, b.ops)
		})
	}
	if err != nil {
		err = fmt.Errorf("identity: write state file %s: %w", a.db.Path(), err)
		a.mu.Lock()
		a.recoverLocked(err)
		a.mu.Unlock()
	}
	b.err = err
	close(b.done)
	return err
}

// recoverLocked makes memory match the file again after a failed commit: the
// failed changes are in memory but not on disk. Changes made since (in the
// open batch) built on them, so they are dropped too and their callers get
// the error. If even reading fails, the allocator refuses further changes.
func (a *Allocator) recoverLocked(cause error) {
	var st *state
	err := a.db.View(func(tx *bolt.Tx) error {
		var err error
		st, err = load(tx, a.first, a.last, a.clock())
		return err
	})
	if err != nil {
		a.broken = fmt.Errorf("identity: allocator stopped after %v; reloading failed: %w", cause, err)
	} else {
		a.state = *st
	}
	c := a.cur
	c.err = fmt.Errorf("identity: change dropped after an earlier write failed: %w", cause)
	close(c.done)
	a.cur = newBatch()
}
