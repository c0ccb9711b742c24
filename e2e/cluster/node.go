package cluster

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Each node is a mount and a network namespace of its own, held open by one
// process (the holder) that every daemon of the node enters with nsenter:
//
//   - network: pods' veths and routes, the kubelet's KUBE-* iptables chains,
//     per-namespace sysctls and conntrack never touch the host's nor another
//     node's, and two clusters (or a cluster and the netns-based e2e tests
//     on 10.13.0.0/24) never meet. The nodes and the host meet on a bridge
//     in the switch's namespace (nodes.go).
//   - mount: /etc, /opt, /var/lib and /var/log are overlays whose writes go
//     to the node's run directory, /run is a fresh tmpfs and /sys/fs/bpf a fresh
//     bpffs, so the DaemonSet's hostPath volumes (/opt/cni/bin,
//     /etc/cni/net.d, /var/lib/idcni, /run/idcni, /var/lib/cni, the bpffs),
//     containerd's /run/netns and the kubelet's /var/log/pods are the
//     node's own while the manifests keep their real paths.
//
// When the last process in them exits the kernel frees both namespaces, and
// with them every mount, pin, link, route and chain: removing a node only
// has to kill its cgroup, and teardown the cluster's, which holds every
// node's, the control plane, the switch and the router.

// nodeDirs are the node's directories that are bind mounts of run directory
// subdirectories, so the host can read (and the harness write) them: the
// CNI plugins, the CNI configuration the agent writes and the bench
// replaces, the agent's state and socket, and the plugin records.
var nodeDirs = []struct{ sub, path string }{
	{"cni-bin", "/opt/cni/bin"},
	{"cni-conf", "/etc/cni/net.d"},
	{"cni-data", "/var/lib/cni"},
	{"idcni-state", "/var/lib/idcni"},
	{"idcni-run", "/run/idcni"},
}

// overlaid are the host directories the node sees through an overlay.
var overlaid = []string{"/etc", "/opt", "/var/lib", "/var/log"}

// launcher joins the cgroup.procs files given first (count, then paths)
// and execs the rest: a daemon is in the cluster's cgroup from its first
// instruction, and so is everything it forks.
const launcher = `n=$1; shift
while [ "$n" -gt 0 ]; do echo $$ >"$1" || exit 111; shift; n=$((n-1)); done
exec "$@"`

// command returns a command that runs argv inside cgroup cg (relative to
// every hierarchy's root); with ns (nsenter's target and namespace flags,
// see nsArgs) inside those namespaces too.
func (c *Cluster) command(cg string, ns []string, argv ...string) (*exec.Cmd, error) {
	procs, err := cgroupProcFiles(cg)
	if err != nil {
		return nil, err
	}
	args := []string{"-c", launcher, "sh", strconv.Itoa(len(procs))}
	args = append(args, procs...)
	if ns != nil {
		args = append(append(append(args, c.bins.nsenter), ns...), "--")
	}
	args = append(args, argv...)
	cmd := exec.Command("/bin/sh", args...)
	cmd.Env = []string{"PATH=" + nodePath(), "HOME=/root", "LANG=C.UTF-8"}
	// A session of its own: a terminal's or `timeout`'s signal to the
	// caller's process group does not reach the daemons. Unless the cluster
	// must outlive its creator, the daemons die with it (a test binary
	// killed by -timeout runs no cleanup); the next Up removes the rest.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if !c.persistent {
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	}
	return cmd, nil
}

// nsArgs are nsenter's arguments for the namespaces held by pid: the
// network one, and with mount the mount one too.
func nsArgs(pid int, mount bool) []string {
	args := []string{"--target", strconv.Itoa(pid), "--net"}
	if mount {
		args = append(args, "--mount")
	}
	return args
}

// runIn runs argv in the namespaces held by pid (see nsArgs), not in the
// cluster's cgroup: it is a short-lived tool, not part of the cluster.
func (c *Cluster) runIn(pid int, mount bool, argv ...string) ([]byte, error) {
	args := append(append(nsArgs(pid, mount), "--"), argv...)
	cmd := exec.Command(c.bins.nsenter, args...)
	cmd.Env = []string{"PATH=" + nodePath(), "HOME=/root", "LANG=C.UTF-8"}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("in the namespaces of %d: %s: %w\n%s", pid, strings.Join(argv, " "), err, tail(out, 20))
	}
	return out, nil
}

// NodeExec runs argv on the first node (the control plane's, see Node.Exec).
func (c *Cluster) NodeExec(argv ...string) ([]byte, error) {
	if len(c.Nodes) == 0 {
		return nil, errors.New("the cluster has no node")
	}
	return c.Nodes[0].Exec(argv...)
}

// startHolder starts, in cgroup cg, a process that creates and holds a new
// network namespace (and with mount a mount namespace), and waits until it
// has; it returns the holder and the namespaces' inode numbers.
func (c *Cluster) startHolder(cg, name string, mount bool) (holder Proc, netIno, mntIno uint64, err error) {
	unshare, err := lookPath("unshare")
	if err != nil {
		return holder, 0, 0, err
	}
	argv := []string{unshare, "--net"}
	if mount {
		// unshare sets / (and so every copy of the host's mounts) private
		// recursively before it execs: nothing mounted on the node
		// propagates to the host.
		argv = append(argv, "--mount", "--propagation", "private")
	}
	cmd, err := c.command(cg, nil, append(argv, "--", "sleep", "infinity")...)
	if err != nil {
		return holder, 0, 0, err
	}
	logf, err := os.Create(filepath.Join(c.Dir, "logs", name+".log"))
	if err != nil {
		return holder, 0, 0, err
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return holder, 0, 0, fmt.Errorf("start the namespace holder %s: %w", name, err)
	}
	c.track(name, cg, cmd)
	myNet, _ := nsInode(0, "net")
	myMnt, _ := nsInode(0, "mnt")
	deadline := time.Now().Add(10 * time.Second)
	for {
		// The holder's pid is the shell's, which execs unshare, which
		// unshares, then execs sleep: the namespaces differ from ours once
		// it is done.
		netIno, err1 := nsInode(cmd.Process.Pid, "net")
		mntIno, err2 := nsInode(cmd.Process.Pid, "mnt")
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", cmd.Process.Pid))
		if err1 == nil && err2 == nil && netIno != myNet && (!mount || mntIno != myMnt) && strings.TrimSpace(string(comm)) == "sleep" {
			if !mount {
				mntIno = 0
			}
			holder, err = procOf(cmd.Process.Pid)
			return holder, netIno, mntIno, err
		}
		if time.Now().After(deadline) {
			return holder, 0, 0, fmt.Errorf("the namespace holder %s did not unshare within 10s: %s", name, tailFile(logf.Name(), 10))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// setupMounts builds the node's file system view (see the top of this
// file) in one shell run inside its mount namespace.
func (c *Cluster) setupMounts(n *Node, etcd bool) error {
	if strings.ContainsAny(c.Dir, ",:= \t\n'\"\\") {
		return fmt.Errorf("run directory %q: overlay options cannot hold it", c.Dir)
	}
	mounts, err := readMountinfo(fmt.Sprintf("/proc/%d/mountinfo", n.Holder.PID))
	if err != nil {
		return err
	}
	// The holder's copy of the host's mounts includes other tests' netns
	// bind mounts and container root file systems: holding them would keep
	// those namespaces and overlays alive after their owners removed them.
	// Only the system mounts stay.
	var detach []string
	for _, m := range mounts {
		if keepMount(m.point) {
			continue
		}
		detach = append(detach, m.point)
	}
	sort.Slice(detach, func(i, j int) bool { return len(detach[i]) > len(detach[j]) })

	q := shellQuote
	var s strings.Builder
	s.WriteString("set -eu\n")
	for _, d := range detach {
		// Lazily, and tolerating those gone with a parent detached first.
		fmt.Fprintf(&s, "umount -l %s 2>/dev/null || :\n", q(d))
	}
	s.WriteString("mount -t bpf bpf /sys/fs/bpf\n")
	s.WriteString("mount -t tmpfs -o mode=0755,size=256m tmpfs /run\n")
	// etcd in memory: its fsyncs on a disk shared with every other test
	// would dominate pod start-up, and the node's state dies with it anyway.
	if etcd {
		fmt.Fprintf(&s, "mount -t tmpfs -o mode=0700,size=1g tmpfs %s\n", q(filepath.Join(c.Dir, "etcd")))
	}
	for _, d := range overlaid {
		o := strings.ReplaceAll(strings.TrimPrefix(d, "/"), "/", "-")
		up, work := filepath.Join(n.dir(), "overlay", o, "upper"), filepath.Join(n.dir(), "overlay", o, "work")
		fmt.Fprintf(&s, "mkdir -p %s %s\n", q(up), q(work))
		fmt.Fprintf(&s, "mount -t overlay overlay -o %s %s\n", q("lowerdir="+d+",upperdir="+up+",workdir="+work), q(d))
	}
	for _, nd := range nodeDirs {
		src := filepath.Join(n.dir(), "node", nd.sub)
		// An existing host directory shows through the overlay with the
		// host's content (stale IPAM leases, say): the bind mount hides it.
		fmt.Fprintf(&s, "mkdir -p %s %s\nmount --bind %s %s\n", q(src), q(nd.path), q(src), q(nd.path))
	}
	if _, err := n.Exec("/bin/sh", "-c", s.String()); err != nil {
		return fmt.Errorf("set up the mounts of node %s: %w", n.Name, err)
	}
	return nil
}

// keepMount tells which of the host's mounts the node keeps: the root and
// the kernel's pseudo file systems, except the host's bpffs, replaced by
// the node's own.
func keepMount(p string) bool {
	under := func(root string) bool { return p == root || strings.HasPrefix(p, root+"/") }
	switch {
	case p == "/":
		return true
	case under("/sys/fs/bpf"):
		return false
	case under("/proc"), under("/sys"), under("/dev"):
		return true
	}
	return false
}

// shellQuote quotes s for sh.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// tailFile returns the last n lines of a file, or why it cannot.
func tailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(no %s: %v)", path, err)
	}
	if len(b) > 64<<10 {
		b = b[len(b)-64<<10:]
	}
	return tail(b, n)
}

// randomSuffix returns 8 random hex digits, for unique names.
func randomSuffix() string {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], rand.Uint32())
	return hex.EncodeToString(b[:])
}
