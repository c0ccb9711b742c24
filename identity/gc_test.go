package identity

import (
	"context"
	"slices"
	"testing"
	"time"
)

func TestGracePeriod(t *testing.T) {
	clock := newFakeClock()
	const grace = 5 * time.Minute
	a := open(t, statePath(t), Config{Grace: grace, Clock: clock.Now})
	web, api, lone := podSet(t, "web", "ns"), podSet(t, "api", "ns"), podSet(t, "lone", "ns")

	webID, _ := a.Acquire("pod-web-1", web)
	_, _ = a.Acquire("pod-web-2", web)
	apiID, _ := a.Acquire("pod-api", api)
	loneID, _ := a.Allocate(lone) // no user: idle from the start

	// Releasing one of two users starts nothing.
	_ = a.Release("pod-web-1")
	clock.Advance(time.Minute)
	_ = a.Release("pod-api") // api idle from t0+1m
	// lone was idle since t0, api since t0+1m: both are past grace at
	// t0+1m+grace. GC returns numbers in ascending order.
	if freed, _ := a.GC(clock.Now().Add(grace)); !slices.Equal(freed, []ID{apiID, loneID}) {
		t.Fatalf("GC freed %v, want %d and %d", freed, loneID, apiID)
	}
	if _, ok := a.Lookup(api); ok {
		t.Fatal("freed set still found")
	}
	if _, ok := a.ByID(apiID); ok {
		t.Fatal("freed number still found")
	}
	if id, ok := a.Lookup(web); !ok || id != webID {
		t.Fatal("number with a user was freed")
	}

	// Last user gone, then back within the grace period: same number.
	_ = a.Release("pod-web-2")
	clock.Advance(grace - time.Second)
	if freed, _ := a.GC(clock.Now()); len(freed) != 0 {
		t.Fatalf("GC inside the grace period freed %v", freed)
	}
	if id, _ := a.Acquire("pod-web-3", web); id != webID {
		t.Fatalf("re-acquired within grace: %d, want %d", id, webID)
	}
	if freed, _ := a.GC(clock.Advance(time.Hour)); len(freed) != 0 {
		t.Fatalf("GC freed a number in use: %v", freed)
	}

	// Allocate (without a user) of an idle set restarts its grace period.
	_ = a.Release("pod-web-3")
	clock.Advance(grace - time.Second)
	if id, _ := a.Allocate(web); id != webID {
		t.Fatalf("re-allocated within grace: %d, want %d", id, webID)
	}
	if freed, _ := a.GC(clock.Advance(grace - time.Second)); len(freed) != 0 {
		t.Fatalf("Allocate did not restart the grace period: freed %v", freed)
	}
	if freed, _ := a.GC(clock.Advance(time.Second)); !slices.Equal(freed, []ID{webID}) {
		t.Fatalf("GC freed %v, want [%d]", freed, webID)
	}

	// After being freed the set gets a new number.
	if id, _ := a.Allocate(web); id == webID {
		t.Fatalf("freed number %d came straight back", id)
	}
	checkDisk(t, a)
}

func TestRelabelStartsGraceOfOldNumber(t *testing.T) {
	clock := newFakeClock()
	a := open(t, statePath(t), Config{Clock: clock.Now})
	oldID, _ := a.Acquire("pod", podSet(t, "v1", "ns"))
	clock.Advance(time.Minute)
	_, _ = a.Acquire("pod", podSet(t, "v2", "ns"))
	if freed, _ := a.GC(clock.Now().Add(DefaultGrace - time.Second)); len(freed) != 0 {
		t.Fatalf("freed %v early", freed)
	}
	if freed, _ := a.GC(clock.Now().Add(DefaultGrace)); !slices.Equal(freed, []ID{oldID}) {
		t.Fatalf("freed %v, want [%d]", freed, oldID)
	}
}

func TestRunGC(t *testing.T) {
	clock := newFakeClock()
	a := open(t, statePath(t), Config{Grace: time.Minute, Clock: clock.Now})
	id, _ := a.Allocate(podSet(t, "web", "ns"))
	clock.Advance(time.Minute)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	reports := make(chan []ID, 1)
	done := make(chan struct{})
	go func() {
		a.RunGC(ctx, time.Millisecond, func(freed []ID, err error) {
			if err != nil {
				t.Error(err)
			}
			reports <- freed
		})
		close(done)
	}()
	select {
	case freed := <-reports:
		if !slices.Equal(freed, []ID{id}) {
			t.Fatalf("RunGC freed %v, want [%d]", freed, id)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("RunGC freed nothing")
	}
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("RunGC did not stop with its context")
	}
}
