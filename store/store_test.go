package store

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

func TestOpenCreatesAndReopens(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "state.db")
	db, err := Open(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	db.Close()
	db, err = Open(path, time.Second)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	db.Close()
}

func TestOpenRefusesAndDoesNotTouch(t *testing.T) {
	dir := t.TempDir()
	cases := map[string]func(path string){
		"garbage": func(p string) { os.WriteFile(p, bytes.Repeat([]byte("not a db "), 1000), 0o600) },
		"foreign bbolt": func(p string) {
			db, _ := bolt.Open(p, 0o600, nil)
			db.Update(func(tx *bolt.Tx) error { _, err := tx.CreateBucket([]byte("someone-else")); return err })
			db.Close()
		},
		"newer schema": func(p string) {
			db, _ := bolt.Open(p, 0o600, nil)
			db.Update(func(tx *bolt.Tx) error {
				b, _ := tx.CreateBucket(metaBucket)
				return b.Put(keySchema, []byte("99"))
			})
			db.Close()
		},
	}
	want := map[string]string{"garbage": "corrupt", "foreign bbolt": "not an idcni state file", "newer schema": "newer than this idcni"}
	for name, mk := range cases {
		path := filepath.Join(dir, strings.ReplaceAll(name, " ", "-"))
		mk(path)
		before, _ := os.ReadFile(path)
		_, err := Open(path, time.Second)
		if err == nil || !strings.Contains(err.Error(), want[name]) || !strings.Contains(err.Error(), path) {
			t.Errorf("%s: %v", name, err)
		}
		after, _ := os.ReadFile(path)
		if !bytes.Equal(before, after) {
			t.Errorf("%s: file changed", name)
		}
	}
	if _, err := Open(filepath.Join(dir, "garbage"), time.Second); errors.Is(err, ErrNotIdcni) {
		t.Error("garbage reported as foreign, not corrupt")
	}
}

func TestOpenLockedNamesTheFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	db, err := Open(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	_, err = Open(path, 100*time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "locked by another process") {
		t.Fatalf("second open: %v", err)
	}
}

// A read-only open never creates the file, reads alongside another reader,
// and gives up on a writer's lock after its timeout with an error naming
// the agent, instead of hanging behind a running idcni-agent.
func TestOpenReadOnly(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "sub", "state.db")
	if _, err := OpenReadOnly(missing, time.Second); !errors.Is(err, ErrNoFile) {
		t.Errorf("read-only open of a missing file: %v, want ErrNoFile", err)
	}
	if _, err := os.Stat(filepath.Dir(missing)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("read-only open created the directory: %v", err)
	}

	path := filepath.Join(dir, "state.db")
	db, err := Open(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = OpenReadOnly(path, 200*time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "locked by another process") || !strings.Contains(err.Error(), "idcni-agent") {
		t.Errorf("read-only open of a file a writer holds: %v", err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("read-only open waited %s on a 200ms timeout", took)
	}
	db.Close()

	before, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	r1, err := OpenReadOnly(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	r2, err := OpenReadOnly(path, time.Second)
	if err != nil {
		t.Fatalf("second reader: %v", err)
	}
	r1.Close()
	r2.Close()
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Error("read-only opens changed the file")
	}

	foreign := filepath.Join(dir, "foreign.db")
	fdb, _ := bolt.Open(foreign, 0o600, nil)
	fdb.Update(func(tx *bolt.Tx) error { _, err := tx.CreateBucket([]byte("someone-else")); return err })
	fdb.Close()
	if _, err := OpenReadOnly(foreign, time.Second); !errors.Is(err, ErrNotIdcni) {
		t.Errorf("read-only open of a foreign bbolt file: %v, want ErrNotIdcni", err)
	}
}
