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
