package cluster

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// State is what a cluster's teardown needs, kept in <Dir>/state.json from
// the moment the directory exists: `down` from another process (the
// cluster.sh half of `make cluster-down`), or the next Up cleaning up after
// a test binary that was killed, finds everything through it.
type State struct {
	Name string
	// Dir is the cluster's run directory, $TMPDIR/idcni-cluster/<Name>.
	Dir string
	// Owner is the process whose death makes the cluster stale (a test
	// binary); zero for a cluster meant to outlive its creator.
	Owner Proc
	// Holder is the process that holds the first node's mount and network
	// namespaces (where the control plane runs too): Nodes[0].Holder.
	Holder Proc
	// Cgroup is the cluster's cgroup, relative to every hierarchy's root:
	// every process of the cluster (daemons, shims, containers) lives
	// under it, which is how teardown finds them all.
	Cgroup string
	// HostVeth is the host's end of its link to the switch; HostIP is its
	// address on the segment. NodeIP and NodeName are the first node's.
	HostVeth       string
	HostIP, NodeIP netip.Addr
	NodeName       string
	// Topology is TopologyFlat or TopologyRouted.
	Topology string
	// Segment is the nodes' shared subnet; FarSubnet, with the routed
	// topology, the far node's, and RouterIP and RouterFarIP the router's
	// addresses on each.
	Segment, FarSubnet    netip.Prefix
	RouterIP, RouterFarIP netip.Addr
	// Switch holds the bridges of the segment and the far subnet; Router
	// routes between them (routed topology only).
	Switch, Router Netns
	// Nodes are the kubelet nodes, the control plane's first.
	Nodes []*Node
	// NextNode numbers the next node's ID: IDs are never reused within a
	// cluster, so a joining node never meets a removed one's files.
	NextNode int
	// APIServer is the URL the host reaches the apiserver at.
	APIServer string
	// Kubeconfig is an admin kubeconfig for the host (kubectl, tests).
	Kubeconfig string
	// KubectlBin is the kubectl binary matching the cluster's release.
	KubectlBin string
	// NetNS and MntNS are the inode numbers of the first node's
	// namespaces (see Node for every node's).
	NetNS, MntNS uint64
	Created      time.Time
}

// Proc names a process by pid and start time, so a recycled pid is never
// mistaken for it.
type Proc struct {
	PID   int
	Start uint64 // clock ticks since boot, field 22 of /proc/PID/stat
}

// Alive tells whether p still runs.
func (p Proc) Alive() bool {
	if p.PID <= 0 {
		return false
	}
	st, err := procStart(p.PID)
	return err == nil && st == p.Start
}

func procOf(pid int) (Proc, error) {
	st, err := procStart(pid)
	if err != nil {
		return Proc{}, err
	}
	return Proc{PID: pid, Start: st}, nil
}

func procStart(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces and parentheses; the
	// fields after its closing parenthesis are plain.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 {
		return 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	return strconv.ParseUint(f[19], 10, 64) // field 22 overall
}

// BaseDir holds every cluster's run directory, the lock that serialises
// their set-up and teardown, and the host sysctls saved while any runs.
func BaseDir() string {
	return filepath.Join(os.TempDir(), "idcni-cluster")
}

var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$`)

// checkName keeps names usable in paths, node names and link aliases.
func checkName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("cluster name %q: want 1-40 lower-case letters, digits and dashes", name)
	}
	return nil
}

func statePath(dir string) string { return filepath.Join(dir, "state.json") }

func (s *State) save() error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	tmp := statePath(s.Dir) + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, statePath(s.Dir))
}

func loadState(dir string) (*State, error) {
	b, err := os.ReadFile(statePath(dir))
	if err != nil {
		return nil, err
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("%s: %w", statePath(dir), err)
	}
	return &s, nil
}

// stale tells whether the cluster is a leftover: its owner or its namespace
// holder is gone, or its set-up never got as far as recording either.
func (s *State) stale() bool {
	switch {
	case s.Owner.PID != 0 && !s.Owner.Alive():
		return true
	case s.Holder.PID != 0 && !s.Holder.Alive():
		return true
	case s.Switch.Holder.PID != 0 && !s.Switch.Holder.Alive():
		return true
	case s.Owner.PID == 0 && s.Holder.PID == 0:
		return time.Since(s.Created) > 10*time.Minute
	}
	return false
}

// List returns the state of every cluster with a run directory, live or
// stale.
func List() ([]*State, error) {
	entries, err := os.ReadDir(BaseDir())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []*State
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		s, err := loadState(filepath.Join(BaseDir(), e.Name()))
		if err != nil {
			// A directory without a state file was never set up far enough
			// to own anything but itself.
			s = &State{Name: e.Name(), Dir: filepath.Join(BaseDir(), e.Name())}
		}
		out = append(out, s)
	}
	return out, nil
}

// globalLock serialises set-up and teardown of all clusters on the host:
// the saved sysctls, the choice of link addresses and the stale clean-up
// are shared. unlock removes the base directory when no cluster is left in
// it, the lock file last: a process that locked the file meanwhile sees it
// unlinked and locks the new one instead.
func globalLock() (unlock func(), err error) {
	path := filepath.Join(BaseDir(), ".lock")
	for {
		if err := os.MkdirAll(BaseDir(), 0o755); err != nil {
			return nil, err
		}
		f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
		if err != nil {
			return nil, err
		}
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		var held, now syscall.Stat_t
		if syscall.Fstat(int(f.Fd()), &held) == nil && syscall.Stat(path, &now) == nil && held.Ino == now.Ino {
			return func() {
				if entries, err := os.ReadDir(BaseDir()); err == nil && len(entries) == 1 && entries[0].Name() == ".lock" {
					os.Remove(path)
					os.Remove(BaseDir())
				}
				f.Close()
			}, nil
		}
		f.Close()
	}
}
