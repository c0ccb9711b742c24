package cluster

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// The cluster as operators run it: kube-proxy on every node for Services,
// and CoreDNS behind the kube-dns Service for names. Both start after the
// kubelets and idcni, in functions of their own here; Up calls them.

// Kube-proxy modes (Options.KubeProxyMode).
const (
	// KubeProxyIPTables is kube-proxy's iptables mode, the default.
	KubeProxyIPTables = "iptables"
	// KubeProxyNFTables is kube-proxy's nftables mode.
	KubeProxyNFTables = "nftables"
	// KubeProxyNone runs no kube-proxy: ClusterIPs then work only where
	// something else (idcni's own translation) does it.
	KubeProxyNone = "none"
)

// DNSServiceIP is the kube-dns Service's ClusterIP, the kubelets'
// clusterDNS: fixed, like kubeadm's tenth address of the service range,
// because every pod's resolv.conf names it before the Service exists.
const DNSServiceIP = "10.96.0.10"

// ClusterDomain is the kubelets' clusterDomain and CoreDNS's zone.
const ClusterDomain = "cluster.local"

// dnsNamespace and dnsDeployment are where CoreDNS runs, under the names
// kubeadm gives them (the upstream e2e suite and operators look there).
const (
	dnsNamespace  = "kube-system"
	dnsDeployment = "coredns"
)

// checkKubeProxyMode validates Options.KubeProxyMode after defaulting.
func checkKubeProxyMode(mode string) error {
	switch mode {
	case KubeProxyIPTables, KubeProxyNFTables, KubeProxyNone:
		return nil
	}
	return fmt.Errorf("kube-proxy mode %q: want %s, %s or %s", mode, KubeProxyIPTables, KubeProxyNFTables, KubeProxyNone)
}

// kubeProxyTools installs what kube-proxy runs in its mode: iptables-restore
// comes with the kubelet's iptables; the nftables mode drives nft.
func kubeProxyTools(mode string, log io.Writer) error {
	if mode != KubeProxyNFTables {
		return nil
	}
	return ensureDebianPackages(log, map[string]string{"nft": "nftables"})
}

// kubeProxyKubeconfig issues, once, the kubeconfig every node's kube-proxy
// uses: the user system:kube-proxy, which the default RBAC policy binds to
// system:node-proxier (read Services, EndpointSlices and Nodes, write
// events), nothing more.
func (c *Cluster) kubeProxyKubeconfig() (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pki.kubeProxy != "" {
		return c.pki.kubeProxy, nil
	}
	p, err := c.pki.ca.Kubeconfig(filepath.Join(c.Dir, "kube-proxy.kubeconfig"), c.APIServer, "kube-proxy", "system:kube-proxy")
	if err != nil {
		return "", fmt.Errorf("kube-proxy kubeconfig: %w", err)
	}
	c.pki.kubeProxy = p
	return p, nil
}

// startKubeProxy starts kube-proxy on node n, in its namespaces and cgroup
// like its kubelet, unless the cluster runs none.
func (c *Cluster) startKubeProxy(n *Node) error {
	if c.kubeProxyMode == KubeProxyNone {
		return nil
	}
	kubeconfig, err := c.kubeProxyKubeconfig()
	if err != nil {
		return err
	}
	return c.nodeDaemon(n, "kube-proxy", c.bins.KubeProxy,
		"--kubeconfig="+kubeconfig,
		"--proxy-mode="+c.kubeProxyMode,
		// The Node's name, not the holder's hostname (the host's): kube-proxy
		// finds its node's addresses and topology by it.
		"--hostname-override="+n.Name,
		// Traffic to a ClusterIP from outside the pods' range is
		// masqueraded, as in any cluster that sets it.
		"--cluster-cidr="+clusterCIDR,
		// Both only on the node's loopback: fixed ports collide with
		// nothing in the node's own network namespace.
		"--metrics-bind-address=127.0.0.1:10249",
		"--healthz-bind-address=127.0.0.1:10256",
		// nf_conntrack_max is one value for the whole host: a node must not
		// rewrite it. The TCP timeouts it sets are per network namespace.
		"--conntrack-max-per-core=0",
	)
}

// corednsManifest is what kubeadm installs for CoreDNS, cut to this
// cluster: one replica (two cores, and the e2e suites need one), the
// image built from e2e/tools/coredns, and a Corefile that answers only the
// cluster's names. No forward: this machine has no upstream resolver that
// pods may use, so any other name fails at once instead of timing out.
const corednsManifest = `apiVersion: v1
kind: ServiceAccount
metadata:
  name: coredns
  namespace: kube-system
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: system:coredns
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: system:coredns
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: system:coredns
subjects:
- kind: ServiceAccount
  name: coredns
  namespace: kube-system
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: coredns
  namespace: kube-system
data:
  Corefile: |
    .:53 {
        errors
        health {
            lameduck 5s
        }
        ready
        kubernetes {{DOMAIN}} in-addr.arpa ip6.arpa {
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
            ttl 30
        }
        prometheus :9153
        cache 30
        loop
        reload
        loadbalance
    }
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: coredns
  namespace: kube-system
  labels:
    k8s-app: kube-dns
spec:
  replicas: 1
  selector:
    matchLabels:
      k8s-app: kube-dns
  template:
    metadata:
      labels:
        k8s-app: kube-dns
    spec:
      priorityClassName: system-cluster-critical
      serviceAccountName: coredns
      # Its own resolver must not be itself.
      dnsPolicy: Default
      containers:
      - name: coredns
        image: {{IMAGE}}
        imagePullPolicy: Never
        args: [-conf, /etc/coredns/Corefile]
        ports:
        - {name: dns, containerPort: 53, protocol: UDP}
        - {name: dns-tcp, containerPort: 53, protocol: TCP}
        - {name: metrics, containerPort: 9153, protocol: TCP}
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities:
            add: [NET_BIND_SERVICE]
            drop: [ALL]
        volumeMounts:
        - {name: config, mountPath: /etc/coredns, readOnly: true}
        livenessProbe:
          httpGet: {path: /health, port: 8080}
          initialDelaySeconds: 10
          periodSeconds: 10
          failureThreshold: 5
        readinessProbe:
          httpGet: {path: /ready, port: 8181}
          periodSeconds: 2
      volumes:
      - name: config
        configMap:
          name: coredns
          items:
          - {key: Corefile, path: Corefile}
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels:
    k8s-app: kube-dns
    kubernetes.io/name: CoreDNS
spec:
  selector:
    k8s-app: kube-dns
  clusterIP: {{DNSIP}}
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
  - {name: metrics, port: 9153, protocol: TCP}
`

// installDNS applies CoreDNS and the kube-dns Service and waits until
// CoreDNS is ready, that is until it has read every Service and Endpoint
// through the kubernetes Service's ClusterIP (its in-cluster client) and
// answers.
func (c *Cluster) installDNS(ctx context.Context) error {
	doc := strings.NewReplacer("{{IMAGE}}", c.bins.corednsTag(), "{{DNSIP}}", DNSServiceIP, "{{DOMAIN}}", ClusterDomain).Replace(corednsManifest)
	path := filepath.Join(c.Dir, "coredns.yaml")
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		return err
	}
	if _, err := c.Kubectl(ctx, "apply", "-f", path); err != nil {
		return fmt.Errorf("install CoreDNS: %w", err)
	}
	return c.poll(ctx, "CoreDNS to be ready", func(ctx context.Context) error {
		_, err := c.Kubectl(ctx, "-n", dnsNamespace, "rollout", "status", "deployment/"+dnsDeployment, "--timeout=5s")
		return err
	})
}
