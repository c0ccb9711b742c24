// Package simulate answers "what would these NetworkPolicies allow?"
// offline, for Namespace, Pod and NetworkPolicy objects already in memory:
// it numbers the pods' identities as the agent does (identity, with the
// agent's churn labels), compiles the policies with the agent's compiler
// (policy/netpol), and decides every ordered pod pair and port with the
// rule book (policy.Set.Decide), saying which rule allowed or which
// isolation denied. No cluster, no root, no files and no cobra: policyctl
// simulate (cmd/policyctl) reads the manifests and prints the results.
package simulate

import (
	"cmp"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
	"github.com/idcni/idcni/policy/netpol"
)

// Inputs are the objects to simulate, as read from manifests.
type Inputs struct {
	Namespaces []*corev1.Namespace
	Pods       []*corev1.Pod
	Policies   []*networkingv1.NetworkPolicy
}

// Result is the verdict for one packet: from a pod to a port of another.
type Result struct {
	From     string `json:"from"` // "ns/pod"
	To       string `json:"to"`
	Protocol string `json:"protocol"` // TCP, UDP or SCTP
	Port     int    `json:"port"`
	Allowed  bool   `json:"allowed"`
	// Reason says why: the rules that allowed both sides, or the isolation
	// that denied.
	Reason  string `json:"reason"`
	Egress  Side   `json:"egress"`  // the source pod's egress check
	Ingress Side   `json:"ingress"` // the destination pod's ingress check
}

// Side is the verdict of one direction check.
type Side struct {
	Allowed bool   `json:"allowed"`
	Reason  string `json:"reason"`
	// Rule is the Rule.Origin ("ns/policy ingress[0]") that allowed it.
	Rule string `json:"rule,omitempty"`
}

// Options choose what to probe.
type Options struct {
	// Ports to probe on every destination. Empty: the ports each
	// destination pod declares in its containers.
	Ports []int
	// Protocol (TCP, UDP, SCTP) of Ports, TCP when empty; without Ports it
	// keeps only the declared ports of this protocol.
	Protocol string
	// ChurnLabels are the pod labels left out of identities, as the agent's
	// --churn-labels; nil means identity.DefaultChurnLabels().
	ChurnLabels []string
}

var protocols = map[string]policy.Proto{"TCP": policy.ProtoTCP, "UDP": policy.ProtoUDP, "SCTP": policy.ProtoSCTP}

// Run compiles in and decides, for every ordered pair of distinct endpoint
// pods, every port of the destination. A pod's traffic to itself never
// leaves its network namespace, so no datapath check applies to it and it
// is not listed.
func Run(in *Inputs, opts Options, warn io.Writer) ([]Result, error) {
	proto := strings.ToUpper(opts.Protocol)
	if proto != "" {
		if _, ok := protocols[proto]; !ok {
			return nil, fmt.Errorf("unknown protocol %q: want TCP, UDP or SCTP", opts.Protocol)
		}
	}
	for _, p := range opts.Ports {
		if p < 1 || p > 65535 {
			return nil, fmt.Errorf("port %d outside 1-65535", p)
		}
	}

	var endpoints []*corev1.Pod
	var noIP []string
	for _, p := range in.Pods {
		key := p.Namespace + "/" + p.Name
		if !netpol.IsEndpoint(p) {
			fmt.Fprintf(warn, "warning: pod %s is not simulated: %s\n", key, notEndpointWhy(p))
			continue
		}
		if p.Status.PodIP == "" && len(p.Status.PodIPs) == 0 {
			noIP = append(noIP, key)
			continue
		}
		endpoints = append(endpoints, p)
	}
	if len(noIP) > 0 {
		slices.Sort(noIP)
		return nil, fmt.Errorf("pods without an IP address (status.podIP): %s; ipBlock peers are matched by pod address, so give every pod one",
			strings.Join(noIP, ", "))
	}
	slices.SortFunc(endpoints, func(a, b *corev1.Pod) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})

	known := map[string]bool{}
	for _, ns := range in.Namespaces {
		known[ns.Name] = true
	}
	missing := map[string]bool{}
	for _, p := range endpoints {
		if !known[p.Namespace] && !missing[p.Namespace] {
			missing[p.Namespace] = true
			fmt.Fprintf(warn, "warning: no Namespace %q given; its only label is taken to be %s=%s\n", p.Namespace, corev1.LabelMetadataName, p.Namespace)
		}
	}

	warnStrippedSelectors(in.Policies, identity.Options{ChurnLabels: opts.ChurnLabels}, warn)

	// The agent's identities (canonical label sets, churn labels stripped),
	// numbered in memory: pods that share an identity in the agent share it
	// here, so a selector on a churn label matches nothing here either.
	ids0 := &netpol.PodIdentities{Alloc: identity.NewMemoryAllocator(), Opts: identity.Options{ChurnLabels: opts.ChurnLabels}}
	c, err := netpol.Compile(ids0, in.Namespaces, endpoints, in.Policies)
	if err != nil {
		return nil, fmt.Errorf("compile policies: %w", err)
	}
	set := c.Set()
	ids := make([]identity.ID, len(endpoints))
	for i, p := range endpoints {
		id, ok := c.PodIdentity(p.Namespace, p.Name)
		if !ok {
			return nil, fmt.Errorf("pod %s/%s has no identity after compiling", p.Namespace, p.Name)
		}
		ids[i] = id
	}

	var out []Result
	for j, dst := range endpoints {
		ports := probePorts(dst, opts.Ports, proto)
		if len(ports) == 0 {
			if len(endpoints) > 1 {
				fmt.Fprintf(warn, "warning: pod %s/%s declares no container ports%s; pass --port to probe it\n", dst.Namespace, dst.Name, protoNote(proto))
			}
			continue
		}
		for i, src := range endpoints {
			if i == j {
				continue
			}
			for _, pp := range ports {
				out = append(out, decide(c, set, src, dst, ids[i], ids[j], pp))
			}
		}
	}
	slices.SortFunc(out, func(a, b Result) int {
		return cmp.Or(cmp.Compare(a.From, b.From), cmp.Compare(a.To, b.To), cmp.Compare(a.Protocol, b.Protocol), cmp.Compare(a.Port, b.Port))
	})
	return out, nil
}

func protoNote(proto string) string {
	if proto == "" {
		return ""
	}
	return " for " + proto
}

func notEndpointWhy(p *corev1.Pod) string {
	if p.Spec.HostNetwork {
		return "it uses the host network, so its traffic is the node's"
	}
	return fmt.Sprintf("it is %s and no longer owns its address", p.Status.Phase)
}

type portProto struct {
	proto string
	port  int
}

// probePorts lists what to probe on dst, sorted and unique.
func probePorts(dst *corev1.Pod, ports []int, proto string) []portProto {
	var out []portProto
	if len(ports) > 0 {
		if proto == "" {
			proto = "TCP"
		}
		for _, p := range ports {
			out = append(out, portProto{proto, p})
		}
	} else {
		for _, cs := range [][]corev1.Container{dst.Spec.InitContainers, dst.Spec.Containers} {
			for _, ct := range cs {
				for _, cp := range ct.Ports {
					p := strings.ToUpper(string(cp.Protocol))
					if p == "" {
						p = "TCP"
					}
					if _, ok := protocols[p]; !ok || cp.ContainerPort < 1 || cp.ContainerPort > 65535 {
						continue
					}
					if proto == "" || proto == p {
						out = append(out, portProto{p, int(cp.ContainerPort)})
					}
				}
			}
		}
	}
	slices.SortFunc(out, func(a, b portProto) int { return cmp.Or(cmp.Compare(a.proto, b.proto), cmp.Compare(a.port, b.port)) })
	return slices.Compact(out)
}

func decide(c *netpol.Compiler, set *policy.Set, src, dst *corev1.Pod, srcID, dstID identity.ID, pp portProto) Result {
	from, to := src.Namespace+"/"+src.Name, dst.Namespace+"/"+dst.Name
	proto := protocols[pp.proto]
	r := Result{From: from, To: to, Protocol: pp.proto, Port: pp.port}
	r.Egress = side(c, set.Decide(srcID, policy.Egress, dstID, proto, uint16(pp.port)), from, to, srcID, policy.Egress)
	r.Ingress = side(c, set.Decide(dstID, policy.Ingress, srcID, proto, uint16(pp.port)), to, from, dstID, policy.Ingress)
	r.Allowed = r.Egress.Allowed && r.Ingress.Allowed
	switch {
	case r.Allowed:
		r.Reason = "egress: " + r.Egress.Reason + "; ingress: " + r.Ingress.Reason
	case !r.Egress.Allowed && !r.Ingress.Allowed:
		r.Reason = r.Egress.Reason + "; and " + r.Ingress.Reason
	case !r.Egress.Allowed:
		r.Reason = r.Egress.Reason
	default:
		r.Reason = r.Ingress.Reason
	}
	return r
}

// side words one direction check of subject (a pod) against peer.
func side(c *netpol.Compiler, d policy.Decision, subject, peer string, id identity.ID, dir policy.Direction) Side {
	s := Side{Allowed: d.Allowed}
	switch d.Reason {
	case policy.ReasonNotIsolated:
		s.Reason = fmt.Sprintf("%s not isolated for %s", subject, dir)
	case policy.ReasonAllowRule:
		s.Rule = d.Rule.Origin
		s.Reason = "allowed by " + d.Rule.Origin
	case policy.ReasonDenyRule:
		s.Rule = d.Rule.Origin
		s.Reason = "denied by " + d.Rule.Origin
	default:
		s.Reason = fmt.Sprintf("%s isolated for %s by %s; no rule allows %s", subject, dir, strings.Join(c.IsolatedBy(id, dir), ", "), peer)
	}
	return s
}

// warnStrippedSelectors warns about each podSelector that names a pod label
// identities leave out (churn and placement labels, --churn-labels): no
// identity carries it, so the selector cannot select by it, here or in the
// agent.
func warnStrippedSelectors(policies []*networkingv1.NetworkPolicy, opts identity.Options, warn io.Writer) {
	for _, np := range policies {
		seen := map[string]bool{}
		check := func(sel *metav1.LabelSelector) {
			if sel == nil {
				return
			}
			keys := slices.Collect(maps.Keys(sel.MatchLabels))
			for _, e := range sel.MatchExpressions {
				keys = append(keys, e.Key)
			}
			slices.Sort(keys)
			for _, k := range keys {
				if !seen[k] && opts.Strips(k) {
					seen[k] = true
					fmt.Fprintf(warn, "warning: NetworkPolicy %s/%s selects pods by label %q, which identities leave out (--churn-labels): no pod has it as far as policy goes\n",
						np.Namespace, np.Name, k)
				}
			}
		}
		check(&np.Spec.PodSelector)
		for _, r := range np.Spec.Ingress {
			for _, peer := range r.From {
				check(peer.PodSelector)
			}
		}
		for _, r := range np.Spec.Egress {
			for _, peer := range r.To {
				check(peer.PodSelector)
			}
		}
	}
}
