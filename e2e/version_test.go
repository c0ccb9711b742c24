package e2e

import (
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/idcni/idcni/bpf"
)

// TestEveryBinaryAnswersVersion: an operator rolling a node forward or back
// must be able to ask each binary which build it is and which pin layout
// it reads, and the plugin must still answer the runtime's CNI VERSION.
func TestEveryBinaryAnswersVersion(t *testing.T) {
	dir := t.TempDir()
	const build = "v0.0.0-e2e-version"
	cmd := exec.Command("go", "build", "-ldflags", "-X github.com/idcni/idcni/internal/version.Build="+build, "-o", dir+"/", "./cmd/...")
	cmd.Dir = ".."
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/...: %v\n%s", err, out)
	}
	for _, name := range []string{"idcni", "idcni-agent", "endpointctl", "policyctl"} {
		out, err := exec.Command(filepath.Join(dir, name), "--version").CombinedOutput()
		if err != nil {
			t.Errorf("%s --version: %v\n%s", name, err, out)
			continue
		}
		want := name + " " + build + " (pin layout " + strconv.Itoa(bpf.LayoutVersion) + ")"
		if got := strings.TrimSpace(string(out)); got != want {
			t.Errorf("%s --version = %q, want %q", name, got, want)
		}
	}
	v := exec.Command(filepath.Join(dir, "idcni"))
	v.Env = []string{"CNI_COMMAND=VERSION"}
	v.Stdin = strings.NewReader(`{"cniVersion":"1.0.0"}`)
	out, err := v.Output()
	if err != nil || !strings.Contains(string(out), `"supportedVersions"`) {
		t.Fatalf("CNI_COMMAND=VERSION: %v: %s", err, out)
	}
}
