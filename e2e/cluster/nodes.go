package cluster

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Topologies of the nodes' network (Options.Topology).
const (
	// TopologyFlat puts every node on one L2 segment: a bridge that the
	// host is plugged into too, so it reaches the apiserver.
	TopologyFlat = "flat"
	// TopologyRouted puts the last node on a subnet of its own behind a
	// router: it shares no subnet with the others, so pod traffic between
	// them cannot go by a direct route to a node's InternalIP.
	TopologyRouted = "routed"
)

// segmentBits is the size of the shared segment and of the far subnet: a
// /27 holds the host, 28 nodes and the router.
const segmentBits = 27

// Node is one kubelet node of the cluster: a mount and a network namespace
// of its own (held by Holder), a containerd and a kubelet in its own cgroup
// under the cluster's, and its directories under <Dir>/nodes/<ID>. The
// first node also runs the control plane.
type Node struct {
	// Name is the Kubernetes Node's name (the kubelet's hostname).
	Name string
	// ID is short and unique within the cluster (n0, n1, ...): the node's
	// cgroup, run subdirectory, log file suffix and switch port.
	ID string
	// IP is the node's address on its segment, its InternalIP.
	IP netip.Addr
	// Far is set for the node behind the router (TopologyRouted).
	Far bool
	// Holder holds the node's namespaces; NetNS and MntNS are their inode
	// numbers, to check after teardown that nothing holds them.
	Holder       Proc
	NetNS, MntNS uint64

	c *Cluster
	// From makePKI: the kubelet's serving pair and kubeconfig.
	kubeletCert, kubeletKey, kubeconfig string
}

// Netns is a network namespace of the cluster's network (the switch, the
// router), held open by a process.
type Netns struct {
	Holder Proc
	NetNS  uint64
}

// Exec runs argv in the node's mount and network namespaces, as a program
// on the node's host would run (ip, bpftool, endpointctl on the host), and
// returns its combined output.
func (n *Node) Exec(argv ...string) ([]byte, error) {
	out, err := n.c.runIn(n.Holder.PID, true, argv...)
	if err != nil {
		return out, fmt.Errorf("node %s: %w", n.Name, err)
	}
	return out, nil
}

// ContainerdSocket is the node's containerd socket, as seen from the host
// (for ctr --address).
func (n *Node) ContainerdSocket() string {
	return filepath.Join(n.dir(), "containerd", "containerd.sock")
}

// Cgroup is the node's cgroup, relative to every hierarchy's root: its
// daemons, and the kubelet's pods (its cgroupRoot).
func (n *Node) Cgroup() string { return n.c.Cgroup + "/" + n.ID }

// dir is the node's run directory.
func (n *Node) dir() string { return filepath.Join(n.c.Dir, "nodes", n.ID) }

// controlPlane tells whether the node runs etcd and the control plane.
func (n *Node) controlPlane() bool { return n.ID == "n0" }

// newNode makes the record of a node with the next ID, at a free address,
// and its run directories; c.mu is held.
func (c *Cluster) newNode(far bool) (*Node, error) {
	id := "n" + strconv.Itoa(c.NextNode)
	c.NextNode++
	n := &Node{Name: fmt.Sprintf("idcni-%s-%s", c.Name, id), ID: id, Far: far, c: c}
	used := map[netip.Addr]bool{c.HostIP: true, c.RouterIP: true, c.RouterFarIP: true}
	for _, o := range c.Nodes {
		used[o.IP] = true
	}
	p := c.Segment
	if far {
		p = c.FarSubnet
	}
	for a := p.Addr().Next(); p.Contains(a); a = a.Next() {
		if !used[a] && a != lastAddr(p) {
			n.IP = a
			break
		}
	}
	if !n.IP.IsValid() {
		return nil, fmt.Errorf("no free address for node %s on %s", n.Name, p)
	}
	for _, sub := range []string{"containerd", "kubelet", "node"} {
		if err := os.MkdirAll(filepath.Join(n.dir(), sub), 0o755); err != nil {
			return nil, err
		}
	}
	return n, nil
}

// lastAddr is the broadcast address of p.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3]) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// nthAddr is the address n after p's first.
func nthAddr(p netip.Prefix, n int) netip.Addr {
	a := p.Masked().Addr()
	for range n {
		a = a.Next()
	}
	return a
}

// pickAddresses chooses the cluster's segment and, for the routed
// topology, the far subnet: /27s in 198.19.200.0 to 198.19.254.255, the
// benchmarking range (RFC 2544) that no real network uses, avoiding the
// host's addresses and other clusters' subnets. Called under the global
// lock.
func pickAddresses(others []*State, far bool) (segment, farSubnet netip.Prefix, err error) {
	used := map[netip.Prefix]bool{}
	mark := func(a netip.Addr) {
		if a.IsValid() && a.Is4() {
			used[netip.PrefixFrom(a, segmentBits).Masked()] = true
		}
	}
	for _, o := range others {
		// HostIP covers a cluster of an older layout, whose link was a
		// /30 inside some /27.
		mark(o.HostIP)
		mark(o.Segment.Addr())
		mark(o.FarSubnet.Addr())
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return segment, farSubnet, err
	}
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(ipn.IP.To4()); ok {
				mark(ip)
			}
		}
	}
	pick := func() (netip.Prefix, error) {
		for range 1000 {
			b := [4]byte{198, 19, byte(200 + rand.IntN(55)), byte(rand.IntN(256>>(32-segmentBits)) << (32 - segmentBits))}
			p := netip.PrefixFrom(netip.AddrFrom4(b), segmentBits)
			if !used[p] {
				used[p] = true
				return p, nil
			}
		}
		return netip.Prefix{}, fmt.Errorf("no free /%d in 198.19.200.0-198.19.254.255", segmentBits)
	}
	if segment, err = pick(); err != nil || !far {
		return segment, farSubnet, err
	}
	farSubnet, err = pick()
	return segment, farSubnet, err
}

// vethName is the host end's name: short (15 bytes at most) and the same
// for a given cluster name, so a teardown can find it from the name alone.
func vethName(cluster string) string {
	h := sha256.Sum256([]byte(cluster))
	return "idcc-" + hex.EncodeToString(h[:5])
}

// ipIn runs ip in the network namespace held by pid; pid 0 is the host's.
func (c *Cluster) ipIn(pid int, args ...string) error {
	if pid == 0 {
		ip, err := lookPath("ip")
		if err != nil {
			return err
		}
		if out, err := exec.Command(ip, args...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
		}
		return nil
	}
	_, err := c.runIn(pid, false, append([]string{"ip"}, args...)...)
	return err
}

// ipAll runs each command of ip in turn, stopping at the first failure.
func (c *Cluster) ipAll(pid int, cmds ...[]string) error {
	for _, args := range cmds {
		if err := c.ipIn(pid, args...); err != nil {
			return err
		}
	}
	return nil
}

// The switch's bridges: the shared segment and the far subnet.
const (
	segmentBridge = "seg"
	farBridge     = "far"
)

// setupSwitch starts the switch: a network namespace of its own with a
// bridge per subnet and no address, so it only forwards frames and routes
// nothing. It lives in the cluster's daemons cgroup, not a node's: a node
// removed takes only its own port with it. The host's veth is plugged into
// the segment, with the host's address there: the host reaches the
// apiserver and every node, and nothing on the segment has a route beyond
// it.
func (c *Cluster) setupSwitch() error {
	var err error
	c.Switch.Holder, c.Switch.NetNS, _, err = c.startHolder(c.Cgroup+"/daemons", "switch", false)
	if err != nil {
		return err
	}
	if err := c.save(); err != nil {
		return err
	}
	sw := c.Switch.Holder.PID
	// IPv6 would only add router solicitations and DAD to every link.
	if _, err := c.runIn(sw, false, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1", "net.ipv6.conf.all.disable_ipv6=1"); err != nil {
		return err
	}
	cmds := [][]string{
		{"link", "set", "lo", "up"},
		{"link", "add", segmentBridge, "type", "bridge"},
		{"link", "set", segmentBridge, "up"},
	}
	if c.FarSubnet.IsValid() {
		cmds = append(cmds, []string{"link", "add", farBridge, "type", "bridge"}, []string{"link", "set", farBridge, "up"})
	}
	if err := c.ipAll(sw, cmds...); err != nil {
		return fmt.Errorf("the switch: %w", err)
	}
	hv := c.HostVeth
	if err := c.ipIn(0, "link", "add", hv, "type", "veth", "peer", "name", "host", "netns", strconv.Itoa(sw)); err != nil {
		return err
	}
	_ = os.WriteFile("/proc/sys/net/ipv6/conf/"+hv+"/disable_ipv6", []byte("1"), 0o644)
	if err := c.ipAll(0,
		[]string{"link", "set", hv, "alias", "idcni-cluster/" + c.Name},
		[]string{"addr", "add", netip.PrefixFrom(c.HostIP, segmentBits).String(), "dev", hv},
		[]string{"link", "set", hv, "up"},
	); err != nil {
		return err
	}
	return c.ipAll(sw, []string{"link", "set", "host", "master", segmentBridge, "up"})
}

// setupRouter starts the router between the segment and the far subnet: a
// network namespace with a leg on each bridge and forwarding on, as a real
// network's router would be. Nodes and router have no default route: no
// packet of theirs can leave for the host's networks.
func (c *Cluster) setupRouter() error {
	var err error
	c.Router.Holder, c.Router.NetNS, _, err = c.startHolder(c.Cgroup+"/daemons", "router", false)
	if err != nil {
		return err
	}
	if err := c.save(); err != nil {
		return err
	}
	r, sw := c.Router.Holder.PID, c.Switch.Holder.PID
	if _, err := c.runIn(r, false, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.default.disable_ipv6=1"); err != nil {
		return err
	}
	for _, leg := range []struct {
		name, bridge string
		addr         netip.Prefix
	}{
		{"rt-seg", segmentBridge, netip.PrefixFrom(c.RouterIP, segmentBits)},
		{"rt-far", farBridge, netip.PrefixFrom(c.RouterFarIP, segmentBits)},
	} {
		if err := c.ipIn(sw, "link", "add", leg.name, "type", "veth", "peer", "name", leg.bridge, "netns", strconv.Itoa(r)); err != nil {
			return fmt.Errorf("the router: %w", err)
		}
		if err := c.ipAll(sw, []string{"link", "set", leg.name, "master", leg.bridge, "up"}); err != nil {
			return fmt.Errorf("the router: %w", err)
		}
		if err := c.ipAll(r,
			[]string{"addr", "add", leg.addr.String(), "dev", leg.bridge},
			[]string{"link", "set", leg.bridge, "up"},
		); err != nil {
			return fmt.Errorf("the router: %w", err)
		}
	}
	return c.ipAll(r, []string{"link", "set", "lo", "up"})
}

// startNodeNamespaces creates the node's cgroup and namespaces, plugs it
// into its segment and builds its mounts.
func (c *Cluster) startNodeNamespaces(n *Node) error {
	if err := createCgroups(n.Cgroup()); err != nil {
		return err
	}
	var err error
	if n.Holder, n.NetNS, n.MntNS, err = c.startHolder(n.Cgroup()+"/daemons", "holder-"+n.ID, true); err != nil {
		return err
	}
	if err := c.plugNode(n); err != nil {
		return err
	}
	return c.setupMounts(n, n.controlPlane())
}

// plugNode links the node to its bridge: a veth whose node end is eth0,
// with the node's address, and a route to the other subnet through the
// router when there is one. The node gets no default route: its pods talk
// to each other and the nodes, never to the host's networks.
func (c *Cluster) plugNode(n *Node) error {
	port, bridge, p := "port-"+n.ID, segmentBridge, c.Segment
	if n.Far {
		bridge, p = farBridge, c.FarSubnet
	}
	sw := c.Switch.Holder.PID
	if err := c.ipIn(sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", strconv.Itoa(n.Holder.PID)); err != nil {
		return fmt.Errorf("plug node %s: %w", n.Name, err)
	}
	if err := c.ipAll(sw, []string{"link", "set", port, "master", bridge, "up"}); err != nil {
		return fmt.Errorf("plug node %s: %w", n.Name, err)
	}
	cmds := [][]string{
		{"link", "set", "lo", "up"},
		{"addr", "add", netip.PrefixFrom(n.IP, p.Bits()).String(), "dev", "eth0"},
		{"link", "set", "eth0", "up"},
	}
	switch {
	case c.FarSubnet.IsValid() && n.Far:
		cmds = append(cmds, []string{"route", "add", c.Segment.String(), "via", c.RouterFarIP.String()})
	case c.FarSubnet.IsValid():
		cmds = append(cmds, []string{"route", "add", c.FarSubnet.String(), "via", c.RouterIP.String()})
	}
	if err := c.ipAll(n.Holder.PID, cmds...); err != nil {
		return fmt.Errorf("plug node %s: %w", n.Name, err)
	}
	return nil
}

// startNode starts the node's containerd, imports the images into it and
// starts its kubelet; it does not wait for the Node object.
func (c *Cluster) startNode(ctx context.Context, n *Node, images []string) error {
	if err := c.startContainerd(n); err != nil {
		return err
	}
	if err := c.waitContainerd(ctx, n); err != nil {
		return err
	}
	if err := c.importImages(ctx, n, images); err != nil {
		return err
	}
	if err := c.startKubelet(n); err != nil {
		return err
	}
	return c.startKubeProxy(n)
}

// forNodes runs f for every node at once (containerd's image import and
// start-up mostly wait on the disk and on each other), and joins the
// errors.
func forNodes(nodes []*Node, f func(n *Node) error) error {
	errs := make([]error, len(nodes))
	var wg sync.WaitGroup
	for i, n := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(n); err != nil {
				errs[i] = fmt.Errorf("node %s: %w", n.Name, err)
			}
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// node returns the node called name.
func (c *Cluster) node(name string) *Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, n := range c.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// AddNode adds a kubelet node to the running cluster, on the shared
// segment, as a machine joining later would: its own namespaces, cgroup,
// containerd (with the images imported) and kubelet. It returns once the
// Node is Ready, which takes idcni's agent on it: the DaemonSet starts
// one there and the agent writes the node's CNI configuration. On failure
// the node is removed again.
func (c *Cluster) AddNode(ctx context.Context) (*Node, error) {
	if c.pki == nil || c.bins == nil || c.bins.Kubelet == "" {
		return nil, errors.New("AddNode needs the cluster's CA and binaries: only the process that brought the cluster up has them")
	}
	c.mu.Lock()
	n, err := c.newNode(false)
	c.mu.Unlock()
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*Node, error) {
		err = fmt.Errorf("add node %s: %w", n.Name, err)
		if rerr := c.removeNode(ctx, n); rerr != nil {
			err = errors.Join(err, fmt.Errorf("and removing it again: %w", rerr))
		}
		return nil, err
	}
	if err := c.startNodeNamespaces(n); err != nil {
		return fail(err)
	}
	c.mu.Lock()
	c.Nodes = append(c.Nodes, n)
	err = c.save()
	c.mu.Unlock()
	if err != nil {
		return fail(err)
	}
	if err := c.nodePKI(n); err != nil {
		return fail(err)
	}
	if err := c.startNode(ctx, n, c.images); err != nil {
		return fail(err)
	}
	if err := c.WaitNodesReady(ctx, n); err != nil {
		return fail(err)
	}
	return n, nil
}

// RemoveNode takes a node away as a machine that died and was deleted
// would go: its cgroup is killed (kubelet, containerd, pods, holder), which
// frees its namespaces and its port on the switch, its directories are
// removed, and its Node object deleted. Its pods' objects are left to the
// pod garbage collector, as with any deleted node. The first node runs the
// control plane and cannot be removed.
func (c *Cluster) RemoveNode(ctx context.Context, name string) error {
	n := c.node(name)
	if n == nil {
		return fmt.Errorf("no node %s in cluster %s", name, c.Name)
	}
	if n.controlPlane() {
		return fmt.Errorf("node %s runs the control plane: take the cluster down instead", name)
	}
	return c.removeNode(ctx, n)
}

func (c *Cluster) removeNode(ctx context.Context, n *Node) error {
	var errs []error
	if err := killCgroup(n.Cgroup(), time.Minute); err != nil {
		errs = append(errs, err)
	}
	c.mu.Lock()
	var keep []*daemon
	for _, d := range c.procs {
		if d.cgroup == n.Cgroup()+"/daemons" {
			select {
			case <-d.done:
			case <-time.After(10 * time.Second):
			}
			continue
		}
		keep = append(keep, d)
	}
	c.procs = keep
	c.mu.Unlock()
	// The kernel deletes the switch's end of the veth with the node's
	// namespace, in a deferred work item.
	if c.Switch.Holder.Alive() {
		port := "port-" + n.ID
		deadline := time.Now().Add(10 * time.Second)
		for c.ipIn(c.Switch.Holder.PID, "link", "show", port) == nil {
			if time.Now().After(deadline) {
				if err := c.ipIn(c.Switch.Holder.PID, "link", "del", port); err != nil {
					errs = append(errs, err)
				}
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	if err := c.Client.CoreV1().Nodes().Delete(ctx, n.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		errs = append(errs, fmt.Errorf("delete Node %s: %w", n.Name, err))
	}
	if err := os.RemoveAll(n.dir()); err != nil {
		errs = append(errs, fmt.Errorf("remove node %s's directory: %w", n.Name, err))
	}
	c.mu.Lock()
	for i, o := range c.Nodes {
		if o == n {
			c.Nodes = append(c.Nodes[:i:i], c.Nodes[i+1:]...)
			break
		}
	}
	errs = append(errs, c.save())
	c.mu.Unlock()
	return errors.Join(errs...)
}
