package cluster

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/idcni/idcni/e2e/internal/kube"
)

// binaries are the programs a cluster runs, all found or built before the
// first daemon starts, so a missing one fails in seconds, not after a half
// started cluster.
type binaries struct {
	APIServer, Kubelet, Kubectl  string
	ControllerManager, Scheduler string
	KubeProxy                    string
	// CoreDNS is built from e2e/tools/coredns at CoreDNSVersion, for the
	// image the cluster's DNS runs.
	CoreDNS, CoreDNSVersion string
	Etcd                    string
	Containerd, Ctr, Runc   string
	// Bridge is the upstream bridge CNI plugin, for the baseline of the
	// pod start-up measurement.
	Bridge string
	// nsenter (util-linux) runs commands in the node's namespaces.
	nsenter string
}

// findBinaries returns every binary a cluster needs, building the missing
// Kubernetes ones and installing containerd and runc from Debian when
// absent. Progress of long steps goes to log.
func findBinaries(root string, log io.Writer) (*binaries, error) {
	kubeDir, err := kube.Binaries()
	if err != nil {
		return nil, err
	}
	b := &binaries{
		APIServer: filepath.Join(kubeDir, "kube-apiserver"),
		Kubelet:   filepath.Join(kubeDir, "kubelet"),
		Kubectl:   filepath.Join(kubeDir, "kubectl"),
	}
	for _, p := range []string{b.APIServer, b.Kubelet, b.Kubectl} {
		if !isExecutable(p) {
			return nil, fmt.Errorf("%s is missing (scripts/build-kube.sh builds it)", p)
		}
	}
	ctrlDir, err := controlBinaries(root, kubeDir, log)
	if err != nil {
		return nil, err
	}
	b.ControllerManager = filepath.Join(ctrlDir, "kube-controller-manager")
	b.Scheduler = filepath.Join(ctrlDir, "kube-scheduler")
	b.KubeProxy = filepath.Join(ctrlDir, "kube-proxy")
	if b.CoreDNS, b.CoreDNSVersion, err = corednsBinary(root, log); err != nil {
		return nil, err
	}
	if b.Etcd, err = kube.Etcd(); err != nil {
		return nil, err
	}
	if err := ensureDebianPackages(log, map[string]string{
		"containerd": "containerd", "ctr": "containerd", "containerd-shim-runc-v2": "containerd",
		"runc": "runc", "nsenter": "util-linux", "unshare": "util-linux", "ip": "iproute2",
		"iptables": "iptables",
	}); err != nil {
		return nil, err
	}
	for name, dst := range map[string]*string{"containerd": &b.Containerd, "ctr": &b.Ctr, "runc": &b.Runc, "nsenter": &b.nsenter} {
		if *dst, err = lookPath(name); err != nil {
			return nil, err
		}
	}
	if b.Bridge, err = bridgePlugin(root, log); err != nil {
		return nil, err
	}
	return b, nil
}

// sbinPath is searched too: root's PATH under `go test` or sudo may lack
// the sbin directories where runc, ip and iptables live.
var sbinPath = []string{"/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"}

func lookPath(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range sbinPath {
		if p := filepath.Join(d, name); isExecutable(p) {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found in PATH nor in %s", name, strings.Join(sbinPath, ":"))
}

// nodePath is the PATH of every daemon: containerd finds its shim and runc
// there, and the kubelet iptables.
func nodePath() string {
	return strings.Join(sbinPath, ":")
}

// ensureDebianPackages installs, with apt-get, the package of every command
// (command -> package) that is missing.
func ensureDebianPackages(log io.Writer, cmds map[string]string) error {
	var pkgs []string
	seen := map[string]bool{}
	for cmd, pkg := range cmds {
		if _, err := lookPath(cmd); err == nil || seen[pkg] {
			continue
		}
		seen[pkg] = true
		pkgs = append(pkgs, pkg)
	}
	if len(pkgs) == 0 {
		return nil
	}
	fmt.Fprintf(log, "cluster: installing %s with apt-get\n", strings.Join(pkgs, " "))
	install := func() ([]byte, error) {
		// The lock timeout makes a parallel installer a wait, not a failure.
		args := append([]string{"-o", "DPkg::Lock::Timeout=300", "install", "-y", "--no-install-recommends"}, pkgs...)
		cmd := exec.Command("apt-get", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		return cmd.CombinedOutput()
	}
	out, err := install()
	if err != nil {
		// A fresh machine may have no package lists yet.
		if upd, uerr := exec.Command("apt-get", "-o", "DPkg::Lock::Timeout=300", "update").CombinedOutput(); uerr != nil {
			return fmt.Errorf("apt-get install %s: %w\n%s\napt-get update: %v\n%s", strings.Join(pkgs, " "), err, tail(out, 20), uerr, tail(upd, 20))
		}
		if out, err = install(); err != nil {
			return fmt.Errorf("apt-get install %s: %w\n%s", strings.Join(pkgs, " "), err, tail(out, 20))
		}
	}
	return nil
}

// controlCmds are the Kubernetes components scripts/build-kube.sh does not
// build (the agent's tests need no controllers): DaemonSets need the
// daemonset controller to create their pods and, since 1.12, the default
// scheduler to bind them; the controller-manager also creates every
// namespace's default ServiceAccount and publishes kube-root-ca.crt, which
// every pod's token volume mounts. kube-proxy runs on every node, for
// Services.
var controlCmds = []string{"kube-controller-manager", "kube-scheduler", "kube-proxy"}

// controlRecipe changes when the build command changes in a way the stamp
// cannot see (2: kube-proxy joined).
const controlRecipe = "2"

// controlBinaries returns a directory with kube-controller-manager and
// kube-scheduler: kubeDir when scripts/build-kube.sh put them there too,
// else a cache directory next to it, built from the same tools module
// (e2e/tools) with the same version stamping, and reused while its stamp
// matches. Builds of one directory are serialised by a lock.
func controlBinaries(root, kubeDir string, log io.Writer) (string, error) {
	if hasAll(kubeDir, controlCmds) {
		return kubeDir, nil
	}
	tools := filepath.Join(root, "e2e", "tools")
	gomod, err := os.ReadFile(filepath.Join(tools, "go.mod"))
	if err != nil {
		return "", fmt.Errorf("read the tools module: %w", err)
	}
	gosum, err := os.ReadFile(filepath.Join(tools, "go.sum"))
	if err != nil {
		return "", fmt.Errorf("read the tools module: %w", err)
	}
	m := regexp.MustCompile(`k8s\.io/kubernetes (v(\d+)\.(\d+)\.\d+)\b`).FindSubmatch(gomod)
	if m == nil {
		return "", errors.New("cannot read the k8s.io/kubernetes release from e2e/tools/go.mod")
	}
	version, major, minor := string(m[1]), string(m[2]), string(m[3])

	cache, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("no cache directory for the Kubernetes controllers: %w", err)
	}
	dest := filepath.Join(cache, "idcni", "kube-control", version)
	if err := os.MkdirAll(dest, 0o755); err != nil {
		return "", err
	}
	goVersion, err := exec.Command(goCmd(), "env", "GOVERSION").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOVERSION: %w", err)
	}
	sum := sha256.Sum256(append(append(gomod, 0), gosum...))
	stamp := fmt.Sprintf("recipe %s\nrelease %s\n%s %s/%s\n%s\n", controlRecipe, version,
		strings.TrimSpace(string(goVersion)), runtime.GOOS, runtime.GOARCH, hex.EncodeToString(sum[:]))
	fresh := func() bool {
		got, err := os.ReadFile(filepath.Join(dest, ".stamp"))
		return err == nil && string(got) == stamp && hasAll(dest, controlCmds)
	}
	if fresh() {
		return dest, nil
	}
	lock, err := os.OpenFile(filepath.Join(dest, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", fmt.Errorf("lock %s: %w", dest, err)
	}
	if fresh() {
		return dest, nil
	}
	tmp, err := os.MkdirTemp(dest, ".build.")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)

	// The same stamping as scripts/build-kube.sh: components that report
	// v0.0.0 confuse version-skew checks.
	ldflags := "-s -w"
	for _, pkg := range []string{"k8s.io/component-base/version", "k8s.io/client-go/pkg/version"} {
		ldflags += fmt.Sprintf(" -X %s.gitVersion=%s -X %s.gitMajor=%s -X %s.gitMinor=%s -X %s.gitTreeState=clean",
			pkg, version, pkg, major, pkg, minor, pkg)
	}
	args := []string{"build", "-mod=readonly", "-trimpath", "-ldflags", ldflags, "-o", tmp + "/"}
	for _, c := range controlCmds {
		args = append(args, "k8s.io/kubernetes/cmd/"+c)
	}
	fmt.Fprintf(log, "cluster: building %s %s into %s (a cold build takes minutes)\n", strings.Join(controlCmds, " "), version, dest)
	start := time.Now()
	cmd := exec.Command(goCmd(), args...)
	cmd.Dir = tools
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("go build %s: %w\n%s", strings.Join(controlCmds, " "), err, tail(out.Bytes(), 30))
	}
	fmt.Fprintf(log, "cluster: built in %s\n", time.Since(start).Round(time.Second))
	// Binaries first, stamp last, each by rename: a reader trusting the
	// stamp always finds whole binaries.
	os.Remove(filepath.Join(dest, ".stamp"))
	for _, c := range controlCmds {
		if err := os.Rename(filepath.Join(tmp, c), filepath.Join(dest, c)); err != nil {
			return "", err
		}
	}
	if err := os.WriteFile(filepath.Join(tmp, "stamp"), []byte(stamp), 0o644); err != nil {
		return "", err
	}
	if err := os.Rename(filepath.Join(tmp, "stamp"), filepath.Join(dest, ".stamp")); err != nil {
		return "", err
	}
	return dest, nil
}

// bridgePlugin builds the upstream bridge plugin at the version of
// containernetworking/plugins the main module requires (the one `make build`
// takes host-local and loopback from), with `go install pkg@version`: that
// resolves its dependencies in a module of its own, so the main module's
// go.sum needs no entries for code only this baseline uses.
func bridgePlugin(root string, log io.Writer) (string, error) {
	list := exec.Command(goCmd(), "list", "-m", "-f", "{{.Version}}", "github.com/containernetworking/plugins")
	list.Dir = root
	out, err := list.Output()
	if err != nil {
		return "", fmt.Errorf("go list -m github.com/containernetworking/plugins: %w", err)
	}
	version := strings.TrimSpace(string(out))
	cache, err := os.UserCacheDir()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(cache, "idcni", "cni-plugins", version)
	bin := filepath.Join(dir, "bridge")
	if isExecutable(bin) {
		return bin, nil
	}
	fmt.Fprintf(log, "cluster: building the bridge CNI plugin %s\n", version)
	cmd := exec.Command(goCmd(), "install", "github.com/containernetworking/plugins/plugins/main/bridge@"+version)
	// Outside the main module, so GOFLAGS=-mod=... of the caller cannot
	// apply, and GOBIN names the cache directory.
	cmd.Dir = os.TempDir()
	cmd.Env = append(os.Environ(), "GOBIN="+dir, "CGO_ENABLED=0", "GOFLAGS=")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go install bridge@%s: %w\n%s", version, err, tail(out, 20))
	}
	return bin, nil
}

// corednsBinary builds CoreDNS from the module e2e/tools/coredns (see its
// main.go: CoreDNS with the plugins the cluster's Corefile uses) into a
// cache directory named by its version and the module's checksum, and
// returns the binary and CoreDNS's version. A lock serialises concurrent
// builders; the binary is renamed into place whole.
func corednsBinary(root string, log io.Writer) (bin, version string, err error) {
	mod := filepath.Join(root, "e2e", "tools", "coredns")
	gomod, err := os.ReadFile(filepath.Join(mod, "go.mod"))
	if err != nil {
		return "", "", fmt.Errorf("read the CoreDNS module: %w", err)
	}
	gosum, err := os.ReadFile(filepath.Join(mod, "go.sum"))
	if err != nil {
		return "", "", fmt.Errorf("read the CoreDNS module: %w", err)
	}
	main, err := os.ReadFile(filepath.Join(mod, "main.go"))
	if err != nil {
		return "", "", fmt.Errorf("read the CoreDNS module: %w", err)
	}
	m := regexp.MustCompile(`github\.com/coredns/coredns (v\d+\.\d+\.\d+)\b`).FindSubmatch(gomod)
	if m == nil {
		return "", "", errors.New("cannot read the github.com/coredns/coredns release from e2e/tools/coredns/go.mod")
	}
	version = string(m[1])
	goVersion, err := exec.Command(goCmd(), "env", "GOVERSION").Output()
	if err != nil {
		return "", "", fmt.Errorf("go env GOVERSION: %w", err)
	}
	h := sha256.New()
	for _, b := range [][]byte{gomod, gosum, main, goVersion} {
		h.Write(b)
		h.Write([]byte{0})
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		return "", "", fmt.Errorf("no cache directory for CoreDNS: %w", err)
	}
	dest := filepath.Join(cache, "idcni", "coredns", version+"-"+hex.EncodeToString(h.Sum(nil))[:12])
	bin = filepath.Join(dest, "coredns")
	if isExecutable(bin) {
		return bin, version, nil
	}
	if err := os.MkdirAll(dest, 0o755); err != nil {
		return "", "", err
	}
	lock, err := os.OpenFile(filepath.Join(dest, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", "", err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", "", fmt.Errorf("lock %s: %w", dest, err)
	}
	if isExecutable(bin) {
		return bin, version, nil
	}
	fmt.Fprintf(log, "cluster: building CoreDNS %s into %s\n", version, dest)
	start := time.Now()
	tmp := bin + ".tmp"
	cmd := exec.Command(goCmd(), "build", "-mod=readonly", "-trimpath", "-ldflags", "-s -w", "-o", tmp, ".")
	cmd.Dir = mod
	// Static: the image has no libc.
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=")
	if out, err := cmd.CombinedOutput(); err != nil {
		os.Remove(tmp)
		return "", "", fmt.Errorf("go build CoreDNS %s: %w\n%s", version, err, tail(out, 20))
	}
	if err := os.Rename(tmp, bin); err != nil {
		return "", "", err
	}
	fmt.Fprintf(log, "cluster: built CoreDNS in %s\n", time.Since(start).Round(time.Second))
	return bin, version, nil
}

// corednsTag is the image reference the cluster's CoreDNS runs from: its
// release, under the project's own name, since it is not upstream's image.
func (b *binaries) corednsTag() string { return "docker.io/idcni/coredns:" + b.CoreDNSVersion }

// goCmd is the go command: from PATH, else the project's /usr/local/go.
func goCmd() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return "/usr/local/go/bin/go"
}

// repoRoot walks up from the working directory to the idcni checkout (the
// directory holding e2e/tools/go.mod), where the manifests, the image
// builder and the tools module live.
func repoRoot() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for dir := wd; ; dir = filepath.Dir(dir) {
		if isFile(filepath.Join(dir, "e2e", "tools", "go.mod")) && isFile(filepath.Join(dir, "go.mod")) {
			return dir, nil
		}
		if filepath.Dir(dir) == dir {
			return "", fmt.Errorf("not inside the idcni checkout (no e2e/tools/go.mod above %s)", wd)
		}
	}
}

func hasAll(dir string, names []string) bool {
	for _, n := range names {
		if !isExecutable(filepath.Join(dir, n)) {
			return false
		}
	}
	return true
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

func isFile(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}

// tail returns the last n lines of out.
func tail(out []byte, n int) string {
	lines := strings.Split(strings.TrimRight(string(out), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
