package cluster

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// flushConntrack deletes the host's connection tracking entries to and from
// the node link's /30. A connection still open when the node's namespace
// went away (an API client of the process that tore it down) can never
// send its FIN (the route went with the link), and its ESTABLISHED entry
// would stay for days.
func flushConntrack(p netip.Prefix) error {
	if !p.IsValid() {
		return nil
	}
	if _, err := os.Stat("/proc/sys/net/netfilter/nf_conntrack_count"); err != nil {
		return nil // no connection tracking on the host: nothing to flush
	}
	ipn := &net.IPNet{IP: p.Masked().Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 32)}
	var filters []netlink.CustomConntrackFilter
	for _, tp := range []netlink.ConntrackFilterType{netlink.ConntrackOrigSrcIP, netlink.ConntrackOrigDstIP} {
		f := &netlink.ConntrackFilter{}
		if err := f.AddIPNet(tp, ipn); err != nil {
			return err
		}
		filters = append(filters, f)
	}
	var err error
	for range 5 {
		// Other tests change the table; an interrupted dump is retried.
		if _, err = netlink.ConntrackDeleteFilters(netlink.ConntrackTable, unix.AF_INET, filters...); !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("flush conntrack entries of %s: %w", p, err)
	}
	return nil
}

// conntrackEntries counts the host's connection tracking entries that
// mention addr.
func conntrackEntries(addr netip.Addr) int {
	b, err := os.ReadFile("/proc/net/nf_conntrack")
	if err != nil {
		return 0
	}
	n := 0
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "src="+addr.String()+" ") || strings.Contains(l, "dst="+addr.String()+" ") {
			n++
		}
	}
	return n
}

// waitLinkGone waits for the host's end of the node link to disappear with
// the node's network namespace, then deletes it if it has not.
func waitLinkGone(name string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if _, err := net.InterfaceByName(name); err != nil {
			return nil
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	ip, err := lookPath("ip")
	if err != nil {
		return err
	}
	if out, err := exec.Command(ip, "link", "del", name).CombinedOutput(); err != nil {
		if _, gone := net.InterfaceByName(name); gone != nil {
			return nil
		}
		return fmt.Errorf("ip link del %s: %w: %s", name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Leftovers lists what of the cluster s is still on the host: processes in
// its cgroup or in any of its namespaces (every node's, the switch's, the
// router's), its cgroup directories, its link, connection tracking entries
// of its addresses, its run directory, mounts under it, and,
// when no other cluster runs, kernel tunables that differ from want (the
// values before the first Up).
func Leftovers(s *State, want map[string]string) []string {
	var out []string
	add := func(format string, a ...any) { out = append(out, fmt.Sprintf(format, a...)) }
	if pids, err := cgroupPIDs(s.Cgroup); err != nil {
		add("list cgroup %s: %v", s.Cgroup, err)
	} else if len(pids) > 0 {
		add("processes in cgroup %s: %v", s.Cgroup, pids)
	}
	for _, d := range CgroupDirs(s.Cgroup) {
		add("cgroup %s", d)
	}
	type namespace struct {
		what, kind string
		ino        uint64
	}
	nss := []namespace{{"the first node's", "net", s.NetNS}, {"the first node's", "mnt", s.MntNS},
		{"the switch's", "net", s.Switch.NetNS}, {"the router's", "net", s.Router.NetNS}}
	addrs := []netip.Addr{s.NodeIP, s.HostIP, s.RouterIP, s.RouterFarIP}
	for _, n := range s.Nodes {
		nss = append(nss, namespace{"node " + n.Name + "'s", "net", n.NetNS}, namespace{"node " + n.Name + "'s", "mnt", n.MntNS})
		addrs = append(addrs, n.IP)
	}
	seenNS := map[uint64]bool{}
	for _, ns := range nss {
		if ns.ino == 0 || seenNS[ns.ino] {
			continue
		}
		seenNS[ns.ino] = true
		if pids := ProcessesInNamespace(ns.kind, ns.ino); len(pids) > 0 {
			add("processes in %s %s namespace (inode %d): %v", ns.what, ns.kind, ns.ino, pids)
		}
	}
	if _, err := net.InterfaceByName(s.HostVeth); err == nil {
		add("link %s", s.HostVeth)
	}
	seenAddr := map[netip.Addr]bool{}
	for _, a := range addrs {
		if !a.IsValid() || seenAddr[a] {
			continue
		}
		seenAddr[a] = true
		if n := conntrackEntries(a); n > 0 {
			add("%d conntrack entries of %s", n, a)
		}
	}
	if _, err := os.Stat(s.Dir); err == nil {
		add("run directory %s", s.Dir)
	} else if !errors.Is(err, os.ErrNotExist) {
		add("run directory %s: %v", s.Dir, err)
	}
	if mounts, err := readMountinfo("/proc/self/mountinfo"); err == nil {
		for _, m := range mounts {
			if strings.HasPrefix(m.point, s.Dir+"/") || m.point == s.Dir {
				add("mount %s (%s)", m.point, m.fstype)
			}
		}
	}
	if want != nil {
		others, _ := List()
		live := false
		for _, o := range others {
			live = live || o.Name != s.Name && !o.stale()
		}
		if !live {
			got, err := ReadSysctls()
			if err != nil {
				add("read sysctls: %v", err)
			}
			for k, v := range want {
				if got[k] != v {
					add("sysctl %s = %s, was %s", strings.ReplaceAll(k, "/", "."), got[k], v)
				}
			}
		}
	}
	return out
}
