package e2e

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/cni"
	"github.com/idcni/idcni/e2e/internal/cnitest"
	"github.com/idcni/idcni/identity"
)

// A node that learned its IPv6 default route from router advertisements
// (SLAAC) keeps it when its first IPv6 pod turns forwarding on, goes on
// accepting advertisements, and forwards the pod's traffic by that route.
// Turning net.ipv6.conf.all.forwarding on by itself makes the kernel purge
// every RA-learned route and ignore later advertisements.
//
// The node is a netns with an uplink veth to a "router" netns that sends
// real router advertisements; the real plugin's ADD runs inside the node.
// Nothing leaves the namespaces the test creates.
func TestIPv6ForwardingKeepsRALearnedDefaultRoute(t *testing.T) {
	t.Parallel()
	e := cnitest.New(t, cnitest.Options{DualStack: true})
	suffix := cnitest.RandHex(8)
	node, router := "idct-node-"+suffix, "idct-rtr-"+suffix
	for _, n := range []string{node, router} {
		run(t, "ip", "netns", "add", n)
		t.Cleanup(func() { runQuiet("ip", "netns", "del", n) })
		// Addresses are usable at once, so an advertisement's source
		// is valid when it is sent; the default route is what counts.
		run(t, "ip", "netns", "exec", n, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
		run(t, "ip", "-n", n, "link", "set", "lo", "up")
	}
	nodeNS := "/run/netns/" + node
	// A host, as a SLAAC node is before its first pod: not forwarding,
	// taking advertisements on its uplink.
	run(t, "ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=0")
	run(t, "ip", "-n", node, "link", "add", "up0", "type", "veth", "peer", "name", "r0", "netns", router)
	run(t, "ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv6.conf.up0.accept_ra=1")
	run(t, "ip", "-n", node, "addr", "add", "fe80::b/64", "dev", "up0", "nodad")
	run(t, "ip", "-n", node, "link", "set", "up0", "up")
	run(t, "ip", "-n", router, "addr", "add", "fe80::a/64", "dev", "r0", "nodad")
	run(t, "ip", "-n", router, "link", "set", "r0", "up")
	// Beyond the router: an address the node reaches only by its
	// default route. The router routes the pods' subnet back to the node.
	far := netip.MustParseAddr("2001:db8:ff::1")
	run(t, "ip", "-n", router, "addr", "add", far.String()+"/128", "dev", "lo")
	run(t, "ip", "-n", router, "-6", "route", "add", e.Subnet6.String(), "via", "fe80::b", "dev", "r0")

	advertise(t, router, node, "fe80::a", "the node learns its default route from the advertisement")

	pod := e.NewPod(t)
	var res *current.Result
	err := ns.WithNetNSPath(nodeNS, func(ns.NetNS) error {
		var err error
		res, err = e.Add(pod)
		return err
	})
	if err != nil {
		t.Fatalf("ADD in the node: %v", err)
	}
	t.Cleanup(func() { _ = ns.WithNetNSPath(nodeNS, func(ns.NetNS) error { return e.Del(pod) }) })
	pod6 := podAddr6(t, res)

	if got := sysctlIn(t, node, "net.ipv6.conf.all.forwarding"); got != "1" {
		t.Fatalf("net.ipv6.conf.all.forwarding = %s after an IPv6 pod's ADD, want 1", got)
	}
	if !hasRADefault(t, node, "fe80::a") {
		t.Fatalf("the node lost its RA-learned default route when the plugin turned forwarding on:\n%s", ipOut(t, "-n", node, "-6", "route"))
	}
	if got := sysctlIn(t, node, "net.ipv6.conf.up0.accept_ra"); got != "2" {
		t.Errorf("uplink accept_ra = %s, want 2 (advertisements accepted while forwarding)", got)
	}
	host := cni.HostVethName(pod.ContainerID, pod.IfName)
	if got := sysctlIn(t, node, "net.ipv6.conf."+host+".accept_ra"); got != "0" {
		t.Errorf("host veth accept_ra = %s, want 0 (a pod must not advertise routes to the node)", got)
	}

	// Advertisements still count: a second router appears.
	run(t, "ip", "-n", router, "addr", "add", "fe80::c/64", "dev", "r0", "nodad")
	advertise(t, router, node, "fe80::c", "the forwarding node learns a route from a later advertisement")

	// And the pod reaches beyond the router through the node. The pod
	// gets a label-range identity no policy isolates, so nothing but
	// routing stands in the way.
	if err := ns.WithNetNSPath(nodeNS, func(ns.NetNS) error { return nameIn(e, pod, 70000) }); err != nil {
		t.Fatal(err)
	}
	if ok, out := pod.Ping(far, 3); !ok {
		t.Errorf("pod %s -> %s beyond the node's RA-learned default route: no reply\n%s", pod6, far, out)
	}
}

// nameIn gives the pod an identity, as endpointctl add does; run it in
// the netns that holds the pod's host veth.
func nameIn(e *cnitest.Env, p *cnitest.Pod, id identity.ID) error {
	l, err := netlinksafe.LinkByName(cni.HostVethName(p.ContainerID, p.IfName))
	if err != nil {
		return err
	}
	dp, err := bpf.Open(e.BPFRoot)
	if err != nil {
		return err
	}
	defer dp.Close()
	ep, ok, err := dp.Endpoint(l.Attrs().Index)
	if err != nil || !ok {
		return fmt.Errorf("endpoint of %s: %v, %v", l.Attrs().Name, ok, err)
	}
	ep.Identity = id
	if err := dp.PutEndpoint(l.Attrs().Index, ep); err != nil {
		return err
	}
	for _, a := range []netip.Addr{ep.IPv4, ep.IPv6} {
		if a.IsValid() {
			if err := dp.PutIPCache(netip.PrefixFrom(a, a.BitLen()), id); err != nil {
				return err
			}
		}
	}
	return nil
}

// advertise sends router advertisements from src on the router's r0 until
// the node has a default route via src, as a router advertises
// periodically: the first may go out before the veth has its carrier, or
// before the source address can be bound.
func advertise(t *testing.T, router, node, src, what string) {
	t.Helper()
	var lastErr error
	deadline := time.Now().Add(30 * time.Second)
	for !hasRADefault(t, node, src) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s (last send: %v)\n%s", what, lastErr, ipOut(t, "-n", node, "-6", "route"))
		}
		lastErr = sendRA(router, "r0", src)
		time.Sleep(50 * time.Millisecond)
	}
}

// sendRA sends one router advertisement (router lifetime 30 minutes, no
// options) from src on ifname in netns to all nodes, as radvd would.
func sendRA(netns, ifname, src string) error {
	err := ns.WithNetNSPath("/run/netns/"+netns, func(ns.NetNS) error {
		c, err := net.ListenPacket("ip6:ipv6-icmp", src+"%"+ifname)
		if err != nil {
			return err
		}
		defer c.Close()
		rc, err := c.(*net.IPConn).SyscallConn()
		if err != nil {
			return err
		}
		// Neighbour discovery is only believed with hop limit 255 (so
		// it cannot have been routed).
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IPV6, syscall.IPV6_MULTICAST_HOPS, 255)
		}); err != nil {
			return err
		}
		if serr != nil {
			return serr
		}
		// ICMPv6 type 134; the kernel fills in the checksum.
		ra := make([]byte, 16)
		ra[0] = 134
		ra[4] = 64 // current hop limit
		binary.BigEndian.PutUint16(ra[6:], 1800)
		_, err = c.WriteTo(ra, &net.IPAddr{IP: net.ParseIP("ff02::1"), Zone: ifname})
		return err
	})
	if err != nil {
		return fmt.Errorf("send a router advertisement from %s on %s in %s: %w", src, ifname, netns, err)
	}
	return nil
}

// hasRADefault reports whether the netns has a default route via gw that
// the kernel learned from an advertisement.
func hasRADefault(t *testing.T, netns, gw string) bool {
	t.Helper()
	for _, line := range strings.Split(ipOut(t, "-n", netns, "-6", "route", "show", "default"), "\n") {
		if strings.Contains(line, "via "+gw+" ") && strings.Contains(line, " proto ra ") {
			return true
		}
	}
	return false
}

func ipOut(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// sysctlIn reads a sysctl in a netns.
func sysctlIn(t *testing.T, netns, key string) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "exec", netns, "sysctl", "-n", key).CombinedOutput()
	if err != nil {
		t.Fatalf("sysctl %s in %s: %v\n%s", key, netns, err, out)
	}
	return strings.TrimSpace(string(out))
}
