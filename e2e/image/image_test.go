package main

import (
	"archive/tar"
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// The images are built once per test process (a cold build of the agent's
// binaries takes minutes on two cores) into a directory removed at exit.
var (
	buildOnce sync.Once
	buildDir  string
	buildOut  string
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// tarballs builds every image with the command's own entry point, as
// `go run ./e2e/image -out DIR` does, and returns name -> tarball path.
func tarballs(t *testing.T) map[string]string {
	t.Helper()
	if _, err := os.Stat("/bin/busybox"); err != nil && os.Geteuid() != 0 {
		t.Skip("no /bin/busybox and not root to install busybox-static")
	}
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "idcni-image-test-")
		if buildErr != nil {
			return
		}
		var stdout, stderr bytes.Buffer
		buildErr = run([]string{"-out", buildDir}, &stdout, &stderr)
		if buildErr != nil {
			buildErr = fmt.Errorf("%w\n%s", buildErr, stderr.String())
		}
		buildOut = stdout.String()
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	lines := strings.Split(strings.TrimSpace(buildOut), "\n")
	want := []string{filepath.Join(buildDir, "agent.tar"), filepath.Join(buildDir, "test.tar"), filepath.Join(buildDir, "pause.tar")}
	if !slices.Equal(lines, want) {
		t.Fatalf("stdout lists %q, want the tarball paths %q and nothing else", lines, want)
	}
	return map[string]string{"agent": want[0], "test": want[1], "pause": want[2]}
}

// loaded is an image read back from its tarball, its filesystem flattened.
type loaded struct {
	img   v1.Image
	cfg   *v1.ConfigFile
	files map[string]*tar.Header
	data  map[string][]byte
}

func load(t *testing.T, path, tag string) loaded {
	t.Helper()
	ref, err := name.NewTag(tag)
	if err != nil {
		t.Fatal(err)
	}
	// The tag must be in the tarball: containerd names the imported image
	// after it, and the manifests refer to that name.
	img, err := tarball.ImageFromPath(path, &ref)
	if err != nil {
		t.Fatalf("%s does not hold %s: %v", path, tag, err)
	}
	m, err := tarball.LoadManifest(func() (io.ReadCloser, error) { return os.Open(path) })
	if err != nil {
		t.Fatal(err)
	}
	if len(m) != 1 || !slices.Contains(m[0].RepoTags, ref.String()) {
		t.Errorf("%s: manifest %+v, want one image tagged %s", path, m, ref)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.OS != "linux" || cfg.Architecture != "amd64" {
		t.Errorf("%s: platform %s/%s, want linux/amd64 (containerd skips other platforms)", tag, cfg.OS, cfg.Architecture)
	}
	if !slices.Contains(cfg.Config.Env, defaultPath) {
		t.Errorf("%s: env %v lacks %s", tag, cfg.Config.Env, defaultPath)
	}
	l := loaded{img: img, cfg: cfg, files: map[string]*tar.Header{}, data: map[string][]byte{}}
	rc := mutate.Extract(img)
	defer rc.Close()
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		p := "/" + strings.TrimSuffix(h.Name, "/")
		l.files[p] = h
		if h.Typeflag == tar.TypeReg {
			if l.data[p], err = io.ReadAll(tr); err != nil {
				t.Fatal(err)
			}
		}
	}
	return l
}

// executable checks that path is a root-owned 0755 regular file holding a
// static x86-64 executable, writes it to dir and returns where.
func (l loaded) executable(t *testing.T, path, dir string) string {
	t.Helper()
	h, ok := l.files[path]
	if !ok {
		t.Fatalf("no %s in the image", path)
	}
	if h.Typeflag != tar.TypeReg || h.Mode != 0o755 || h.Uid != 0 || h.Gid != 0 {
		t.Errorf("%s: type %c mode %o owner %d:%d, want a regular file, 0755, root", path, h.Typeflag, h.Mode, h.Uid, h.Gid)
	}
	out := filepath.Join(dir, filepath.Base(path))
	if err := os.WriteFile(out, l.data[path], 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := elf.Open(out)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 {
		t.Errorf("%s: machine %v, want x86-64", path, f.Machine)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Errorf("%s has an ELF interpreter: it is dynamically linked and cannot run in an image without libc", path)
		}
	}
	return out
}

func TestAgentImage(t *testing.T) {
	l := load(t, tarballs(t)["agent"], AgentTag)
	if ep := l.cfg.Config.Entrypoint; !slices.Equal(ep, []string{"/usr/bin/idcni-agent"}) {
		t.Errorf("entrypoint %v, want /usr/bin/idcni-agent", ep)
	}
	dir := t.TempDir()
	for _, b := range AgentBinaries {
		l.executable(t, "/usr/bin/"+b, dir)
	}
	// The init container's step, run as the image lays it out: the
	// plugins next to the agent land in the bin directory.
	binDir := filepath.Join(t.TempDir(), "opt", "cni", "bin")
	out, err := exec.Command(filepath.Join(dir, "idcni-agent"), "install-cni", "--bin-dir", binDir).CombinedOutput()
	if err != nil {
		t.Fatalf("idcni-agent install-cni: %v\n%s", err, out)
	}
	for _, p := range []string{"idcni", "host-local", "loopback"} {
		got, err := os.ReadFile(filepath.Join(binDir, p))
		if err != nil || !bytes.Equal(got, l.data["/usr/bin/"+p]) {
			t.Errorf("install-cni did not install the image's %s: %v", p, err)
		}
	}
	// The plugin answers VERSION, so it starts without a loader.
	cmd := exec.Command(filepath.Join(binDir, "idcni"))
	cmd.Env = []string{"CNI_COMMAND=VERSION"}
	cmd.Stdin = strings.NewReader(`{"cniVersion":"1.1.0"}`)
	if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "supportedVersions") {
		t.Errorf("idcni VERSION: %v\n%s", err, out)
	}
}

func TestTestImage(t *testing.T) {
	l := load(t, tarballs(t)["test"], TestTag)
	bb := l.executable(t, "/bin/busybox", t.TempDir())
	for _, a := range append(slices.Clone(busyboxRequired), "ip") {
		h, ok := l.files["/bin/"+a]
		if !ok || h.Typeflag != tar.TypeSymlink || h.Linkname != "busybox" {
			t.Errorf("/bin/%s: %+v, want a symlink to busybox", a, h)
		}
	}
	if h := l.files["/tmp"]; h == nil || h.Typeflag != tar.TypeDir || h.Mode != 0o1777 {
		t.Errorf("/tmp: %+v, want a directory, mode 1777", h)
	}
	// A command: without a path (sleep, as the test pods run) resolves
	// through PATH to the links; here busybox runs its shell directly.
	out, err := exec.Command(bb, "sh", "-c", "echo ok").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "ok" {
		t.Errorf("busybox sh: %v %q", err, out)
	}
}

func TestPauseImage(t *testing.T) {
	l := load(t, tarballs(t)["pause"], PauseTag)
	if ep := l.cfg.Config.Entrypoint; !slices.Equal(ep, []string{"/pause"}) {
		t.Errorf("entrypoint %v, want /pause", ep)
	}
	pause := l.executable(t, "/pause", t.TempDir())
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) {
			cmd := exec.Command(pause)
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			time.Sleep(200 * time.Millisecond) // past signal.Notify
			if err := cmd.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			if err := waitTimeout(cmd, 5*time.Second); err != nil {
				t.Errorf("pause after %v: %v, want exit 0", sig, err)
			}
		})
	}
	t.Run("reaps", func(t *testing.T) { testPauseReaps(t, pause) })
}

// testPauseReaps runs pause as PID 1 of a new PID namespace, makes an
// orphan in that namespace, and checks the orphan is reparented to pause
// and, once it exits, reaped rather than left a zombie.
func testPauseReaps(t *testing.T, pause string) {
	if os.Geteuid() != 0 {
		t.Skip("a new PID namespace needs root")
	}
	nsenter, err := exec.LookPath("nsenter")
	if err != nil {
		t.Skip("no nsenter")
	}
	cmd := exec.Command(pause)
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	time.Sleep(200 * time.Millisecond)
	// sh starts sleep in the background and exits at once: sleep's parent
	// is gone, and the namespace's init (pause) inherits it. sleep must not
	// hold the output pipe, or CombinedOutput would wait for it to exit.
	orphan := exec.Command(nsenter, "--target", strconv.Itoa(cmd.Process.Pid), "--pid", "--",
		"/bin/sh", "-c", "sleep 1 </dev/null >/dev/null 2>&1 & exit 0")
	if out, err := orphan.CombinedOutput(); err != nil {
		t.Fatalf("nsenter: %v\n%s", err, out)
	}
	time.Sleep(300 * time.Millisecond)
	if kids := children(t, cmd.Process.Pid); len(kids) != 1 || kids[0] != 'S' {
		t.Fatalf("pause's children while sleep runs: states %q, want one sleeping orphan", kids)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		kids := children(t, cmd.Process.Pid)
		if len(kids) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pause's children 5 s after the orphan's exit: states %q, want none (a Z is an unreaped zombie)", kids)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// children returns the states (R, S, Z, ...) of ppid's children.
func children(t *testing.T, ppid int) []byte {
	t.Helper()
	stats, err := filepath.Glob("/proc/[0-9]*/stat")
	if err != nil {
		t.Fatal(err)
	}
	var out []byte
	for _, p := range stats {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // the process is gone
		}
		// pid (comm) state ppid ...; comm may hold spaces, so split after
		// the last ')'.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) >= 2 && f[1] == strconv.Itoa(ppid) {
			out = append(out, f[0][0])
		}
	}
	return out
}

func waitTimeout(cmd *exec.Cmd, d time.Duration) error {
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-time.After(d):
		_ = cmd.Process.Kill()
		<-done
		return fmt.Errorf("still running after %v", d)
	}
}

func TestChoose(t *testing.T) {
	pre := map[string]prebuilt{"agnhost": {bin: "/x/agnhost", tag: "registry.k8s.io/e2e-test-images/agnhost:2.63.0"}}
	for _, c := range []struct {
		only string
		pre  map[string]prebuilt
		want []string
	}{
		{"", nil, []string{"agent", "test", "pause"}},
		{"pause,agent", nil, []string{"agent", "pause"}},
		{" test ", nil, []string{"test"}},
		{"agent,test,pause,", nil, nil}, // empty name: error
		{"registry", nil, nil},
		// Images of a prebuilt binary only when it is given, then last.
		{"", pre, []string{"agent", "test", "pause", "agnhost"}},
		{"agnhost,pause", pre, []string{"pause", "agnhost"}},
		{"agnhost", nil, nil},
		{"coredns", pre, nil},
	} {
		got, err := choose(c.only, c.pre)
		if c.want == nil {
			if err == nil {
				t.Errorf("-only %q with %v: no error", c.only, c.pre)
			}
			continue
		}
		var names []string
		for _, s := range got {
			names = append(names, s.name)
		}
		if err != nil || !slices.Equal(names, c.want) {
			t.Errorf("-only %q with %v: %v %v, want %v", c.only, c.pre, names, err, c.want)
		}
	}
}

// TestImport loads the tarballs into a containerd of its own (its own
// socket, root and state under a temporary directory, no CRI) with the ctr
// command the cluster harness uses, and runs a container from each: the
// proof that the tarballs are what containerd imports, unpacks and runs.
// Skipped without root, containerd, ctr and runc.
func TestImport(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("containerd needs root")
	}
	for _, bin := range []string{"containerd", "ctr", "runc"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("no %s (apt-get install containerd)", bin)
		}
	}
	tbs := tarballs(t)
	dir, err := os.MkdirTemp("", "idcni-ctd-") // short: socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "c.sock")
	conf := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = %q
[ttrpc]
  address = %q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), sock, sock+".ttrpc")
	if err := os.WriteFile(filepath.Join(dir, "config.toml"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "containerd.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	ctd := exec.Command("containerd", "--config", filepath.Join(dir, "config.toml"))
	ctd.Stdout, ctd.Stderr = logf, logf
	ctd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := ctd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = ctd.Process.Signal(syscall.SIGTERM)
		if waitTimeout(ctd, 10*time.Second) != nil {
			t.Log("containerd did not stop on SIGTERM; killed")
		}
		// Unmount whatever a failed run left mounted under the root.
		_ = exec.Command("umount", "-R", filepath.Join(dir, "root")).Run()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	ctr := func(args ...string) (string, error) {
		cmd := exec.CommandContext(ctx, "ctr", append([]string{"--address", sock, "--namespace", "k8s.io"}, args...)...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	for deadline := time.Now().Add(30 * time.Second); ; {
		if _, err := ctr("version"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(logf.Name())
			t.Fatalf("containerd did not come up:\n%s", log)
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, n := range []string{"agent", "test", "pause"} {
		if out, err := ctr("images", "import", tbs[n]); err != nil {
			t.Fatalf("ctr images import %s: %v\n%s", tbs[n], err, out)
		}
	}
	out, err := ctr("images", "ls", "-q")
	if err != nil {
		t.Fatal(err)
	}
	for _, tag := range []string{AgentTag, TestTag, PauseTag} {
		if !slices.Contains(strings.Fields(out), tag) {
			t.Errorf("ctr images ls lists %q, want %s", out, tag)
		}
	}

	runIn := func(id, image string, args ...string) string {
		t.Helper()
		out, err := ctr(append([]string{"run", "--rm", image, id}, args...)...)
		if err != nil {
			t.Errorf("ctr run %s %v: %v\n%s", image, args, err, out)
		}
		return out
	}
	if out := runIn("idcni-test-agent", AgentTag, "/usr/bin/idcni-agent", "install-cni", "--help"); !strings.Contains(out, "--bin-dir") {
		t.Errorf("idcni-agent install-cni --help in the agent image:\n%s", out)
	}
	if out := runIn("idcni-test-busybox", TestTag, "sh", "-c", "ping -c 1 -W 2 127.0.0.1 >/dev/null && echo pong"); strings.TrimSpace(out) != "pong" {
		t.Errorf("ping in the test image: %q", out)
	}
	// The sandbox process: started detached, stopped with SIGTERM like
	// containerd stops a sandbox, and it must exit by itself.
	if out, err := ctr("run", "-d", PauseTag, "idcni-test-pause"); err != nil {
		t.Fatalf("ctr run pause: %v\n%s", err, out)
	}
	defer func() { _, _ = ctr("containers", "rm", "idcni-test-pause") }()
	time.Sleep(300 * time.Millisecond)
	if out, err := ctr("task", "kill", "--signal", "SIGTERM", "idcni-test-pause"); err != nil {
		t.Fatalf("ctr task kill: %v\n%s", err, out)
	}
	for deadline := time.Now().Add(10 * time.Second); ; {
		out, _ := ctr("task", "ls")
		if strings.Contains(out, "STOPPED") || !strings.Contains(out, "idcni-test-pause") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pause still running 10 s after SIGTERM:\n%s", out)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if out, err := ctr("task", "delete", "idcni-test-pause"); err != nil {
		t.Errorf("ctr task delete: %v\n%s", err, out)
	}
}
