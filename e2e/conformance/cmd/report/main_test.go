package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A report in the shape ginkgo v2 writes: suite nodes, specs the focus
// left out, a passed, a failed and a command-line skipped spec.
const junit = `<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="6" disabled="0" errors="0" failures="1" time="30">
  <testsuite name="Kubernetes e2e suite" package="netpol" tests="6" skipped="3" failures="1" errors="0" time="30">
    <testcase name="[SynchronizedBeforeSuite]" classname="Kubernetes e2e suite" status="passed" time="1"></testcase>
    <testcase name="[sig-network] Netpol API should support creating NetworkPolicy API operations" classname="Kubernetes e2e suite" status="skipped" time="0"><skipped message="skipped"></skipped></testcase>
    <testcase name="[sig-network] Netpol NetworkPolicy between server and client should support a 'default-deny-ingress' policy [Feature:NetworkPolicy]" classname="Kubernetes e2e suite" status="passed" time="12.4"></testcase>
    <testcase name="[sig-network] Netpol NetworkPolicy between server and client should allow egress access on one named port [Feature:NetworkPolicy]" classname="Kubernetes e2e suite" status="failed" time="20"><failure message="probes failed&#xA;more" type="failed">details</failure></testcase>
    <testcase name="[sig-network] Netpol [Feature:SCTPConnectivity] NetworkPolicy between server and client using SCTP should support a 'default-deny-ingress' policy [Feature:NetworkPolicy]" classname="Kubernetes e2e suite" status="skipped" time="0"><skipped message="skipped"></skipped></testcase>
    <testcase name="[sig-network] Netpol NetworkPolicy should skip itself [Feature:NetworkPolicy]" classname="Kubernetes e2e suite" status="skipped" time="0"><skipped message="skipped - no IPv6 here"></skipped></testcase>
  </testsuite>
</testsuites>`

func TestReport(t *testing.T) {
	path := filepath.Join(t.TempDir(), "junit.xml")
	if err := os.WriteFile(path, []byte(junit), 0o644); err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	ok, err := report(path, "no sctp", &out)
	if err != nil {
		t.Fatal(err)
	}
	if ok {
		t.Error("a failed spec reported as a passing run")
	}
	got := out.String()
	for _, want := range []string{
		"PASS  [sig-network] Netpol NetworkPolicy between server and client should support a 'default-deny-ingress' policy [Feature:NetworkPolicy] (12s)\n",
		"FAIL  [sig-network] Netpol NetworkPolicy between server and client should allow egress access on one named port [Feature:NetworkPolicy] (20s): probes failed\n",
		"SKIP  [sig-network] Netpol [Feature:SCTPConnectivity] NetworkPolicy between server and client using SCTP should support a 'default-deny-ingress' policy [Feature:NetworkPolicy] (no sctp)\n",
		"SKIP  [sig-network] Netpol NetworkPolicy should skip itself [Feature:NetworkPolicy] (no IPv6 here)\n",
		"conformance: 1 of 2 passed, 2 skipped (no sctp)\n",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("missing %q in:\n%s", want, got)
		}
	}
	if strings.Contains(got, "Netpol API") {
		t.Errorf("a spec outside the focus was counted:\n%s", got)
	}
}

func TestReportNothingRan(t *testing.T) {
	path := filepath.Join(t.TempDir(), "junit.xml")
	doc := `<testsuites><testsuite><testcase name="[sig-network] Netpol NetworkPolicy x [Feature:NetworkPolicy]" status="skipped"><skipped message="skipped"></skipped></testcase></testsuite></testsuites>`
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	if ok, err := report(path, "", &out); ok || err == nil {
		t.Errorf("a run where nothing ran: ok %v, err %v", ok, err)
	}
}
