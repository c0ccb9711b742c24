package identity

import (
	"reflect"
	"testing"
	"time"

	"github.com/idcni/idcni/store"
)

// The allocator's entries and what a tool reads from the file with no
// allocator (read-only, while no agent runs) are the same: label sets,
// users, idle times.
func TestEntriesMatchTheFile(t *testing.T) {
	path := statePath(t)
	clock := newFakeClock()
	a := open(t, path, Config{Clock: clock.Now})
	web, db := podSet(t, "web", "shop"), podSet(t, "db", "shop")
	webID, err := a.Acquire("pod/shop/web-2", web)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Acquire("pod/shop/web-1", web); err != nil {
		t.Fatal(err)
	}
	dbID, err := a.Allocate(db)
	if err != nil {
		t.Fatal(err)
	}
	want := []Entry{
		{ID: webID, Set: web, Users: []string{"pod/shop/web-1", "pod/shop/web-2"}},
		{ID: dbID, Set: db, IdleSince: clock.Now()},
	}
	if got := a.Entries(); !reflect.DeepEqual(got, want) {
		t.Errorf("Entries() = %+v, want %+v", got, want)
	}
	if got, ok := a.Entry(webID); !ok || !reflect.DeepEqual(got, want[0]) {
		t.Errorf("Entry(%d) = %+v, %v, want %+v", webID, got, ok, want[0])
	}
	if _, ok := a.Entry(dbID + 100); ok {
		t.Errorf("Entry of a number never allocated was found")
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}

	ro, err := store.OpenReadOnly(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	got, err := ReadEntries(ro)
	if err != nil {
		t.Fatal(err)
	}
	// The file keeps idle times in nanoseconds, without a location.
	for i := range got {
		if !got[i].IdleSince.IsZero() {
			got[i].IdleSince = got[i].IdleSince.UTC()
		}
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("ReadEntries = %+v, want %+v", got, want)
	}
}
