package manual

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
	"github.com/idcni/idcni/store"
)

// Buckets of the state file. The "manual/" prefix keeps them apart from
// the identity allocator's.
var (
	bucketBindings = []byte("manual/endpoints")
	bucketRules    = []byte("manual/rules")
)

// bindingRecord and ruleRecord are the on-disk forms. They spell actions,
// protocols and ports as words rather than reuse the policy types' JSON, so
// that a change to those types cannot silently change the meaning of a file
// written before it.
type bindingRecord struct {
	IP       string `json:"ip"`
	Identity uint32 `json:"identity"`
}

type ruleRecord struct {
	Action    string `json:"action"`
	Src       uint32 `json:"src"`
	Dst       uint32 `json:"dst"`
	Symmetric bool   `json:"symmetric,omitempty"`
	Proto     string `json:"proto"`
	Ports     string `json:"ports"`
}

func toRuleRecord(r policy.ManualRule) ruleRecord {
	return ruleRecord{Action: r.Action.String(), Src: uint32(r.Src), Dst: uint32(r.Dst), Symmetric: r.Symmetric, Proto: r.Proto.String(), Ports: r.Ports.String()}
}

func (rec ruleRecord) rule() (policy.ManualRule, error) {
	r := policy.ManualRule{Src: identity.ID(rec.Src), Dst: identity.ID(rec.Dst), Symmetric: rec.Symmetric}
	switch rec.Action {
	case "allow":
		r.Action = policy.Allow
	case "deny":
		r.Action = policy.Deny
	default:
		return r, fmt.Errorf("unknown action %q", rec.Action)
	}
	var err error
	if r.Proto, err = policy.ParseProto(rec.Proto); err != nil {
		return r, err
	}
	if r.Ports, err = policy.ParsePortRange(rec.Ports); err != nil {
		return r, err
	}
	return r, nil
}

// Load reads the manual state from the state file. A file with no manual
// state yet gives an empty State.
func Load(db *store.DB) (State, error) {
	var st State
	err := db.View(func(tx *bolt.Tx) error {
		var err error
		st, err = LoadTx(tx)
		return err
	})
	return st, err
}

// LoadTx reads the manual state inside a transaction of the caller's.
func LoadTx(tx *bolt.Tx) (State, error) {
	var st State
	if b := tx.Bucket(bucketBindings); b != nil {
		err := b.ForEach(func(k, v []byte) error {
			var rec bindingRecord
			if err := json.Unmarshal(v, &rec); err != nil {
				return fmt.Errorf("manual endpoint %q: %w", k, err)
			}
			ip, err := netip.ParseAddr(rec.IP)
			if err != nil {
				return fmt.Errorf("manual endpoint %q: %w", k, err)
			}
			st.Bindings = append(st.Bindings, Binding{IP: ip, Identity: identity.ID(rec.Identity)})
			return nil
		})
		if err != nil {
			return State{}, fmt.Errorf("read state bucket %s: %w", bucketBindings, err)
		}
	}
	// Keys are sequence numbers in big-endian, so ForEach returns the
	// rules in the order they were added.
	if b := tx.Bucket(bucketRules); b != nil {
		err := b.ForEach(func(k, v []byte) error {
			var rec ruleRecord
			if err := json.Unmarshal(v, &rec); err != nil {
				return fmt.Errorf("manual rule %x: %w", k, err)
			}
			r, err := rec.rule()
			if err != nil {
				return fmt.Errorf("manual rule %x: %w", k, err)
			}
			st.Rules = append(st.Rules, r)
			return nil
		})
		if err != nil {
			return State{}, fmt.Errorf("read state bucket %s: %w", bucketRules, err)
		}
	}
	st.sortBindings()
	if err := st.Validate(); err != nil {
		return State{}, fmt.Errorf("manual state in the state file is invalid: %w", err)
	}
	return st, nil
}

// Save replaces the manual state in the state file with st.
func Save(db *store.DB, st State) error {
	return db.Update(func(tx *bolt.Tx) error { return SaveTx(tx, st) })
}

// SaveTx replaces the manual state inside a transaction of the caller's.
// The state is small (people type it), so it is rewritten whole.
func SaveTx(tx *bolt.Tx, st State) error {
	if err := st.Validate(); err != nil {
		return err
	}
	for _, name := range [][]byte{bucketBindings, bucketRules} {
		if err := tx.DeleteBucket(name); err != nil && !errors.Is(err, bolterrors.ErrBucketNotFound) {
			return fmt.Errorf("clear state bucket %s: %w", name, err)
		}
	}
	bb, err := tx.CreateBucket(bucketBindings)
	if err != nil {
		return fmt.Errorf("create state bucket %s: %w", bucketBindings, err)
	}
	for _, b := range st.Bindings {
		v, err := json.Marshal(bindingRecord{IP: b.IP.String(), Identity: uint32(b.Identity)})
		if err != nil {
			return err
		}
		if err := bb.Put([]byte(b.IP.String()), v); err != nil {
			return fmt.Errorf("write manual endpoint %s: %w", b.IP, err)
		}
	}
	rb, err := tx.CreateBucket(bucketRules)
	if err != nil {
		return fmt.Errorf("create state bucket %s: %w", bucketRules, err)
	}
	for i, r := range st.Rules {
		v, err := json.Marshal(toRuleRecord(r))
		if err != nil {
			return err
		}
		k := binary.BigEndian.AppendUint64(nil, uint64(i))
		if err := rb.Put(k, v); err != nil {
			return fmt.Errorf("write manual rule %s: %w", r, err)
		}
	}
	return nil
}

// Update changes the manual state with fn, then makes both the state file
// and the datapath hold the result. fn works on a copy: when it fails, or
// the result is invalid, or writing the maps fails, the state file is left
// as it was and the maps are given the previous state back, so a failed
// command changes nothing. It returns the state before and after.
func Update(db *store.DB, d *bpf.Datapath, fn func(*State) error) (before, after State, err error) {
	applied := false
	err = db.Update(func(tx *bolt.Tx) error {
		var err error
		if before, err = LoadTx(tx); err != nil {
			return err
		}
		after = before.Clone()
		if err := fn(&after); err != nil {
			return err
		}
		if err := after.Validate(); err != nil {
			return err
		}
		if err := SaveTx(tx, after); err != nil {
			return err
		}
		if err := Apply(d, after); err != nil {
			return rollback(d, before, err)
		}
		applied = true
		return nil
	})
	if err != nil && applied {
		// The maps hold the new state but the file could not be
		// committed: put the maps back to what the file says.
		err = rollback(d, before, fmt.Errorf("save state file: %w", err))
	}
	if err != nil {
		return before, before, err
	}
	return before, after, nil
}

func rollback(d *bpf.Datapath, before State, cause error) error {
	if err := Apply(d, before); err != nil {
		return fmt.Errorf("%w; putting the previous manual state back into the datapath failed too (%v): run policyctl restore", cause, err)
	}
	return cause
}
