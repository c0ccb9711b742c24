package netpol

import (
	"fmt"
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/idcni/idcni/policy"
)

// parsedPolicy is a NetworkPolicy checked once and turned into the form the
// compiler evaluates many times: selectors converted, CIDRs parsed, ports
// typed.
type parsedPolicy struct {
	key     string // "ns/name"
	ns      string
	subject labels.Selector
	ingress bool // policyTypes contains Ingress (after defaulting)
	egress  bool
	rules   []parsedRule
	// prefixes lists every ipBlock cidr and except, masked, without
	// duplicates: each needs a CIDR identity while the policy exists.
	prefixes []netip.Prefix
	// hasNamed: some rule names a port, so the output depends on the
	// containerPorts of subjects or peers.
	hasNamed bool
	// egressNamed: an egress rule without "to" names a port; it resolves the
	// name on every pod of the cluster.
	egressNamed bool
}

type parsedRule struct {
	dir    policy.Direction
	origin string // "ns/name ingress[0]"
	// allPeers: from/to is empty, the rule matches every peer.
	allPeers bool
	peers    []parsedPeer
	// ports is empty when the rule matches every port and protocol.
	ports []parsedPort
}

type parsedPeer struct {
	// Selector peer: nsSel nil means the policy's own namespace.
	nsSel  labels.Selector
	podSel labels.Selector
	// ipBlock peer when block is valid. blockKey names the block with its
	// excepts: the compiler keeps one pod index per distinct block.
	block    netip.Prefix
	except   []netip.Prefix
	blockKey string
}

func (p *parsedPeer) isBlock() bool { return p.block.IsValid() }

// blockMatches reports whether addr is inside the block and outside every
// except.
func (p *parsedPeer) blockMatches(addr netip.Addr) bool {
	if !p.block.Contains(addr) {
		return false
	}
	for _, e := range p.except {
		if e.Contains(addr) {
			return false
		}
	}
	return true
}

type parsedPort struct {
	proto   policy.Proto
	k8s     corev1.Protocol
	ports   policy.PortRange // AnyPort when the port is not given
	name    string           // named port, resolved per destination pod
	isNamed bool
}

// policyKey is how policies, and pods, are addressed: "namespace/name".
func policyKey(ns, name string) string { return ns + "/" + name }

// parsePolicy validates np the way the API server would for everything the
// compiler depends on, so a malformed manifest fed to an offline tool fails
// loudly instead of compiling to something surprising.
func parsePolicy(np *networkingv1.NetworkPolicy) (*parsedPolicy, error) {
	if np.Name == "" {
		return nil, fmt.Errorf("NetworkPolicy without a name")
	}
	ns := np.Namespace
	if ns == "" {
		// Objects read from manifests without a namespace land in
		// "default", as kubectl apply would put them.
		ns = metav1.NamespaceDefault
	}
	p := &parsedPolicy{key: policyKey(ns, np.Name), ns: ns}
	sel, err := metav1.LabelSelectorAsSelector(&np.Spec.PodSelector)
	if err != nil {
		return nil, fmt.Errorf("NetworkPolicy %s: spec.podSelector: %w", p.key, err)
	}
	p.subject = sel

	if len(np.Spec.PolicyTypes) == 0 {
		// The documented default: every policy affects ingress, and egress
		// when it has egress rules.
		p.ingress = true
		p.egress = len(np.Spec.Egress) > 0
	}
	for _, t := range np.Spec.PolicyTypes {
		switch t {
		case networkingv1.PolicyTypeIngress:
			p.ingress = true
		case networkingv1.PolicyTypeEgress:
			p.egress = true
		default:
			return nil, fmt.Errorf("NetworkPolicy %s: unknown policyType %q (want Ingress or Egress)", p.key, t)
		}
	}

	seen := map[netip.Prefix]bool{}
	addPrefix := func(pf netip.Prefix) {
		if !seen[pf] {
			seen[pf] = true
			p.prefixes = append(p.prefixes, pf)
		}
	}
	// Rules of a direction the policy does not affect are kept out: the API
	// says policyTypes decides which sections count.
	if p.ingress {
		for i, r := range np.Spec.Ingress {
			pr, err := parseRule(p, policy.Ingress, i, r.Ports, r.From, addPrefix)
			if err != nil {
				return nil, err
			}
			p.rules = append(p.rules, pr)
		}
	}
	if p.egress {
		for i, r := range np.Spec.Egress {
			pr, err := parseRule(p, policy.Egress, i, r.Ports, r.To, addPrefix)
			if err != nil {
				return nil, err
			}
			for _, pt := range pr.ports {
				p.egressNamed = p.egressNamed || (pt.isNamed && pr.allPeers)
			}
			p.rules = append(p.rules, pr)
		}
	}
	for _, r := range p.rules {
		for _, pt := range r.ports {
			p.hasNamed = p.hasNamed || pt.isNamed
		}
	}
	return p, nil
}

func parseRule(p *parsedPolicy, dir policy.Direction, i int, ports []networkingv1.NetworkPolicyPort, peers []networkingv1.NetworkPolicyPeer, addPrefix func(netip.Prefix)) (parsedRule, error) {
	r := parsedRule{dir: dir, origin: fmt.Sprintf("%s %s[%d]", p.key, dir, i), allPeers: len(peers) == 0}
	for j, pt := range ports {
		pp, err := parsePort(pt)
		if err != nil {
			return r, fmt.Errorf("NetworkPolicy %s: %s[%d].ports[%d]: %w", p.key, dir, i, j, err)
		}
		r.ports = append(r.ports, pp)
	}
	for j, peer := range peers {
		pp, err := parsePeer(peer, addPrefix)
		if err != nil {
			field := "from"
			if dir == policy.Egress {
				field = "to"
			}
			return r, fmt.Errorf("NetworkPolicy %s: %s[%d].%s[%d]: %w", p.key, dir, i, field, j, err)
		}
		r.peers = append(r.peers, pp)
	}
	return r, nil
}

func parsePort(pt networkingv1.NetworkPolicyPort) (parsedPort, error) {
	k8s := corev1.ProtocolTCP
	if pt.Protocol != nil && *pt.Protocol != "" {
		k8s = *pt.Protocol
	}
	pp := parsedPort{k8s: k8s}
	proto, ok := protoOf[k8s]
	if !ok {
		return pp, fmt.Errorf("unsupported protocol %q (want TCP, UDP or SCTP)", k8s)
	}
	pp.proto = proto
	if pt.Port == nil {
		if pt.EndPort != nil {
			return pp, fmt.Errorf("endPort %d without port", *pt.EndPort)
		}
		return pp, nil
	}
	if pt.Port.Type == intstr.String {
		if pt.EndPort != nil {
			return pp, fmt.Errorf("endPort %d with named port %q", *pt.EndPort, pt.Port.StrVal)
		}
		if pt.Port.StrVal == "" {
			return pp, fmt.Errorf("empty port name")
		}
		pp.name, pp.isNamed = pt.Port.StrVal, true
		return pp, nil
	}
	lo := pt.Port.IntVal
	hi := lo
	if pt.EndPort != nil {
		hi = *pt.EndPort
	}
	if lo < 1 || lo > 65535 {
		return pp, fmt.Errorf("port %d outside 1-65535", lo)
	}
	if hi < lo || hi > 65535 {
		return pp, fmt.Errorf("endPort %d must be between port %d and 65535", hi, lo)
	}
	pp.ports = policy.PortRange{Lo: uint16(lo), Hi: uint16(hi)}
	return pp, nil
}

func parsePeer(peer networkingv1.NetworkPolicyPeer, addPrefix func(netip.Prefix)) (parsedPeer, error) {
	var pp parsedPeer
	if peer.IPBlock != nil {
		if peer.PodSelector != nil || peer.NamespaceSelector != nil {
			return pp, fmt.Errorf("ipBlock cannot be combined with podSelector or namespaceSelector")
		}
		block, err := netip.ParsePrefix(peer.IPBlock.CIDR)
		if err != nil {
			return pp, fmt.Errorf("ipBlock.cidr: %w", err)
		}
		// Host bits are dropped: "10.0.0.1/8" means 10.0.0.0/8, as the
		// datapath's trie can only hold masked prefixes.
		pp.block = block.Masked()
		addPrefix(pp.block)
		for k, e := range peer.IPBlock.Except {
			ex, err := netip.ParsePrefix(e)
			if err != nil {
				return pp, fmt.Errorf("ipBlock.except[%d]: %w", k, err)
			}
			ex = ex.Masked()
			if ex.Addr().Is4() != pp.block.Addr().Is4() || ex.Bits() < pp.block.Bits() || !pp.block.Contains(ex.Addr()) {
				return pp, fmt.Errorf("ipBlock.except[%d] %s is outside cidr %s", k, e, peer.IPBlock.CIDR)
			}
			pp.except = append(pp.except, ex)
			addPrefix(ex)
		}
		slices.SortFunc(pp.except, netip.Prefix.Compare)
		pp.except = slices.Compact(pp.except)
		key := pp.block.String()
		for _, ex := range pp.except {
			key += " except " + ex.String()
		}
		pp.blockKey = key
		return pp, nil
	}
	if peer.PodSelector == nil && peer.NamespaceSelector == nil {
		return pp, fmt.Errorf("peer has none of podSelector, namespaceSelector, ipBlock")
	}
	pp.podSel = labels.Everything()
	if peer.PodSelector != nil {
		s, err := metav1.LabelSelectorAsSelector(peer.PodSelector)
		if err != nil {
			return pp, fmt.Errorf("podSelector: %w", err)
		}
		pp.podSel = s
	}
	if peer.NamespaceSelector != nil {
		s, err := metav1.LabelSelectorAsSelector(peer.NamespaceSelector)
		if err != nil {
			return pp, fmt.Errorf("namespaceSelector: %w", err)
		}
		pp.nsSel = s
	}
	return pp, nil
}
