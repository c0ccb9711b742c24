package cluster

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// kubeletSysctls are the host-wide kernel settings the kubelet rewrites at
// start (its container manager's "kernel tunables"). They are not
// namespaced, so the node's namespaces do not contain them: the first
// cluster saves them and the last one down puts them back.
var kubeletSysctls = []string{
	"kernel/panic",
	"kernel/panic_on_oops",
	"vm/overcommit_memory",
	"vm/panic_on_oom",
	"kernel/keys/root_maxkeys",
	"kernel/keys/root_maxbytes",
}

func sysctlFile() string { return filepath.Join(BaseDir(), "sysctl.json") }

// ReadSysctls returns the current values of kubeletSysctls.
func ReadSysctls() (map[string]string, error) {
	out := map[string]string{}
	for _, k := range kubeletSysctls {
		b, err := os.ReadFile("/proc/sys/" + k)
		if err != nil {
			return nil, err
		}
		out[k] = strings.TrimSpace(string(b))
	}
	return out, nil
}

// saveSysctls records the host's values unless a record exists: then an
// earlier cluster is running, or died before restoring them, and either
// way the record holds the host's own values while the kernel may not.
func saveSysctls() error {
	if _, err := os.Stat(sysctlFile()); err == nil {
		return nil
	}
	v, err := ReadSysctls()
	if err != nil {
		return err
	}
	b, _ := json.MarshalIndent(v, "", "  ")
	return os.WriteFile(sysctlFile(), append(b, '\n'), 0o600)
}

// SavedSysctls returns the values recorded for restoring, if any.
func SavedSysctls() (map[string]string, error) {
	b, err := os.ReadFile(sysctlFile())
	if err != nil {
		return nil, err
	}
	v := map[string]string{}
	return v, json.Unmarshal(b, &v)
}

func restoreSysctls() error {
	v, err := SavedSysctls()
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for k, val := range v {
		if err := os.WriteFile("/proc/sys/"+k, []byte(val), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("restore %s: %w", k, err))
		}
	}
	if len(errs) == 0 {
		errs = append(errs, os.Remove(sysctlFile()))
	}
	return errors.Join(errs...)
}

// hierarchy is one mounted cgroup hierarchy.
type hierarchy struct {
	root   string // mount point
	v2     bool
	cpuset bool // v1 cpuset: a new group has no CPUs until given some
	frz    bool // v1 freezer
}

// hierarchies lists the cgroup hierarchies mounted on the host, v1 and v2
// alike (this machine class runs the hybrid layout: v1 controllers plus an
// empty v2 tree at /sys/fs/cgroup/unified).
func hierarchies() ([]hierarchy, error) {
	mounts, err := readMountinfo("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	var out []hierarchy
	seen := map[string]bool{}
	for _, m := range mounts {
		if m.fstype != "cgroup" && m.fstype != "cgroup2" || seen[m.point] {
			continue
		}
		seen[m.point] = true
		h := hierarchy{root: m.point, v2: m.fstype == "cgroup2"}
		for _, o := range strings.Split(m.superOpts, ",") {
			h.cpuset = h.cpuset || o == "cpuset"
			h.frz = h.frz || o == "freezer"
		}
		out = append(out, h)
	}
	if len(out) == 0 {
		return nil, errors.New("no cgroup hierarchy mounted")
	}
	return out, nil
}

// createCgroups makes <cg> and <cg>/daemons in every hierarchy: for the
// cluster (the control plane, the switch and the router join its daemons
// group) and for each node, whose kubelet puts its pods under <cg> (its
// cgroupRoot). Every daemon joins a daemons group before it execs, so the
// shims it forks land there too.
func createCgroups(cg string) error {
	hs, err := hierarchies()
	if err != nil {
		return err
	}
	for _, h := range hs {
		for _, rel := range []string{cg, cg + "/daemons"} {
			dir := filepath.Join(h.root, rel)
			if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
				return err
			}
			if h.cpuset {
				// A v1 cpuset group takes no task until it has CPUs and
				// memory nodes: give it its parent's.
				for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
					b, err := os.ReadFile(filepath.Join(filepath.Dir(dir), f))
					if err != nil {
						return err
					}
					if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
						return fmt.Errorf("%s: %w", filepath.Join(dir, f), err)
					}
				}
			}
			if h.v2 && rel == cg {
				// On a pure v2 host the kubelet needs the controllers
				// enabled below its root; the hybrid layout's v2 tree has
				// none to enable.
				if b, err := os.ReadFile(filepath.Join(dir, "cgroup.controllers")); err == nil {
					var enable []string
					for _, c := range strings.Fields(string(b)) {
						enable = append(enable, "+"+c)
					}
					if len(enable) > 0 {
						_ = os.WriteFile(filepath.Join(dir, "cgroup.subtree_control"), []byte(strings.Join(enable, " ")), 0o644)
					}
				}
			}
		}
	}
	return nil
}

// cgroupProcFiles are the cgroup.procs files of cg (a daemons group of the
// cluster or of a node) a daemon writes its pid to before it execs.
func cgroupProcFiles(cg string) ([]string, error) {
	hs, err := hierarchies()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, h := range hs {
		out = append(out, filepath.Join(h.root, cg, "cgroup.procs"))
	}
	return out, nil
}

// cgroupPIDs lists every process in the tree of cg, in any hierarchy.
func cgroupPIDs(cg string) ([]int, error) {
	hs, err := hierarchies()
	if err != nil {
		return nil, err
	}
	seen := map[int]bool{}
	var out []int
	for _, h := range hs {
		root := filepath.Join(h.root, cg)
		err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return nil
				}
				return err
			}
			if d.IsDir() || d.Name() != "cgroup.procs" {
				return nil
			}
			b, err := os.ReadFile(p)
			if err != nil {
				return nil // the group went away under us
			}
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil && !seen[pid] {
					seen[pid] = true
					out = append(out, pid)
				}
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	return out, nil
}

// killCgroup kills every process under cg and removes the tree from every
// hierarchy. The tree is frozen first, so nothing forks between the listing
// and the kill (containerd restarting a container, a shim spawning runc).
func killCgroup(cg string, timeout time.Duration) error {
	hs, err := hierarchies()
	if err != nil {
		return err
	}
	setFreeze := func(on bool) {
		for _, h := range hs {
			dir := filepath.Join(h.root, cg)
			switch {
			case h.frz:
				state := "THAWED"
				if on {
					state = "FROZEN"
				}
				_ = os.WriteFile(filepath.Join(dir, "freezer.state"), []byte(state), 0o644)
			case h.v2:
				v := "0"
				if on {
					v = "1"
				}
				_ = os.WriteFile(filepath.Join(dir, "cgroup.freeze"), []byte(v), 0o644)
			}
		}
	}
	deadline := time.Now().Add(timeout)
	for {
		pids, err := cgroupPIDs(cg)
		if err != nil {
			return err
		}
		if len(pids) == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes of cgroup %s still alive after %s: %v", cg, timeout, pids)
		}
		setFreeze(true)
		pids, _ = cgroupPIDs(cg)
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		// Frozen tasks take their SIGKILL when thawed.
		setFreeze(false)
		time.Sleep(50 * time.Millisecond)
	}
	// Deepest first; a group whose last task just died can refuse rmdir
	// (EBUSY) for a moment.
	for _, h := range hs {
		root := filepath.Join(h.root, cg)
		var dirs []string
		_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		sort.Slice(dirs, func(i, j int) bool { return len(dirs[i]) > len(dirs[j]) })
		for _, d := range dirs {
			for {
				err := syscall.Rmdir(d)
				if err == nil || errors.Is(err, syscall.ENOENT) {
					break
				}
				if time.Now().After(deadline) {
					return fmt.Errorf("remove cgroup %s: %w", d, err)
				}
				time.Sleep(50 * time.Millisecond)
			}
		}
	}
	return nil
}

// CgroupDirs lists the directories of cg that exist, in any hierarchy.
func CgroupDirs(cg string) []string {
	hs, _ := hierarchies()
	var out []string
	for _, h := range hs {
		if st, err := os.Stat(filepath.Join(h.root, cg)); err == nil && st.IsDir() {
			out = append(out, filepath.Join(h.root, cg))
		}
	}
	return out
}

// mount is one line of a mountinfo file.
type mount struct {
	point, fstype, source, superOpts string
}

func readMountinfo(path string) ([]mount, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []mount
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// id parent major:minor root point options [optional...] - type source superopts
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, f := range fields {
			if f == "-" && i >= 6 {
				sep = i
				break
			}
		}
		if sep < 0 || len(fields) < sep+4 {
			continue
		}
		out = append(out, mount{
			point:     unescapeMount(fields[4]),
			fstype:    fields[sep+1],
			source:    unescapeMount(fields[sep+2]),
			superOpts: fields[sep+3],
		})
	}
	return out, sc.Err()
}

// unescapeMount decodes the octal escapes (\040 for a space) the kernel
// writes in mountinfo paths.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// nsInode returns the inode number of a namespace of a process ("net",
// "mnt").
func nsInode(pid int, kind string) (uint64, error) {
	var st syscall.Stat_t
	p := "/proc/self/ns/" + kind
	if pid > 0 {
		p = fmt.Sprintf("/proc/%d/ns/%s", pid, kind)
	}
	if err := syscall.Stat(p, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// ProcessesInNamespace lists the processes whose namespace of kind has
// inode ino.
func ProcessesInNamespace(kind string, ino uint64) []int {
	entries, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if got, err := nsInode(pid, kind); err == nil && got == ino {
			out = append(out, pid)
		}
	}
	return out
}
