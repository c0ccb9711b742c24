package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/cni"
	"github.com/idcni/idcni/e2e/internal/cnitest"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/internal/clitest"
)

func TestMain(m *testing.M) {
	code := m.Run()
	cnitest.RemoveBuilt()
	clitest.RemoveBins()
	removeAgentBin()
	os.Exit(code)
}

// podAddr returns the pod's IPv4 address from an ADD result.
func podAddr(t *testing.T, r *current.Result) netip.Addr {
	t.Helper()
	for _, ipc := range r.IPs {
		if a, ok := netip.AddrFromSlice(ipc.Address.IP); ok && a.Unmap().Is4() {
			return a.Unmap()
		}
	}
	t.Fatalf("no IPv4 address in result %+v", r)
	return netip.Addr{}
}

func TestAddGivesAddressRoutesAndUnresolvedIdentity(t *testing.T) {
	t.Parallel()
	e := cnitest.New(t, cnitest.Options{})
	pod := e.NewPod(t)
	res := e.MustAdd(t, pod)

	addr := podAddr(t, res)
	if !e.Subnet.Contains(addr) {
		t.Fatalf("pod address %s is outside the IPAM subnet %s", addr, e.Subnet)
	}
	host := cni.HostVethName(pod.ContainerID, pod.IfName)
	if len(res.Interfaces) != 2 || res.Interfaces[0].Name != host || res.Interfaces[1].Name != "eth0" || res.Interfaces[1].Sandbox != pod.NSPath {
		t.Errorf("result interfaces = %v, want [%s, eth0 in %s]", res.Interfaces, host, pod.NSPath)
	}
	if len(res.IPs) != 1 || res.IPs[0].Address.String() != addr.String()+"/32" || res.IPs[0].Gateway.String() != "169.254.1.1" || res.IPs[0].Interface == nil || *res.IPs[0].Interface != 1 {
		t.Errorf("result ips = %v, want [%s/32 gw 169.254.1.1 on interface 1]", res.IPs, addr)
	}
	if len(res.Routes) != 1 || res.Routes[0].Dst.String() != "0.0.0.0/0" || res.Routes[0].GW.String() != "169.254.1.1" {
		t.Errorf("result routes = %v, want [0.0.0.0/0 via 169.254.1.1]", res.Routes)
	}

	// Host side: the veth, a /32 route through it, and its programs.
	hostLink, err := netlinksafe.LinkByName(host)
	if err != nil {
		t.Fatalf("host veth: %v", err)
	}
	routes, err := netlinksafe.RouteList(hostLink, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	if len(routes) != 1 || routes[0].Dst.String() != addr.String()+"/32" {
		t.Errorf("host routes via %s = %v, want only %s/32", host, routes, addr)
	}

	// Pod side: the /32, the link-local gateway with a permanent entry
	// for the host veth's MAC, the default route through it.
	err = ns.WithNetNSPath(pod.NSPath, func(ns.NetNS) error {
		l, err := netlinksafe.LinkByName("eth0")
		if err != nil {
			return err
		}
		addrs, err := netlinksafe.AddrList(l, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		if len(addrs) != 1 || addrs[0].IPNet.String() != addr.String()+"/32" {
			t.Errorf("pod addresses = %v, want %s/32", addrs, addr)
		}
		rs, err := netlinksafe.RouteList(l, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		var dflt, gw bool
		for _, r := range rs {
			if (r.Dst == nil || r.Dst.String() == "0.0.0.0/0") && r.Gw.String() == "169.254.1.1" {
				dflt = true
			}
			if r.Dst != nil && r.Dst.String() == "169.254.1.1/32" && r.Scope == netlink.SCOPE_LINK {
				gw = true
			}
		}
		if !dflt || !gw {
			t.Errorf("pod routes = %v, want default via 169.254.1.1 and 169.254.1.1 scope link", rs)
		}
		neighs, err := netlink.NeighList(l.Attrs().Index, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		var found bool
		for _, n := range neighs {
			if n.IP.Equal(net.ParseIP("169.254.1.1")) && n.State&netlink.NUD_PERMANENT != 0 && n.HardwareAddr.String() == hostLink.Attrs().HardwareAddr.String() {
				found = true
			}
		}
		if !found {
			t.Errorf("pod neighbours = %v, want 169.254.1.1 lladdr %s permanent", neighs, hostLink.Attrs().HardwareAddr)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	// Datapath: attached, endpoint and ipcache entry under identity 5.
	dp := e.Datapath(t)
	if ok, err := dp.Attached(host); err != nil || !ok {
		t.Errorf("Attached(%s) = %v, %v; want true", host, ok, err)
	}
	ep, ok, err := dp.Endpoint(hostLink.Attrs().Index)
	if err != nil || !ok || ep.Identity != identity.Unresolved || ep.IPv4 != addr {
		t.Errorf("endpoint of ifindex %d = %+v, %v, %v; want identity 5 with %s", hostLink.Attrs().Index, ep, ok, err, addr)
	}
	if id, ok, err := dp.IPCacheLookup(addr); err != nil || !ok || id != identity.Unresolved {
		t.Errorf("ipcache %s = %v, %v, %v; want 5", addr, id, ok, err)
	}
	locals, err := dp.LocalPods()
	if lp, ok := locals[addr]; err != nil || !ok || lp.Ifindex != hostLink.Attrs().Index ||
		lp.HostMAC.String() != hostLink.Attrs().HardwareAddr.String() || lp.MAC.String() != res.Interfaces[1].Mac ||
		lp.ConntrackSlot == 0 || lp.ConntrackSlot != ep.ConntrackSlot {
		t.Errorf("local pod entry of %s = %+v, %v, %v; want ifindex %d, MAC %s, host MAC %s, the endpoint's conntrack slot %d", addr, lp, ok, err,
			hostLink.Attrs().Index, res.Interfaces[1].Mac, hostLink.Attrs().HardwareAddr, ep.ConntrackSlot)
	}

	if err := e.Check(pod); err != nil {
		t.Errorf("CHECK on a good pod: %v", err)
	}
	if err := e.Del(pod); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	e.AssertNoLeaks(t, pod)
}

// Pods nobody has named carry the unresolved identity, which is isolated
// both ways: they cannot reach each other, while the node still reaches
// them. Naming both with an identity no policy isolates opens the path,
// which shows the drop was the identity's doing and not a broken route.
func TestUnresolvedPodsCannotTalk(t *testing.T) {
	t.Parallel()
	e := cnitest.New(t, cnitest.Options{})
	a, b := e.NewPod(t), e.NewPod(t)
	addrA, addrB := podAddr(t, e.MustAdd(t, a)), podAddr(t, e.MustAdd(t, b))
	t.Cleanup(func() { _ = e.Del(a); _ = e.Del(b) })

	for _, p := range []struct {
		pod  *cnitest.Pod
		addr netip.Addr
	}{{a, addrA}, {b, addrB}} {
		if ok, out := hostPing(p.addr); !ok {
			t.Fatalf("node -> pod %s: no reply (routing is broken, not policy):\n%s", p.addr, out)
		}
	}
	if ok, out := a.Ping(addrB, 3); ok {
		t.Errorf("pod %s -> pod %s answered while both are unresolved:\n%s", addrA, addrB, out)
	}
	if ok, out := b.Ping(addrA, 3); ok {
		t.Errorf("pod %s -> pod %s answered while both are unresolved:\n%s", addrB, addrA, out)
	}

	// Name both pods with a label identity no NetworkPolicy selects.
	dp := e.Datapath(t)
	const open = identity.MinLabel + 4242
	name(t, dp, a, open)
	name(t, dp, b, open)
	if ok, out := a.Ping(addrB, 2); !ok {
		t.Errorf("pod %s -> pod %s: no reply once both have an unisolated identity:\n%s", addrA, addrB, out)
	}

	// DEL must take the flows just created out of conntrack, too.
	for _, p := range []*cnitest.Pod{a, b} {
		if err := e.Del(p); err != nil {
			t.Fatalf("DEL: %v", err)
		}
	}
	e.AssertNoLeaks(t, a, b)
}

// hostPing pings from the node's own netns.
func hostPing(dst netip.Addr) (bool, string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ping", "-n", "-c", "1", "-W", "2", dst.String()).CombinedOutput()
	return err == nil, string(out)
}

func TestDelIsIdempotent(t *testing.T) {
	t.Parallel()
	t.Run("twice", func(t *testing.T) {
		t.Parallel()
		e := cnitest.New(t, cnitest.Options{})
		pod := e.NewPod(t)
		e.MustAdd(t, pod)
		for i := range 2 {
			if err := e.Del(pod); err != nil {
				t.Fatalf("DEL #%d: %v", i+1, err)
			}
		}
		e.AssertNoLeaks(t, pod)
	})
	t.Run("netns deleted first", func(t *testing.T) {
		t.Parallel()
		e := cnitest.New(t, cnitest.Options{})
		pod := e.NewPod(t)
		e.MustAdd(t, pod)
		pod.DeleteNetns()
		for i := range 2 {
			if err := e.Del(pod); err != nil {
				t.Fatalf("DEL #%d after the netns is gone: %v", i+1, err)
			}
		}
		e.AssertNoLeaks(t, pod)
	})
	t.Run("netns deleted and veth gone", func(t *testing.T) {
		t.Parallel()
		e := cnitest.New(t, cnitest.Options{})
		pod := e.NewPod(t)
		e.MustAdd(t, pod)
		pod.DeleteNetns()
		// Wait for the kernel to destroy the pair, so DEL works from
		// its record alone.
		waitLinkGone(t, cni.HostVethName(pod.ContainerID, pod.IfName))
		if err := e.Del(pod); err != nil {
			t.Fatalf("DEL: %v", err)
		}
		e.AssertNoLeaks(t, pod)
	})
	t.Run("unknown container", func(t *testing.T) {
		t.Parallel()
		e := cnitest.New(t, cnitest.Options{})
		known := e.NewPod(t)
		e.MustAdd(t, known)
		stranger := e.NewPod(t)
		if err := e.Del(stranger); err != nil {
			t.Fatalf("DEL of a container the plugin never saw: %v", err)
		}
		if err := e.Check(known); err != nil {
			t.Errorf("DEL of a stranger disturbed another pod: %v", err)
		}
		if err := e.Del(known); err != nil {
			t.Fatal(err)
		}
		e.AssertNoLeaks(t, known, stranger)
	})
	t.Run("unknown container, nothing ever loaded", func(t *testing.T) {
		t.Parallel()
		e := cnitest.New(t, cnitest.Options{})
		pod := e.NewPod(t)
		if err := e.Del(pod); err != nil {
			t.Fatalf("DEL on a node where the datapath was never loaded: %v", err)
		}
		if _, err := os.Stat(e.BPFRoot + "/progs"); err == nil {
			t.Error("DEL loaded the datapath")
		}
	})
}

func waitLinkGone(t *testing.T, name string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := netlinksafe.LinkByName(name); err != nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s still exists 20s after its netns was deleted", name)
}

func TestCheck(t *testing.T) {
	t.Parallel()
	e := cnitest.New(t, cnitest.Options{})
	pod := e.NewPod(t)
	e.MustAdd(t, pod)
	t.Cleanup(func() { _ = e.Del(pod) })
	if err := e.Check(pod); err != nil {
		t.Fatalf("CHECK on a good pod: %v", err)
	}

	host := cni.HostVethName(pod.ContainerID, pod.IfName)
	// Another program in ours' place at the ingress hook, the link and
	// its pin still there: only the kernel tells.
	foreign, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL", Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()}})
	if err != nil {
		t.Fatal(err)
	}
	defer foreign.Close()
	l, err := link.LoadPinnedLink(filepath.Join(e.BPFRoot, "links", host+"_ingress"), nil)
	if err != nil {
		t.Fatal(err)
	}
	err = l.Update(foreign)
	l.Close()
	if err != nil {
		t.Fatal(err)
	}
	te := cnitest.AsCNIError(t, e.Check(pod))
	if !strings.Contains(te.Msg, "TC programs are not attached to host veth "+host) || !strings.Contains(te.Msg, "at its ingress hook") {
		t.Errorf("CHECK with a foreign program at the ingress hook: code %d %q; want it to name the veth and the hook", te.Code, te.Msg)
	}
	if err := e.Datapath(t).Attach(host); err != nil {
		t.Fatal(err)
	}
	if err := e.Check(pod); err != nil {
		t.Fatalf("CHECK after the programs are back: %v", err)
	}

	if err := e.Datapath(t).Detach(host); err != nil {
		t.Fatal(err)
	}
	te = cnitest.AsCNIError(t, e.Check(pod))
	if !strings.Contains(te.Msg, "TC programs are not attached to host veth "+host) || !strings.Contains(te.Msg, "ingress and egress hook") {
		t.Errorf("CHECK with the programs detached: code %d %q; want it to name the detached veth", te.Code, te.Msg)
	}

	// A second problem is reported along with the first.
	err = ns.WithNetNSPath(pod.NSPath, func(ns.NetNS) error {
		l, err := netlinksafe.LinkByName("eth0")
		if err != nil {
			return err
		}
		return netlink.RouteDel(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: &net.IPNet{IP: net.IPv4zero, Mask: net.CIDRMask(0, 32)}, Gw: net.ParseIP("169.254.1.1")})
	})
	if err != nil {
		t.Fatal(err)
	}
	te = cnitest.AsCNIError(t, e.Check(pod))
	if !strings.Contains(te.Msg, "default route via 169.254.1.1 dev eth0 is missing") || !strings.Contains(te.Msg, "not attached") {
		t.Errorf("CHECK with two problems: %q; want both named", te.Msg)
	}

	// CHECK of an attachment that does not exist.
	te = cnitest.AsCNIError(t, e.Check(e.NewPod(t)))
	if te.Code != types.ErrUnknownContainer {
		t.Errorf("CHECK of an unknown container: code %d %q, want %d", te.Code, te.Msg, types.ErrUnknownContainer)
	}
}

// 50 pods added at once, as a node starting a DaemonSet's worth of pods,
// then deleted at once.
func TestConcurrentAddDel(t *testing.T) {
	t.Parallel()
	const n = 50
	e := cnitest.New(t, cnitest.Options{})
	pods := make([]*cnitest.Pod, n)
	for i := range pods {
		pods[i] = e.NewPod(t)
	}
	// Each ADD is timed alone; the wall time includes the waiting
	// that 50 processes contending for the same locks cause.
	lat := make([]time.Duration, n)
	start := time.Now()
	errs := runAll(pods, func(i int, p *cnitest.Pod) error {
		t0 := time.Now()
		_, err := e.Add(p)
		lat[i] = time.Since(t0)
		return err
	})
	wall := time.Since(start)
	for i, err := range errs {
		if err != nil {
			t.Errorf("ADD %d: %v", i, err)
		}
	}
	slices.Sort(lat)
	t.Logf("%d concurrent ADDs: wall %v, latency p50 %v p90 %v max %v", n, wall.Round(time.Millisecond),
		lat[n/2].Round(time.Millisecond), lat[n*9/10].Round(time.Millisecond), lat[n-1].Round(time.Millisecond))

	seen := map[string]bool{}
	dp := e.Datapath(t)
	eps, err := dp.Endpoints()
	if err != nil {
		t.Fatal(err)
	}
	for _, ep := range eps {
		if seen[ep.IPv4.String()] {
			t.Errorf("address %s given to two pods", ep.IPv4)
		}
		seen[ep.IPv4.String()] = true
	}
	if len(eps) != n {
		t.Errorf("%d endpoints in the datapath after %d ADDs", len(eps), n)
	}

	start = time.Now()
	errs = runAll(pods, func(_ int, p *cnitest.Pod) error { return e.Del(p) })
	t.Logf("%d concurrent DELs: wall %v", n, time.Since(start).Round(time.Millisecond))
	for i, err := range errs {
		if err != nil {
			t.Errorf("DEL %d: %v", i, err)
		}
	}
	e.AssertNoLeaks(t, pods...)
}

func runAll(pods []*cnitest.Pod, fn func(int, *cnitest.Pod) error) []error {
	errs := make([]error, len(pods))
	var wg sync.WaitGroup
	for i, p := range pods {
		wg.Go(func() { errs[i] = fn(i, p) })
	}
	wg.Wait()
	return errs
}

// An ADD that fails at any step leaves the node as it was.
func TestFailedAddLeavesNothing(t *testing.T) {
	t.Parallel()
	t.Run("IPAM exhausted", func(t *testing.T) {
		t.Parallel()
		// host-local keeps .1 of a /30 as the gateway: one address.
		e := cnitest.New(t, cnitest.Options{SubnetBits: 30})
		first, second := e.NewPod(t), e.NewPod(t)
		e.MustAdd(t, first)
		_, err := e.Add(second)
		te := cnitest.AsCNIError(t, err)
		if !strings.Contains(te.Msg, `IPAM plugin "host-local"`) || !strings.Contains(te.Msg, "no IP addresses available") {
			t.Errorf("ADD with IPAM exhausted: code %d %q", te.Code, te.Msg)
		}
		if err := e.Check(first); err != nil {
			t.Errorf("the failed ADD disturbed the first pod: %v", err)
		}
		if err := e.Del(first); err != nil {
			t.Fatal(err)
		}
		e.AssertNoLeaks(t, first, second)
		assertPodEmpty(t, second)
	})
	t.Run("host veth name taken", func(t *testing.T) {
		t.Parallel()
		// Fails right after IPAM allocated: the address must go back.
		e := cnitest.New(t, cnitest.Options{})
		pod := e.NewPod(t)
		name := cni.HostVethName(pod.ContainerID, pod.IfName)
		squatter := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: "idcsq" + cnitest.RandHex(8)}
		if err := netlink.LinkAdd(squatter); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = netlink.LinkDel(squatter) })
		_, err := e.Add(pod)
		te := cnitest.AsCNIError(t, err)
		if !strings.Contains(te.Msg, name) || !strings.Contains(te.Msg, "already exists") {
			t.Errorf("ADD with the host veth name taken: %q", te.Msg)
		}
		if _, err := netlinksafe.LinkByName(name); err != nil {
			t.Errorf("the undo removed a link the plugin did not create: %v", err)
		}
		// The runtime follows a failed ADD with a DEL, which must not
		// take the squatter either.
		if err := e.Del(pod); err != nil {
			t.Errorf("DEL after the failed ADD: %v", err)
		}
		if _, err := netlinksafe.LinkByName(name); err != nil {
			t.Errorf("DEL removed a link the plugin did not create: %v", err)
		}
		if err := netlink.LinkDel(squatter); err != nil {
			t.Fatal(err)
		}
		e.AssertNoLeaks(t, pod)
		assertPodEmpty(t, pod)
	})
	t.Run("pod route conflict after enforcement", func(t *testing.T) {
		t.Parallel()
		// The pod already has a default route, so the last netlink
		// step fails after veth, host routes, programs and map
		// entries are in place: all of them must go.
		e := cnitest.New(t, cnitest.Options{})
		pod := e.NewPod(t)
		ctx := context.Background()
		for _, c := range [][]string{
			{"ip", "link", "add", "other0", "type", "veth", "peer", "name", "other1"},
			{"ip", "link", "set", "other0", "up"},
			{"ip", "route", "add", "default", "dev", "other0"},
		} {
			if out, err := pod.Exec(ctx, c[0], c[1:]...); err != nil {
				t.Fatalf("%v: %v: %s", c, err, out)
			}
		}
		_, err := e.Add(pod)
		te := cnitest.AsCNIError(t, err)
		if !strings.Contains(te.Msg, "add route 0.0.0.0/0 via 169.254.1.1 dev eth0 in the pod") {
			t.Errorf("ADD with a conflicting pod route: %q", te.Msg)
		}
		e.AssertNoLeaks(t, pod)
		assertPodEmpty(t, pod)
		// The datapath was loaded by this ADD; only the attachment
		// and entries must be gone, which AssertNoLeaks checked.
		if _, err := os.Stat(e.BPFRoot + "/progs/from_pod"); err != nil {
			t.Errorf("datapath pins: %v", err)
		}
	})
}

// assertPodEmpty checks the plugin's interface is not in the pod.
func assertPodEmpty(t *testing.T, pod *cnitest.Pod) {
	t.Helper()
	err := ns.WithNetNSPath(pod.NSPath, func(ns.NetNS) error {
		if l, err := netlinksafe.LinkByName(pod.IfName); err == nil {
			t.Errorf("%s left in pod %s: %+v", pod.IfName, pod.Name, l.Attrs())
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// Broken configuration and environment get the spec's error JSON with a
// code and a message that says what to fix.
func TestConfigAndEnvironmentErrors(t *testing.T) {
	t.Parallel()
	e := cnitest.New(t, cnitest.Options{})
	pod := e.NewPod(t)
	good := e.PluginConf()
	with := func(k string, v any) []byte {
		m := e.PluginConf()
		if v == nil {
			delete(m, k)
		} else {
			m[k] = v
		}
		return e.PluginConfBytes(m)
	}
	noIPAMType := e.PluginConf()
	delete(noIPAMType["ipam"].(map[string]any), "type")

	for _, tc := range []struct {
		name    string
		stdin   []byte
		pod     *cnitest.Pod
		cniArgs string
		code    uint
		msg     string
	}{
		{"malformed JSON", []byte(`{"cniVersion": "1.1.0", "name": "x", `), pod, "", types.ErrDecodingFailure, "error unmarshall network config"},
		{"no network name", func() []byte {
			b, _ := json.Marshal(map[string]any{"cniVersion": "1.1.0", "type": "idcni", "ipam": good["ipam"]})
			return b
		}(), pod, "", types.ErrInvalidNetworkConfig, "missing network name"},
		{"no ipam", with("ipam", nil), pod, "", types.ErrInvalidNetworkConfig, `"ipam" has no "type"`},
		{"ipam without type", e.PluginConfBytes(noIPAMType), pod, "", types.ErrInvalidNetworkConfig, `"ipam" has no "type"`},
		{"mtu out of range", with("mtu", 20), pod, "", types.ErrInvalidNetworkConfig, `"mtu" 20 is out of range`},
		{"mtu not a number", with("mtu", "1500"), pod, "", types.ErrDecodingFailure, "cannot parse the network configuration"},
		{"relative bpfRoot", with("bpfRoot", "idcni"), pod, "", types.ErrInvalidNetworkConfig, `"bpfRoot" must be an absolute path`},
		{"unsupported version", func() []byte {
			m := e.PluginConf()
			m["cniVersion"] = "0.2.0"
			m["name"] = e.Network
			b, _ := json.Marshal(m)
			return b
		}(), pod, "", types.ErrIncompatibleCNIVersion, "incompatible CNI versions"},
		{"no container ID", e.PluginConfBytes(good), &cnitest.Pod{NSPath: pod.NSPath, IfName: "eth0"}, "", types.ErrInvalidEnvironmentVariables, "CNI_CONTAINERID"},
		{"bad CNI_ARGS", e.PluginConfBytes(good), pod, "K8S_POD_NAME", types.ErrInvalidEnvironmentVariables, `CNI_ARGS entry "K8S_POD_NAME" is not KEY=VALUE`},
		{"pod name without namespace", e.PluginConfBytes(good), pod, "K8S_POD_NAME=web", types.ErrInvalidEnvironmentVariables, "both K8S_POD_NAMESPACE and K8S_POD_NAME"},
		{"netns missing", e.PluginConfBytes(good), &cnitest.Pod{ContainerID: "c" + cnitest.RandHex(8), NSPath: "/run/netns/does-not-exist-" + cnitest.RandHex(6), IfName: "eth0"}, "", types.ErrInvalidNetNS, "cannot open the pod's netns"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.Exec("ADD", tc.stdin, tc.pod, tc.cniArgs)
			te := cnitest.AsCNIError(t, err)
			if te.Code != tc.code || !strings.Contains(te.Msg+te.Details, tc.msg) {
				t.Errorf("ADD: code %d msg %q details %q; want code %d containing %q", te.Code, te.Msg, te.Details, tc.code, tc.msg)
			}
		})
	}
	e.AssertNoLeaks(t, pod)
}

// Every spec version the plugin claims works end to end, and results come
// back in the version asked for.
func TestEveryCNIVersion(t *testing.T) {
	t.Parallel()
	for _, v := range []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		t.Run(v, func(t *testing.T) {
			t.Parallel()
			e := cnitest.New(t, cnitest.Options{CNIVersion: v})
			pod := e.NewPod(t)
			ctx := context.Background()
			r, err := e.CNI.AddNetworkList(ctx, e.ConfList(), e.RuntimeConf(pod))
			if err != nil {
				t.Fatalf("ADD: %v", err)
			}
			if r.Version() != v {
				t.Errorf("result version %s, want %s", r.Version(), v)
			}
			cur, err := current.NewResultFromResult(r)
			if err != nil || len(cur.IPs) != 1 || !e.Subnet.Contains(podAddr(t, cur)) {
				t.Errorf("result %v (%v)", r, err)
			}
			err = e.Check(pod)
			if v == "0.3.1" {
				if err == nil {
					t.Error("CHECK succeeded on 0.3.1, which has no CHECK")
				}
			} else if err != nil {
				t.Errorf("CHECK: %v", err)
			}
			if err := e.Del(pod); err != nil {
				t.Fatalf("DEL: %v", err)
			}
			e.AssertNoLeaks(t, pod)
		})
	}
	t.Run("VERSION", func(t *testing.T) {
		t.Parallel()
		e := cnitest.New(t, cnitest.Options{})
		info, err := e.CNI.GetVersionInfo(context.Background(), "idcni")
		if err != nil {
			t.Fatal(err)
		}
		if got := info.SupportedVersions(); !slices.Equal(got, []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"}) {
			t.Errorf("VERSION = %v", got)
		}
	})
}

func TestStatus(t *testing.T) {
	t.Parallel()
	t.Run("loads the datapath when no agent is required", func(t *testing.T) {
		t.Parallel()
		e := cnitest.New(t, cnitest.Options{})
		if err := e.CNI.GetStatusNetworkList(context.Background(), e.ConfList()); err != nil {
			t.Fatalf("STATUS: %v", err)
		}
		if _, err := os.Stat(e.BPFRoot + "/progs/from_pod"); err != nil {
			t.Errorf("STATUS succeeded but no datapath is pinned: %v", err)
		}
		if err := e.CNI.GetStatusNetworkList(context.Background(), e.ConfList()); err != nil {
			t.Errorf("second STATUS: %v", err)
		}
	})
	t.Run("required agent down", func(t *testing.T) {
		t.Parallel()
		e := cnitest.New(t, cnitest.Options{Plugin: map[string]any{"agentRequired": true}})
		te := cnitest.AsCNIError(t, e.CNI.GetStatusNetworkList(context.Background(), e.ConfList()))
		if te.Code != types.ErrPluginNotAvailable || !strings.Contains(te.Msg, "idcni-agent is required") || !strings.Contains(te.Msg, e.Socket) {
			t.Errorf("STATUS with the agent down: code %d %q", te.Code, te.Msg)
		}
	})
	t.Run("required agent up, datapath not loaded", func(t *testing.T) {
		t.Parallel()
		e := cnitest.New(t, cnitest.Options{Plugin: map[string]any{"agentRequired": true}})
		cnitest.ServeAgent(t, e.Socket, &cnitest.AgentPeer{})
		te := cnitest.AsCNIError(t, e.CNI.GetStatusNetworkList(context.Background(), e.ConfList()))
		if te.Code != types.ErrPluginNotAvailable || !strings.Contains(te.Msg, "datapath is not loaded under "+e.BPFRoot) {
			t.Errorf("STATUS with no datapath: code %d %q", te.Code, te.Msg)
		}
	})
}

// GC tears down every attachment the runtime does not list, whether the
// plugin knows it from its record or only from the link, and leaves the
// listed ones alone.
func TestGC(t *testing.T) {
	t.Parallel()
	e := cnitest.New(t, cnitest.Options{})
	keep, stale, gone, lost := e.NewPod(t), e.NewPod(t), e.NewPod(t), e.NewPod(t)
	for _, p := range []*cnitest.Pod{keep, stale, gone, lost} {
		e.MustAdd(t, p)
	}
	t.Cleanup(func() { _ = e.Del(keep) })
	// gone: the sandbox died without a DEL. lost: the plugin's record
	// was wiped (the link alias is all that is left).
	gone.DeleteNetns()
	entries, err := os.ReadDir(e.DataDir + "/" + e.Network)
	if err != nil {
		t.Fatal(err)
	}
	for _, ent := range entries {
		if strings.HasPrefix(ent.Name(), lost.ContainerID) {
			os.Remove(e.DataDir + "/" + e.Network + "/" + ent.Name())
		}
	}

	// A runtime whose libcni cache was lost, so that only the plugin's
	// GC (not libcni's synthesized DELs) can find the stale ones.
	fresh := cnitest.NewCNIConfig(e.BinDir, t.TempDir())
	err = fresh.GCNetworkList(context.Background(), e.ConfList(), &libcni.GCArgs{
		ValidAttachments: []types.GCAttachment{{ContainerID: keep.ContainerID, IfName: keep.IfName}},
	})
	if err != nil {
		t.Fatalf("GC: %v", err)
	}
	if err := e.Check(keep); err != nil {
		t.Errorf("GC disturbed a valid attachment: %v", err)
	}
	if err := e.Del(keep); err != nil {
		t.Fatal(err)
	}
	e.AssertNoLeaks(t, keep, stale, gone, lost)
}

// With an agent configured and answering, ADD waits for it to resolve the
// pod and passes on its errors verbatim; a required agent that is down
// fails ADD before anything is allocated.
func TestAgent(t *testing.T) {
	t.Parallel()
	t.Run("required and down", func(t *testing.T) {
		t.Parallel()
		e := cnitest.New(t, cnitest.Options{Plugin: map[string]any{"agentRequired": true}})
		pod := e.NewPod(t)
		_, err := e.Add(pod)
		te := cnitest.AsCNIError(t, err)
		if te.Code != types.ErrTryAgainLater || !strings.Contains(te.Msg, "idcni-agent is required") || !strings.Contains(te.Msg, e.Socket) {
			t.Errorf("ADD with the required agent down: code %d %q", te.Code, te.Msg)
		}
		e.AssertNoLeaks(t, pod)
		assertPodEmpty(t, pod)
	})
	t.Run("not required and down", func(t *testing.T) {
		t.Parallel()
		e := cnitest.New(t, cnitest.Options{})
		pod := e.NewPod(t)
		e.MustAdd(t, pod)
		if err := e.Del(pod); err != nil {
			t.Fatal(err)
		}
		e.AssertNoLeaks(t, pod)
	})
	t.Run("resolves before ADD returns", func(t *testing.T) {
		t.Parallel()
		e := cnitest.New(t, cnitest.Options{Plugin: map[string]any{"agentRequired": true}})
		const resolved = identity.MinLabel + 7
		const delay = 500 * time.Millisecond
		peer := &cnitest.AgentPeer{}
		peer.Register = func(req api.EndpointRequest) (api.EndpointResponse, error) {
			// As the agent does: the identity is in the maps before
			// the answer.
			time.Sleep(delay)
			dp, err := bpf.Open(e.BPFRoot)
			if err != nil {
				return api.EndpointResponse{}, err
			}
			defer dp.Close()
			ep, _, err := dp.Endpoint(req.HostIfIndex)
			if err != nil {
				return api.EndpointResponse{}, err
			}
			ep.Identity = resolved
			if err := dp.PutEndpoint(req.HostIfIndex, ep); err != nil {
				return api.EndpointResponse{}, err
			}
			return api.EndpointResponse{Identity: resolved}, dp.PutIPCache(netip.PrefixFrom(ep.IPv4, 32), resolved)
		}
		cnitest.ServeAgent(t, e.Socket, peer)
		pod := e.NewPod(t)
		pod.Args = [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "shop"}, {"K8S_POD_NAME", "cart-0"}}
		t0 := time.Now()
		res := e.MustAdd(t, pod)
		if took := time.Since(t0); took < delay {
			t.Errorf("ADD returned after %v, before the agent answered (%v)", took, delay)
		}
		reqs := peer.Requests()
		host := cni.HostVethName(pod.ContainerID, pod.IfName)
		l, err := netlinksafe.LinkByName(host)
		if err != nil {
			t.Fatal(err)
		}
		want := api.EndpointRequest{ContainerID: pod.ContainerID, Netns: pod.NSPath, IfName: "eth0", HostIfName: host,
			HostIfIndex: l.Attrs().Index, Addresses: []netip.Addr{podAddr(t, res)}, PodNamespace: "shop", PodName: "cart-0"}
		if len(reqs) != 1 || !reflect.DeepEqual(reqs[0], want) {
			t.Errorf("agent got %+v, want [%+v]", reqs, want)
		}
		if id, _, _ := e.Datapath(t).IPCacheLookup(podAddr(t, res)); id != resolved {
			t.Errorf("identity after ADD = %v, want %v", id, resolved)
		}
		if err := e.Check(pod); err != nil {
			t.Errorf("CHECK: %v", err)
		}
		if err := e.Del(pod); err != nil {
			t.Fatal(err)
		}
		if d := peer.Deleted(); !slices.Equal(d, []string{pod.ContainerID}) {
			t.Errorf("agent told of deletions %v, want [%s]", d, pod.ContainerID)
		}
		e.AssertNoLeaks(t, pod)
	})
	t.Run("error passed on verbatim and undone", func(t *testing.T) {
		t.Parallel()
		e := cnitest.New(t, cnitest.Options{})
		const refusal = `namespace "shop" has no labels the identity allocator accepts: label key "bad key" is invalid`
		cnitest.ServeAgent(t, e.Socket, &cnitest.AgentPeer{Register: func(api.EndpointRequest) (api.EndpointResponse, error) {
			return api.EndpointResponse{}, errors.New(refusal)
		}})
		pod := e.NewPod(t)
		pod.Args = [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "shop"}, {"K8S_POD_NAME", "cart-0"}}
		_, err := e.Add(pod)
		te := cnitest.AsCNIError(t, err)
		if te.Msg != refusal {
			t.Errorf("ADD refused by the agent: msg %q, want the agent's %q", te.Msg, refusal)
		}
		// The refusal came after every other step: all are undone.
		e.AssertNoLeaks(t, pod)
		assertPodEmpty(t, pod)
	})
}

// A dual-stack pod gets a /32 and a /128, a gateway per family (169.254.1.1
// and fe80::1, both resolved to the host veth's MAC), both addresses in the
// datapath, and the same isolation in both families.
func TestDualStack(t *testing.T) {
	t.Parallel()
	e := cnitest.New(t, cnitest.Options{DualStack: true})
	a, b := e.NewPod(t), e.NewPod(t)
	resA, resB := e.MustAdd(t, a), e.MustAdd(t, b)
	t.Cleanup(func() { _ = e.Del(a); _ = e.Del(b) })

	v6 := func(r *current.Result) netip.Addr {
		for _, ipc := range r.IPs {
			if ad, ok := netip.AddrFromSlice(ipc.Address.IP); ok && ad.Is6() && !ad.Is4In6() {
				if ones, _ := ipc.Address.Mask.Size(); ones != 128 || ipc.Gateway.String() != "fe80::1" {
					t.Errorf("IPv6 entry %v, want /128 via fe80::1", ipc)
				}
				return ad
			}
		}
		t.Fatalf("no IPv6 address in %v", r)
		return netip.Addr{}
	}
	a6, b6 := v6(resA), v6(resB)
	if !e.Subnet6.Contains(a6) || !e.Subnet6.Contains(b6) {
		t.Fatalf("IPv6 addresses %s, %s outside %s", a6, b6, e.Subnet6)
	}
	var routes []string
	for _, r := range resA.Routes {
		routes = append(routes, r.Dst.String()+" via "+r.GW.String())
	}
	if !slices.Equal(routes, []string{"0.0.0.0/0 via 169.254.1.1", "::/0 via fe80::1"}) {
		t.Errorf("result routes = %v", routes)
	}

	host := cni.HostVethName(a.ContainerID, a.IfName)
	l, err := netlinksafe.LinkByName(host)
	if err != nil {
		t.Fatal(err)
	}
	ep, ok, err := e.Datapath(t).Endpoint(l.Attrs().Index)
	if err != nil || !ok || ep.IPv4 != podAddr(t, resA) || ep.IPv6 != a6 || ep.Identity != identity.Unresolved {
		t.Errorf("endpoint = %+v, %v, %v; want both addresses under identity 5", ep, ok, err)
	}
	if id, ok, _ := e.Datapath(t).IPCacheLookup(a6); !ok || id != identity.Unresolved {
		t.Errorf("ipcache %s = %v, %v; want 5", a6, id, ok)
	}

	if ok, out := hostPing(a6); !ok {
		t.Fatalf("node -> pod %s: no reply (routing is broken, not policy):\n%s", a6, out)
	}
	if ok, out := a.Ping(b6, 3); ok {
		t.Errorf("pod %s -> pod %s answered while both are unresolved:\n%s", a6, b6, out)
	}
	if err := e.Check(a); err != nil {
		t.Errorf("CHECK: %v", err)
	}
	for _, p := range []*cnitest.Pod{a, b} {
		if err := e.Del(p); err != nil {
			t.Fatal(err)
		}
	}
	e.AssertNoLeaks(t, a, b)
}

// BenchmarkAddDel measures one pod's ADD and DEL through libcni, process
// starts of idcni and host-local included, as a runtime sees them.
func BenchmarkAddDel(b *testing.B) {
	e := cnitest.New(b, cnitest.Options{SubnetBits: 20})
	// Load the datapath outside the measurement: it happens once per node.
	if err := e.CNI.GetStatusNetworkList(context.Background(), e.ConfList()); err != nil {
		b.Fatal(err)
	}
	var add, del time.Duration
	for b.Loop() {
		b.StopTimer()
		pod := e.NewPod(b)
		b.StartTimer()
		t0 := time.Now()
		if _, err := e.Add(pod); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if err := e.Del(pod); err != nil {
			b.Fatal(err)
		}
		add += t1.Sub(t0)
		del += time.Since(t1)
		b.StopTimer()
		pod.DeleteNetns()
		b.StartTimer()
	}
	b.ReportMetric(float64(add.Microseconds())/float64(b.N)/1000, "ms/add")
	b.ReportMetric(float64(del.Microseconds())/float64(b.N)/1000, "ms/del")
}
