package identity

import (
	"context"
	"errors"
	"slices"
	"time"
)

// GC frees the numbers that have had no user for at least the grace period
// as of now, and returns them in ascending order, so the caller can purge
// them from the datapath. now is a parameter so tests (and a caller with its
// own clock) decide what time it is.
func (a *Allocator) GC(now time.Time) ([]ID, error) {
	a.mu.Lock()
	if err := a.usableLocked(); err != nil {
		a.mu.Unlock()
		return nil, err
	}
	b := a.cur
	var freed []ID
	for id, e := range a.idle {
		if now.Sub(e.idleSince) < a.grace {
			continue
		}
		delete(a.idle, id)
		delete(a.byID, id)
		delete(a.bySet, e.set.s)
		if id >= a.first && id <= a.last {
			a.inRange--
		}
		b.ops = append(b.ops, opDelID(id), opDelIdle(id))
		freed = append(freed, id)
	}
	a.mu.Unlock()
	if len(freed) == 0 {
		return nil, nil
	}
	if err := a.commit(b); err != nil {
		return nil, err
	}
	slices.Sort(freed)
	return freed, nil
}

// RunGC calls GC with the allocator's clock every interval until ctx is done
// or the allocator is closed. report, if not nil, hears of every run that
// freed something or failed. Start it with go.
func (a *Allocator) RunGC(ctx context.Context, every time.Duration, report func(freed []ID, err error)) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		freed, err := a.GC(a.clock())
		if errors.Is(err, ErrClosed) {
			return
		}
		if report != nil && (len(freed) > 0 || err != nil) {
			report(freed, err)
		}
	}
}
