package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Record is what the plugin remembers about one attachment (container ID +
// interface name) between ADD and DEL. ADD writes it before it allocates
// anything and updates it as it goes, so that even a plugin killed halfway
// leaves DEL and GC enough to find everything it made.
type Record struct {
	Network     string       `json:"network"`
	ContainerID string       `json:"containerID"`
	IfName      string       `json:"ifName"`
	Netns       string       `json:"netns,omitempty"`
	HostIfName  string       `json:"hostIfName"`
	HostIfIndex int          `json:"hostIfIndex,omitempty"`
	Addresses   []netip.Addr `json:"addresses,omitempty"`
	// PodNamespace and PodName are the pod of CNI_ARGS (K8S_POD_*), when
	// the runtime passed them: the agent rebuilds its endpoint registry
	// from the records when its state file is lost.
	PodNamespace string `json:"podNamespace,omitempty"`
	PodName      string `json:"podName,omitempty"`
	// Complete is set once ADD returned success; a record without it is
	// the trace of an ADD that failed or died.
	Complete bool `json:"complete,omitempty"`
}

// recordStore is the per-network directory of records.
type recordStore struct {
	dir  string
	lock *os.File
}

// openRecords opens (creating it) the record directory of a network and
// takes its lock: shared for ADD, DEL and CHECK, which only touch their own
// attachment, exclusive for GC, which must not judge an attachment stale
// while its ADD is still running.
func openRecords(dataDir, network string, exclusive bool) (*recordStore, error) {
	dir := filepath.Join(dataDir, network)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create record directory %s: %w", dir, err)
	}
	f, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open lock of record directory %s: %w", dir, err)
	}
	how := unix.LOCK_SH
	if exclusive {
		how = unix.LOCK_EX
	}
	for {
		err = unix.Flock(int(f.Fd()), how)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("lock record directory %s: %w", dir, err)
	}
	return &recordStore{dir: dir, lock: f}, nil
}

// Close releases the lock.
func (s *recordStore) Close() error {
	return s.lock.Close()
}

// path names the record file. Neither a container ID nor an interface name
// may contain ':', so the name is unambiguous.
func (s *recordStore) path(containerID, ifName string) string {
	return filepath.Join(s.dir, containerID+":"+ifName+".json")
}

// Get returns the record of an attachment, or nil when there is none.
func (s *recordStore) Get(containerID, ifName string) (*Record, error) {
	b, err := os.ReadFile(s.path(containerID, ifName))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read record: %w", err)
	}
	r := &Record{}
	if err := json.Unmarshal(b, r); err != nil {
		return nil, fmt.Errorf("record %s is corrupt (%v); remove it and delete the container's links by hand", s.path(containerID, ifName), err)
	}
	return r, nil
}

// Put writes a record atomically, so a crash leaves the old or the new one.
func (s *recordStore) Put(r *Record) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	final := s.path(r.ContainerID, r.IfName)
	tmp, err := os.CreateTemp(s.dir, ".tmp-*")
	if err != nil {
		return fmt.Errorf("write record: %w", err)
	}
	_, werr := tmp.Write(append(b, '\n'))
	cerr := tmp.Close()
	if err := errors.Join(werr, cerr); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("write record %s: %w", final, err)
	}
	if err := os.Rename(tmp.Name(), final); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("write record %s: %w", final, err)
	}
	return nil
}

// Delete removes a record; a missing one is not an error.
func (s *recordStore) Delete(containerID, ifName string) error {
	err := os.Remove(s.path(containerID, ifName))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove record: %w", err)
	}
	return nil
}

// List returns every record of the network. Unreadable records are
// reported, not skipped, so GC never forgets an attachment silently.
func (s *recordStore) List() ([]*Record, error) {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("list records: %w", err)
	}
	var out []*Record
	var errs []error
	for _, e := range entries {
		name := e.Name()
		if !strings.HasSuffix(name, ".json") || strings.HasPrefix(name, ".") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(s.dir, name))
		if err != nil {
			errs = append(errs, fmt.Errorf("read record %s: %w", name, err))
			continue
		}
		r := &Record{}
		if err := json.Unmarshal(b, r); err != nil {
			errs = append(errs, fmt.Errorf("record %s is corrupt: %w", filepath.Join(s.dir, name), err))
			continue
		}
		out = append(out, r)
	}
	return out, errors.Join(errs...)
}

// ReadRecords returns the records of a network in dataDir (see
// NetConf.DataDir) for a reader outside the plugin: the agent, rebuilding
// its endpoint registry. It takes no lock (records are replaced by rename,
// so each one read is whole) and creates nothing: a missing directory is
// no records. Unreadable records are reported beside the readable ones.
func ReadRecords(dataDir, network string) ([]*Record, error) {
	s := &recordStore{dir: filepath.Join(dataDir, network)}
	recs, err := s.List()
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	return recs, err
}

// ParseLinkAlias reads the alias the plugin gives every host veth (see
// linkAlias): the network, container ID and interface name of the
// attachment that owns the link. ok is false for any other alias.
// Network names cannot contain '/' (libcni refuses them), so the alias
// is unambiguous.
func ParseLinkAlias(alias string) (network, containerID, ifName string, ok bool) {
	rest, ok := strings.CutPrefix(alias, aliasPrefix)
	if !ok {
		return "", "", "", false
	}
	network, _, ok = strings.Cut(rest, "/")
	if !ok || network == "" {
		return "", "", "", false
	}
	containerID, ifName, ok = parseLinkAlias(network, alias)
	if !ok {
		return "", "", "", false
	}
	return network, containerID, ifName, true
}
