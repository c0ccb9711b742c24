package agent

import (
	"context"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"

	"github.com/idcni/idcni/bpf"
)

func eventScheme() *runtime.Scheme {
	s := runtime.NewScheme()
	_ = scheme.AddToScheme(s)
	return s
}

// eventSink writes recorder events through the clientset (events.k8s.io is
// not needed: core/v1 Events are what kubectl describe shows).
type eventSink struct{ client kubernetes.Interface }

func (s *eventSink) Create(e *corev1.Event) (*corev1.Event, error) {
	return s.client.CoreV1().Events(e.Namespace).Create(context.Background(), e, metav1.CreateOptions{})
}

func (s *eventSink) Update(e *corev1.Event) (*corev1.Event, error) {
	return s.client.CoreV1().Events(e.Namespace).Update(context.Background(), e, metav1.UpdateOptions{})
}

func (s *eventSink) Patch(e *corev1.Event, data []byte) (*corev1.Event, error) {
	return s.client.CoreV1().Events(e.Namespace).Patch(context.Background(), e.Name, "application/strategic-merge-patch+json", data, metav1.PatchOptions{})
}

func removePins(root string) error { return bpf.Unpin(root) }

// trim keeps of an informer's object what the agent reads. The cache holds
// every Pod of the cluster, and most of a Pod (its containers' images,
// commands, env, volumes, its conditions and container statuses, its
// managed fields) says nothing about identity or addresses; a Node's status
// carries its image list. The compiler keeps the same objects.
func trim(obj any) (any, error) {
	switch o := obj.(type) {
	case *corev1.Pod:
		p := &corev1.Pod{
			ObjectMeta: trimMeta(o.ObjectMeta),
			Spec:       corev1.PodSpec{NodeName: o.Spec.NodeName, HostNetwork: o.Spec.HostNetwork},
			Status:     corev1.PodStatus{Phase: o.Status.Phase, PodIP: o.Status.PodIP, PodIPs: o.Status.PodIPs},
		}
		// Named ports, of restartable init containers too (sidecars).
		for _, c := range o.Spec.InitContainers {
			p.Spec.InitContainers = append(p.Spec.InitContainers, corev1.Container{Name: c.Name, Ports: c.Ports})
		}
		for _, c := range o.Spec.Containers {
			p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: c.Name, Ports: c.Ports})
		}
		return p, nil
	case *corev1.Node:
		return &corev1.Node{
			ObjectMeta: trimMeta(o.ObjectMeta),
			Spec:       corev1.NodeSpec{PodCIDR: o.Spec.PodCIDR, PodCIDRs: o.Spec.PodCIDRs},
			Status:     corev1.NodeStatus{Addresses: o.Status.Addresses},
		}, nil
	case *corev1.Namespace:
		return &corev1.Namespace{ObjectMeta: trimMeta(o.ObjectMeta)}, nil
	case *networkingv1.NetworkPolicy:
		return &networkingv1.NetworkPolicy{ObjectMeta: trimMeta(o.ObjectMeta), Spec: o.Spec}, nil
	case *corev1.Service:
		// What serviceEntries reads; a Service's status (load balancer
		// ingress) and its NodePorts and external IPs are kube-proxy's.
		s := o.Spec
		return &corev1.Service{ObjectMeta: trimMeta(o.ObjectMeta), Spec: corev1.ServiceSpec{Type: s.Type,
			ClusterIP: s.ClusterIP, ClusterIPs: s.ClusterIPs, Ports: s.Ports, SessionAffinity: s.SessionAffinity,
			SessionAffinityConfig: s.SessionAffinityConfig, InternalTrafficPolicy: s.InternalTrafficPolicy}}, nil
	case *discoveryv1.EndpointSlice:
		es := &discoveryv1.EndpointSlice{ObjectMeta: trimMeta(o.ObjectMeta), AddressType: o.AddressType, Ports: o.Ports}
		// An endpoint's hints, zone, hostname and target pod say nothing
		// about where its flows go.
		for _, ep := range o.Endpoints {
			es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: ep.Addresses,
				Conditions: ep.Conditions, NodeName: ep.NodeName})
		}
		return es, nil
	}
	return obj, nil
}

// trimMeta keeps what keys, events and selectors need.
func trimMeta(m metav1.ObjectMeta) metav1.ObjectMeta {
	return metav1.ObjectMeta{Name: m.Name, Namespace: m.Namespace, UID: m.UID, ResourceVersion: m.ResourceVersion,
		Generation: m.Generation, Labels: m.Labels, DeletionTimestamp: m.DeletionTimestamp}
}
