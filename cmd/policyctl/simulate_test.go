package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/idcni/idcni/policy/simulate"
)

// runSimulate executes `policyctl simulate` in process and returns stdout,
// stderr and the error.
func runSimulate(t *testing.T, stdin string, args ...string) (string, string, error) {
	t.Helper()
	cmd := newSimulate()
	var out, errb bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&errb)
	cmd.SetIn(strings.NewReader(stdin))
	cmd.SetArgs(args)
	err := cmd.Execute()
	return out.String(), errb.String(), err
}

func simResults(t *testing.T, stdout string) map[string]simulate.Result {
	t.Helper()
	var rs []simulate.Result
	if err := json.Unmarshal([]byte(stdout), &rs); err != nil {
		t.Fatalf("output is not a JSON array of results: %v\n%s", err, stdout)
	}
	m := map[string]simulate.Result{}
	for _, r := range rs {
		m[r.From+" "+r.To+" "+r.Protocol+"/"+strconv.Itoa(r.Port)] = r
	}
	return m
}

func TestSimulateShopJSON(t *testing.T) {
	stdout, stderr, err := runSimulate(t, "", "-f", "testdata/shop", "-o", "json")
	if err != nil {
		t.Fatalf("simulate: %v\n%s", err, stderr)
	}
	got := simResults(t, stdout)
	want := map[string]simulate.Result{
		"ops/prom shop/web TCP/80": {Allowed: true,
			Reason:  "egress: ops/prom not isolated for egress; ingress: allowed by shop/allow-web ingress[0]",
			Egress:  simulate.Side{Allowed: true, Reason: "ops/prom not isolated for egress"},
			Ingress: simulate.Side{Allowed: true, Reason: "allowed by shop/allow-web ingress[0]", Rule: "shop/allow-web ingress[0]"}},
		"ops/prom shop/db TCP/5432": {Allowed: false,
			Reason:  "shop/db isolated for ingress by shop/default-deny, shop/web-to-db; no rule allows ops/prom",
			Egress:  simulate.Side{Allowed: true, Reason: "ops/prom not isolated for egress"},
			Ingress: simulate.Side{Allowed: false, Reason: "shop/db isolated for ingress by shop/default-deny, shop/web-to-db; no rule allows ops/prom"}},
		"shop/web shop/db TCP/5432": {Allowed: true,
			Reason:  "egress: allowed by shop/web-egress egress[0]; ingress: allowed by shop/web-to-db ingress[0]",
			Egress:  simulate.Side{Allowed: true, Reason: "allowed by shop/web-egress egress[0]", Rule: "shop/web-egress egress[0]"},
			Ingress: simulate.Side{Allowed: true, Reason: "allowed by shop/web-to-db ingress[0]", Rule: "shop/web-to-db ingress[0]"}},
		"shop/db shop/web TCP/80": {Allowed: false,
			Reason:  "shop/db isolated for egress by shop/default-deny; no rule allows shop/web",
			Egress:  simulate.Side{Allowed: false, Reason: "shop/db isolated for egress by shop/default-deny; no rule allows shop/web"},
			Ingress: simulate.Side{Allowed: true, Reason: "allowed by shop/allow-web ingress[0]", Rule: "shop/allow-web ingress[0]"}},
	}
	if len(got) != len(want) {
		t.Errorf("got %d results, want %d:\n%s", len(got), len(want), stdout)
	}
	for k, w := range want {
		g, ok := got[k]
		if !ok {
			t.Errorf("missing %s", k)
			continue
		}
		g.From, g.To, g.Protocol, g.Port = "", "", "", 0
		if g != w {
			t.Errorf("%s:\n got  %+v\n want %+v", k, g, w)
		}
	}
	for _, w := range []string{
		`ignoring Deployment "web"`,
		"pod ops/node-exporter is not simulated: it uses the host network",
		"pod ops/prom declares no container ports",
	} {
		if !strings.Contains(stderr, w) {
			t.Errorf("stderr lacks %q:\n%s", w, stderr)
		}
	}
	if strings.Contains(stderr, "README") {
		t.Errorf("a directory walk read a non-manifest file:\n%s", stderr)
	}
}

func TestSimulateShopTable(t *testing.T) {
	stdout, _, err := runSimulate(t, "", "-f", "testdata/shop/namespaces.yaml", "-f", "testdata/shop/pods.json", "testdata/shop/policies")
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []string{
		"TCP/5432\nfrom \\ to  ops/prom  shop/db  shop/web\n",
		"ops/prom   -         DENY     -\n",
		"shop/web   -         ok       -\n",
		"4 probes: 2 allowed, 2 denied",
		"  shop/db -> shop/web TCP/80: shop/db isolated for egress by shop/default-deny; no rule allows shop/web\n",
	} {
		if !strings.Contains(stdout, w) {
			t.Errorf("table lacks %q:\n%s", w, stdout)
		}
	}
}

func TestSimulatePortAndProtocolFlags(t *testing.T) {
	stdout, _, err := runSimulate(t, "", "-f", "testdata/shop", "-o", "json", "--port", "80,5432", "--protocol", "tcp")
	if err != nil {
		t.Fatal(err)
	}
	got := simResults(t, stdout)
	if len(got) != 3*2*2 { // ordered pairs of 3 endpoints x 2 ports
		t.Errorf("got %d results, want 12", len(got))
	}
	if r := got["shop/web ops/prom TCP/80"]; r.Allowed || !strings.Contains(r.Reason, "shop/web isolated for egress by shop/default-deny") {
		t.Errorf("shop/web -> ops/prom: %+v", r)
	}
	if r := got["shop/db ops/prom TCP/5432"]; r.Allowed {
		t.Errorf("shop/db -> ops/prom allowed: %+v", r)
	}

	stdout, _, err = runSimulate(t, "", "-f", "testdata/shop", "--port", "53", "--protocol", "UDP", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	if r := simResults(t, stdout)["ops/prom shop/web UDP/53"]; r.Allowed || r.Ingress.Allowed {
		t.Errorf("UDP/53 to web should be denied by ingress (allow-web names TCP http): %+v", r)
	}

	// Without --port, --protocol filters the declared ports.
	stdout, _, err = runSimulate(t, "", "-f", "testdata/shop", "--protocol", "UDP")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(stdout, "nothing to probe") {
		t.Errorf("no declared UDP port, yet:\n%s", stdout)
	}
}

func TestSimulateStdinAndLists(t *testing.T) {
	manifest := `
apiVersion: v1
kind: PodList
items:
- metadata: {name: a, namespace: ns1, labels: {app: a}}
  spec: {containers: [{name: c, ports: [{containerPort: 8080, protocol: UDP}]}]}
  status: {podIP: 10.0.0.1}
- metadata: {name: b, namespace: ns1, labels: {app: b}}
  spec: {containers: [{name: c, ports: [{containerPort: 8080, protocol: UDP}]}]}
  status: {podIPs: [{ip: 10.0.0.2}]}
--- # a separator may carry a comment
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-from-a, namespace: ns1}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.1/32}}]
    ports: [{protocol: UDP}]
`
	stdout, stderr, err := runSimulate(t, manifest, "-f", "-", "-o", "json")
	if err != nil {
		t.Fatalf("%v\n%s", err, stderr)
	}
	got := simResults(t, stdout)
	if r := got["ns1/a ns1/b UDP/8080"]; !r.Allowed || r.Ingress.Rule != "ns1/only-from-a ingress[0]" {
		t.Errorf("a -> b: %+v", r)
	}
	if r := got["ns1/b ns1/a UDP/8080"]; !r.Allowed {
		t.Errorf("b -> a: %+v", r)
	}
	if !strings.Contains(stderr, `no Namespace "ns1" given`) {
		t.Errorf("missing-namespace warning absent:\n%s", stderr)
	}
}

func TestSimulateDuplicatesAndArrays(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("a.json", `[{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","labels":{"v":"1"}},"status":{"podIP":"10.0.0.1"}},
	 {"apiVersion":"v1","kind":"Pod","metadata":{"name":"q"},"status":{"podIP":"10.0.0.2"}}]`)
	write("b.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {v: '2'}}\nstatus: {podIP: 10.0.0.3}\n")
	var warn bytes.Buffer
	in, err := loadManifests([]string{dir}, nil, &warn)
	if err != nil {
		t.Fatal(err)
	}
	if len(in.Pods) != 2 || in.Pods[0].Labels["v"] != "2" || in.Pods[0].Namespace != "default" {
		t.Errorf("pods %+v", in.Pods)
	}
	if !strings.Contains(warn.String(), "Pod default/p already read from") {
		t.Errorf("duplicate warning absent: %s", warn.String())
	}
}

func TestSimulateErrors(t *testing.T) {
	cases := []struct {
		args []string
		want []string
	}{
		{[]string{"-f", "testdata/nonexistent.yaml"}, []string{"testdata/nonexistent.yaml", "no such file"}},
		{[]string{"-f", "testdata/bad/broken.yaml"}, []string{"testdata/bad/broken.yaml", "not YAML or JSON"}},
		{[]string{"-f", "testdata/bad/noip.yaml"}, []string{"pods without an IP address", "default/pending"}},
		{[]string{"-f", "testdata/bad/typo.yaml"}, []string{"testdata/bad/typo.yaml", "podSelecter"}},
		{[]string{"-f", "testdata/bad/invalid-policy.yaml"}, []string{"default/bad-range", "endPort 80"}},
		{[]string{"-f", "testdata/shop", "--protocol", "ICMP"}, []string{`unknown protocol "ICMP"`}},
		{[]string{"-f", "testdata/shop", "--port", "70000"}, []string{"port 70000"}},
		{[]string{"-f", "testdata/shop", "-o", "yaml"}, []string{`unknown output format "yaml"`}},
		{nil, []string{"no manifests given"}},
	}
	for _, tc := range cases {
		_, _, err := runSimulate(t, "", tc.args...)
		if err == nil {
			t.Errorf("%v: no error", tc.args)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%v: error %q lacks %q", tc.args, err, w)
			}
		}
	}
	// Wrong apiVersion of a known kind is an error, not a silent skip.
	_, err := loadManifests([]string{"-"}, strings.NewReader("apiVersion: extensions/v1beta1\nkind: NetworkPolicy\nmetadata: {name: x}\n"), &bytes.Buffer{})
	if err == nil || !strings.Contains(err.Error(), "networking.k8s.io/v1") {
		t.Errorf("old apiVersion: %v", err)
	}
}

func TestSimulateUnreadableFile(t *testing.T) {
	// A symlink loop cannot be read by anyone, root included (tests run as
	// root in CI, where file modes would not stop a read).
	dir := t.TempDir()
	p := filepath.Join(dir, "loop.yaml")
	if err := os.Symlink(p, p); err != nil {
		t.Fatal(err)
	}
	_, _, err := runSimulate(t, "", "-f", p)
	if err == nil || !strings.Contains(err.Error(), "loop.yaml") {
		t.Errorf("unreadable file: %v", err)
	}
	// Inside a directory walk too.
	_, _, err = runSimulate(t, "", "-f", dir)
	if err == nil || !strings.Contains(err.Error(), "loop.yaml") {
		t.Errorf("unreadable file in a directory: %v", err)
	}
}

// TestSimulateManifestsFolder reads the repository's manifests folder as
// `policyctl simulate -f manifests/` does (the install manifests' other
// kinds are skipped) and finds the seed's answer: frontend reaches backend
// on port 80, and nothing reaches frontend.
func TestSimulateManifestsFolder(t *testing.T) {
	stdout, stderr, err := runSimulate(t, "", "-f", "../../manifests", "--port", "80", "-o", "json")
	if err != nil {
		t.Fatalf("simulate: %v\n%s", err, stderr)
	}
	got := simResults(t, stdout)
	for k, want := range map[string]bool{
		"idcni-demo/frontend idcni-demo/backend TCP/80": true,
		"idcni-demo/backend idcni-demo/frontend TCP/80": false,
	} {
		if r, ok := got[k]; !ok || r.Allowed != want {
			t.Errorf("%s: allowed %v (found %v), want %v", k, r.Allowed, ok, want)
		}
	}
}
