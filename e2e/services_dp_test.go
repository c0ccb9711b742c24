package e2e

import (
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/cni"
	"github.com/idcni/idcni/e2e/internal/cnitest"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// A pod reaches a backend on its node through a ClusterIP that only the
// datapath knows: no kube-proxy, no NAT rule on the node, and a blackhole
// route for the ClusterIP, so an untranslated packet dies here. Delivered
// directly and routed through the node's stack. Egress policy judges the
// backend: a rule for its identity admits the flow, rules for another
// identity or for the world (what the ClusterIP would be) do not. A
// frontend without backends refuses the connection at once.
func TestServiceTranslatedByTheDatapath(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{cni.LocalDirect, cni.LocalRouted} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			e := cnitest.New(t, cnitest.Options{Plugin: map[string]any{"localDelivery": mode}})
			client, backend := e.NewPod(t), e.NewPod(t)
			addrC, addrB := podAddr(t, e.MustAdd(t, client)), podAddr(t, e.MustAdd(t, backend))
			t.Cleanup(func() { _ = e.Del(client); _ = e.Del(backend) })
			dp := e.Datapath(t)
			name(t, dp, client, 1001)
			name(t, dp, backend, 1002)
			t.Cleanup(func() { unname(t, dp, addrC, addrB) })
			listenTCP(t, backend, 7011)

			vip := netip.AddrFrom4([4]byte{198, 18, byte(rand.IntN(256)), byte(1 + rand.IntN(254))})
			run(t, "ip", "route", "add", "blackhole", vip.String()+"/32")
			t.Cleanup(func() { runQuiet("ip", "route", "del", "blackhole", vip.String()+"/32") })
			fe := bpf.ServiceFrontend{Addr: vip, Port: 80, Proto: unix.IPPROTO_TCP}
			if err := dp.PutService(fe, bpf.Service{Backends: []bpf.ServiceBackend{{Addr: addrB, Port: 7011}}}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = dp.DeleteService(fe) })

			apply := func(rules ...policy.Rule) {
				t.Helper()
				ms, err := (&policy.Set{Rules: rules}).Compile()
				if err != nil {
					t.Fatal(err)
				}
				if err := dp.ApplyPolicy(ms); err != nil {
					t.Fatal(err)
				}
			}
			backendAdmits := policy.Rule{Subject: 1002, Direction: policy.Ingress, Peer: 1001, Action: policy.Allow}
			apply(backendAdmits, policy.Rule{Subject: 1001, Direction: policy.Egress, Peer: 1002, Proto: policy.ProtoTCP, Ports: policy.PortRange{Lo: 7011, Hi: 7011}, Action: policy.Allow})
			if err := exchange(client, "tcp4", vip, 80); err != nil {
				t.Fatalf("client -> ClusterIP %s:80 -> backend %s:7011, egress allowed to the backend: %v", vip, addrB, err)
			}
			for _, other := range []identity.ID{1003, identity.World} {
				apply(backendAdmits, policy.Rule{Subject: 1001, Direction: policy.Egress, Peer: other, Action: policy.Allow})
				if err := exchange(client, "tcp4", vip, 80); err == nil {
					t.Fatalf("client -> ClusterIP connected with egress allowed only to %s", other)
				}
			}

			// A datagram to a backend's closed port: the backend's port
			// unreachable, about its own address, reaches the client as
			// the frontend's, which makes it "connection refused".
			dns := bpf.ServiceFrontend{Addr: vip, Port: 53, Proto: unix.IPPROTO_UDP}
			if err := dp.PutService(dns, bpf.Service{Backends: []bpf.ServiceBackend{{Addr: addrB, Port: 7012}}}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = dp.DeleteService(dns) })
			apply(backendAdmits, policy.Rule{Subject: 1001, Direction: policy.Egress, Peer: 1002, Action: policy.Allow})
			uc, err := dialIn(client, "udp4", vip, 53)
			if err != nil {
				t.Fatal(err)
			}
			err = echo(uc, "anyone there?\n")
			uc.Close()
			if err == nil || !strings.Contains(err.Error(), "refused") {
				t.Fatalf("datagram through ClusterIP %s:53 to a closed port of the backend: %v, want connection refused", vip, err)
			}

			// Hairpin: the backend reaches itself through a frontend of its
			// own, under its own rules both ways.
			self := bpf.ServiceFrontend{Addr: vip, Port: 81, Proto: unix.IPPROTO_TCP}
			if err := dp.PutService(self, bpf.Service{Backends: []bpf.ServiceBackend{{Addr: addrB, Port: 7011}}}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = dp.DeleteService(self) })
			apply(policy.Rule{Subject: 1002, Direction: policy.Egress, Peer: 1002, Action: policy.Allow})
			if err := exchange(backend, "tcp4", vip, 81); err == nil {
				t.Fatalf("backend -> itself through ClusterIP %s:81 connected with no ingress rule for itself", vip)
			}
			apply(policy.Rule{Subject: 1002, Direction: policy.Egress, Peer: 1002, Action: policy.Allow},
				policy.Rule{Subject: 1002, Direction: policy.Ingress, Peer: 1002, Action: policy.Allow})
			if err := exchange(backend, "tcp4", vip, 81); err != nil {
				t.Fatalf("backend -> itself through ClusterIP %s:81, allowed both ways: %v", vip, err)
			}

			if err := dp.PutService(fe, bpf.Service{}); err != nil {
				t.Fatal(err)
			}
			apply(backendAdmits, policy.Rule{Subject: 1001, Direction: policy.Egress, Peer: 1002, Action: policy.Allow})
			err = exchange(client, "tcp4", vip, 80)
			if err == nil || !strings.Contains(err.Error(), "refused") {
				t.Fatalf("client -> ClusterIP without backends: %v, want connection refused", err)
			}
		})
	}
}
