package agent

import (
	"net/netip"
	"reflect"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func ptr[T any](v T) *T { return &v }

type testEP struct {
	addr                        string
	node                        string
	ready, serving, terminating *bool
}

func epSlice(family discoveryv1.AddressType, ports []discoveryv1.EndpointPort, eps ...testEP) *discoveryv1.EndpointSlice {
	es := &discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Name: "s", Namespace: "ns"}, AddressType: family, Ports: ports}
	for _, e := range eps {
		ep := discoveryv1.Endpoint{Addresses: []string{e.addr},
			Conditions: discoveryv1.EndpointConditions{Ready: e.ready, Serving: e.serving, Terminating: e.terminating}}
		if e.node != "" {
			ep.NodeName = ptr(e.node)
		}
		es.Endpoints = append(es.Endpoints, ep)
	}
	return es
}

func be(addr string, port uint16) svcBackend {
	return svcBackend{Addr: netip.MustParseAddr(addr), Port: port}
}

func TestServiceEntriesReadyFirstThenServingTerminating(t *testing.T) {
	svc := &corev1.Service{Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.10", ClusterIPs: []string{"10.96.0.10"},
		Ports: []corev1.ServicePort{{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP}}}}
	ports := []discoveryv1.EndpointPort{{Name: ptr("dns"), Port: ptr[int32](5353), Protocol: ptr(corev1.ProtocolUDP)}}
	mixed := epSlice(discoveryv1.AddressTypeIPv4, ports,
		testEP{addr: "10.0.0.3", ready: ptr(true)},
		testEP{addr: "10.0.0.2"}, // no conditions: ready
		testEP{addr: "10.0.0.4", ready: ptr(false), serving: ptr(true), terminating: ptr(true)},
		testEP{addr: "10.0.0.5", ready: ptr(false)})
	got := serviceEntries(svc, []*discoveryv1.EndpointSlice{mixed}, "n1")
	want := []svcEntry{{Frontend: svcFrontend{Addr: netip.MustParseAddr("10.96.0.10"), Port: 53, Proto: corev1.ProtocolUDP},
		Backends: []svcBackend{be("10.0.0.2", 5353), be("10.0.0.3", 5353)}}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("ready endpoints: got %+v, want %+v", got, want)
	}

	// None ready: the serving ones that terminate, never the unready.
	draining := epSlice(discoveryv1.AddressTypeIPv4, ports,
		testEP{addr: "10.0.0.4", ready: ptr(false), serving: ptr(true), terminating: ptr(true)},
		testEP{addr: "10.0.0.6", ready: ptr(false), serving: ptr(false), terminating: ptr(true)},
		testEP{addr: "10.0.0.5", ready: ptr(false)})
	got = serviceEntries(svc, []*discoveryv1.EndpointSlice{draining}, "n1")
	if len(got) != 1 || !reflect.DeepEqual(got[0].Backends, []svcBackend{be("10.0.0.4", 5353)}) {
		t.Fatalf("no ready endpoint: got %+v, want the serving terminating one", got)
	}

	// Nothing usable: the frontend stays, with no backends, so its flows
	// are rejected rather than left to kube-proxy or a time-out.
	got = serviceEntries(svc, []*discoveryv1.EndpointSlice{epSlice(discoveryv1.AddressTypeIPv4, ports,
		testEP{addr: "10.0.0.5", ready: ptr(false)})}, "n1")
	if len(got) != 1 || len(got[0].Backends) != 0 {
		t.Fatalf("no usable endpoint: got %+v, want one frontend without backends", got)
	}
}

func TestServiceEntriesNamedPortsPerFamilyAndSlice(t *testing.T) {
	// targetPort "http" is 8080 on one pod and 9090 on another: the
	// EndpointSlice controller puts them in two slices, each with its
	// number under the service port's name.
	svc := &corev1.Service{Spec: corev1.ServiceSpec{ClusterIPs: []string{"10.96.0.20", "fd00:96::20"},
		Ports: []corev1.ServicePort{
			{Name: "http", Port: 80},
			{Name: "metrics", Port: 9000, Protocol: corev1.ProtocolTCP},
		}}}
	a := epSlice(discoveryv1.AddressTypeIPv4, []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}},
		testEP{addr: "10.0.0.2"})
	b := epSlice(discoveryv1.AddressTypeIPv4, []discoveryv1.EndpointPort{
		{Name: ptr("http"), Port: ptr[int32](9090), Protocol: ptr(corev1.ProtocolTCP)},
		{Name: ptr("metrics"), Port: ptr[int32](9100), Protocol: ptr(corev1.ProtocolTCP)},
		{Name: ptr("http"), Port: ptr[int32](9090), Protocol: ptr(corev1.ProtocolUDP)},
	}, testEP{addr: "10.0.0.3"})
	v6 := epSlice(discoveryv1.AddressTypeIPv6, []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}},
		testEP{addr: "fd00::2"})
	got := serviceEntries(svc, []*discoveryv1.EndpointSlice{a, b, v6}, "n1")
	fe := func(addr string, port uint16) svcFrontend {
		return svcFrontend{Addr: netip.MustParseAddr(addr), Port: port, Proto: corev1.ProtocolTCP}
	}
	want := []svcEntry{
		{Frontend: fe("10.96.0.20", 80), Backends: []svcBackend{be("10.0.0.2", 8080), be("10.0.0.3", 9090)}},
		{Frontend: fe("10.96.0.20", 9000), Backends: []svcBackend{be("10.0.0.3", 9100)}},
		{Frontend: fe("fd00:96::20", 80), Backends: []svcBackend{be("fd00::2", 8080)}},
		{Frontend: fe("fd00:96::20", 9000), Backends: nil},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v\nwant %+v", got, want)
	}
}

func TestServiceEntriesAffinityLocalAndSkipped(t *testing.T) {
	local := corev1.ServiceInternalTrafficPolicyLocal
	svc := &corev1.Service{Spec: corev1.ServiceSpec{ClusterIPs: []string{"10.96.0.30"},
		Ports:                 []corev1.ServicePort{{Port: 443}},
		SessionAffinity:       corev1.ServiceAffinityClientIP,
		InternalTrafficPolicy: &local}}
	ports := []discoveryv1.EndpointPort{{Port: ptr[int32](8443)}}
	es := epSlice(discoveryv1.AddressTypeIPv4, ports,
		testEP{addr: "10.0.1.2", node: "n1"}, testEP{addr: "10.0.2.2", node: "n2"}, testEP{addr: "10.0.3.2"},
		testEP{addr: "10.0.1.3", node: "n1", ready: ptr(false), serving: ptr(true), terminating: ptr(true)})
	got := serviceEntries(svc, []*discoveryv1.EndpointSlice{es}, "n1")
	if len(got) != 1 || got[0].AffinityTimeout != defaultAffinityTimeout || !got[0].Local ||
		!reflect.DeepEqual(got[0].Backends, []svcBackend{be("10.0.1.2", 8443)}) {
		t.Fatalf("local with affinity: got %+v", got)
	}
	// This node's only endpoint is terminating and serving: it serves
	// (kube-proxy falls back per node under the Local policy).
	es.Endpoints[0].Conditions.Ready = ptr(false)
	got = serviceEntries(svc, []*discoveryv1.EndpointSlice{es}, "n1")
	if len(got) != 1 || !reflect.DeepEqual(got[0].Backends, []svcBackend{be("10.0.1.3", 8443)}) {
		t.Fatalf("local fallback: got %+v", got)
	}
	svc.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr[int32](60)}}
	if got := serviceEntries(svc, nil, "n1"); len(got) != 1 || got[0].AffinityTimeout != 60 || got[0].Backends != nil {
		t.Fatalf("affinity timeout 60, no slices: got %+v", got)
	}

	for _, s := range []*corev1.Service{
		{Spec: corev1.ServiceSpec{ClusterIP: "None", ClusterIPs: []string{"None"}, Ports: []corev1.ServicePort{{Port: 80}}}},
		{Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName, ExternalName: "example.com"}},
	} {
		if got := serviceEntries(s, []*discoveryv1.EndpointSlice{es}, "n1"); got != nil {
			t.Errorf("%+v: got %+v, want nothing to translate", s.Spec, got)
		}
	}
}

// The informers keep of a Service and an EndpointSlice what serviceEntries
// reads (and the slice's service-name label, to find its Service).
func TestTrimServicesAndEndpointSlices(t *testing.T) {
	local := corev1.ServiceInternalTrafficPolicyLocal
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "shop", ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "x"}}},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeNodePort, ClusterIP: "10.96.0.40", ClusterIPs: []string{"10.96.0.40"},
			Ports:           []corev1.ServicePort{{Name: "http", Port: 80, NodePort: 30080}},
			SessionAffinity: corev1.ServiceAffinityClientIP, InternalTrafficPolicy: &local,
			ExternalIPs: []string{"192.0.2.1"}, Selector: map[string]string{"app": "web"}},
		Status: corev1.ServiceStatus{LoadBalancer: corev1.LoadBalancerStatus{Ingress: []corev1.LoadBalancerIngress{{IP: "192.0.2.2"}}}},
	}
	obj, err := trim(svc)
	if err != nil {
		t.Fatal(err)
	}
	ts := obj.(*corev1.Service)
	if !reflect.DeepEqual(serviceEntries(ts, nil, "n1"), serviceEntries(svc, nil, "n1")) || ts.Name != "web" {
		t.Fatalf("trim lost something serviceEntries reads: %+v", ts)
	}
	if ts.Spec.ExternalIPs != nil || ts.Spec.Selector != nil || ts.Status.LoadBalancer.Ingress != nil || ts.ManagedFields != nil {
		t.Fatalf("trim kept what the agent never reads: %+v", ts)
	}

	es := epSlice(discoveryv1.AddressTypeIPv4, []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}},
		testEP{addr: "10.0.1.2", node: "n1"}, testEP{addr: "10.0.1.3", ready: ptr(false), serving: ptr(true), terminating: ptr(true)})
	es.Labels = map[string]string{discoveryv1.LabelServiceName: "web"}
	es.Endpoints[0].Hostname = ptr("web-0")
	es.Endpoints[0].TargetRef = &corev1.ObjectReference{Kind: "Pod", Name: "web-0"}
	es.Endpoints[0].Zone = ptr("z1")
	obj, err = trim(es)
	if err != nil {
		t.Fatal(err)
	}
	te := obj.(*discoveryv1.EndpointSlice)
	slices := []*discoveryv1.EndpointSlice{te}
	if !reflect.DeepEqual(serviceEntries(ts, slices, "n1"), serviceEntries(ts, []*discoveryv1.EndpointSlice{es}, "n1")) ||
		te.Labels[discoveryv1.LabelServiceName] != "web" {
		t.Fatalf("trim lost something serviceEntries reads: %+v", te)
	}
	if ep := te.Endpoints[0]; ep.Hostname != nil || ep.TargetRef != nil || ep.Zone != nil {
		t.Fatalf("trim kept what the agent never reads: %+v", ep)
	}
}
