package main

import (
	"net/netip"
	"strings"
	"testing"
)

func TestParseServicesFlags(t *testing.T) {
	o, err := parseFlags([]string{"-services", "10, 1000,10000,10"})
	if err != nil {
		t.Fatal(err)
	}
	if want := []int{10, 1000, 10000}; len(o.services) != len(want) || o.services[0] != 10 || o.services[1] != 1000 || o.services[2] != 10000 {
		t.Errorf("services %v, want %v", o.services, want)
	}
	for _, c := range svcConfigs {
		if !o.svcConfigs[c] {
			t.Errorf("%s not selected by default", c)
		}
	}
	if !o.skipCNI {
		t.Error("-services runs the CNI latency part")
	}
	o, err = parseFlags([]string{"-services", "10", "-configs", "idcni-podip,kube-proxy-nftables"})
	if err != nil {
		t.Fatal(err)
	}
	if !o.svcConfigs["idcni-podip"] || !o.svcConfigs["kube-proxy-nftables"] || o.svcConfigs["idcni-clusterip"] || o.svcConfigs["kube-proxy-iptables"] {
		t.Errorf("configs %v", o.svcConfigs)
	}
	for _, bad := range [][]string{
		{"-services", "0"},
		{"-services", "16001"},
		{"-services", "ten"},
		{"-services", "10", "-configs", "iptables"},
		{"-services", "10", "-nodes"},
		{"-services", "10", "-port", "65534"},
	} {
		if _, err := parseFlags(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	if o, err := parseFlags(nil); err != nil || len(o.services) != 0 {
		t.Errorf("default run: %v, services %v", err, o.services)
	}
}

func testPlan(n int) svcPlan {
	return svcPlan{
		n: n, real: n / 2,
		cips:     netip.MustParsePrefix("198.18.64.0/18"),
		backends: netip.MustParsePrefix("198.19.64.0/18"),
		cluster:  netip.MustParsePrefix("10.213.7.0/24"),
		server:   netip.MustParseAddrPort("10.213.7.3:5001"),
	}
}

func TestServicePlan(t *testing.T) {
	p := testPlan(maxServices)
	seen := map[netip.AddrPort]bool{}
	for i := range p.n {
		e := p.service(i)
		fe := netip.AddrPortFrom(e.cip, e.port)
		if seen[fe] || !p.cips.Contains(e.cip) || e.cip == p.cips.Addr() {
			t.Fatalf("service %d: frontend %s repeated or outside %s", i, fe, p.cips)
		}
		seen[fe] = true
		if len(e.backends) != 1 {
			t.Fatalf("service %d: %d backends", i, len(e.backends))
		}
		if i == p.real {
			if e.backends[0] != p.server || e.port != svcPort {
				t.Errorf("the benchmark Service is %+v", e)
			}
		} else if !p.backends.Contains(e.backends[0].Addr()) {
			t.Fatalf("service %d: backend %s outside %s", i, e.backends[0], p.backends)
		}
	}
	// The benchmark Service's ClusterIP is the same at every count.
	if a, b := testPlan(10).frontend(), testPlan(10000).frontend(); a != b {
		t.Errorf("the benchmark frontend moves: %s at 10, %s at 10000", a, b)
	}
}

func TestIptablesServices(t *testing.T) {
	p := testPlan(5)
	k := kpChains{prefix: "NBABCDEF"}
	for _, c := range k.all(testPlan(maxServices)) {
		if len(c) > 28 {
			t.Fatalf("chain name %q is longer than iptables allows", c)
		}
	}
	rules := iptablesServices(k, p)
	count := func(s string) int { return strings.Count(rules, s) }
	if got := count("-A NBABCDEF-SERVICES -d "); got != 5 {
		t.Errorf("%d Service rules in SERVICES, want 5", got)
	}
	if !strings.Contains(rules, "--dst-type LOCAL -j NBABCDEF-NODEPORTS\n-A NBABCDEF-SVC-") {
		t.Error("the NODEPORTS jump is not SERVICES' last rule")
	}
	if got := count("-j DNAT --to-destination"); got != 5 {
		t.Errorf("%d DNAT rules, want 5", got)
	}
	if !strings.Contains(rules, "-j DNAT --to-destination 10.213.7.3:5001\n") {
		t.Error("no DNAT to the server")
	}
	for _, j := range []string{"-A PREROUTING -d 198.18.64.0/18", "-A OUTPUT -d 198.18.64.0/18", "-A POSTROUTING -s 10.213.7.0/24"} {
		if !strings.Contains(rules, j) {
			t.Errorf("no %q", j)
		}
	}
	if !strings.Contains(rules, "! -s 10.213.7.0/24 -d ") || count("-j NBABCDEF-MARK-MASQ") != 10 {
		t.Error("KUBE-MARK-MASQ is not where kube-proxy puts it (outside the cluster range, and hairpin)")
	}
	if !strings.HasPrefix(rules, "*nat\n") || !strings.HasSuffix(rules, "COMMIT\n") {
		t.Error("not one nat table transaction")
	}
	// Several endpoints: statistic with falling probabilities, the last
	// one taken unconditionally.
	e := svcEntry{name: "nb/x:p80", cip: netip.MustParseAddr("198.18.64.9"), port: 80, backends: []netip.AddrPort{
		netip.MustParseAddrPort("10.1.0.1:80"), netip.MustParseAddrPort("10.1.0.2:80"), netip.MustParseAddrPort("10.1.0.3:80")}}
	var sb strings.Builder
	writeIptablesService(&sb, k, p, e)
	got := sb.String()
	for _, want := range []string{"--probability 0.3333333333 -j", "--probability 0.5000000000 -j"} {
		if !strings.Contains(got, want) {
			t.Errorf("no %q in\n%s", want, got)
		}
	}
	if strings.Count(got, "statistic") != 2 {
		t.Errorf("the last endpoint is not unconditional:\n%s", got)
	}
	removal := iptablesServicesRemoval(k, p)
	if strings.Count(removal, "\n-X ") != len(k.all(p)) {
		t.Errorf("removal does not delete every chain:\n%s", removal)
	}
}

func TestNftServices(t *testing.T) {
	p := testPlan(5)
	text := nftServices("idcni-nb-abc", p)
	for _, want := range []string{
		"table ip idcni-nb-abc {",
		"type ipv4_addr . inet_proto . inet_service : verdict",
		"type nat hook prerouting priority dstnat; policy accept;",
		"type nat hook output priority -100; policy accept;",
		"type nat hook postrouting priority srcnat; policy accept;",
		"ip daddr . meta l4proto . th dport vmap @service-ips",
		"numgen random mod 1 vmap { 0 : goto endpoint-",
		"meta l4proto tcp counter dnat to 10.213.7.3:5001",
		"masquerade fully-random",
		"add element ip idcni-nb-abc service-ips {",
		"198.18.64.1 . tcp . 80 : goto service-",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("no %q in the table", want)
		}
	}
	if got := strings.Count(text, "\tchain service-"); got != 5 {
		t.Errorf("%d service chains, want 5", got)
	}
	if got := strings.Count(text, "\tchain endpoint-"); got != 5 {
		t.Errorf("%d endpoint chains, want 5", got)
	}
	if got := strings.Count(text, "counter"); got != 1 {
		t.Errorf("%d counters, want 1 (the benchmark Service's endpoint)", got)
	}
}

// A round whose two windows fell in different speed bands moves the
// ratio of medians but not the paired ratio.
func TestPairedRatio(t *testing.T) {
	// Three slow rounds of five for the baseline, two for the other: the
	// band changed between round 2's windows.
	base := []float64{9500, 9600, 9400, 14000, 14100}
	v := []float64{9300, 13600, 9200, 13700, 13650}
	if got := median(v) / median(base); got < 1.4 {
		t.Fatalf("ratio of medians %.3f: the bands should push it over 1.4 in this example", got)
	}
	if got := paired(v, base); got < 0.978 || got > 0.98 {
		t.Fatalf("paired ratio %.3f, want the unchanged rounds' own ratio (0.979)", got)
	}
	if got := paired(v[:2], base[:1]); got != v[0]/base[0] {
		t.Fatalf("paired over unequal rounds: %.3f, want only the first round's", got)
	}
}

// The flatness line reads the paired ratios: a Service count that ran in
// the slow band (both configurations slower) is no cost of Services.
func TestServiceFlatnessIsPaired(t *testing.T) {
	r := &report{
		Params: params{Services: []int{10, 10000}},
		Summary: []summaryRow{
			{Config: "idcni-clusterip/10", Metric: "crr", Median: 14000, RatioToPodIP: 0.96, Paired: 0.96},
			{Config: "idcni-clusterip/10000", Metric: "crr", Median: 9500, RatioToPodIP: 0.95, Paired: 0.955},
		},
	}
	var out strings.Builder
	r.printServiceTargets(&out)
	if want := "paired ratio at 10000 Services over at 10: x0.995"; !strings.Contains(out.String(), want) {
		t.Fatalf("report:\n%s\nwant a line with %q", out.String(), want)
	}
}
