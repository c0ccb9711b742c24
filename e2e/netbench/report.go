package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"
)

// target is what idcni must keep of bare on every workload.
const target = 0.95

type report struct {
	Started        time.Time          `json:"started"`
	Finished       time.Time          `json:"finished"`
	Host           hostInfo           `json:"host"`
	Params         params             `json:"params"`
	DatapathLoadMS float64            `json:"datapath_load_ms"`
	Pods           map[string]podInfo `json:"pods,omitempty"`
	Configs        []config           `json:"configs,omitempty"`
	Samples        []sampleRecord     `json:"samples,omitempty"`
	Summary        []summaryRow       `json:"summary,omitempty"`
	Profile        []profileRow       `json:"profile,omitempty"`
	CNI            *cniReport         `json:"cni,omitempty"`
	// RulesLoadMS is how long the last load of each -services step's
	// Services took: idcni's map, iptables-restore, nft -f.
	RulesLoadMS map[string]float64 `json:"rules_load_ms,omitempty"`
	metrics     []metric
}

type hostInfo struct {
	Kernel     string     `json:"kernel"`
	CPUs       int        `json:"cpus"`
	GoVersion  string     `json:"go_version"`
	LoadStart  [3]float64 `json:"loadavg_start"`
	LoadEnd    [3]float64 `json:"loadavg_end"`
	Iptables   string     `json:"iptables"`
	GitHead    string     `json:"git_head,omitempty"`
	GitDirty   []string   `json:"git_dirty,omitempty"` // uncommitted changes under bpf/, cni/, cmd/idcni
	PluginSHA  string     `json:"idcni_sha256"`
	Conntrack0 string     `json:"nf_conntrack_count_start"`
}

type params struct {
	Duration string   `json:"duration"`
	Warmup   string   `json:"warmup"`
	Count    int      `json:"count"`
	Rules    []int    `json:"rules"`
	Port     int      `json:"port"`
	Metrics  []string `json:"metrics"`
	Network  string   `json:"network"`
	Subnet   string   `json:"subnet"`
	BPFRoot  string   `json:"bpf_root"`
	// -services
	Services   []int  `json:"services,omitempty"`
	ClusterIPs string `json:"cluster_ips,omitempty"`
	Backends   string `json:"other_backends,omitempty"`
}

type podInfo struct {
	Netns    string     `json:"netns"`
	Addr     netip.Addr `json:"addr"`
	HostIf   string     `json:"host_if"`
	Identity uint32     `json:"identity"`
}

type sampleRecord struct {
	Config    string         `json:"config"`
	Metric    string         `json:"metric"`
	Round     int            `json:"round"`
	Value     float64        `json:"value"`
	Unit      string         `json:"unit"`
	Ops       int64          `json:"ops"`
	ElapsedNS int64          `json:"elapsed_ns"`
	Load1     float64        `json:"load1"`
	StealPct  float64        `json:"steal_pct"`
	Checks    map[string]any `json:"checks"`
}

type summaryRow struct {
	Config      string    `json:"config"`
	Metric      string    `json:"metric"`
	Unit        string    `json:"unit"`
	Samples     []float64 `json:"samples"`
	Median      float64   `json:"median"`
	Min         float64   `json:"min"`
	Max         float64   `json:"max"`
	RatioToBare float64   `json:"ratio_to_bare"`
	// RatioToPodIP is, for a -services configuration, its median over
	// idcni-podip's with as many Services.
	RatioToPodIP float64 `json:"ratio_to_podip,omitempty"`
	// Paired is the median, over rounds, of this configuration's sample
	// over its baseline's (bare, or idcni-podip with as many Services) of
	// the same round: see paired.
	Paired float64 `json:"paired_ratio,omitempty"`
}

type cniReport struct {
	Pods       int       `json:"pods"`
	AddMS      []float64 `json:"add_ms"`
	DelMS      []float64 `json:"del_ms"`
	AddP50     float64   `json:"add_p50_ms"`
	AddP99     float64   `json:"add_p99_ms"`
	DelP50     float64   `json:"del_p50_ms"`
	DelP99     float64   `json:"del_p99_ms"`
	Load1Start float64   `json:"load1_start"`
	Load1End   float64   `json:"load1_end"`
}

func newReport(o *options) *report {
	r := &report{Started: time.Now(), metrics: o.metrics}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		r.Host.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	r.Host.CPUs = runtime.NumCPU()
	r.Host.GoVersion = runtime.Version()
	r.Host.LoadStart = loadavg3()
	if out, err := command(context.Background(), "iptables", "--version").Output(); err == nil {
		r.Host.Iptables = strings.TrimSpace(string(out))
	}
	if b, err := os.ReadFile("/proc/sys/net/netfilter/nf_conntrack_count"); err == nil {
		r.Host.Conntrack0 = strings.TrimSpace(string(b))
	}
	r.Params = params{Duration: o.duration.String(), Warmup: o.warmup.String(), Count: o.count, Rules: o.rules, Port: o.port, Services: o.services}
	for _, m := range o.metrics {
		r.Params.Metrics = append(r.Params.Metrics, m.name)
	}
	return r
}

func loadavg3() [3]float64 {
	var l [3]float64
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		_, _ = fmt.Sscanf(string(b), "%f %f %f", &l[0], &l[1], &l[2])
	}
	return l
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n == 0 {
		return math.NaN()
	}
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// percentile is the nearest-rank percentile.
func percentile(v []float64, p float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s) == 0 {
		return math.NaN()
	}
	i := int(math.Ceil(p/100*float64(len(s)))) - 1
	return s[max(0, min(i, len(s)-1))]
}

// paired is the median over rounds of v[i]/base[i], two samples a round
// apart at most (the order rotates every round). This machine's speed
// drifts between a fast and a slow band over tens of seconds, idle or not:
// a ratio of medians then compares windows of different bands, the ratio
// of each round's back-to-back windows mostly does not, and the median
// of those drops the rounds where the speed changed between them.
func paired(v, base []float64) float64 {
	var r []float64
	for i := range min(len(v), len(base)) {
		if base[i] > 0 {
			r = append(r, v[i]/base[i])
		}
	}
	return median(r)
}

func (r *report) finish() {
	r.Finished = time.Now()
	r.Host.LoadEnd = loadavg3()
	if r.CNI != nil {
		r.CNI.AddP50, r.CNI.AddP99 = percentile(r.CNI.AddMS, 50), percentile(r.CNI.AddMS, 99)
		r.CNI.DelP50, r.CNI.DelP99 = percentile(r.CNI.DelMS, 50), percentile(r.CNI.DelMS, 99)
	}
	bare := map[string]summaryRow{}
	for _, c := range r.Configs {
		for _, m := range r.metrics {
			row := summaryRow{Config: c.String(), Metric: m.name, Unit: m.unit}
			for _, s := range r.Samples {
				if s.Config == row.Config && s.Metric == m.name {
					row.Samples = append(row.Samples, s.Value)
				}
			}
			if len(row.Samples) == 0 {
				continue
			}
			row.Median = median(row.Samples)
			row.Min, row.Max = slices.Min(row.Samples), slices.Max(row.Samples)
			if c.Name == "bare" {
				bare[m.name] = row
			}
			if b := bare[m.name]; b.Median > 0 {
				row.RatioToBare = row.Median / b.Median
				row.Paired = paired(row.Samples, b.Samples)
			}
			r.Summary = append(r.Summary, row)
		}
	}
	podip := map[string]summaryRow{}
	for _, c := range r.Configs {
		if c.Name == "idcni-podip" {
			for _, m := range r.metrics {
				if s, ok := r.row(c.String(), m.name); ok {
					podip[fmt.Sprintf("%d/%s", c.Services, m.name)] = s
				}
			}
		}
	}
	for i := range r.Summary {
		s := &r.Summary[i]
		for _, c := range r.Configs {
			if c.Services > 0 && c.String() == s.Config {
				if p := podip[fmt.Sprintf("%d/%s", c.Services, s.Metric)]; p.Median > 0 {
					s.RatioToPodIP = s.Median / p.Median
					s.Paired = paired(s.Samples, p.Samples)
				}
			}
		}
	}
}

func (r *report) row(config, metric string) (summaryRow, bool) {
	for _, s := range r.Summary {
		if s.Config == config && s.Metric == metric {
			return s, true
		}
	}
	return summaryRow{}, false
}

func formatValue(v float64, unit string) string {
	if unit == "Gbit/s" {
		return fmt.Sprintf("%.2f", v)
	}
	return fmt.Sprintf("%.0f", v)
}

func (r *report) print(out io.Writer) {
	fmt.Fprintf(out, "\nidcni netbench  %s  kernel %s, %d CPUs, %s\n", r.Started.Format(time.RFC3339), r.Host.Kernel, r.Host.CPUs, r.Host.GoVersion)
	if r.Host.GitHead != "" {
		dirty := "clean"
		if len(r.Host.GitDirty) > 0 {
			dirty = fmt.Sprintf("%d uncommitted changes under bpf/, cni/, cmd/idcni", len(r.Host.GitDirty))
		}
		fmt.Fprintf(out, "tree %s (%s), idcni sha256 %.16s\n", r.Host.GitHead, dirty, r.Host.PluginSHA)
	}
	fmt.Fprintf(out, "load average at start %.2f %.2f %.2f, at end %.2f %.2f %.2f\n",
		r.Host.LoadStart[0], r.Host.LoadStart[1], r.Host.LoadStart[2], r.Host.LoadEnd[0], r.Host.LoadEnd[1], r.Host.LoadEnd[2])
	if len(r.Summary) > 0 {
		base := "bare"
		if len(r.Params.Services) > 0 {
			base = "idcni-podip with as many Services"
		}
		fmt.Fprintf(out, "median of %d runs of %s (after %s warm-up); x = ratio to %s (paired: the median of each round's ratio); [min-max]\n\n", r.Params.Count, r.Params.Duration, r.Params.Warmup, base)
		tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
		fmt.Fprint(tw, "config")
		for _, m := range r.metrics {
			fmt.Fprintf(tw, "\t%s (%s)\t", m.name, m.unit)
		}
		fmt.Fprintln(tw)
		for _, c := range r.Configs {
			fmt.Fprint(tw, c.String())
			for _, m := range r.metrics {
				s, ok := r.row(c.String(), m.name)
				if !ok {
					fmt.Fprint(tw, "\t-\t")
					continue
				}
				ratio := "x-"
				if s.RatioToBare > 0 {
					ratio = fmt.Sprintf("x%.3f", s.RatioToBare)
				}
				if s.RatioToPodIP > 0 {
					ratio = fmt.Sprintf("x%.3f", s.RatioToPodIP)
				}
				if s.Paired > 0 && s.Paired != 1 {
					ratio += fmt.Sprintf(" (paired x%.3f)", s.Paired)
				}
				fmt.Fprintf(tw, "\t%s %s\t[%s-%s]", formatValue(s.Median, s.Unit), ratio, formatValue(s.Min, s.Unit), formatValue(s.Max, s.Unit))
			}
			fmt.Fprintln(tw)
		}
		tw.Flush()
		fmt.Fprintln(out)
		for _, m := range r.metrics {
			fmt.Fprintf(out, "  %-7s %s\n", m.name, m.desc)
		}
		if len(r.Params.Services) > 0 {
			r.printServiceTargets(out)
		} else {
			fmt.Fprintf(out, "\ntarget: idcni >= %.2f x bare on every workload and rule count\n", target)
		}
		for _, s := range r.Summary {
			if strings.HasPrefix(s.Config, "idcni/") && s.RatioToBare > 0 {
				fmt.Fprintf(out, "  %-14s %-7s x%.3f, paired x%.3f  %s\n", s.Config, s.Metric, s.RatioToBare, s.Paired, verdict(s.Paired))
			}
		}
	}
	if len(r.Profile) > 0 {
		fmt.Fprintf(out, "\nidcni programs, one more run each with BPF run-time statistics on (not in the medians above):\n\n")
		tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "config\tworkload\tresult\tprogram runs\tns/run from_pod\tns/run to_pod\tprogram ns\ttime in programs")
		for _, p := range r.Profile {
			fmt.Fprintf(tw, "%s\t%s\t%s %s\t%.1f /%s\t%.0f\t%.0f\t%.0f /%s\t%.2f%%\n", p.Config, p.Metric, formatValue(p.Value, p.Unit), p.Unit,
				p.RunsPerOp, opName(p.Metric), p.FromPodNS, p.ToPodNS, p.BPFNSPerOp, opName(p.Metric), 100*p.BPFShare)
		}
		tw.Flush()
	}
	if r.CNI != nil {
		fmt.Fprintf(out, "\nCNI (no agent, datapath already loaded; first load took %.1f ms), %d pods one after another:\n", r.DatapathLoadMS, r.CNI.Pods)
		fmt.Fprintf(out, "  ADD p50 %.1f ms  p99 %.1f ms\n", r.CNI.AddP50, r.CNI.AddP99)
		fmt.Fprintf(out, "  DEL p50 %.1f ms  p99 %.1f ms\n", r.CNI.DelP50, r.CNI.DelP99)
	}
}

func (r *report) writeJSON(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// noteSource records what was measured: the commit, uncommitted changes to
// the datapath or the plugin, and the plugin binary itself.
func (r *report) noteSource(ctx context.Context, plugin string) {
	if f, err := os.Open(plugin); err == nil {
		h := sha256.New()
		if _, err := io.Copy(h, f); err == nil {
			r.Host.PluginSHA = hex.EncodeToString(h.Sum(nil))
		}
		f.Close()
	}
	root, err := repoRoot()
	if err != nil {
		return
	}
	cmd := command(ctx, "git", "rev-parse", "--short=12", "HEAD")
	cmd.Dir = root
	if out, err := cmd.Output(); err == nil {
		r.Host.GitHead = strings.TrimSpace(string(out))
	}
	cmd = command(ctx, "git", "status", "--porcelain", "--", "bpf", "cni", "cmd/idcni")
	cmd.Dir = root
	if out, err := cmd.Output(); err == nil {
		for l := range strings.SplitSeq(strings.TrimRight(string(out), "\n"), "\n") {
			if l != "" {
				r.Host.GitDirty = append(r.Host.GitDirty, strings.TrimSpace(l))
			}
		}
	}
}

// verdict judges a paired ratio against the target.
func verdict(paired float64) string {
	if paired >= target {
		return "met"
	}
	return "MISSED"
}

// printServiceTargets says how the ClusterIP configurations fare against
// issue 13's goal: idcni through a ClusterIP >= 0.95 x the pod IP on crr,
// flat from the fewest Services to the most.
func (r *report) printServiceTargets(out io.Writer) {
	fmt.Fprintf(out, "\ntarget: idcni-clusterip crr >= %.2f x idcni-podip crr at every Service count, flat across counts\n", target)
	var first, last float64
	for _, s := range r.Summary {
		if !strings.HasPrefix(s.Config, "idcni-clusterip/") || s.RatioToPodIP == 0 {
			continue
		}
		v := ""
		if s.Metric == "crr" {
			v = verdict(s.Paired)
			// Flatness on the paired ratio: each count's ClusterIP rounds
			// against its own pod-IP rounds, so the machine's speed band
			// when a count ran (which moves both) does not read as a cost
			// of more Services.
			if first == 0 {
				first = s.Paired
			}
			last = s.Paired
		}
		fmt.Fprintf(out, "  %-24s %-7s x%.3f, paired x%.3f  %s\n", s.Config, s.Metric, s.RatioToPodIP, s.Paired, v)
	}
	if first > 0 && len(r.Params.Services) > 1 {
		fmt.Fprintf(out, "  idcni-clusterip crr's paired ratio at %d Services over at %d: x%.3f\n",
			r.Params.Services[len(r.Params.Services)-1], r.Params.Services[0], last/first)
	}
	fmt.Fprintln(out, "kube-proxy through the ClusterIP, against idcni-podip:")
	for _, s := range r.Summary {
		if strings.HasPrefix(s.Config, "kube-proxy-") && s.RatioToPodIP > 0 {
			fmt.Fprintf(out, "  %-28s %-7s x%.3f, paired x%.3f\n", s.Config, s.Metric, s.RatioToPodIP, s.Paired)
		}
	}
}
