package e2e

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/net/dns/dnsmessage"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/cni"
	"github.com/idcni/idcni/e2e/internal/cnitest"
	"github.com/idcni/idcni/e2e/internal/kube"
)

// Issue 13: a pod's flows to a ClusterIP are translated to a backend in
// from_pod, from the Services and EndpointSlices the agent watches. No
// kube-proxy runs here, and the apiserver's Service range is blackholed
// on this host: a packet to a ClusterIP that the datapath did not
// translate dies in the node instead of leaving the machine, so every
// test below fails without translation.

// newServiceEnv is an agentEnv whose apiserver allocates ClusterIPs from a
// range of its own, blackholed here; localDelivery "" is the plugin's
// default.
func newServiceEnv(t *testing.T, localDelivery string) *agentEnv {
	t.Helper()
	cnitest.RequireRoot(t)
	svcCIDR := cnitest.PickSubnet(t, 24)
	run(t, "ip", "route", "add", "blackhole", svcCIDR.String())
	t.Cleanup(func() { runQuiet("ip", "route", "del", "blackhole", svcCIDR.String()) })
	var plugin map[string]any
	if localDelivery != "" {
		plugin = map[string]any{"localDelivery": localDelivery}
	}
	return newAgentEnvWith(t, buildAgent(t), kube.Options{ServiceCIDR: svcCIDR.String()}, plugin)
}

// svcPort is one port of a test Service: the Service's port and the
// backends' port it resolves to, as the EndpointSlice says.
type svcPort struct {
	name        string
	proto       corev1.Protocol
	port        int32
	backendPort int32
}

// service creates a ClusterIP Service and, as the EndpointSlice
// controller would (none runs here), its EndpointSlice with the backends
// ready on the env's node. It returns the ClusterIP the apiserver gave.
func (e *agentEnv) service(t *testing.T, namespace, name string, ports []svcPort, backends ...netip.Addr) netip.Addr {
	t.Helper()
	ctx := context.Background()
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeClusterIP}}
	for _, p := range ports {
		svc.Spec.Ports = append(svc.Spec.Ports, corev1.ServicePort{Name: p.name, Protocol: p.proto, Port: p.port,
			TargetPort: intstr.FromInt32(p.backendPort)})
	}
	svc, err := e.kube.Client.CoreV1().Services(namespace).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip, err := netip.ParseAddr(svc.Spec.ClusterIP)
	if err != nil {
		t.Fatalf("service %s/%s: ClusterIP %q: %v", namespace, name, svc.Spec.ClusterIP, err)
	}
	es := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name + "-1",
			Labels: map[string]string{discoveryv1.LabelServiceName: name}},
		AddressType: discoveryv1.AddressTypeIPv4,
	}
	for _, p := range ports {
		es.Ports = append(es.Ports, discoveryv1.EndpointPort{Name: ptrTo(p.name), Protocol: ptrTo(p.proto), Port: ptrTo(p.backendPort)})
	}
	for _, b := range backends {
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{b.String()},
			Conditions: discoveryv1.EndpointConditions{Ready: ptrTo(true)}})
	}
	if _, err := e.kube.Client.DiscoveryV1().EndpointSlices(namespace).Create(ctx, es, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	return vip
}

// setEndpoints replaces the backends of a Service made by service.
func (e *agentEnv) setEndpoints(t *testing.T, namespace, name string, backends ...netip.Addr) {
	t.Helper()
	ctx := context.Background()
	c := e.kube.Client.DiscoveryV1().EndpointSlices(namespace)
	es, err := c.Get(ctx, name+"-1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	es.Endpoints = nil
	for _, b := range backends {
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{b.String()},
			Conditions: discoveryv1.EndpointConditions{Ready: ptrTo(true)}})
	}
	if _, err := c.Update(ctx, es, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func ptrTo[T any](v T) *T { return &v }

// reachAddr reports whether a new TCP connection from p to dst:port
// carries data both ways.
func (p *kpod) reachAddr(dst netip.Addr, port int) bool {
	c, err := p.dial(dst, port, time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	return echoOK(c)
}

// agentMetric is the value of one sample line of the agent's /metrics.
func (e *agentEnv) agentMetric(t *testing.T, name string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + e.agent.metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`).FindSubmatch(body)
	if m == nil {
		t.Fatalf("no %s in /metrics", name)
	}
	v, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// A ClusterIP Service with a backend on this node, reached from another
// pod through the ClusterIP: delivered straight into the backend
// (direct, the default), and across the node's routing (routed). The
// backend's host veth tells the two apart, as in TestLocalDelivery. A
// Service whose endpoints go away refuses new connections at once.
func TestServicesClusterIPLocalBackend(t *testing.T) {
	for _, mode := range []string{cni.LocalDirect, cni.LocalRouted} {
		t.Run(mode, func(t *testing.T) {
			e := newServiceEnv(t, mode)
			e.kube.CreateNamespace(t, "shop", nil)
			web := e.newPod(t, "shop", "web", map[string]string{"app": "web"})
			db := e.newPod(t, "shop", "db", map[string]string{"app": "db"})
			db.serve(t, 8080)
			vip := e.service(t, "shop", "db", []svcPort{{name: "http", proto: corev1.ProtocolTCP, port: 80, backendPort: 8080}}, db.ip)
			eventually(t, fmt.Sprintf("web -> ClusterIP %s:80 -> db:8080", vip), true, func() bool { return web.reachAddr(vip, 80) })
			if web.reachAddr(vip, 8080) {
				t.Fatalf("web reached %s:8080, a port the Service does not have", vip)
			}

			// Ten round trips on one connection: at least ten segments
			// from web to db. Routed, each leaves through db's host veth;
			// direct, none does (neighbour discovery may add a few).
			conn, err := web.dial(vip, 80, time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			hostDB, err := netlinksafe.LinkByName(cni.HostVethName(db.ContainerID, db.IfName))
			if err != nil {
				t.Fatal(err)
			}
			before := txPackets(t, hostDB)
			for i := range 10 {
				if !echoOK(conn) {
					t.Fatalf("round trip %d through the ClusterIP failed", i)
				}
			}
			sent := txPackets(t, hostDB) - before
			if mode == cni.LocalDirect && sent >= 6 {
				t.Errorf("db's host veth transmitted %d packets during 10 round trips: routed, not delivered directly", sent)
			}
			if mode == cni.LocalRouted && sent < 10 {
				t.Errorf("db's host veth transmitted %d packets during 10 round trips: want them routed through it", sent)
			}
			if got := e.agentMetric(t, "idcni_service_frontends"); got < 1 {
				t.Errorf("idcni_service_frontends %v, want the Service's frontend", got)
			}
			if got := e.agentMetric(t, "idcni_service_backends"); got < 1 {
				t.Errorf("idcni_service_backends %v, want db", got)
			}

			// No endpoint left: refused at once (a TCP reset), not
			// left to time out.
			e.setEndpoints(t, "shop", "db")
			// The agent's part: the frontend stays, with no backend.
			dp := e.Datapath(t)
			waitFor(t, 15*time.Second, "the service map holds db's frontend with no backend", func() bool {
				m, err := dp.Services()
				v, ok := m[bpf.ServiceFrontend{Addr: vip, Port: 80, Proto: unix.IPPROTO_TCP}]
				return err == nil && ok && len(v.Backends) == 0
			})
			var last error
			defer func() {
				if t.Failed() {
					t.Logf("last dial to the ClusterIP without endpoints: %v", last)
				}
			}()
			eventually(t, "ClusterIP without endpoints refuses", true, func() bool {
				c, err := web.dial(vip, 80, time.Second)
				if err == nil {
					c.Close()
				}
				last = err
				return err != nil && strings.Contains(err.Error(), "connection refused")
			})
			e.setEndpoints(t, "shop", "db", db.ip)
			eventually(t, "ClusterIP with db back", true, func() bool { return web.reachAddr(vip, 80) })
		})
	}
}

// Egress policy judges the backend a ClusterIP flow goes to, not the
// ClusterIP (issue 13's defect: it was world, and any egress policy
// dropped it). An egress rule allowing the backend's label, on the
// backend's port, admits traffic through the Service; the same client's
// flows through another Service, whose backend the rule does not allow,
// are dropped, as they are to that backend's own address.
func TestServicesEgressPolicyJudgesTheBackend(t *testing.T) {
	e := newServiceEnv(t, "")
	e.kube.CreateNamespace(t, "shop", nil)
	web := e.newPod(t, "shop", "web", map[string]string{"app": "web"})
	db := e.newPod(t, "shop", "db", map[string]string{"app": "db"})
	cache := e.newPod(t, "shop", "cache", map[string]string{"app": "cache"})
	db.serve(t, 8080)
	cache.serve(t, 8080)
	port := []svcPort{{name: "http", proto: corev1.ProtocolTCP, port: 80, backendPort: 8080}}
	dbVIP := e.service(t, "shop", "db", port, db.ip)
	cacheVIP := e.service(t, "shop", "cache", port, cache.ip)
	eventually(t, "web -> db's ClusterIP with no policy", true, func() bool { return web.reachAddr(dbVIP, 80) })
	eventually(t, "web -> cache's ClusterIP with no policy", true, func() bool { return web.reachAddr(cacheVIP, 80) })

	e.apply(t, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "web-to-db", Namespace: "shop"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
			Egress: []networkingv1.NetworkPolicyEgressRule{{
				To:    []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "db"}}}},
				Ports: tcpPort(8080),
			}},
		},
	})
	eventually(t, "web -> cache's ClusterIP under an egress policy that does not allow cache", false,
		func() bool { return web.reachAddr(cacheVIP, 80) })
	if !web.reachAddr(dbVIP, 80) {
		t.Fatal("web -> db's ClusterIP dropped under the egress policy that allows db on 8080")
	}
	if !web.reach(db, 8080) {
		t.Fatal("web -> db's own address dropped under the egress policy that allows it")
	}
	if web.reach(cache, 8080) {
		t.Fatal("web -> cache's own address allowed, the control of the Service case")
	}

	// The same label on another port than the backend's: the Service's
	// port (80) is not what the rule is about, the backend's is.
	e.apply(t, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "web-to-db", Namespace: "shop"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
			Egress: []networkingv1.NetworkPolicyEgressRule{{
				To:    []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "db"}}}},
				Ports: tcpPort(80),
			}},
		},
	})
	eventually(t, "web -> db's ClusterIP:80 when the rule allows db's port 80, not its 8080", false,
		func() bool { return web.reachAddr(dbVIP, 80) })
}

// dnsName is the name the test's DNS server answers, with dnsAnswer.
const dnsName = "db.shop.svc.cluster.local."

var dnsAnswer = netip.MustParseAddr("192.0.2.53")

// serveDNS runs a tiny DNS server in the pod on UDP and TCP port: an A
// record for dnsName, NXDOMAIN for anything else.
func (p *kpod) serveDNS(t *testing.T, port int) {
	t.Helper()
	var pc net.PacketConn
	var l net.Listener
	err := ns.WithNetNSPath(p.NSPath, func(ns.NetNS) error {
		var err error
		addr := fmt.Sprintf(":%d", port)
		if pc, err = net.ListenPacket("udp4", addr); err != nil {
			return err
		}
		l, err = net.Listen("tcp4", addr)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close(); l.Close() })
	go func() {
		buf := make([]byte, 512)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if resp, err := dnsReply(buf[:n]); err == nil {
				_, _ = pc.WriteTo(resp, from)
			}
		}
	}()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				q, err := readTCPMsg(c)
				if err != nil {
					return
				}
				if resp, err := dnsReply(q); err == nil {
					_ = writeTCPMsg(c, resp)
				}
			}()
		}
	}()
}

func dnsReply(query []byte) ([]byte, error) {
	var m dnsmessage.Message
	if err := m.Unpack(query); err != nil {
		return nil, err
	}
	if len(m.Questions) != 1 {
		return nil, errors.New("want one question")
	}
	q := m.Questions[0]
	resp := dnsmessage.Message{Header: dnsmessage.Header{ID: m.ID, Response: true, Authoritative: true}, Questions: m.Questions}
	if q.Name.String() == dnsName && q.Type == dnsmessage.TypeA {
		resp.Answers = []dnsmessage.Resource{{
			Header: dnsmessage.ResourceHeader{Name: q.Name, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET, TTL: 30},
			Body:   &dnsmessage.AResource{A: dnsAnswer.As4()},
		}}
	} else {
		resp.RCode = dnsmessage.RCodeNameError
	}
	return resp.Pack()
}

func readTCPMsg(c net.Conn) ([]byte, error) {
	var n [2]byte
	if _, err := io.ReadFull(c, n[:]); err != nil {
		return nil, err
	}
	b := make([]byte, binary.BigEndian.Uint16(n[:]))
	_, err := io.ReadFull(c, b)
	return b, err
}

func writeTCPMsg(c net.Conn, b []byte) error {
	_, err := c.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(b))), b...))
	return err
}

// resolve asks server:port for dnsName's A record from inside the pod,
// over network ("udp" or "tcp"), and checks the answer.
func (p *kpod) resolve(server netip.Addr, port int, network string) error {
	name := dnsmessage.MustNewName(dnsName)
	id := uint16(rand.Uint32())
	q, err := (&dnsmessage.Message{Header: dnsmessage.Header{ID: id, RecursionDesired: true},
		Questions: []dnsmessage.Question{{Name: name, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}}}).Pack()
	if err != nil {
		return err
	}
	var c net.Conn
	err = ns.WithNetNSPath(p.NSPath, func(ns.NetNS) error {
		// A connected socket: a reply from anything but server:port
		// (an untranslated backend address) is not taken.
		c, err = net.DialTimeout(network, netip.AddrPortFrom(server, uint16(port)).String(), time.Second)
		return err
	})
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	var resp []byte
	if network == "tcp" {
		if err := writeTCPMsg(c, q); err != nil {
			return err
		}
		if resp, err = readTCPMsg(c); err != nil {
			return err
		}
	} else {
		if _, err := c.Write(q); err != nil {
			return err
		}
		buf := make([]byte, 512)
		n, err := c.Read(buf)
		if err != nil {
			return err
		}
		resp = buf[:n]
	}
	var m dnsmessage.Message
	if err := m.Unpack(resp); err != nil {
		return err
	}
	if m.ID != id || len(m.Answers) != 1 {
		return fmt.Errorf("reply id %d (asked %d) with %d answers", m.ID, id, len(m.Answers))
	}
	a, ok := m.Answers[0].Body.(*dnsmessage.AResource)
	if !ok || netip.AddrFrom4(a.A) != dnsAnswer {
		return fmt.Errorf("answer %v, want %s", m.Answers[0].Body, dnsAnswer)
	}
	return nil
}

// DNS under the standard egress rule: a client whose egress policy allows
// only k8s-app=kube-dns pods in kube-system on port 53 resolves through
// the kube-dns Service's ClusterIP, over UDP and TCP. What the rule does
// not allow stays denied: before it exists (egress denied by default),
// a pod with the same label in another namespace behind a Service of its
// own, and the DNS pod on another port.
func TestServicesDNSUnderEgressPolicy(t *testing.T) {
	e := newServiceEnv(t, "")
	e.kube.CreateNamespace(t, "app", nil)
	// The apiserver makes kube-system itself, soon after it is ready;
	// its default ServiceAccount, which a Pod needs, is the
	// controller-manager's, which does not run here.
	waitFor(t, 30*time.Second, "kube-system exists", func() bool {
		_, err := e.kube.Client.CoreV1().Namespaces().Get(context.Background(), "kube-system", metav1.GetOptions{})
		return err == nil
	})
	if err := e.kube.EnsureDefaultServiceAccount(context.Background(), "kube-system"); err != nil {
		t.Fatal(err)
	}
	client := e.newPod(t, "app", "client", map[string]string{"app": "client"})
	dns := e.newPod(t, "kube-system", "coredns", map[string]string{"k8s-app": "kube-dns"})
	decoy := e.newPod(t, "app", "decoy", map[string]string{"k8s-app": "kube-dns"})
	dns.serveDNS(t, 53)
	dns.serveDNS(t, 5353)
	decoy.serveDNS(t, 53)
	dnsPorts := []svcPort{
		{name: "dns", proto: corev1.ProtocolUDP, port: 53, backendPort: 53},
		{name: "dns-tcp", proto: corev1.ProtocolTCP, port: 53, backendPort: 53},
	}
	kubeDNS := e.service(t, "kube-system", "kube-dns", dnsPorts, dns.ip)
	decoyDNS := e.service(t, "app", "decoy-dns", dnsPorts, decoy.ip)
	resolves := func(server netip.Addr, port int, network string) func() bool {
		return func() bool { return client.resolve(server, port, network) == nil }
	}
	eventually(t, "client resolves through kube-dns's ClusterIP with no policy", true, resolves(kubeDNS, 53, "udp"))
	eventually(t, "client resolves through the decoy's ClusterIP with no policy", true, resolves(decoyDNS, 53, "udp"))

	e.apply(t, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "default-deny-egress", Namespace: "app"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "client"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
		},
	})
	eventually(t, "client resolves through kube-dns's ClusterIP with egress denied", false, resolves(kubeDNS, 53, "udp"))
	if err := client.resolve(dns.ip, 53, "udp"); err == nil {
		t.Fatal("client resolved at the DNS pod's own address with egress denied")
	}

	udp, tcp := corev1.ProtocolUDP, corev1.ProtocolTCP
	p53 := intstr.FromInt32(53)
	e.apply(t, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "allow-dns", Namespace: "app"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "client"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
			Egress: []networkingv1.NetworkPolicyEgressRule{{
				To: []networkingv1.NetworkPolicyPeer{{
					NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"kubernetes.io/metadata.name": "kube-system"}},
					PodSelector:       &metav1.LabelSelector{MatchLabels: map[string]string{"k8s-app": "kube-dns"}},
				}},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &udp, Port: &p53}, {Protocol: &tcp, Port: &p53}},
			}},
		},
	})
	eventually(t, "client resolves through kube-dns's ClusterIP over UDP under allow-dns", true, resolves(kubeDNS, 53, "udp"))
	if err := client.resolve(kubeDNS, 53, "tcp"); err != nil {
		t.Fatalf("client resolves through kube-dns's ClusterIP over TCP under allow-dns: %v", err)
	}
	if err := client.resolve(decoyDNS, 53, "udp"); err == nil {
		t.Fatal("client resolved through the decoy's ClusterIP: a k8s-app=kube-dns pod outside kube-system")
	}
	if err := client.resolve(decoyDNS, 53, "tcp"); err == nil {
		t.Fatal("client resolved over TCP through the decoy's ClusterIP")
	}
	if err := client.resolve(dns.ip, 5353, "udp"); err == nil {
		t.Fatal("client reached the DNS pod on port 5353, which allow-dns does not allow")
	}
}

// A ClusterIP whose backend is a pod of another node: the translated
// packet leaves through the node's routing to that node, and the reply,
// routed back to the client's host veth, is translated back there
// (to_pod). The other node is a netns (remoteNode) holding the backend's
// address on its loopback; this node routes that one address to it.
func TestServicesClusterIPRemoteBackend(t *testing.T) {
	e := newServiceEnv(t, "")
	e.kube.CreateNamespace(t, "shop", nil)
	web := e.newPod(t, "shop", "web", map[string]string{"app": "web"})
	r := newRemoteNode(t, e)
	backend := cnitest.PickSubnet(t, 32).Addr()
	run(t, "ip", "-n", r.name, "addr", "add", backend.String()+"/32", "dev", "lo")
	run(t, "ip", "route", "add", backend.String()+"/32", "via", r.node.String())
	t.Cleanup(func() { runQuiet("ip", "route", "del", backend.String()+"/32") })
	var l net.Listener
	err := ns.WithNetNSPath(r.nsPath, func(ns.NetNS) error {
		var err error
		l, err = net.Listen("tcp", netip.AddrPortFrom(backend, 8080).String())
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	if !web.reachAddr(backend, 8080) {
		t.Fatal("web cannot reach the other node's backend at its own address")
	}
	vip := e.service(t, "shop", "remote", []svcPort{{name: "http", proto: corev1.ProtocolTCP, port: 80, backendPort: 8080}}, backend)
	eventually(t, fmt.Sprintf("web -> ClusterIP %s:80 -> %s:8080 on another node", vip, backend), true,
		func() bool { return web.reachAddr(vip, 80) })
}
