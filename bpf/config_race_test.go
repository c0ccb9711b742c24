package bpf

import (
	"sync"
	"testing"
)

// TestBumpRevisionSurvivesConcurrentSetDebug is issue 11's defect 6: the
// revision and the debug switch share one config entry, and a bump that
// races with SetDebug (or another bump) must never be lost, whether the
// other writer is a goroutine on the same handle or another handle on the
// same pins, as policyctl without an agent is.
func TestBumpRevisionSurvivesConcurrentSetDebug(t *testing.T) {
	d := loadTest(t, Options{})
	other, err := Open(d.Root())
	if err != nil {
		t.Fatalf("open a second handle on %s: %v", d.Root(), err)
	}
	t.Cleanup(func() { other.Close() })

	start, err := d.Revision()
	if err != nil {
		t.Fatal(err)
	}
	const bumpers, bumps, togglers, toggles = 4, 2000, 2, 4000
	var wg sync.WaitGroup
	errs := make(chan error, bumpers+togglers)
	for i := range bumpers {
		h := d
		if i%2 == 1 {
			h = other // bumps from "another process" too
		}
		wg.Go(func() {
			for range bumps {
				if err := h.BumpRevision(); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	for i := range togglers {
		h := other
		if i%2 == 1 {
			h = d
		}
		wg.Go(func() {
			for j := range toggles {
				if err := h.SetDebug(j%2 == 0); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	got, err := d.Revision()
	if err != nil {
		t.Fatal(err)
	}
	if want := start + bumpers*bumps; got != want {
		t.Fatalf("revision = %d after %d bumps from %d; want %d (%d bumps lost)", got, bumpers*bumps, start, want, want-got)
	}
	// The togglers' last writes set debug off; a lost SetDebug would show too.
	if on, err := d.Debug(); err != nil || on {
		t.Fatalf("debug = %v, %v after every toggler ended on off; want false", on, err)
	}
}
