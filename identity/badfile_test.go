package identity

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/idcni/idcni/store"
)

// refuse opens path through the allocator, wants an error containing want,
// and checks that the file is byte for byte what it was.
func refuse(t *testing.T, path, want string) error {
	t.Helper()
	before, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	a, err := OpenAllocator(path, 100*time.Millisecond, Config{})
	if err == nil {
		_ = a.Close()
		t.Fatal("file accepted")
	}
	t.Logf("error: %v", err)
	if !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), path) {
		t.Errorf("error %q does not say %q and name %s", err, want, path)
	}
	after, rerr := os.ReadFile(path)
	if rerr != nil {
		t.Fatal(rerr)
	}
	if !bytes.Equal(before, after) {
		t.Error("refused file was modified")
	}
	return err
}

// writeBolt makes a bbolt file with whatever fill puts in it.
func writeBolt(t *testing.T, path string, fill func(tx *bolt.Tx) error) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Update(fill); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
}

// validState makes a good idcni state file with two identities, one user,
// then lets spoil change it behind the allocator's back.
func validState(t *testing.T, spoil func(tx *bolt.Tx) error) string {
	t.Helper()
	path := statePath(t)
	a, err := OpenAllocator(path, time.Second, Config{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Acquire("ep", podSet(t, "web", "ns")); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Allocate(podSet(t, "api", "ns")); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if spoil != nil {
		writeBolt(t, path, spoil)
	}
	return path
}

func TestRefuseNotBbolt(t *testing.T) {
	for name, content := range map[string][]byte{
		"text":    bytes.Repeat([]byte("this is not a database\n"), 1000),
		"zeros":   make([]byte, 16384),
		"garbage": garbage(20000),
	} {
		t.Run(name, func(t *testing.T) {
			path := statePath(t)
			if err := os.WriteFile(path, content, 0o600); err != nil {
				t.Fatal(err)
			}
			refuse(t, path, "corrupt")
		})
	}
}

func garbage(n int) []byte {
	b := make([]byte, n)
	x := uint32(2463534242)
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
	return b
}

func TestRefuseForeignBbolt(t *testing.T) {
	path := statePath(t)
	writeBolt(t, path, func(tx *bolt.Tx) error {
		b, err := tx.CreateBucket([]byte("someone-else"))
		if err != nil {
			return err
		}
		return b.Put([]byte("k"), []byte("v"))
	})
	if err := refuse(t, path, "not an idcni state file"); !errors.Is(err, store.ErrNotIdcni) {
		t.Errorf("error does not wrap store.ErrNotIdcni: %v", err)
	}
}

func TestRefuseNewerSchema(t *testing.T) {
	// The schema record is the store package's; written here by hand, as a
	// newer idcni would.
	path := validState(t, func(tx *bolt.Tx) error {
		return tx.Bucket([]byte("idcni-meta")).Put([]byte("schema"), []byte(strconv.Itoa(store.SchemaVersion+1)))
	})
	refuse(t, path, "newer")
}

func TestRefuseLocked(t *testing.T) {
	path := statePath(t)
	a := open(t, path, Config{})
	if _, err := a.Allocate(podSet(t, "web", "ns")); err != nil {
		t.Fatal(err)
	}
	refuse(t, path, "locked")
}

func TestRefuseInconsistentIdentityRecords(t *testing.T) {
	key := func(id ID) []byte { return binary.BigEndian.AppendUint32(nil, uint32(id)) }
	put := func(bucket string, k, v []byte) func(tx *bolt.Tx) error {
		return func(tx *bolt.Tx) error {
			b, err := tx.CreateBucketIfNotExists([]byte(bucket))
			if err != nil {
				return err
			}
			return b.Put(k, v)
		}
	}
	tests := []struct {
		name  string
		spoil func(tx *bolt.Tx) error
		want  string
	}{
		{"short number", put("identity/ids", []byte{1, 0, 0}, []byte("a=b")), "not 4 bytes"},
		{"manual number", put("identity/ids", key(1000), []byte("a=b")), "outside the label range"},
		{"reserved number", put("identity/ids", key(Host), []byte("a=b")), "outside the label range"},
		{"non-canonical set", put("identity/ids", key(MaxLabel), []byte("b=1,a=2")), "canonical order"},
		{"duplicate set", func(tx *bolt.Tx) error {
			var dup []byte
			b := tx.Bucket([]byte("identity/ids"))
			_, dup = b.Cursor().First()
			return b.Put(key(MaxLabel), bytes.Clone(dup))
		}, "share label set"},
		{"user of a missing number", put("identity/users", []byte("ghost"), key(MaxLabel)), "not allocated"},
		{"idle record of a missing number", put("identity/idle", key(MaxLabel), make([]byte, 8)), "not allocated"},
		{"short idle record", func(tx *bolt.Tx) error {
			b := tx.Bucket([]byte("identity/ids"))
			k, _ := b.Cursor().First()
			return tx.Bucket([]byte("identity/idle")).Put(k, []byte{1})
		}, "want 8"},
		{"bad cursor", put("identity/meta", []byte("next"), []byte("x")), "not 4 bytes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := validState(t, tt.spoil)
			if err := refuse(t, path, tt.want); !errors.Is(err, ErrCorrupt) {
				t.Errorf("error does not wrap ErrCorrupt: %v", err)
			}
		})
	}
}

// A fresh file and a file from before identities existed are both fine, and
// opening them writes nothing beyond the store's own schema stamp.
func TestOpenDoesNotWrite(t *testing.T) {
	path := statePath(t)
	db, err := store.Open(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	_ = db.Close()
	before, _ := os.ReadFile(path)
	a := open(t, path, Config{})
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	after, _ := os.ReadFile(path)
	if !bytes.Equal(before, after) {
		t.Fatal("opening and closing an allocator without changes modified the file")
	}
}
