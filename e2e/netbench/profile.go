package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// profileRow is one workload run with BPF run-time statistics on: how often
// the two programs ran and how long they took, next to how much traffic
// went through. Statistics cost two clock reads per program run, so these
// runs are kept out of the medians.
type profileRow struct {
	Config     string  `json:"config"`
	Metric     string  `json:"metric"`
	Value      float64 `json:"value"`
	Unit       string  `json:"unit"`
	Ops        int64   `json:"ops"`
	ElapsedNS  int64   `json:"elapsed_ns"`
	FromPodRun uint64  `json:"from_pod_runs"`
	ToPodRuns  uint64  `json:"to_pod_runs"`
	FromPodNS  float64 `json:"from_pod_ns_per_run"`
	ToPodNS    float64 `json:"to_pod_ns_per_run"`
	RunsPerOp  float64 `json:"runs_per_op"`
	BPFNSPerOp float64 `json:"bpf_ns_per_op"`
	// BPFShare is program time over wall time. With client and server on
	// one CPU (-pin same) the workload keeps that CPU busy, so this is
	// about the share of its time the programs took.
	BPFShare float64 `json:"bpf_share"`
}

type progStats struct{ runs, ns uint64 }

func readProgStats(root string) (map[string]progStats, error) {
	out := map[string]progStats{}
	for _, name := range []string{"from_pod", "to_pod"} {
		p, err := ebpf.LoadPinnedProgram(filepath.Join(root, "progs", name), nil)
		if err != nil {
			return nil, fmt.Errorf("open pinned program %s: %w", name, err)
		}
		s, err := p.Stats()
		p.Close()
		if err != nil {
			return nil, fmt.Errorf("statistics of %s: %w", name, err)
		}
		out[name] = progStats{runs: s.RunCount, ns: uint64(s.Runtime.Nanoseconds())}
	}
	return out, nil
}

// profile runs every workload once per idcni configuration with BPF
// statistics enabled (for this process's lifetime of the returned fd only;
// the kernel switches them off when it is closed).
func (b *bench) profile(ctx context.Context, configs []config, w workload, root string) ([]profileRow, error) {
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		return nil, fmt.Errorf("enable BPF statistics: %w", err)
	}
	defer stats.Close()
	w.warmup = 0 // count every packet of the run against its traffic
	var rows []profileRow
	for _, c := range configs {
		if !c.isIdcni() {
			continue
		}
		cw := w
		if c.Services > 0 {
			if _, err := b.svcEnter(ctx, c); err != nil {
				return nil, err
			}
			cw = b.svcWorkload(c, w)
		} else if _, err := b.enter(ctx, c); err != nil {
			return nil, err
		}
		for _, m := range b.o.metrics {
			s0, err := readProgStats(root)
			if err != nil {
				return nil, err
			}
			s, err := m.run(ctx, cw)
			if err != nil {
				return nil, fmt.Errorf("profile %s %s: %w", c, m.name, err)
			}
			s1, err := readProgStats(root)
			if err != nil {
				return nil, err
			}
			from := progStats{s1["from_pod"].runs - s0["from_pod"].runs, s1["from_pod"].ns - s0["from_pod"].ns}
			to := progStats{s1["to_pod"].runs - s0["to_pod"].runs, s1["to_pod"].ns - s0["to_pod"].ns}
			r := profileRow{Config: c.String(), Metric: m.name, Value: s.Value, Unit: m.unit, Ops: s.Ops,
				ElapsedNS: s.Elapsed.Nanoseconds(), FromPodRun: from.runs, ToPodRuns: to.runs}
			if from.runs > 0 {
				r.FromPodNS = float64(from.ns) / float64(from.runs)
			}
			if to.runs > 0 {
				r.ToPodNS = float64(to.ns) / float64(to.runs)
			}
			ops := float64(s.Ops)
			if m.name == "stream" {
				ops /= 1 << 20 // per MiB
			}
			if ops > 0 {
				r.RunsPerOp = float64(from.runs+to.runs) / ops
				r.BPFNSPerOp = float64(from.ns+to.ns) / ops
			}
			r.BPFShare = float64(from.ns+to.ns) / float64(s.Elapsed.Nanoseconds())
			rows = append(rows, r)
			logf("profile %-21s %-6s %.4g %s: %.1f program runs/%s at %.0f/%.0f ns (from_pod/to_pod), %.2f%% of the time in programs",
				c, m.name, s.Value, m.unit, r.RunsPerOp, opName(m.name), r.FromPodNS, r.ToPodNS, 100*r.BPFShare)
		}
	}
	return rows, nil
}

func opName(metric string) string {
	if metric == "stream" {
		return "MiB"
	}
	return "transaction"
}

// cpuTimes reads the all-CPU line of /proc/stat: total and steal jiffies.
func cpuTimes() (total, steal uint64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	for i, s := range f[1:] {
		var v uint64
		fmt.Sscan(s, &v)
		if i < 8 { // user nice system idle iowait irq softirq steal; guest is in user
			total += v
		}
		if i == 7 {
			steal = v
		}
	}
	return total, steal
}
