// Package netpol is the upstream NetworkPolicy e2e suite
// (k8s.io/kubernetes/test/e2e/network/netpol) as a test binary of its own:
// scripts/conformance.sh builds it with `go test -c` and runs it against a
// local cluster. RunE2ETests's package (test/e2e) registers the specs of
// test/e2e/common too (586 in all at v1.36.3): the script's focus,
// [Feature:NetworkPolicy], selects the netpol ones (45 without SCTP).
package netpol

import (
	"flag"
	"fmt"
	"os"
	"testing"

	"k8s.io/kubernetes/test/e2e"
	"k8s.io/kubernetes/test/e2e/framework"

	// The specs: their init registers them with ginkgo.
	_ "k8s.io/kubernetes/test/e2e/network/netpol"

	// As upstream's e2e_test.go: debug dumps on failure, node helpers.
	_ "k8s.io/kubernetes/test/e2e/framework/debug/init"
	_ "k8s.io/kubernetes/test/e2e/framework/node/init"
)

// TestMain does what upstream's test/e2e/e2e_test.go does before running:
// the framework reads its configuration (--kubeconfig, --provider, the
// timeouts) from flags registered here, and AfterReadingAllFlags turns
// them into framework.TestContext.
func TestMain(m *testing.M) {
	framework.RegisterCommonFlags(flag.CommandLine)
	framework.RegisterClusterFlags(flag.CommandLine)
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "unknown arguments: %v\n", flag.Args())
		os.Exit(2)
	}
	framework.AfterReadingAllFlags(&framework.TestContext)
	os.Exit(m.Run())
}

// TestE2E runs the specs with the suite's standard setup (e2e.go's
// SynchronizedBeforeSuite waits for schedulable nodes and ready kube-system
// pods) and ginkgo's configuration from the --ginkgo.* flags.
func TestE2E(t *testing.T) {
	e2e.RunE2ETests(t)
}
