package cluster_test

import (
	"context"
	"fmt"
	"net/netip"
	"regexp"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/idcni/idcni/e2e/cluster"
)

// TestClusterServices is the cluster as operators run it: kube-proxy on
// every node and CoreDNS behind kube-dns. A pod resolves the kubernetes
// Service's and a test Service's names through kube-dns, a name outside
// the cluster is refused (nothing forwards), and the pod reaches a server
// on another node through the test Service's ClusterIP; a Service without
// endpoints is refused. It asks nothing of idcni's own Service
// translation: today kube-proxy translates, later idcni may, and the test
// holds either way.
//
// Alone: go test -run TestClusterServices -v ./e2e/cluster/ (KUBE_PROXY_MODE
// and NODES as for TestCluster).
func TestClusterServices(t *testing.T) {
	c := up(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	k := &kctl{t: t, c: c, ctx: ctx}

	// The server on the last node, the client on the first: the ClusterIP
	// leads to another node, as most Service traffic does.
	server, client := c.Nodes[len(c.Nodes)-1].Name, c.Nodes[0].Name
	k.apply(fmt.Sprintf(`apiVersion: v1
kind: Namespace
metadata:
  name: %[1]s
---
apiVersion: v1
kind: Pod
metadata:
  name: echo
  namespace: %[1]s
  labels: {app: echo}
spec:
  nodeName: %[2]s
  containers:
  - name: echo
    image: idcni/test:dev
    imagePullPolicy: Never
    command: [nc, -ll, -p, "8080", -e, cat]
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: %[1]s
spec:
  nodeName: %[3]s
  containers:
  - name: client
    image: idcni/test:dev
    imagePullPolicy: Never
    command: [sleep, "3600"]
---
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: %[1]s
spec:
  selector: {app: echo}
  ports:
  - {name: echo, port: 80, targetPort: 8080, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata:
  name: nobody
  namespace: %[1]s
spec:
  selector: {app: nobody}
  ports:
  - {port: 80, protocol: TCP}
`, demoNS, server, client))
	k.waitReady("echo", "client")
	echoIP := serviceIP(k, demoNS, "echo")
	nobodyIP := serviceIP(k, demoNS, "nobody")
	// kube-proxy and CoreDNS learn of the new Services by their watches.
	k.changed()

	step(t, "a pod resolves cluster names through kube-dns", func(t *testing.T) {
		k.t = t
		resolv := k.run("-n", demoNS, "exec", "client", "--", "cat", "/etc/resolv.conf")
		if !strings.Contains(resolv, "nameserver "+cluster.DNSServiceIP) || !strings.Contains(resolv, "svc."+cluster.ClusterDomain) {
			t.Fatalf("the pod's resolv.conf does not name kube-dns (%s) and the cluster domain:\n%s", cluster.DNSServiceIP, resolv)
		}
		wantLookup(k, "kubernetes.default.svc."+cluster.ClusterDomain, netip.MustParseAddr("10.96.0.1"))
		k.changed()
		wantLookup(k, "echo."+demoNS+".svc."+cluster.ClusterDomain, echoIP)
		// No forward in the Corefile: other names get an answer at once,
		// and it is a failure.
		out, err := k.c.Kubectl(k.ctx, "-n", demoNS, "exec", "client", "--", "nslookup", "idcni.example", cluster.DNSServiceIP)
		t.Logf("$ kubectl exec client -- nslookup idcni.example\n%s", indent(out))
		if err == nil || regexp.MustCompile(`Address: \d+\.\d+\.\d+\.\d+\s*$`).Match(out) {
			t.Errorf("a name outside the cluster resolved: the cluster's DNS must answer only its own names")
		}
	})
	step(t, "a pod reaches a Service through its ClusterIP", func(t *testing.T) {
		k.t = t
		k.changed()
		wantClusterIP(k, echoIP, 80, true)
		// Without endpoints kube-proxy rejects: the translation above was
		// the Service's, not a route that reaches anything.
		wantClusterIP(k, nobodyIP, 80, false)
	})
}

// serviceIP is the ClusterIP of ns/name.
func serviceIP(k *kctl, ns, name string) netip.Addr {
	k.t.Helper()
	s, err := k.c.Client.CoreV1().Services(ns).Get(k.ctx, name, metav1.GetOptions{})
	if err != nil {
		k.t.Fatal(err)
	}
	a, err := netip.ParseAddr(s.Spec.ClusterIP)
	if err != nil {
		k.t.Fatalf("service %s/%s: ClusterIP %q: %v", ns, name, s.Spec.ClusterIP, err)
	}
	return a
}

// wantLookup resolves name in the client pod with busybox's nslookup (its
// own DNS client: the static busybox has no resolver library to trust)
// against the resolv.conf's server and wants want among the answers.
func wantLookup(k *kctl, name string, want netip.Addr) {
	k.t.Helper()
	args := []string{"-n", demoNS, "exec", "client", "--", "nslookup", name}
	k.check(fmt.Sprintf("%s resolves to %s", name, want), func() (bool, string) {
		out, _ := k.c.Kubectl(k.ctx, args...)
		k.t.Logf("$ kubectl %s\n%s", shellJoin(args), indent(out))
		// The answers follow the server's own lines, after the name.
		_, answers, found := strings.Cut(string(out), "Name:")
		if !found {
			return false, "no answer"
		}
		for _, m := range regexp.MustCompile(`Address:\s*(\S+)`).FindAllStringSubmatch(answers, -1) {
			if a, err := netip.ParseAddr(m[1]); err == nil && a == want {
				return true, ""
			}
		}
		return false, strings.TrimSpace(answers)
	})
}

// wantClusterIP sends a line from the client pod to ip:port and wants it
// echoed, or (want false) no connection.
func wantClusterIP(k *kctl, ip netip.Addr, port int, want bool) {
	k.t.Helper()
	const probe = "idcni-service-probe"
	args := []string{"-n", demoNS, "exec", "client", "--", "sh", "-c", fmt.Sprintf("echo %s | nc -w 2 %s %d", probe, ip, port)}
	verdict := map[bool]string{true: "connects and is echoed", false: "does not connect"}
	k.check(fmt.Sprintf("TCP client -> %s:%d %s", ip, port, verdict[want]), func() (bool, string) {
		out, _ := k.c.Kubectl(k.ctx, args...)
		k.t.Logf("$ kubectl %s\n%s", shellJoin(args), indent(out))
		got := strings.Contains(string(out), probe)
		return got == want, "it " + verdict[got]
	})
}
