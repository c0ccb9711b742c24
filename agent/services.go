package agent

import (
	"cmp"
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

// svcFrontend is one address a pod reaches a Service at: a ClusterIP, a
// port and a protocol. Only ClusterIPs: NodePorts, load balancers and
// external IPs stay with kube-proxy.
type svcFrontend struct {
	Addr  netip.Addr
	Port  uint16
	Proto corev1.Protocol
}

// svcBackend is an endpoint a frontend's flows go to.
type svcBackend struct {
	Addr netip.Addr
	Port uint16
}

// svcEntry is what the datapath needs of one frontend.
type svcEntry struct {
	Frontend svcFrontend
	// Backends in a stable order (address, port), so that an unchanged
	// Service rewrites no map entry and a flow's slot keeps its backend.
	Backends []svcBackend
	// AffinityTimeout is sessionAffinity ClientIP's timeout in seconds;
	// 0 when the Service has no affinity.
	AffinityTimeout uint32
	// Local is internalTrafficPolicy Local: Backends holds only this
	// node's endpoints, and none there means none at all.
	Local bool
}

// defaultAffinityTimeout is the API's default for
// sessionAffinityConfig.clientIP.timeoutSeconds (3 hours).
const defaultAffinityTimeout = 10800

// serviceEntries turns a Service and its EndpointSlices into the
// frontends this node translates, one per ClusterIP and port. A frontend
// with no usable endpoint is kept with no backends: the datapath rejects
// its flows at once instead of leaving them to time out. Endpoints are
// chosen as kube-proxy does: the ready ones, and only when none is ready,
// the ones still serving while they terminate; with
// internalTrafficPolicy Local, among this node's only. A port's backends
// come from the EndpointSlice port of the same name and protocol, which
// carries the number a named targetPort resolved to on each pod.
func serviceEntries(svc *corev1.Service, epSlices []*discoveryv1.EndpointSlice, node string) []svcEntry {
	if svc.Spec.Type == corev1.ServiceTypeExternalName {
		return nil
	}
	var timeout uint32
	if svc.Spec.SessionAffinity == corev1.ServiceAffinityClientIP {
		timeout = defaultAffinityTimeout
		if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
			timeout = uint32(max(*c.ClientIP.TimeoutSeconds, 1))
		}
	}
	local := svc.Spec.InternalTrafficPolicy != nil && *svc.Spec.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal
	ips := svc.Spec.ClusterIPs
	if len(ips) == 0 && svc.Spec.ClusterIP != "" {
		ips = []string{svc.Spec.ClusterIP}
	}
	var out []svcEntry
	for _, s := range ips {
		addr, err := netip.ParseAddr(s)
		if err != nil { // "None" (headless) or garbage: nothing to translate
			continue
		}
		addr = addr.Unmap()
		for _, sp := range svc.Spec.Ports {
			proto := cmp.Or(sp.Protocol, corev1.ProtocolTCP)
			out = append(out, svcEntry{
				Frontend:        svcFrontend{Addr: addr, Port: uint16(sp.Port), Proto: proto},
				Backends:        backendsFor(epSlices, addr.Is4(), sp.Name, proto, node, local),
				AffinityTimeout: timeout,
				Local:           local,
			})
		}
	}
	return out
}

// backendsFor picks one service port's backends of one address family.
func backendsFor(epSlices []*discoveryv1.EndpointSlice, v4 bool, portName string, proto corev1.Protocol, node string,
	local bool) []svcBackend {
	want := discoveryv1.AddressTypeIPv6
	if v4 {
		want = discoveryv1.AddressTypeIPv4
	}
	var ready, terminating []svcBackend
	for _, es := range epSlices {
		if es.AddressType != want {
			continue
		}
		port, ok := slicePort(es, portName, proto)
		if !ok {
			continue
		}
		for _, ep := range es.Endpoints {
			if local && (ep.NodeName == nil || *ep.NodeName != node) {
				continue
			}
			// The API reads a missing condition as true for ready and
			// serving, false for terminating.
			isReady := ep.Conditions.Ready == nil || *ep.Conditions.Ready
			serving := ep.Conditions.Serving == nil || *ep.Conditions.Serving
			isTerminating := ep.Conditions.Terminating != nil && *ep.Conditions.Terminating
			for _, a := range ep.Addresses {
				addr, err := netip.ParseAddr(a)
				if err != nil || addr.Unmap().Is4() != v4 {
					continue
				}
				b := svcBackend{Addr: addr.Unmap(), Port: port}
				switch {
				case isReady:
					ready = append(ready, b)
				case serving && isTerminating:
					terminating = append(terminating, b)
				}
			}
		}
	}
	out := ready
	if len(out) == 0 {
		out = terminating
	}
	slices.SortFunc(out, func(a, b svcBackend) int {
		return cmp.Or(a.Addr.Compare(b.Addr), cmp.Compare(a.Port, b.Port))
	})
	return slices.Compact(out)
}

// slicePort is the number an EndpointSlice gives the service port named
// portName (the empty name of a Service with a single unnamed port).
func slicePort(es *discoveryv1.EndpointSlice, portName string, proto corev1.Protocol) (uint16, bool) {
	for _, p := range es.Ports {
		name, pproto := "", corev1.ProtocolTCP
		if p.Name != nil {
			name = *p.Name
		}
		if p.Protocol != nil {
			pproto = *p.Protocol
		}
		if name == portName && pproto == proto && p.Port != nil && *p.Port > 0 && *p.Port < 65536 {
			return uint16(*p.Port), true
		}
	}
	return 0, false
}
