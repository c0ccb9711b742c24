package e2e

import (
	"math/rand/v2"
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/cni"
	"github.com/idcni/idcni/e2e/internal/cnitest"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// Packets between two pods of one node go straight from the sender's host
// veth into the receiver ("direct", the default): the receiver's host veth
// never transmits them, and the receiver's rules still decide. With
// "localDelivery": "routed" they cross the node's routing and leave through
// that veth, as without idcni.
func TestLocalDelivery(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{cni.LocalDirect, cni.LocalRouted} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			e := cnitest.New(t, cnitest.Options{DualStack: true, Plugin: map[string]any{"localDelivery": mode}})
			a, b := e.NewPod(t), e.NewPod(t)
			resA, resB := e.MustAdd(t, a), e.MustAdd(t, b)
			addrA, addrB := podAddr(t, resA), podAddr(t, resB)
			addr6B := podAddr6(t, resB)
			t.Cleanup(func() { _ = e.Del(a); _ = e.Del(b) })
			dp := e.Datapath(t)
			name(t, dp, a, 1001)
			hostB := name(t, dp, b, 1002)
			if err := e.Check(a); err != nil {
				t.Fatalf("CHECK: %v", err)
			}

			// One way: A may reach B, B may not open anything to A.
			ms, err := (&policy.Set{Rules: policy.ManualRule{Action: policy.Allow, Src: 1001, Dst: 1002}.Expand()}).Compile()
			if err != nil {
				t.Fatal(err)
			}
			if err := dp.ApplyPolicy(ms); err != nil {
				t.Fatal(err)
			}
			before := txPackets(t, hostB)
			if ok, out := a.Ping(addrB, 3); !ok {
				t.Fatalf("A -> B with A allowed to reach B: no reply:\n%s", out)
			}
			sent := txPackets(t, hostB) - before
			if mode == cni.LocalDirect && sent >= 3 {
				t.Errorf("B's host veth transmitted %d packets during 3 pings: they were routed, not delivered directly", sent)
			}
			if mode == cni.LocalRouted && sent < 3 {
				t.Errorf("B's host veth transmitted %d packets during 3 pings: want them routed through it", sent)
			}
			if ok, out := b.Ping(addrA, 2); ok {
				t.Errorf("B -> A answered with no rule allowing it:\n%s", out)
			}
			// Neighbour discovery goes through B's host veth either way
			// (B resolving its gateway, the node probing B's addresses):
			// 0 to 4 packets over 8 runs, against 11 to 14 routed. With
			// 3 pings that noise alone failed the direct case now and
			// then on a loaded machine.
			before = txPackets(t, hostB)
			if ok, out := a.Ping(addr6B, 10); !ok {
				t.Fatalf("A -> B over IPv6: no reply:\n%s", out)
			}
			if sent := txPackets(t, hostB) - before; (mode == cni.LocalDirect) != (sent < 6) {
				t.Errorf("%s: B's host veth transmitted %d packets during 10 IPv6 pings", mode, sent)
			}

			// TCP both ways through the same path: the reply of an
			// allowed connection comes back, the reverse is refused.
			listenTCP(t, b, 7001)
			listenTCP(t, a, 7002)
			if err := exchange(a, "tcp4", addrB, 7001); err != nil {
				t.Errorf("A -> B tcp: %v", err)
			}
			if err := exchange(b, "tcp4", addrA, 7002); err == nil {
				t.Errorf("B -> A tcp connected with no rule allowing it")
			}

			// CHECK notices a missing or wrong local pod entry.
			if mode == cni.LocalDirect {
				if err := dp.DeleteLocalPod(addrB, hostB.Attrs().Index); err != nil {
					t.Fatal(err)
				}
				te := cnitest.AsCNIError(t, e.Check(b))
				if !strings.Contains(te.Msg, "no local pod entry for "+addrB.String()) {
					t.Errorf("CHECK without B's local pod entry: %q", te.Msg)
				}
			}

			// The bindings outlive the pods, as endpointctl's do;
			// remove them as endpointctl del would.
			unname(t, dp, addrA, podAddr6(t, resA), addrB, addr6B)
			for _, p := range []*cnitest.Pod{a, b} {
				if err := e.Del(p); err != nil {
					t.Fatalf("DEL: %v", err)
				}
			}
			e.AssertNoLeaks(t, a, b)
		})
	}
}

// name gives the pod an identity, as endpointctl add does, and returns its
// host veth.
func name(t *testing.T, dp *bpf.Datapath, p *cnitest.Pod, id identity.ID) netlink.Link {
	t.Helper()
	l, err := netlinksafe.LinkByName(cni.HostVethName(p.ContainerID, p.IfName))
	if err != nil {
		t.Fatal(err)
	}
	ep, _, err := dp.Endpoint(l.Attrs().Index)
	if err != nil {
		t.Fatal(err)
	}
	ep.Identity = id
	if err := dp.PutEndpoint(l.Attrs().Index, ep); err != nil {
		t.Fatal(err)
	}
	for _, a := range []netip.Addr{ep.IPv4, ep.IPv6} {
		if a.IsValid() {
			if err := dp.PutIPCache(netip.PrefixFrom(a, a.BitLen()), id); err != nil {
				t.Fatal(err)
			}
		}
	}
	return l
}

// unname removes the bindings name made: like endpointctl's, they outlive
// the pods.
func unname(t *testing.T, dp *bpf.Datapath, addrs ...netip.Addr) {
	t.Helper()
	for _, a := range addrs {
		if err := dp.DeleteIPCache(netip.PrefixFrom(a, a.BitLen())); err != nil {
			t.Fatal(err)
		}
	}
}

// podAddr6 returns the pod's IPv6 address from an ADD result.
func podAddr6(t *testing.T, r *current.Result) netip.Addr {
	t.Helper()
	for _, ipc := range r.IPs {
		if a, ok := netip.AddrFromSlice(ipc.Address.IP); ok && a.Is6() && !a.Is4In6() {
			return a
		}
	}
	t.Fatalf("no IPv6 address in result %+v", r)
	return netip.Addr{}
}

func txPackets(t *testing.T, l netlink.Link) uint64 {
	t.Helper()
	cur, err := netlinksafe.LinkByName(l.Attrs().Name)
	if err != nil {
		t.Fatal(err)
	}
	if cur.Attrs().Statistics == nil {
		t.Fatalf("no statistics for %s", cur.Attrs().Name)
	}
	return cur.Attrs().Statistics.TxPackets
}

// A Service's backend answers a client on the same node through the node's
// NAT: the client dialled the Service address, and only the node's
// conntrack can turn the backend's reply back into an answer from that
// address. So direct delivery must leave such a reply to the stack. The
// Service here is an nftables DNAT rule, as kube-proxy would write one.
func TestLocalDeliveryLeavesServiceRepliesToTheNode(t *testing.T) {
	t.Parallel()
	e := cnitest.New(t, cnitest.Options{})
	client, backend := e.NewPod(t), e.NewPod(t)
	addrC, addrB := podAddr(t, e.MustAdd(t, client)), podAddr(t, e.MustAdd(t, backend))
	t.Cleanup(func() { _ = e.Del(client); _ = e.Del(backend) })
	dp := e.Datapath(t)
	name(t, dp, client, 1001)
	name(t, dp, backend, 1002)
	// The client may reach the Service address (world, to the datapath:
	// no pod has it) and the backend; the backend admits the client.
	set := &policy.Set{Rules: policy.ManualRule{Action: policy.Allow, Src: 1001, Dst: 1002}.Expand()}
	set.Rules = append(set.Rules, policy.Rule{Subject: 1001, Direction: policy.Egress, Peer: identity.World, Action: policy.Allow})
	ms, err := set.Compile()
	if err != nil {
		t.Fatal(err)
	}
	if err := dp.ApplyPolicy(ms); err != nil {
		t.Fatal(err)
	}
	listenTCP(t, backend, 7003)

	// The Service address gets a blackhole route, so a packet the DNAT
	// rule missed dies here instead of leaving the machine.
	vip := netip.AddrFrom4([4]byte{198, 18, byte(rand.IntN(256)), byte(1 + rand.IntN(254))})
	table := "idcni_e2e_" + cnitest.RandHex(8)
	run(t, "ip", "route", "add", "blackhole", vip.String()+"/32")
	t.Cleanup(func() { runQuiet("ip", "route", "del", "blackhole", vip.String()+"/32") })
	run(t, "nft", "add", "table", "ip", table)
	t.Cleanup(func() { runQuiet("nft", "delete", "table", "ip", table) })
	run(t, "nft", "add", "chain", "ip", table, "pre", "{ type nat hook prerouting priority -100 ; }")
	run(t, "nft", "add", "rule", "ip", table, "pre", "ip", "daddr", vip.String(), "tcp", "dport", "80",
		"dnat", "to", addrB.String()+":7003")

	if err := exchange(client, "tcp4", vip, 80); err != nil {
		t.Fatalf("client -> Service %s:80 -> backend %s:7003: %v", vip, addrB, err)
	}
	// The same backend straight, through direct delivery both ways.
	if err := exchange(client, "tcp4", addrB, 7003); err != nil {
		t.Fatalf("client -> backend %s:7003: %v", addrB, err)
	}
	unname(t, dp, addrC, addrB)
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

func runQuiet(name string, args ...string) { _ = exec.Command(name, args...).Run() }

// A datagram to a port nobody listens on comes back as ICMP port
// unreachable. The pods' rules allow only the datagram's way, yet the
// error reaches the sender, which learns "connection refused" at once
// instead of waiting: the datapath passes ICMP errors about tracked flows.
// Both ways between pods of one node: delivered directly, and routed.
func TestICMPErrorReachesSender(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{cni.LocalDirect, cni.LocalRouted} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			e := cnitest.New(t, cnitest.Options{Plugin: map[string]any{"localDelivery": mode}})
			a, b := e.NewPod(t), e.NewPod(t)
			addrA, addrB := podAddr(t, e.MustAdd(t, a)), podAddr(t, e.MustAdd(t, b))
			t.Cleanup(func() { _ = e.Del(a); _ = e.Del(b) })
			dp := e.Datapath(t)
			name(t, dp, a, 1001)
			name(t, dp, b, 1002)
			t.Cleanup(func() { unname(t, dp, addrA, addrB) })
			ms, err := (&policy.Set{Rules: policy.ManualRule{Action: policy.Allow, Src: 1001, Dst: 1002, Proto: policy.ProtoUDP}.Expand()}).Compile()
			if err != nil {
				t.Fatal(err)
			}
			if err := dp.ApplyPolicy(ms); err != nil {
				t.Fatal(err)
			}
			c, err := dialIn(a, "udp4", addrB, 7009)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			err = echo(c, "anyone there?\n")
			if err == nil || !strings.Contains(err.Error(), "connection refused") {
				t.Fatalf("datagram to a closed port of B: %v, want connection refused", err)
			}
			cs, err := dp.Counters()
			if err != nil {
				t.Fatal(err)
			}
			var n uint64
			for k, c := range cs {
				if k.Reason == bpf.ReasonAllowRelated {
					n += c.Packets
				}
			}
			if n == 0 {
				t.Errorf("no packet counted as related")
			}
		})
	}
}
