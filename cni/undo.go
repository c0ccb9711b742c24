package cni

import (
	"errors"
	"fmt"
)

// undo collects the inverse of every step an ADD has completed, so that a
// failing ADD leaves the node as it found it.
type undo struct {
	steps []undoStep
}

type undoStep struct {
	what string
	fn   func() error
}

// push records how to revert a step that just succeeded.
func (u *undo) push(what string, fn func() error) {
	u.steps = append(u.steps, undoStep{what, fn})
}

// run reverts the steps, last first. It carries on past failures, so one
// stuck step does not leak all the others, and reports every failure.
func (u *undo) run() error {
	var errs []error
	for i := len(u.steps) - 1; i >= 0; i-- {
		if err := u.steps[i].fn(); err != nil {
			errs = append(errs, fmt.Errorf("undo %s: %w", u.steps[i].what, err))
		}
	}
	u.steps = nil
	return errors.Join(errs...)
}
