package bpf

import (
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// sysctl writes a sysctl of the calling thread's network namespace.
func sysctl(path, value string) error {
	return os.WriteFile("/proc/sys/"+path, []byte(value), 0o644)
}

// livePods is two pods, each a network namespace of its own on a veth
// whose host end lives in a third, the host: A (10.13.0.2) may open TCP
// to B's port 8080, nothing else is allowed, so B's packets reach A only
// as replies conntrack knows. Static neighbours and no IPv6 keep every
// packet the datapath sees one of the flow's.
type livePods struct {
	host, a, b *testNet
	d          *Datapath
}

func newLivePods(t *testing.T) *livePods {
	t.Helper()
	lp := &livePods{host: newTestNet(t, 2), a: newTestNet(t, 0), b: newTestNet(t, 0)}
	lp.d = loadTest(t, Options{Root: testRoot(t), Attach: AttachTCX})
	var err error
	must := func() {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	hostMACs := map[string]net.HardwareAddr{}
	lp.host.do(func() {
		for _, p := range []string{"ipv6/conf/all/disable_ipv6", "ipv6/conf/default/disable_ipv6", "ipv6/conf/ep0/disable_ipv6", "ipv6/conf/ep1/disable_ipv6"} {
			if err = sysctl("net/"+p, "1"); err != nil {
				return
			}
		}
		err = sysctl("net/ipv4/ip_forward", "1")
	})
	must()
	pods := []struct {
		ns    *testNet
		ep    string
		pe    string
		addr  netip.Addr
		id    identity.ID
		peMAC net.HardwareAddr
	}{{lp.a, "ep0", "pe0", ipA, idA, nil}, {lp.b, "ep1", "pe1", ipB, idB, nil}}
	for i := range pods {
		p := &pods[i]
		var fd int
		p.ns.do(func() {
			for _, s := range []string{"ipv6/conf/all/disable_ipv6", "ipv6/conf/default/disable_ipv6"} {
				if err = sysctl("net/"+s, "1"); err != nil {
					return
				}
			}
			fd, err = unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		})
		must()
		lp.host.do(func() {
			defer unix.Close(fd)
			var l netlink.Link
			if l, err = netlink.LinkByName(p.pe); err != nil {
				return
			}
			if err = netlink.LinkSetNsFd(l, fd); err != nil {
				return
			}
			var ep netlink.Link
			if ep, err = netlink.LinkByName(p.ep); err != nil {
				return
			}
			hostMACs[p.ep] = ep.Attrs().HardwareAddr
			err = netlink.LinkSetUp(ep)
		})
		must()
		p.ns.do(func() {
			var l, lo netlink.Link
			if l, err = netlink.LinkByName(p.pe); err != nil {
				return
			}
			p.peMAC = l.Attrs().HardwareAddr
			if lo, err = netlink.LinkByName("lo"); err != nil {
				return
			}
			for _, f := range []func() error{
				func() error { return netlink.LinkSetUp(lo) },
				func() error { return netlink.LinkSetUp(l) },
				func() error {
					return netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: p.addr.AsSlice(), Mask: net.CIDRMask(32, 32)}})
				},
				func() error {
					return netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Scope: netlink.SCOPE_LINK, Dst: &net.IPNet{IP: net.IPv4(169, 254, 1, 1), Mask: net.CIDRMask(32, 32)}})
				},
				func() error {
					return netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Gw: net.IPv4(169, 254, 1, 1)})
				},
				func() error {
					return netlink.NeighAdd(&netlink.Neigh{LinkIndex: l.Attrs().Index, State: netlink.NUD_PERMANENT, IP: net.IPv4(169, 254, 1, 1), HardwareAddr: hostMACs[p.ep]})
				},
			} {
				if err = f(); err != nil {
					return
				}
			}
		})
		must()
	}
	lp.host.do(func() {
		for _, p := range pods {
			ep, lerr := netlink.LinkByName(p.ep)
			if lerr != nil {
				err = lerr
				return
			}
			if err = netlink.RouteAdd(&netlink.Route{LinkIndex: ep.Attrs().Index, Dst: &net.IPNet{IP: p.addr.AsSlice(), Mask: net.CIDRMask(32, 32)}}); err != nil {
				return
			}
			if err = netlink.NeighAdd(&netlink.Neigh{LinkIndex: ep.Attrs().Index, State: netlink.NUD_PERMANENT, IP: p.addr.AsSlice(), HardwareAddr: p.peMAC}); err != nil {
				return
			}
			slot, serr := lp.d.AddConntrackTable(0)
			if serr != nil {
				err = serr
				return
			}
			e := Endpoint{Identity: p.id, IPv4: p.addr, ConntrackSlot: slot}
			if err = lp.d.PutEndpoint(ep.Attrs().Index, e); err != nil {
				return
			}
			if err = lp.d.PutIPCache(netip.PrefixFrom(p.addr, 32), e.Identity); err != nil {
				return
			}
			if err = lp.d.Attach(p.ep); err != nil {
				return
			}
		}
	})
	must()
	ms, err := manual(policy.ManualRule{Action: policy.Allow, Src: idA, Dst: idB, Proto: policy.ProtoTCP, Ports: policy.PortRange{Lo: 8080, Hi: 8080}}).Compile()
	must()
	err = lp.d.ApplyPolicy(ms)
	must()
	return lp
}

// drops sums the datapath's drop counters.
func drops(t *testing.T, d *Datapath) uint64 {
	t.Helper()
	c, err := d.Counters()
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	for k, v := range c {
		if k.Reason.Drop() {
			n += v.Packets
		}
	}
	return n
}

// stream opens A's connection to B, and B pushes to A without a pause:
// each of B's packets passes only as a reply conntrack remembers. It
// returns the count of bytes A received so far.
func (lp *livePods) stream(t *testing.T) *atomic.Int64 {
	t.Helper()
	var ln net.Listener
	var err error
	lp.b.do(func() { ln, err = net.Listen("tcp4", netip.AddrPortFrom(ipB, 8080).String()) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 1024)
		for {
			if _, err := c.Write(buf); err != nil {
				return
			}
			time.Sleep(time.Millisecond) // a stream, not a flood: the machine is shared
		}
	}()
	var c net.Conn
	lp.a.do(func() { c, err = net.Dial("tcp4", netip.AddrPortFrom(ipB, 8080).String()) })
	if err != nil {
		t.Fatalf("A connects to B: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	var got atomic.Int64
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			got.Add(int64(n))
			if err != nil {
				return
			}
		}
	}()
	return &got
}

// waitBytes waits until A has received more than n bytes in all; a
// deadline only ends a test that failed.
func waitBytes(t *testing.T, got *atomic.Int64, n int64, what string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for got.Load() <= n {
		if time.Now().After(deadline) {
			t.Fatalf("%s: A received nothing more in 30s (%d bytes in all)", what, got.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestLiveFlowSurvivesMigration: a TCP stream from B to the A that opened
// it, between two pods in network namespaces of their own, goes on across
// a migration whose conntrack grows (shared and per-pod tables), and the
// datapath drops not one packet meanwhile. The control migration loses
// the conntrack entries (a converter that drops them) and the same count
// rises: the count sees a lost flow.
func TestLiveFlowSurvivesMigration(t *testing.T) {
	for _, tc := range []struct {
		name     string
		loseFlow bool
	}{{"conntrack carried over", false}, {"control: conntrack lost", true}} {
		t.Run(tc.name, func(t *testing.T) {
			lp := newLivePods(t)
			got := lp.stream(t)
			waitBytes(t, got, 64*1024, "before the migration")
			before := drops(t, lp.d)

			b, hook := grown(true)
			if tc.loseFlow {
				lose := func(k, v []byte) ([]byte, []byte, bool, error) { return nil, nil, false, nil }
				b.converters = map[convertKey]entryConverter{{"conntrack", LayoutVersion, LayoutVersion + 1}: lose, {"ct_tables/inner", LayoutVersion, LayoutVersion + 1}: lose}
			}
			var up *Datapath
			var err error
			at := got.Load()
			lp.host.do(func() {
				up, err = Load(Options{Root: lp.d.Root(), Replace: true, Attach: AttachTCX, build: b, specHook: hook})
			})
			if err != nil {
				t.Fatalf("migrate: %v", err)
			}
			t.Cleanup(func() { up.Close() })
			if tc.loseFlow {
				deadline := time.Now().Add(30 * time.Second)
				for drops(t, up) == before {
					if time.Now().After(deadline) {
						t.Fatal("conntrack was lost, yet B's stream dropped nothing: the count cannot tell")
					}
					time.Sleep(10 * time.Millisecond)
				}
				t.Logf("with conntrack lost: %d drops", drops(t, up)-before)
				return
			}
			waitBytes(t, got, at+256*1024, "after the migration")
			if n := drops(t, up); n != before {
				t.Fatalf("the datapath dropped %d packets across the migration", n-before)
			}
			t.Logf("%d bytes streamed, %d during and after the migration, 0 drops", got.Load(), got.Load()-at)
		})
	}
}
