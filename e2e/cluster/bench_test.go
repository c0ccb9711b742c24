package cluster_test

import (
	"context"
	"flag"
	"testing"

	"github.com/idcni/idcni/e2e/cluster"
)

var benchPods = flag.Int("pods", 50, "BenchmarkPodStartup: pods created at once per network")

// BenchmarkPodStartup measures pod creation to Ready on idcni and on the
// upstream bridge plugin with host-local IPAM (the baseline: a veth into a
// Linux bridge, no programs, no agent), on the same cluster in the same run:
// -pods pods created all at once (burst: what a rollout does, and what
// saturates a small node), then one after the other (serial: each pod's own
// latency, where the CNI's share shows). Each iteration creates the pods
// and deletes them; the default -benchtime runs one.
//
//	go test -run '^$' -bench PodStartup ./e2e/cluster/ [-args -pods 50]
//
// The same numbers for a running `make cluster`: go run
// ./e2e/cluster/cmd/idcni-cluster bench.
func BenchmarkPodStartup(b *testing.B) {
	c := up(b)
	for _, mode := range []struct {
		name     string
		parallel int
	}{{"burst", *benchPods}, {"serial", 1}} {
		for _, network := range []string{cluster.NetworkIdcni, cluster.NetworkBridge} {
			b.Run(mode.name+"/"+network, func(b *testing.B) {
				var p50, p99, total float64
				n := 0
				for b.Loop() {
					r, err := c.MeasurePodStartup(context.Background(), network, *benchPods, mode.parallel)
					if err != nil {
						b.Fatal(err)
					}
					b.Log(r)
					p50 += r.P50.Seconds() * 1000
					p99 += r.P99.Seconds() * 1000
					total += r.Total.Seconds()
					n++
				}
				b.ReportMetric(p50/float64(n), "p50-ms")
				b.ReportMetric(p99/float64(n), "p99-ms")
				b.ReportMetric(total/float64(n), "total-s")
				// The time per op is the burst's, which says less than these.
				b.ReportMetric(0, "ns/op")
			})
		}
	}
}

var propagationPods = flag.Int("propagation-pods", 60, "BenchmarkPropagation: client pods per setting")

// BenchmarkPropagation measures issue 12's propagation race on two nodes:
// a client pod on one node pings a server on another, isolated by a policy
// that admits the client, from the moment its container starts; reported
// are pod Ready to the first packet the server's node admitted, and
// container start to it, and how many clients lost their first ping. The
// agents announce new pods' addresses (--announce-pods, the default) and,
// as the baseline in the same run, do not (only the kubelet's status write
// tells other nodes).
//
//	go test -run '^$' -bench Propagation ./e2e/cluster/ [-args -propagation-pods 60]
func BenchmarkPropagation(b *testing.B) {
	c := up(b)
	if len(c.Nodes) < 2 {
		b.Skip("needs two nodes")
	}
	ctx := context.Background()
	for _, mode := range []struct{ name, value string }{{"announce", ""}, {"kubelet-only", "false"}} {
		b.Run(mode.name, func(b *testing.B) {
			if err := c.SetAgentArg(ctx, "--announce-pods", mode.value); err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				r, err := c.MeasurePropagation(ctx, c.Nodes[0].Name, c.Nodes[1].Name, *propagationPods, 5)
				if err != nil {
					b.Fatal(err)
				}
				b.Log(r)
				b.ReportMetric(r.FromReady.P50.Seconds()*1000, "ready-p50-ms")
				b.ReportMetric(r.FromReady.P99.Seconds()*1000, "ready-p99-ms")
				b.ReportMetric(r.FromStart.P50.Seconds()*1000, "start-p50-ms")
				b.ReportMetric(r.FromStart.P99.Seconds()*1000, "start-p99-ms")
				b.ReportMetric(float64(r.Dropped), "first-lost")
				b.ReportMetric(0, "ns/op")
			}
		})
	}
	if err := c.SetAgentArg(ctx, "--announce-pods", ""); err != nil {
		b.Fatal(err)
	}
}
