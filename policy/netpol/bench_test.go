package netpol

import (
	"fmt"
	"runtime"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The scale fixture: 100 namespaces x 100 pods (10 apps of 10 replicas) and
// 10 policies per namespace, 1,000 in all, mixing the shapes clusters use:
// default deny, app-to-app on a named port, cross-namespace by team,
// egress to an external range and to a cluster-wide DNS app, and monitoring
// from every prod namespace.
const (
	scaleNamespaces  = 100
	scaleApps        = 10
	scaleReplicas    = 10
	scalePolsPerNS   = 10
	scaleTeams       = 10
	scaleRoleCount   = 3
	scaleHTTPPort    = 8080
	scaleMetricsPort = 9090
)

var scaleRoles = []string{"frontend", "backend", "db"}

type scaleFixture struct {
	nss  []*corev1.Namespace
	pods []*corev1.Pod
	pols []*networkingv1.NetworkPolicy
}

func scaleNS(i int) string { return fmt.Sprintf("ns%03d", i) }

func newScaleFixture() *scaleFixture {
	f := &scaleFixture{}
	for i := range scaleNamespaces {
		env := "dev"
		if i%2 == 0 {
			env = "prod"
		}
		ns := scaleNS(i)
		f.nss = append(f.nss, mkNS(ns, "team", fmt.Sprintf("t%d", i%scaleTeams), "env", env))
		for a := range scaleApps {
			for r := range scaleReplicas {
				n := a*scaleReplicas + r
				f.pods = append(f.pods, mkPod(ns, fmt.Sprintf("app%d-%d", a, r),
					fmt.Sprintf("10.%d.%d.%d", 1+i/200, i%200, 1+n),
					map[string]string{"app": fmt.Sprintf("app%d", a), "role": scaleRoles[a%scaleRoleCount]},
					portSpec{"http", scaleHTTPPort, corev1.ProtocolTCP}, portSpec{"metrics", scaleMetricsPort, corev1.ProtocolTCP}))
			}
		}
		f.pols = append(f.pols, scalePolicies(i, 0)...)
	}
	return f
}

// scalePolicies returns namespace i's policies; variant changes one port so
// a benchmark can flip a policy back and forth.
func scalePolicies(i, variant int) []*networkingv1.NetworkPolicy {
	ns := scaleNS(i)
	var out []*networkingv1.NetworkPolicy
	out = append(out, mkPolicy(ns, "default-deny", metav1.LabelSelector{}, nil))
	for a := 1; a <= 6; a++ {
		out = append(out, mkPolicy(ns, fmt.Sprintf("app%d-from-app%d", a, a-1), *sel("app", fmt.Sprintf("app%d", a)), func(s *networkingv1.NetworkPolicySpec) {
			s.Ingress = []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{podPeer(sel("app", fmt.Sprintf("app%d", a-1)))},
				Ports: []networkingv1.NetworkPolicyPort{namedPort("http", corev1.ProtocolTCP)},
			}}
		}))
	}
	out = append(out, mkPolicy(ns, "backend-from-team-frontends", *sel("role", "backend"), func(s *networkingv1.NetworkPolicySpec) {
		s.Ingress = []networkingv1.NetworkPolicyIngressRule{{
			From: []networkingv1.NetworkPolicyPeer{{
				NamespaceSelector: sel("team", fmt.Sprintf("t%d", i%scaleTeams)),
				PodSelector:       sel("role", "frontend"),
			}},
			Ports: []networkingv1.NetworkPolicyPort{tcpPort(scaleHTTPPort + variant)},
		}}
	}))
	out = append(out, mkPolicy(ns, "db-egress", *sel("role", "db"), func(s *networkingv1.NetworkPolicySpec) {
		ext := blockPeer("172.16.0.0/12", fmt.Sprintf("172.16.%d.0/24", i))
		if i%10 == 0 {
			// Some namespaces may reach the whole pod range by address.
			ext = blockPeer("10.0.0.0/8", fmt.Sprintf("10.1.%d.0/24", i))
		}
		s.Egress = []networkingv1.NetworkPolicyEgressRule{
			{To: []networkingv1.NetworkPolicyPeer{ext}, Ports: []networkingv1.NetworkPolicyPort{tcpPort(5432)}},
			{To: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: &metav1.LabelSelector{}, PodSelector: sel("app", "app0")}},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: protoPtr(corev1.ProtocolUDP)}}},
		}
	}))
	out = append(out, mkPolicy(ns, "monitoring", metav1.LabelSelector{}, func(s *networkingv1.NetworkPolicySpec) {
		s.Ingress = []networkingv1.NetworkPolicyIngressRule{{
			From:  []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("env", "prod"), PodSelector: sel("app", "app9")}},
			Ports: []networkingv1.NetworkPolicyPort{namedPort("metrics", corev1.ProtocolTCP)},
		}}
	}))
	if len(out) != scalePolsPerNS {
		panic(fmt.Sprintf("%d policies per namespace", len(out)))
	}
	return out
}

func (f *scaleFixture) compile(b *testing.B) *Compiler {
	b.Helper()
	c, err := Compile(NewMemoryIdentities(), f.nss, f.pods, f.pols)
	if err != nil {
		b.Fatal(err)
	}
	return c
}

// cpuTime is the process's user+system CPU time. The machine is shared, so
// wall time per op swings with other people's load; CPU time per op is the
// steadier number to compare against the targets.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// untimedCPU collects CPU time spent with the benchmark timer stopped.
var untimedCPU time.Duration

// loopCPU runs body under b.Loop and reports CPU milliseconds per op,
// leaving out untimedCPU.
func loopCPU(b *testing.B, body func()) {
	n := 0
	untimedCPU = 0
	start := cpuTime()
	for b.Loop() {
		body()
		n++
	}
	b.ReportMetric(float64(cpuTime()-start-untimedCPU)/float64(time.Millisecond)/float64(n), "cpu-ms/op")
}

func heapInUse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

func BenchmarkFullCompile(b *testing.B) {
	f := newScaleFixture()
	before := heapInUse()
	c := f.compile(b)
	retained := heapInUse() - before
	st := c.Stats()
	b.ReportAllocs()
	loopCPU(b, func() { f.compile(b) })
	b.ReportMetric(float64(st.Rules), "rules")
	b.ReportMetric(float64(st.Subjects), "identities")
	b.ReportMetric(float64(st.CIDRs), "cidrs")
	b.ReportMetric(float64(retained)/(1<<20), "retained-MiB")
	runtime.KeepAlive(c)
}

// BenchmarkIncrementalPodLabel moves one pod between two apps (and so
// between two identities, each selected and named by several policies).
func BenchmarkIncrementalPodLabel(b *testing.B) {
	f := newScaleFixture()
	c := f.compile(b)
	pod := f.pods[3*scaleApps*scaleReplicas+4*scaleReplicas].DeepCopy() // ns003, app4-0
	apps := []string{"app4", "app5"}
	changed, i := 0, 0
	b.ReportAllocs()
	loopCPU(b, func() {
		i++
		p := pod.DeepCopy()
		p.Labels = map[string]string{"app": apps[i%2], "role": scaleRoles[(4+i%2)%scaleRoleCount]}
		d, err := c.UpsertPod(p)
		if err != nil {
			b.Fatal(err)
		}
		changed += len(d.Identities)
	})
	b.ReportMetric(float64(changed)/float64(i), "changed-ids/op")
}

// BenchmarkIncrementalPodNewIdentity gives one pod a label no other pod
// has, and takes it away again: each change creates or retires an identity
// that many policies select as subject or peer, the costly kind of label
// change.
func BenchmarkIncrementalPodNewIdentity(b *testing.B) {
	f := newScaleFixture()
	c := f.compile(b)
	pod := f.pods[3*scaleApps*scaleReplicas+4*scaleReplicas].DeepCopy() // ns003, app4-0
	changed, rules, i := 0, 0, 0
	var fetch time.Duration
	b.ReportAllocs()
	loopCPU(b, func() {
		i++
		p := pod.DeepCopy()
		p.Labels = map[string]string{"app": "app4", "role": "backend"}
		if i%2 == 1 {
			p.Labels["canary"] = "true"
		}
		d, err := c.UpsertPod(p)
		if err != nil {
			b.Fatal(err)
		}
		changed += len(d.Identities)
		// What the agent does next: fetch the rules of each changed
		// identity. Timed apart, as it is not part of the compile.
		b.StopTimer()
		t0, c0 := time.Now(), cpuTime()
		for _, id := range d.Identities {
			rules += len(c.Rules(id))
		}
		fetch += time.Since(t0)
		untimedCPU += cpuTime() - c0
		b.StartTimer()
	})
	b.ReportMetric(float64(changed)/float64(i), "changed-ids/op")
	b.ReportMetric(float64(rules)/float64(i), "changed-rules/op")
	b.ReportMetric(float64(fetch)/float64(time.Millisecond)/float64(i), "fetch-rules-ms/op")
}

// BenchmarkIncrementalPolicy changes the port of one policy back and forth.
func BenchmarkIncrementalPolicy(b *testing.B) {
	f := newScaleFixture()
	c := f.compile(b)
	variants := [2]*networkingv1.NetworkPolicy{scalePolicies(7, 0)[7], scalePolicies(7, 1)[7]}
	changed, i := 0, 0
	b.ReportAllocs()
	loopCPU(b, func() {
		i++
		d, err := c.UpsertPolicy(variants[i%2])
		if err != nil {
			b.Fatal(err)
		}
		changed += len(d.Identities)
	})
	b.ReportMetric(float64(changed)/float64(i), "changed-ids/op")
}

// BenchmarkIncrementalPodIP moves one pod's address in and out of another
// namespace's ipBlock except.
func BenchmarkIncrementalPodIP(b *testing.B) {
	f := newScaleFixture()
	c := f.compile(b)
	pod := f.pods[5*scaleApps*scaleReplicas].DeepCopy() // ns005 app0-0
	ips := []string{"10.1.10.250", "10.1.11.250"}
	i := 0
	b.ReportAllocs()
	loopCPU(b, func() {
		i++
		p := pod.DeepCopy()
		p.Status.PodIP = ips[i%2]
		if _, err := c.UpsertPod(p); err != nil {
			b.Fatal(err)
		}
	})
}
