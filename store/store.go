// Package store opens the node's state file (bbolt), the one place idcni keeps
// what must survive a restart: label identities, and the manual endpoints and
// rules people set with endpointctl and policyctl.
//
// The file carries a schema version. A file that is not a bbolt database, a
// bbolt database written by something else, or one written by a newer idcni
// is refused with a clear error and never modified.
package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// DefaultPath is where the state lives unless a flag or IDCNI_STATE says
// otherwise.
const DefaultPath = "/var/lib/idcni/state.db"

// SchemaVersion is the on-disk layout this code reads and writes.
const SchemaVersion = 1

var (
	metaBucket = []byte("idcni-meta")
	keySchema  = []byte("schema")
)

// ErrNotIdcni means the file is a bbolt database that idcni did not write.
var ErrNotIdcni = errors.New("not an idcni state file")

// DB is an open state file.
type DB struct {
	*bolt.DB
}

// Open opens the state file at path, creating it (and its directory) when it
// does not exist. Only one process holds it at a time; a second one waits
// lockTimeout and then fails naming the file.
func Open(path string, lockTimeout time.Duration) (*DB, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("create state directory: %w", err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: lockTimeout})
	switch {
	case errors.Is(err, bolterrors.ErrTimeout):
		return nil, fmt.Errorf("state file %s is locked by another process (an idcni-agent or another endpointctl/policyctl?)", path)
	case errors.Is(err, bolterrors.ErrInvalid), errors.Is(err, bolterrors.ErrVersionMismatch), errors.Is(err, bolterrors.ErrChecksum):
		return nil, fmt.Errorf("state file %s is corrupt or not a bbolt database (%v); move it away to start from scratch", path, err)
	case err != nil:
		return nil, fmt.Errorf("open state file %s: %w", path, err)
	}
	if err := checkSchema(db); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("state file %s: %w", path, err)
	}
	return &DB{DB: db}, nil
}

// ErrNoFile means OpenReadOnly found no state file at the path.
var ErrNoFile = errors.New("no state file")

// OpenReadOnly opens an existing state file for reading only, for tools
// that look without changing anything: it never creates the file or its
// directory and never stamps a schema. bbolt gives readers a shared lock,
// which a running idcni-agent's exclusive one keeps out; after lockTimeout
// the error says so rather than the caller hanging behind the agent.
func OpenReadOnly(path string, lockTimeout time.Duration) (*DB, error) {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w at %s", ErrNoFile, path)
	} else if err != nil {
		return nil, fmt.Errorf("open state file %s: %w", path, err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: lockTimeout, ReadOnly: true})
	switch {
	case errors.Is(err, bolterrors.ErrTimeout):
		return nil, fmt.Errorf("state file %s is locked by another process (a running idcni-agent holds it for as long as it runs: ask the agent instead)", path)
	case errors.Is(err, bolterrors.ErrInvalid), errors.Is(err, bolterrors.ErrVersionMismatch), errors.Is(err, bolterrors.ErrChecksum):
		return nil, fmt.Errorf("state file %s is corrupt or not a bbolt database (%v)", path, err)
	case err != nil:
		return nil, fmt.Errorf("open state file %s read-only: %w", path, err)
	}
	if err := readSchema(db); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("state file %s: %w", path, err)
	}
	return &DB{DB: db}, nil
}

// checkSchema accepts a file with our schema record, stamps an empty one,
// and refuses anything else.
func checkSchema(db *bolt.DB) error {
	found, err := schemaOf(db)
	if err != nil || found {
		return err
	}
	return db.Update(func(tx *bolt.Tx) error {
		meta, err := tx.CreateBucketIfNotExists(metaBucket)
		if err != nil {
			return err
		}
		return meta.Put(keySchema, []byte(strconv.Itoa(SchemaVersion)))
	})
}

// readSchema is checkSchema for a file opened read-only: a file with no
// schema record yet (created, never written) is empty, which is fine to read.
func readSchema(db *bolt.DB) error {
	_, err := schemaOf(db)
	return err
}

// schemaOf reports whether the file has our schema record, and refuses a
// file with someone else's data or a newer schema.
func schemaOf(db *bolt.DB) (bool, error) {
	var found bool
	err := db.View(func(tx *bolt.Tx) error {
		meta := tx.Bucket(metaBucket)
		if meta == nil {
			empty := true
			_ = tx.ForEach(func([]byte, *bolt.Bucket) error { empty = false; return nil })
			if !empty {
				return fmt.Errorf("%w: it holds data but no idcni schema record", ErrNotIdcni)
			}
			return nil
		}
		found = true
		raw := meta.Get(keySchema)
		v, err := strconv.Atoi(string(raw))
		if err != nil {
			return fmt.Errorf("%w: bad schema record %q", ErrNotIdcni, raw)
		}
		if v > SchemaVersion {
			return fmt.Errorf("schema version %d is newer than this idcni understands (%d); upgrade idcni rather than downgrade", v, SchemaVersion)
		}
		if v < 1 {
			return fmt.Errorf("%w: schema version %d", ErrNotIdcni, v)
		}
		return nil
	})
	return found, err
}
