// Package cnitest runs the real idcni plugin the way a container runtime
// does: through libcni, with host-local and loopback next to it on
// CNI_PATH, and network namespaces as pods. Everything a test creates
// (netns, bpffs root, data directories, subnet) is private to it, so tests
// run in parallel with each other and with other packages' tests, and it is
// all removed in t.Cleanup, failed test or not.
package cnitest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// BinDir returns a directory holding idcni, host-local and loopback. With
// IDCNI_E2E_BIN set (e.g. to the bin/ of `make build`), it is that
// directory. Otherwise the binaries are built once per test process into a
// temporary directory: building idcni from the working tree every time
// means a test never runs a stale plugin left in bin/.
func BinDir() (string, error) {
	buildOnce.Do(func() {
		if d := os.Getenv("IDCNI_E2E_BIN"); d != "" {
			binDir = d
			for _, name := range []string{"idcni", "host-local", "loopback"} {
				if _, err := os.Stat(filepath.Join(d, name)); err != nil {
					buildErr = fmt.Errorf("IDCNI_E2E_BIN=%s: %w (run make build)", d, err)
					return
				}
			}
			return
		}
		binDir, buildErr = build()
	})
	return binDir, buildErr
}

func build() (string, error) {
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp("", "idcni-e2e-bin-")
	if err != nil {
		return "", err
	}
	for name, pkg := range map[string]string{
		"idcni":      "./cmd/idcni",
		"host-local": "github.com/containernetworking/plugins/plugins/ipam/host-local",
		"loopback":   "github.com/containernetworking/plugins/plugins/main/loopback",
	} {
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, name), pkg)
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			os.RemoveAll(dir)
			return "", fmt.Errorf("go build %s: %v\n%s", pkg, err, out)
		}
	}
	return dir, nil
}

// RemoveBuilt deletes the binaries BinDir built (not a directory it was
// given); TestMain calls it.
func RemoveBuilt() {
	if binDir != "" && os.Getenv("IDCNI_E2E_BIN") == "" {
		os.RemoveAll(binDir)
	}
}

// repoRoot is the directory of the main module's go.mod.
func repoRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("not inside the idcni module")
	}
	return filepath.Dir(gomod), nil
}
