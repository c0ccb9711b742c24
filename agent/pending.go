package agent

import (
	"context"
	"errors"
	"sync"

	corev1 "k8s.io/api/core/v1"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/manual"
)

// The local API hands changes to the writer loop and waits for the write
// that contains them: a registration answers only once the pod's identity,
// endpoint and policy are in the maps, a manual change only once it is in
// force.

// endpointChange is a registration (or, remove set, a removal) waiting for
// the writer.
type endpointChange struct {
	remove   bool
	register api.EndpointRequest
	pod      *corev1.Pod // as the handler found it, when the informer lags
}

// pendingEndpoints holds the latest change per container: a removal that
// arrives before its registration was processed replaces it.
type pendingEndpoints struct {
	mu sync.Mutex
	m  map[string]endpointChange
}

func (p *pendingEndpoints) put(id string, c endpointChange) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.m == nil {
		p.m = map[string]endpointChange{}
	}
	p.m[id] = c
}

func (p *pendingEndpoints) take(id string) (endpointChange, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	c, ok := p.m[id]
	delete(p.m, id)
	return c, ok
}

// manualChange is one change of the manual state and its caller.
type manualChange struct {
	change func(*manual.State) error
	done   chan error
}

type pendingManual struct {
	mu sync.Mutex
	cs []manualChange
}

func (p *pendingManual) add(c manualChange) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cs = append(p.cs, c)
}

func (p *pendingManual) take() []manualChange {
	p.mu.Lock()
	defer p.mu.Unlock()
	cs := p.cs
	p.cs = nil
	return cs
}

// waiters are the callers waiting for keys to be written.
type waiters struct {
	mu sync.Mutex
	m  map[key][]chan error
}

// wait registers a caller for k; the writer answers on the channel.
func (w *waiters) wait(k key) chan error {
	ch := make(chan error, 1)
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.m == nil {
		w.m = map[key][]chan error{}
	}
	w.m[k] = append(w.m[k], ch)
	return ch
}

func (a *Agent) takeWaiters(k key) []chan error {
	a.waiting.mu.Lock()
	defer a.waiting.mu.Unlock()
	ws := a.waiting.m[k]
	delete(a.waiting.m, k)
	return ws
}

func answer(ws []chan error, err error) {
	for _, w := range ws {
		w <- err
	}
}

// badRequest marks a change the writer refused as invalid, not as failed.
type badRequest struct{ error }

func (b badRequest) Unwrap() error { return b.error }

// submit enqueues k after its change was recorded and waits for the write.
func (a *Agent) submit(ctx context.Context, k key) error {
	ch := a.waiting.wait(k)
	a.queue.Add(k)
	select {
	case err := <-ch:
		return err
	case <-ctx.Done():
		return errors.Join(errors.New("idcni-agent: the change is queued but not written yet"), ctx.Err())
	}
}
