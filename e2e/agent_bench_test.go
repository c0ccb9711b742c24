package e2e

import (
	"bufio"
	"context"
	"fmt"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// BenchmarkAgent measures, against a real kube-apiserver:
//
//   - policy-p50/p99-ms: NetworkPolicy create to its rule in the datapath's
//     policy map, over 100 policies created one after another;
//
//   - add-p50/p99-ms: time the agent spends inside CNI ADD (its own log),
//     over 20 pods plugged through the plugin;
//
//   - rss-MiB: the agent's resident memory with 1,000 pods and 200 policies
//     in the API server.
//
//     go test -run '^$' -bench Agent -benchtime 1x ./e2e/
func BenchmarkAgent(b *testing.B) {
	for range b.N {
		benchAgentOnce(b)
	}
}

func benchAgentOnce(b *testing.B) {
	e := newAgentEnv(b)
	ctx := context.Background()
	e.kube.CreateNamespace(b, "bench", map[string]string{"team": "bench"})

	// The agent's ADD time, from its own log lines.
	var targets []*kpod
	for i := range 20 {
		targets = append(targets, e.newPod(b, "bench", fmt.Sprintf("target-%d", i), map[string]string{"app": "target"}))
	}
	adds := agentAddTimes(b, e.agent.log)
	b.ReportMetric(pct(adds, 50), "add-p50-ms")
	b.ReportMetric(pct(adds, 99), "add-p99-ms")

	// 100 peers, each its own identity, known to the ipcache.
	for i := range 100 {
		ip := netip.AddrFrom4([4]byte{10, 250, byte(i / 250), byte(1 + i%250)})
		createPodObject(b, e, "bench", fmt.Sprintf("peer-%d", i), map[string]string{"peer": strconv.Itoa(i)}, ip)
	}
	d, err := bpf.Open(e.BPFRoot)
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	peerID := func(i int) identity.ID {
		id, ok, _ := d.IPCacheLookup(netip.AddrFrom4([4]byte{10, 250, byte(i / 250), byte(1 + i%250)}))
		if !ok || !id.IsLabel() {
			return 0
		}
		return id
	}
	waitFor(b, 60*time.Second, "peers in the ipcache", func() bool { return peerID(99) != 0 })
	targetID, ok, _ := d.IPCacheLookup(targets[0].ip)
	if !ok {
		b.Fatal("target not in the ipcache")
	}

	var lat []float64
	for i := range 100 {
		want := policy.Key{Subject: targetID, Peer: peerID(i), Direction: policy.Ingress, Proto: policy.ProtoTCP}
		start := time.Now()
		_, err := e.kube.Client.NetworkingV1().NetworkPolicies("bench").Create(ctx, &networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("from-peer-%d", i)},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "target"}},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{
					From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"peer": strconv.Itoa(i)}}}},
					Ports: tcpPort(int32(1000 + i)),
				}},
			},
		}, metav1.CreateOptions{})
		if err != nil {
			b.Fatal(err)
		}
		for {
			ms, err := d.Policy()
			if err != nil {
				b.Fatal(err)
			}
			if _, ok := ms.Entries[want]; ok {
				break
			}
			if time.Since(start) > 30*time.Second {
				b.Fatalf("policy %d not in the map after 30s", i)
			}
			time.Sleep(time.Millisecond)
		}
		lat = append(lat, float64(time.Since(start).Microseconds())/1000)
	}
	b.ReportMetric(pct(lat, 50), "policy-p50-ms")
	b.ReportMetric(pct(lat, 99), "policy-p99-ms")

	// Scale: 1,000 pods and 200 policies in the API server.
	for i := 100; i < 1000; i++ {
		ip := netip.AddrFrom4([4]byte{10, 250, byte(i / 250), byte(1 + i%250)})
		createPodObject(b, e, "bench", fmt.Sprintf("peer-%d", i), map[string]string{"peer": strconv.Itoa(i), "tier": strconv.Itoa(i % 10)}, ip)
	}
	for i := 100; i < 200; i++ {
		_, err := e.kube.Client.NetworkingV1().NetworkPolicies("bench").Create(ctx, &networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("tier-%d", i)},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"tier": strconv.Itoa(i % 10)}},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{
					From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"peer": strconv.Itoa(i)}}}},
					Ports: tcpPort(int32(2000 + i)),
				}},
			},
		}, metav1.CreateOptions{})
		if err != nil {
			b.Fatal(err)
		}
	}
	waitFor(b, 120*time.Second, "1,000 pods in the ipcache", func() bool {
		id, ok, _ := d.IPCacheLookup(netip.AddrFrom4([4]byte{10, 250, 3, 250}))
		return ok && id.IsLabel()
	})
	time.Sleep(2 * time.Second) // let the last policies land
	b.ReportMetric(rssMiB(b, e.agent.cmd.Process.Pid), "rss-MiB")
}

func createPodObject(b testing.TB, e *agentEnv, ns, name string, labels map[string]string, ip netip.Addr) {
	ctx := context.Background()
	p, err := e.kube.Client.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels},
		Spec:       corev1.PodSpec{NodeName: "elsewhere", Containers: []corev1.Container{{Name: "c", Image: "idcni/test:none"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		b.Fatal(err)
	}
	p.Status.PodIP, p.Status.PodIPs, p.Status.Phase = ip.String(), []corev1.PodIP{{IP: ip.String()}}, corev1.PodRunning
	if _, err := e.kube.Client.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		b.Fatal(err)
	}
}

var tookRE = regexp.MustCompile(`msg="endpoint registered".* took=([0-9.]+)(µs|ms|s)`)

func agentAddTimes(b testing.TB, log string) []float64 {
	f, err := os.Open(log)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	var out []float64
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		m := tookRE.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		v, _ := strconv.ParseFloat(m[1], 64)
		switch m[2] {
		case "µs":
			v /= 1000
		case "s":
			v *= 1000
		}
		out = append(out, v)
	}
	if len(out) == 0 {
		b.Fatal("no ADD timings in the agent log")
	}
	return out
}

func pct(xs []float64, p int) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[min(len(s)-1, (len(s)*p+99)/100-1)]
}

func rssMiB(b testing.TB, pid int) float64 {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, l := range strings.Split(string(raw), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			kb, _ := strconv.Atoi(strings.Fields(l)[1])
			return float64(kb) / 1024
		}
	}
	b.Fatal("no VmRSS")
	return 0
}
