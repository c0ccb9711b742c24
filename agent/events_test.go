package agent

import (
	"fmt"
	"testing"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/bpf"
)

// A reader that falls behind loses events, never silently: before the
// next event it takes, it gets a gap marker counting exactly what it
// missed, and a reader that keeps up is not affected.
func TestSlowReaderSeesGap(t *testing.T) {
	h := newEventHub(nil)
	slow := &subscriber{ch: make(chan api.Event, 4)}
	fast := &subscriber{ch: make(chan api.Event, 64)}
	h.subs[slow], h.subs[fast] = struct{}{}, struct{}{}
	for i := range 10 {
		h.publish(api.Event{Event: bpf.Event{Ifindex: i + 1}})
	}
	if len(fast.ch) != 10 {
		t.Fatalf("the fast reader got %d of 10 events", len(fast.ch))
	}
	var got []api.Event
	drain := func() {
		for len(slow.ch) > 0 {
			got = append(got, <-slow.ch)
		}
	}
	drain()
	// Events 5..10 did not fit; the marker waits for room.
	h.publish(api.Event{Event: bpf.Event{Ifindex: 11}})
	drain()
	want := []string{"event 1", "event 2", "event 3", "event 4", "gap 6", "event 11"}
	if len(got) != len(want) {
		t.Fatalf("slow reader got %d lines, want %v: %+v", len(got), want, got)
	}
	for i, e := range got {
		var s string
		if e.Gap != nil {
			s = fmt.Sprint("gap ", e.Gap.Missed)
		} else {
			s = fmt.Sprint("event ", e.Ifindex)
		}
		if s != want[i] {
			t.Fatalf("line %d is %q, want %q (all: %+v)", i, s, want[i], got)
		}
	}
	if slow.missed != 0 {
		t.Fatalf("%d misses left after the marker", slow.missed)
	}
}
