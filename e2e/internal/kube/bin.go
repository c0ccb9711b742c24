package kube

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// BinEnv names the directory of the Kubernetes binaries. scripts/build-kube.sh
// builds into it (instead of its default cache directory); a directory that
// holds a kube-apiserver but no .stamp of that script was filled by hand and
// is used as it is.
const BinEnv = "IDCNI_KUBE_BIN"

// buildScript is the repository-relative path of the script that builds or
// reuses the binaries.
const buildScript = "scripts/build-kube.sh"

var (
	binMu  sync.Mutex
	binDir string // set once a lookup or build succeeded in this process
)

// Binaries returns the directory holding kube-apiserver, kubelet and kubectl,
// building them with scripts/build-kube.sh when they are missing or stale. A
// cold build takes several minutes; its progress goes to the test's stderr
// so a long silence is not mistaken for a hang.
func Binaries() (string, error) {
	binMu.Lock()
	defer binMu.Unlock()
	if binDir != "" {
		return binDir, nil
	}
	dir, err := findOrBuild()
	if err != nil {
		return "", err
	}
	binDir = dir
	return dir, nil
}

func findOrBuild() (string, error) {
	if dir := os.Getenv(BinEnv); dir != "" && isExecutable(filepath.Join(dir, "kube-apiserver")) {
		if _, err := os.Stat(filepath.Join(dir, ".stamp")); errors.Is(err, os.ErrNotExist) {
			return dir, nil
		}
	}
	root, err := repoRoot()
	if err != nil {
		return "", fmt.Errorf("no Kubernetes binaries: set %s to a directory with kube-apiserver, or run the tests inside the idcni tree: %w", BinEnv, err)
	}
	var out, errOut bytes.Buffer
	cmd := exec.Command("bash", filepath.Join(root, buildScript))
	cmd.Dir = root
	cmd.Stdout = &out
	cmd.Stderr = io.MultiWriter(os.Stderr, &errOut)
	start := time.Now()
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("building the Kubernetes binaries failed (%s, after %s): %w\n%s",
			buildScript, time.Since(start).Round(time.Second), err, lastLines(errOut.String(), 30))
	}
	dir := strings.TrimSpace(out.String())
	if i := strings.LastIndexByte(dir, '\n'); i >= 0 {
		dir = dir[i+1:]
	}
	if !isExecutable(filepath.Join(dir, "kube-apiserver")) {
		return "", fmt.Errorf("%s printed %q, which holds no kube-apiserver", buildScript, dir)
	}
	return dir, nil
}

// repoRoot walks up from the working directory (a package directory under
// go test) to the directory that holds the build script and the tools module.
func repoRoot() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("working directory: %w", err)
	}
	for dir := wd; ; dir = filepath.Dir(dir) {
		if _, err := os.Stat(filepath.Join(dir, buildScript)); err == nil {
			if _, err := os.Stat(filepath.Join(dir, "e2e", "tools", "go.mod")); err == nil {
				return dir, nil
			}
		}
		if filepath.Dir(dir) == dir {
			return "", fmt.Errorf("%s not found in %s or any parent", buildScript, wd)
		}
	}
}

// etcdPath is where Debian's etcd-server package puts the binary.
const etcdPath = "/usr/bin/etcd"

var etcdMu sync.Mutex

// Etcd returns the path of an etcd binary: the first in PATH, else Debian's,
// installing the etcd-server package when neither exists. The package's
// service is not what the tests use (they start their own etcd on free
// ports), and on machines without an init system it does not start at all.
func Etcd() (string, error) {
	etcdMu.Lock()
	defer etcdMu.Unlock()
	if p, err := exec.LookPath("etcd"); err == nil {
		return p, nil
	}
	if isExecutable(etcdPath) {
		return etcdPath, nil
	}
	if os.Geteuid() != 0 {
		return "", fmt.Errorf("etcd is not installed and installing it needs root: run apt-get install -y etcd-server")
	}
	install := func() ([]byte, error) {
		// The lock timeout makes a parallel test process that is installing
		// too a wait, not a failure.
		cmd := exec.Command("apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "--no-install-recommends", "etcd-server")
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		return cmd.CombinedOutput()
	}
	out, err := install()
	if err != nil {
		// A fresh machine may have no package lists yet.
		upd, uerr := exec.Command("apt-get", "-o", "DPkg::Lock::Timeout=300", "update").CombinedOutput()
		if uerr != nil {
			return "", fmt.Errorf("apt-get install etcd-server: %w\n%s\napt-get update: %v\n%s", err, lastLines(string(out), 20), uerr, lastLines(string(upd), 20))
		}
		if out, err = install(); err != nil {
			return "", fmt.Errorf("apt-get install etcd-server: %w\n%s", err, lastLines(string(out), 20))
		}
	}
	if !isExecutable(etcdPath) {
		return "", fmt.Errorf("apt-get installed etcd-server but %s is missing", etcdPath)
	}
	return etcdPath, nil
}

func isExecutable(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
