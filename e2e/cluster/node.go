package cluster

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// The node is a mount and a network namespace of its own, held open by one
// process (the holder) that every daemon enters with nsenter:
//
//   - network: pods' veths and routes, the kubelet's KUBE-* iptables chains,
//     per-namespace sysctls and conntrack never touch the host's, and two
//     clusters (or a cluster and the netns-based e2e tests on 10.13.0.0/24)
//     never meet. The host reaches the node over one veth pair.
//   - mount: /etc, /opt, /var/lib and /var/log are overlays whose writes go
//     to the run directory, /run is a fresh tmpfs and /sys/fs/bpf a fresh
//     bpffs, so the DaemonSet's hostPath volumes (/opt/cni/bin,
//     /etc/cni/net.d, /var/lib/idcni, /run/idcni, /var/lib/cni, the bpffs),
//     containerd's /run/netns and the kubelet's /var/log/pods are the
//     node's own while the manifests keep their real paths.
//
// When the last process in them exits the kernel frees both namespaces, and
// with them every mount, pin, link, route and chain: teardown only has to
// kill the cluster's cgroup.

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

// command returns a command that runs argv inside the cluster's cgroup; with
// node set, inside the node's namespaces too.
func (c *Cluster) command(node bool, argv ...string) (*exec.Cmd, error) {
	procs, err := cgroupProcFiles(c.Cgroup)
	if err != nil {
		return nil, err
	}
	args := []string{"-c", launcher, "sh", strconv.Itoa(len(procs))}
	args = append(args, procs...)
	if node {
		args = append(args, c.bins.nsenter, "--target", strconv.Itoa(c.Holder.PID), "--mount", "--net", "--")
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

// nodeRun runs argv in the node's namespaces (not in its cgroup: it is a
// short-lived tool, not part of the cluster) and returns its output.
func (c *Cluster) nodeRun(argv ...string) ([]byte, error) {
	args := append([]string{"--target", strconv.Itoa(c.Holder.PID), "--mount", "--net", "--"}, argv...)
	cmd := exec.Command(c.bins.nsenter, args...)
	cmd.Env = []string{"PATH=" + nodePath(), "HOME=/root", "LANG=C.UTF-8"}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("on the node: %s: %w\n%s", strings.Join(argv, " "), err, tail(out, 20))
	}
	return out, nil
}

// NodeExec runs argv in the node's mount and network namespaces, as a
// program on the node's host would run (endpointctl on the host, ip, bpftool).
func (c *Cluster) NodeExec(argv ...string) ([]byte, error) { return c.nodeRun(argv...) }

// startHolder starts the process that creates and holds the node's
// namespaces, and waits until it has.
func (c *Cluster) startHolder() error {
	unshare, err := lookPath("unshare")
	if err != nil {
		return err
	}
	// unshare sets / (and so every copy of the host's mounts) private
	// recursively before it execs: nothing mounted on the node propagates
	// to the host.
	cmd, err := c.command(false, unshare, "--mount", "--net", "--propagation", "private", "--", "sleep", "infinity")
	if err != nil {
		return err
	}
	logf, err := os.Create(filepath.Join(c.Dir, "logs", "holder.log"))
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start the namespace holder: %w", err)
	}
	c.track("holder", cmd)
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
		if err1 == nil && err2 == nil && netIno != myNet && mntIno != myMnt && strings.TrimSpace(string(comm)) == "sleep" {
			c.NetNS, c.MntNS = netIno, mntIno
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the namespace holder did not unshare within 10s: %s", tailFile(logf.Name(), 10))
		}
		time.Sleep(5 * time.Millisecond)
	}
	if c.Holder, err = procOf(cmd.Process.Pid); err != nil {
		return err
	}
	return c.save()
}

// pickAddresses chooses the /30 of the host-node link: 198.19.200.0 to
// 198.19.254.255, in the benchmarking range (RFC 2544) that no real network
// uses, avoiding addresses the host has and those of other clusters. Called
// under the global lock.
func pickAddresses(others []*State) (host, node netip.Addr, err error) {
	used := map[netip.Prefix]bool{}
	for _, o := range others {
		if o.HostIP.IsValid() {
			used[netip.PrefixFrom(o.HostIP, 30).Masked()] = true
		}
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return host, node, err
	}
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(ipn.IP.To4()); ok {
				used[netip.PrefixFrom(ip, 30).Masked()] = true
			}
		}
	}
	for range 1000 {
		b := [4]byte{198, 19, byte(200 + rand.IntN(55)), byte(rand.IntN(64) * 4)}
		p := netip.PrefixFrom(netip.AddrFrom4(b), 30)
		if used[p] {
			continue
		}
		h := p.Addr().Next()
		return h, h.Next(), nil
	}
	return host, node, fmt.Errorf("no free /30 in 198.19.200.0-198.19.254.255")
}

// vethName is the host end's name: short (15 bytes at most) and the same
// for a given cluster name, so a teardown can find it from the name alone.
func vethName(cluster string) string {
	h := sha256.Sum256([]byte(cluster))
	return "idcc-" + hex.EncodeToString(h[:5])
}

// setupNetwork links the host and the node: a veth pair with a /30, the
// node's end named eth0. The node gets no default route: its pods talk to
// each other and the node, never to the host's networks.
func (c *Cluster) setupNetwork() error {
	ip, err := lookPath("ip")
	if err != nil {
		return err
	}
	run := func(args ...string) error {
		if out, err := exec.Command(ip, args...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
		}
		return nil
	}
	hv := c.HostVeth
	if err := run("link", "add", hv, "type", "veth", "peer", "name", "eth0", "netns", strconv.Itoa(c.Holder.PID)); err != nil {
		return err
	}
	// IPv6 would only add router solicitations and DAD to the host's link.
	_ = os.WriteFile("/proc/sys/net/ipv6/conf/"+hv+"/disable_ipv6", []byte("1"), 0o644)
	for _, args := range [][]string{
		{"link", "set", hv, "alias", "idcni-cluster/" + c.Name},
		{"addr", "add", c.HostIP.String() + "/30", "dev", hv},
		{"link", "set", hv, "up"},
	} {
		if err := run(args...); err != nil {
			return err
		}
	}
	for _, args := range [][]string{
		{ip, "link", "set", "lo", "up"},
		{ip, "addr", "add", c.NodeIP.String() + "/30", "dev", "eth0"},
		{ip, "link", "set", "eth0", "up"},
	} {
		if _, err := c.nodeRun(args...); err != nil {
			return err
		}
	}
	return nil
}

// setupMounts builds the node's file system view (see the top of this
// file) in one shell run inside its mount namespace.
func (c *Cluster) setupMounts() error {
	if strings.ContainsAny(c.Dir, ",:= \t\n'\"\\") {
		return fmt.Errorf("run directory %q: overlay options cannot hold it", c.Dir)
	}
	mounts, err := readMountinfo(fmt.Sprintf("/proc/%d/mountinfo", c.Holder.PID))
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
	fmt.Fprintf(&s, "mount -t tmpfs -o mode=0700,size=1g tmpfs %s\n", q(filepath.Join(c.Dir, "etcd")))
	for _, d := range overlaid {
		n := strings.ReplaceAll(strings.TrimPrefix(d, "/"), "/", "-")
		up, work := filepath.Join(c.Dir, "overlay", n, "upper"), filepath.Join(c.Dir, "overlay", n, "work")
		fmt.Fprintf(&s, "mkdir -p %s %s\n", q(up), q(work))
		fmt.Fprintf(&s, "mount -t overlay overlay -o %s %s\n", q("lowerdir="+d+",upperdir="+up+",workdir="+work), q(d))
	}
	for _, nd := range nodeDirs {
		src := filepath.Join(c.Dir, "node", nd.sub)
		// An existing host directory shows through the overlay with the
		// host's content (stale IPAM leases, say): the bind mount hides it.
		fmt.Fprintf(&s, "mkdir -p %s %s\nmount --bind %s %s\n", q(src), q(nd.path), q(src), q(nd.path))
	}
	if _, err := c.nodeRun("/bin/sh", "-c", s.String()); err != nil {
		return fmt.Errorf("set up the node's mounts: %w", err)
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
