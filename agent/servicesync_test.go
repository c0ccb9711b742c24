package agent

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
)

func svcObj(namespace, name, clusterIP string, ports ...corev1.ServicePort) *corev1.Service {
	return &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name, ResourceVersion: "1"},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeClusterIP, ClusterIP: clusterIP, ClusterIPs: []string{clusterIP}, Ports: ports}}
}

func tcpSvcPort(name string, port int32) corev1.ServicePort {
	return corev1.ServicePort{Name: name, Port: port, Protocol: corev1.ProtocolTCP}
}

// sliceObj is an EndpointSlice of service with one TCP port and ready
// endpoints on node-b.
func sliceObj(namespace, name, service, portName string, port int32, addrs ...string) *discoveryv1.EndpointSlice {
	es := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name, ResourceVersion: "1",
			Labels: map[string]string{discoveryv1.LabelServiceName: service}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr(portName), Port: ptr(port), Protocol: ptr(corev1.ProtocolTCP)}},
	}
	for _, a := range addrs {
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{a}, NodeName: ptr("node-b"),
			Conditions: discoveryv1.EndpointConditions{Ready: ptr(true)}})
	}
	return es
}

func fe(addr string, port uint16, proto corev1.Protocol) svcFrontend {
	return svcFrontend{Addr: netip.MustParseAddr(addr), Port: port, Proto: proto}
}

func (ta *testAgent) opsSince(n int, prefix string) []string {
	var out []string
	for _, op := range ta.fm.ops[n:] {
		if strings.HasPrefix(op, prefix) {
			out = append(out, op)
		}
	}
	return out
}

// A Service and its EndpointSlices become one map entry per ClusterIP and
// port; a change of one slice rewrites only the frontend it changed, and
// a Service's deletion removes its frontends.
func TestServicesFollowServicesAndSlices(t *testing.T) {
	ctx := context.Background()
	ta := newTestAgent(t, newFakeMaps(), ns("shop", nil),
		svcObj("shop", "db", "10.96.0.20", tcpSvcPort("pg", 5432), tcpSvcPort("metrics", 9187)),
		sliceObj("shop", "db-1", "db", "pg", 15432, "10.1.0.3", "10.1.0.4"))
	pg, metrics := fe("10.96.0.20", 5432, corev1.ProtocolTCP), fe("10.96.0.20", 9187, corev1.ProtocolTCP)
	if got, want := ta.fm.svc[pg].Backends, []svcBackend{be("10.1.0.3", 15432), be("10.1.0.4", 15432)}; !slices.Equal(got, want) {
		t.Fatalf("pg backends %v, want %v", got, want)
	}
	// No slice port named metrics: the frontend is there, with no
	// backend, so that its flows are rejected at once.
	if v, ok := ta.fm.svc[metrics]; !ok || len(v.Backends) != 0 {
		t.Fatalf("metrics frontend %v (present %v), want present with no backends", v, ok)
	}

	// A second slice adds a backend to pg only.
	before := len(ta.fm.ops)
	es2 := sliceObj("shop", "db-2", "db", "pg", 15432, "10.1.0.5")
	if _, err := ta.client.DiscoveryV1().EndpointSlices("shop").Create(ctx, es2, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ta.settle(t)
	if got := ta.opsSince(before, "service"); !slices.Equal(got, []string{"service put " + pg.String()}) {
		t.Errorf("a new slice for pg wrote %v", got)
	}
	if n := len(ta.fm.svc[pg].Backends); n != 3 {
		t.Errorf("pg has %d backends after the second slice, want 3", n)
	}

	// A slice of another Service, and a slice with no Service, touch
	// nothing of db.
	before = len(ta.fm.ops)
	other := sliceObj("shop", "cache-1", "cache", "pg", 15432, "10.1.0.9")
	orphan := sliceObj("shop", "orphan", "", "pg", 15432, "10.1.0.9")
	delete(orphan.Labels, discoveryv1.LabelServiceName)
	for _, es := range []*discoveryv1.EndpointSlice{other, orphan} {
		if _, err := ta.client.DiscoveryV1().EndpointSlices("shop").Create(ctx, es, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	ta.settle(t)
	if got := ta.opsSince(before, "service"); len(got) > 0 {
		t.Errorf("slices of no translated Service wrote %v", got)
	}

	// Deleting the Service removes both frontends, and nothing else.
	before = len(ta.fm.ops)
	if err := ta.client.CoreV1().Services("shop").Delete(ctx, "db", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	ta.settle(t)
	if len(ta.fm.svc) != 0 {
		t.Errorf("frontends left after the Service was deleted: %v", ta.fm.svc)
	}
	if got := ta.opsSince(before, "service"); len(got) != 2 {
		t.Errorf("deleting the Service wrote %v, want its two frontends deleted", got)
	}
	if v := metricValue(t, ta.metrics.svc.frontends); v != 0 {
		t.Errorf("idcni_service_frontends %v after the deletion, want 0", v)
	}
}

// At start the map becomes the cluster's: frontends of Services deleted
// while no agent ran go, and a frontend that holds other backends is
// rewritten. The audit repairs the same drift later.
func TestServicesStartAndAuditRemoveStaleFrontends(t *testing.T) {
	fm := newFakeMaps()
	stale := fe("10.96.0.99", 80, corev1.ProtocolTCP)
	web := fe("10.96.0.30", 80, corev1.ProtocolTCP)
	fm.svc[stale] = svcValue{Backends: []svcBackend{be("10.1.0.7", 80)}}
	fm.svc[web] = svcValue{Backends: []svcBackend{be("10.1.0.66", 8080)}}
	ta := newTestAgent(t, fm, ns("shop", nil), svcObj("shop", "web", "10.96.0.30", tcpSvcPort("http", 80)),
		sliceObj("shop", "web-1", "web", "http", 8080, "10.1.0.8"))
	if _, ok := fm.svc[stale]; ok {
		t.Error("start left the frontend of a Service that no longer exists")
	}
	if got := fm.svc[web].Backends; !slices.Equal(got, []svcBackend{be("10.1.0.8", 8080)}) {
		t.Errorf("start left web's backends %v", got)
	}

	fm.svc[stale] = svcValue{}
	delete(fm.svc, web)
	ta.queue.Add(key{kind: kindAudit})
	ta.settle(t)
	if _, ok := fm.svc[stale]; ok {
		t.Error("audit left a frontend nobody wants")
	}
	if got := fm.svc[web].Backends; !slices.Equal(got, []svcBackend{be("10.1.0.8", 8080)}) {
		t.Errorf("audit did not restore web: %v", got)
	}
	if v := metricValue(t, ta.metrics.auditDrift.WithLabelValues("services")); v != 2 {
		t.Errorf("audit drift for services %v, want 2", v)
	}
}

// A full service map loses nothing: the frontend that does not fit waits,
// with a log line, a metric and a Warning Event on its Service, the
// others are written, and it goes in once room is freed.
func TestServicesMapFullWaitsForRoom(t *testing.T) {
	fm := newFakeMaps()
	fm.svcCap = 1
	ta := newTestAgent(t, fm, ns("shop", nil), svcObj("shop", "a", "10.96.0.1", tcpSvcPort("", 80)))
	if len(fm.svc) != 1 {
		t.Fatalf("service map %v, want a's frontend", fm.svc)
	}
	if _, err := ta.client.CoreV1().Services("shop").Create(context.Background(),
		svcObj("shop", "b", "10.96.0.2", tcpSvcPort("", 80)), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ta.settle(t)
	b := fe("10.96.0.2", 80, corev1.ProtocolTCP)
	if _, ok := fm.svc[b]; ok {
		t.Fatal("b written past the map's capacity")
	}
	select {
	case ev := <-ta.events.Events:
		if !strings.Contains(ev, "ServiceNotTranslated") || !strings.Contains(ev, "service map is full") {
			t.Errorf("event %q", ev)
		}
	default:
		t.Error("no Event on the Service that did not fit")
	}
	if v := metricValue(t, ta.metrics.svc.waiting); v != 1 {
		t.Errorf("idcni_service_frontends_waiting %v, want 1", v)
	}
	if v := metricValue(t, ta.metrics.svc.writeErrors.WithLabelValues("full")); v < 1 {
		t.Errorf("idcni_service_map_write_errors_total{cause=full} %v", v)
	}

	if err := ta.client.CoreV1().Services("shop").Delete(context.Background(), "a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	ta.settle(t)
	if _, ok := fm.svc[b]; !ok || len(fm.svc) != 1 {
		t.Fatalf("b not written once a's frontend freed room: %v", fm.svc)
	}
	if v := metricValue(t, ta.metrics.svc.waiting); v != 0 {
		t.Errorf("idcni_service_frontends_waiting %v after b went in, want 0", v)
	}
}

// A failed write leaves the frontend dirty: the next flush writes it.
func TestServicesRetryAFailedWrite(t *testing.T) {
	fm := newFakeMaps()
	ta := newTestAgent(t, fm, ns("shop", nil))
	fm.failNext = fmt.Errorf("injected")
	if _, err := ta.client.CoreV1().Services("shop").Create(context.Background(),
		svcObj("shop", "a", "10.96.0.1", tcpSvcPort("", 80)), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ta.settle(t)
	if len(fm.svc) != 0 {
		t.Fatal("the injected failure did not fail the write")
	}
	if !ta.svc.isDirty() {
		t.Fatal("a frontend whose write failed is not waiting for a retry")
	}
	ta.queue.Add(key{kind: kindRetry})
	ta.settle(t)
	if len(fm.svc) != 1 {
		t.Fatalf("retry did not write the frontend: %v", fm.svc)
	}
}

// Incremental equals full: after any sequence of Service and
// EndpointSlice changes, handled key by key, the map holds exactly what
// serviceEntries makes of the objects as they are now, and an agent
// starting on that map writes nothing. ClusterIPs come from a small pool,
// so two Services sometimes claim one frontend, as an address freed and
// taken again briefly does.
func TestServicesIncrementalEqualsFull(t *testing.T) {
	for seed := range uint64(10) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 13))
			fm := newFakeMaps()
			ta := newTestAgent(t, fm, ns("a", nil), ns("b", nil))
			for step := range 40 {
				randomServiceChange(t, rng, ta.client)
				if rng.IntN(3) == 0 || step == 39 {
					ta.settle(t)
					want := fullServiceMap(t, ta.client, localNode)
					if !sameServiceMap(fm.svc, want) {
						t.Fatalf("step %d: incremental map\n%v\nfull\n%v", step, fm.svc, want)
					}
				}
			}
			// A restart on the map as it is writes nothing.
			objs := currentObjects(t, ta.client)
			before := len(fm.ops)
			newTestAgent(t, fm, objs...)
			var svcOps []string
			for _, op := range fm.ops[before:] {
				if strings.HasPrefix(op, "service") {
					svcOps = append(svcOps, op)
				}
			}
			if len(svcOps) > 0 {
				t.Fatalf("a start on an up-to-date map wrote %v", svcOps)
			}
		})
	}
}

func randomServiceChange(t *testing.T, rng *rand.Rand, c kubernetes.Interface) {
	t.Helper()
	ctx := context.Background()
	// The fake clientset keeps ResourceVersions as given; an API server
	// moves them on every write, and the handlers rely on that.
	rv := fmt.Sprint(rng.Uint64())
	namespace := []string{"a", "b"}[rng.IntN(2)]
	svcName := fmt.Sprintf("s%d", rng.IntN(4))
	ip := fmt.Sprintf("10.96.0.%d", 1+rng.IntN(5))
	switch op := rng.IntN(6); op {
	case 0, 1: // create or replace a Service
		svc := svcObj(namespace, svcName, ip, tcpSvcPort("http", 80))
		if rng.IntN(2) == 0 {
			svc.Spec.Ports = append(svc.Spec.Ports, corev1.ServicePort{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP})
		}
		if rng.IntN(3) == 0 {
			svc.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
		}
		if rng.IntN(3) == 0 {
			svc.Spec.InternalTrafficPolicy = ptr(corev1.ServiceInternalTrafficPolicyLocal)
		}
		svc.ResourceVersion = rv
		if _, err := c.CoreV1().Services(namespace).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
			if _, gerr := c.CoreV1().Services(namespace).Get(ctx, svcName, metav1.GetOptions{}); gerr != nil {
				t.Fatal(err, gerr)
			}
			if _, err := c.CoreV1().Services(namespace).Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
	case 2: // delete a Service
		_ = c.CoreV1().Services(namespace).Delete(ctx, svcName, metav1.DeleteOptions{})
	case 3, 4: // create or replace one of its slices
		es := &discoveryv1.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: fmt.Sprintf("%s-%d", svcName, rng.IntN(2)),
				Labels: map[string]string{discoveryv1.LabelServiceName: svcName}, ResourceVersion: rv},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports: []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(8000 + rng.IntN(2))), Protocol: ptr(corev1.ProtocolTCP)},
				{Name: ptr("dns"), Port: ptr(int32(5353)), Protocol: ptr(corev1.ProtocolUDP)}},
		}
		for range rng.IntN(4) {
			ep := discoveryv1.Endpoint{Addresses: []string{fmt.Sprintf("10.1.0.%d", 1+rng.IntN(6))},
				NodeName:   ptr([]string{localNode, "node-b"}[rng.IntN(2)]),
				Conditions: discoveryv1.EndpointConditions{Ready: ptr(rng.IntN(3) > 0), Serving: ptr(rng.IntN(2) == 0), Terminating: ptr(rng.IntN(2) == 0)}}
			es.Endpoints = append(es.Endpoints, ep)
		}
		if _, err := c.DiscoveryV1().EndpointSlices(namespace).Create(ctx, es, metav1.CreateOptions{}); err != nil {
			if _, gerr := c.DiscoveryV1().EndpointSlices(namespace).Get(ctx, es.Name, metav1.GetOptions{}); gerr != nil {
				t.Fatal(err, gerr)
			}
			if _, err := c.DiscoveryV1().EndpointSlices(namespace).Update(ctx, es, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
	case 5: // delete a slice
		_ = c.DiscoveryV1().EndpointSlices(namespace).Delete(ctx, fmt.Sprintf("%s-%d", svcName, rng.IntN(2)), metav1.DeleteOptions{})
	}
}

// fullServiceMap is the service map computed from scratch: every Service
// with its slices through serviceEntries, a frontend two Services claim
// going to the first by namespace/name.
func fullServiceMap(t *testing.T, c kubernetes.Interface, node string) map[svcFrontend]svcValue {
	t.Helper()
	ctx := context.Background()
	svcs, err := c.CoreV1().Services("").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	owner := map[svcFrontend]string{}
	out := map[svcFrontend]svcValue{}
	for _, svc := range svcs.Items {
		sl, err := c.DiscoveryV1().EndpointSlices(svc.Namespace).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + svc.Name})
		if err != nil {
			t.Fatal(err)
		}
		var eps []*discoveryv1.EndpointSlice
		for i := range sl.Items {
			eps = append(eps, &sl.Items[i])
		}
		k := svc.Namespace + "/" + svc.Name
		for _, e := range serviceEntries(&svc, eps, node) {
			if o, ok := owner[e.Frontend]; ok && o < k {
				continue
			}
			owner[e.Frontend] = k
			out[e.Frontend] = svcValue{Backends: e.Backends, AffinityTimeout: e.AffinityTimeout}
		}
	}
	return out
}

func sameServiceMap(a, b map[svcFrontend]svcValue) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		w, ok := b[k]
		if !ok || !v.equal(w) {
			return false
		}
	}
	return true
}

func currentObjects(t *testing.T, c kubernetes.Interface) []runtime.Object {
	t.Helper()
	ctx := context.Background()
	objs := []runtime.Object{ns("a", nil), ns("b", nil)}
	svcs, err := c.CoreV1().Services("").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range svcs.Items {
		objs = append(objs, &svcs.Items[i])
	}
	sl, err := c.DiscoveryV1().EndpointSlices("").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range sl.Items {
		objs = append(objs, &sl.Items[i])
	}
	return objs
}

// metricValue reads a gauge or counter as a scrape would.
func metricValue(t *testing.T, c prometheus.Metric) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	if m.Gauge != nil {
		return m.Gauge.GetValue()
	}
	return m.Counter.GetValue()
}
