package identity

import (
	"encoding/binary"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
)

// On-disk layout, inside the state file's bbolt database:
//
//	identity/ids    ID (4 bytes, big endian) -> canonical label set
//	identity/users  user key                 -> ID
//	identity/idle   ID                       -> unused since (unix ns, 8 bytes BE)
//	identity/meta   "next"                   -> next number to try (4 bytes BE)
//
// Keying ids by number keeps fresh allocations appending at the end of the
// B+tree (dense pages, small file); the reverse map lives in memory only.
// References are persisted (users, idle) rather than rebuilt from the
// agent's endpoints after a restart: until the informers have synced, the
// agent does not know every endpoint, and a rebuilt count of zero would let GC
// free numbers the datapath still uses. The agent instead compares Users()
// with the endpoints it knows and releases the ones that are gone.
var (
	bucketIDs   = []byte("identity/ids")
	bucketUsers = []byte("identity/users")
	bucketIdle  = []byte("identity/idle")
	bucketMeta  = []byte("identity/meta")
	keyNext     = []byte("next")
)

// op is one write to the state file. A nil val deletes key.
type op struct {
	bucket   []byte
	key, val []byte
}

func idKey(id ID) []byte { return binary.BigEndian.AppendUint32(nil, uint32(id)) }

func opPutID(e *entry) op { return op{bucketIDs, idKey(e.id), []byte(e.set.s)} }
func opDelID(id ID) op    { return op{bucketIDs, idKey(id), nil} }
func opPutUser(u string, id ID) op {
	return op{bucketUsers, []byte(u), idKey(id)}
}
func opDelUser(u string) op { return op{bucketUsers, []byte(u), nil} }
func opPutIdle(id ID, since time.Time) op {
	return op{bucketIdle, idKey(id), binary.BigEndian.AppendUint64(nil, uint64(since.UnixNano()))}
}
func opDelIdle(id ID) op   { return op{bucketIdle, idKey(id), nil} }
func opPutNext(next ID) op { return op{bucketMeta, keyNext, idKey(next)} }

// apply writes ops in order, creating the buckets on first use so that merely
// opening a file never writes to it.
func apply(tx *bolt.Tx, ops []op) error {
	buckets := make(map[string]*bolt.Bucket, 4)
	for _, o := range ops {
		b := buckets[string(o.bucket)]
		if b == nil {
			var err error
			if b, err = tx.CreateBucketIfNotExists(o.bucket); err != nil {
				return fmt.Errorf("create bucket %s: %w", o.bucket, err)
			}
			// Buckets keyed by number grow at the end (the cursor only walks
			// forward), so bbolt's default of half-full pages on split would
			// leave every page half empty for good. Full pages cost an extra
			// split on the rare insert after the cursor wraps.
			if string(o.bucket) == string(bucketIDs) || string(o.bucket) == string(bucketIdle) {
				b.FillPercent = 1.0
			}
			buckets[string(o.bucket)] = b
		}
		var err error
		if o.val == nil {
			err = b.Delete(o.key)
		} else {
			err = b.Put(o.key, o.val)
		}
		if err != nil {
			return fmt.Errorf("write %s key %x: %w", o.bucket, o.key, err)
		}
	}
	return nil
}

// state is the in-memory mirror of the buckets.
type state struct {
	bySet   map[string]*entry // canonical label set -> entry
	byID    map[ID]*entry
	users   map[string]*entry
	idle    map[ID]*entry // entries with no users
	next    ID
	inRange int // entries whose number lies in [first, last]
}

// load reads and checks the identity buckets. It never writes: a file we
// cannot make sense of must stay as it was for a person to look at. now is
// the idle time given to a number that has neither users nor an idle record.
func load(tx *bolt.Tx, first, last ID, now time.Time) (*state, error) {
	st, err := loadUnchecked(tx, first, last, now)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	return st, nil
}

func loadUnchecked(tx *bolt.Tx, first, last ID, now time.Time) (*state, error) {
	st := &state{
		bySet: make(map[string]*entry),
		byID:  make(map[ID]*entry),
		users: make(map[string]*entry),
		idle:  make(map[ID]*entry),
		next:  first,
	}
	if b := tx.Bucket(bucketIDs); b != nil {
		err := b.ForEach(func(k, v []byte) error {
			id, err := parseIDKey(k)
			if err != nil {
				return fmt.Errorf("%s: %w", bucketIDs, err)
			}
			set, err := ParseLabelSet(string(v))
			if err != nil {
				return fmt.Errorf("%s: identity %d: %w", bucketIDs, id, err)
			}
			if other := st.bySet[set.s]; other != nil {
				return fmt.Errorf("%s: identities %d and %d share label set %q", bucketIDs, other.id, id, set.s)
			}
			e := &entry{id: id, set: set}
			st.bySet[set.s], st.byID[id] = e, e
			if id >= first && id <= last {
				st.inRange++
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	if b := tx.Bucket(bucketUsers); b != nil {
		err := b.ForEach(func(k, v []byte) error {
			id, err := parseIDKey(v)
			if err != nil {
				return fmt.Errorf("%s: user %q: %w", bucketUsers, k, err)
			}
			e := st.byID[id]
			if e == nil {
				return fmt.Errorf("%s: user %q holds identity %d, which is not allocated", bucketUsers, k, id)
			}
			e.users++
			st.users[string(k)] = e
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	if b := tx.Bucket(bucketIdle); b != nil {
		err := b.ForEach(func(k, v []byte) error {
			id, err := parseIDKey(k)
			if err != nil {
				return fmt.Errorf("%s: %w", bucketIdle, err)
			}
			e := st.byID[id]
			if e == nil {
				return fmt.Errorf("%s: idle record for identity %d, which is not allocated", bucketIdle, id)
			}
			if len(v) != 8 {
				return fmt.Errorf("%s: idle record for identity %d is %d bytes, want 8", bucketIdle, id, len(v))
			}
			e.idleSince = time.Unix(0, int64(binary.BigEndian.Uint64(v)))
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	for id, e := range st.byID {
		if e.users > 0 {
			continue
		}
		if e.idleSince.IsZero() {
			// Cannot be written by this code (every unused number gets an
			// idle record in the same transaction); granting a full grace
			// period is the harmless reading.
			e.idleSince = now
		}
		st.idle[id] = e
	}
	if b := tx.Bucket(bucketMeta); b != nil {
		if v := b.Get(keyNext); v != nil {
			next, err := parseIDKey(v)
			if err != nil {
				return nil, fmt.Errorf("%s: next: %w", bucketMeta, err)
			}
			// A different configured range makes the saved cursor
			// meaningless, not wrong.
			if next >= first && next <= last {
				st.next = next
			}
		}
	}
	return st, nil
}

func parseIDKey(k []byte) (ID, error) {
	if len(k) != 4 {
		return 0, fmt.Errorf("identity number %x is not 4 bytes", k)
	}
	id := ID(binary.BigEndian.Uint32(k))
	if !id.IsLabel() {
		return 0, fmt.Errorf("identity %d is outside the label range %d-%d", id, MinLabel, MaxLabel)
	}
	return id, nil
}
