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
