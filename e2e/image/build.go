package main

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Image tags. The manifests under manifests/ name the short forms
// (idcni/agent:dev); containerd stores images under the full reference, so
// the tarballs carry that.
const (
	AgentTag = "docker.io/idcni/agent:dev"
	TestTag  = "docker.io/idcni/test:dev"
	PauseTag = "docker.io/idcni/pause:dev"
)

// agentBinDir is where the agent image keeps every binary. The plugins sit
// next to idcni-agent on purpose: `idcni-agent install-cni` copies them
// from its own directory onto the node.
const agentBinDir = "usr/bin"

// Go packages of the agent image, by the binary name `go build -o DIR/`
// gives them. host-local and loopback are the upstream plugins the shipped
// conflist needs; they come from the module graph, so their version is the
// one go.mod pins.
var agentPackages = []string{
	"./cmd/idcni-agent",
	"./cmd/idcni",
	"./cmd/endpointctl",
	"./cmd/policyctl",
	"github.com/containernetworking/plugins/plugins/ipam/host-local",
	"github.com/containernetworking/plugins/plugins/main/loopback",
}

// AgentBinaries are the files of the agent image under /usr/bin.
var AgentBinaries = []string{"idcni-agent", "idcni", "endpointctl", "policyctl", "host-local", "loopback"}

const pausePackage = "./e2e/image/pause"

// busyboxApplets are linked to /bin/busybox in the test image. The first
// ones are what the end-to-end tests run in pods; a busybox without them is
// refused. The optional ones are linked when this busybox has them.
var (
	busyboxRequired = []string{"sh", "ping", "nc", "sleep", "wget"}
	busyboxOptional = []string{"ip", "cat", "echo", "hostname", "httpd", "ls", "nslookup", "ps", "timeout", "true"}
)

// epoch is the modification time of every file and the creation time of
// every image: the same sources give the same image digest, so importing a
// rebuilt but unchanged image is a no-op for containerd.
var epoch = time.Unix(0, 0).UTC()

// defaultPath is PATH in every image: kubectl exec and command: without a
// path must find the tools.
const defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// builder builds images from the module at moduleDir.
type builder struct {
	moduleDir string
	// busybox is the static busybox the test image carries.
	busybox string
	// log receives progress; the command prints only tarball paths on
	// stdout so scripts can read them.
	log io.Writer
	// prebuilt are the binaries and tags of the images made of one binary
	// built elsewhere (another module), by image name: coredns, agnhost.
	prebuilt map[string]prebuilt
}

// prebuilt is a static binary built outside this module and the tag its
// image gets.
type prebuilt struct {
	bin, tag string
}

// spec is one image the command can build.
type spec struct {
	name  string // what -only names
	tag   string
	build func(b *builder, work string) (v1.Image, error)
}

var specs = []spec{
	{"agent", AgentTag, (*builder).agentImage},
	{"test", TestTag, (*builder).testImage},
	{"pause", PauseTag, (*builder).pauseImage},
}

// prebuiltSpecs are built only when their binary is given (-coredns,
// -agnhost): their sources are other modules (e2e/tools/coredns,
// e2e/conformance), built by their users, and their tags are the users'
// too (the upstream suite wants agnhost under upstream's exact name).
var prebuiltSpecs = map[string]struct {
	entrypoint []string
	title      string
}{
	// The cluster's DNS; the Corefile comes from a ConfigMap.
	"coredns": {[]string{"/coredns"}, "CoreDNS with the plugins of the local cluster's Corefile"},
	// The upstream e2e suites' Swiss army knife: servers run /agnhost
	// porter, clients /agnhost connect, each named in the pod's command.
	"agnhost": {[]string{"/agnhost"}, "agnhost from k8s.io/kubernetes/test/images/agnhost"},
}

// prebuiltImage is an image of one static binary at its root.
func (b *builder) prebuiltImage(name string) (v1.Image, error) {
	p := b.prebuilt[name]
	f, err := binaryFile(p.bin, name)
	if err != nil {
		return nil, err
	}
	s := prebuiltSpecs[name]
	// agnhost's porter and netexec write nothing to disk, but some of its
	// modes want /tmp.
	files := []file{f, {name: "tmp", mode: 0o1777, dir: true}}
	return image(files, func(c *v1.Config) {
		c.Entrypoint = s.entrypoint
		c.Labels = map[string]string{"org.opencontainers.image.title": name, "org.opencontainers.image.description": s.title}
	})
}

// write builds s and writes its tarball to out/<name>.tar, returning the
// path. The tarball is written under a temporary name first so a failed or
// interrupted build never leaves a truncated tarball to import.
func (b *builder) write(s spec, out string) (string, error) {
	work, err := os.MkdirTemp("", "idcni-image-"+s.name+"-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(work)
	img, err := s.build(b, work)
	if err != nil {
		return "", fmt.Errorf("image %s: %w", s.name, err)
	}
	tag, err := name.NewTag(s.tag)
	if err != nil {
		return "", err
	}
	dst := filepath.Join(out, s.name+".tar")
	tmp, err := os.CreateTemp(out, "."+s.name+".tar-*")
	if err != nil {
		return "", err
	}
	defer os.Remove(tmp.Name()) // after the rename this removes nothing
	if err := tarball.Write(tag, img, tmp); err != nil {
		tmp.Close()
		return "", fmt.Errorf("image %s: write tarball: %w", s.name, err)
	}
	if err := tmp.Close(); err != nil {
		return "", err
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return "", err
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return "", err
	}
	return dst, nil
}

func (b *builder) agentImage(work string) (v1.Image, error) {
	if err := b.goBuild(work, agentPackages...); err != nil {
		return nil, err
	}
	var files []file
	for _, bin := range AgentBinaries {
		f, err := binaryFile(filepath.Join(work, bin), path.Join(agentBinDir, bin))
		if err != nil {
			return nil, err
		}
		files = append(files, f)
	}
	return image(files, func(c *v1.Config) {
		c.Entrypoint = []string{"/" + path.Join(agentBinDir, "idcni-agent")}
		c.Labels = map[string]string{
			"org.opencontainers.image.title":       "idcni-agent",
			"org.opencontainers.image.description": "idcni node agent, CNI plugin (idcni, host-local, loopback) and tools",
		}
	})
}

func (b *builder) testImage(string) (v1.Image, error) {
	bb, err := binaryFile(b.busybox, "bin/busybox")
	if err != nil {
		return nil, fmt.Errorf("%w (install Debian's busybox-static: apt-get install busybox-static)", err)
	}
	applets, err := busyboxApplets(b.busybox)
	if err != nil {
		return nil, err
	}
	files := []file{bb, {name: "tmp", mode: 0o1777, dir: true}}
	link := func(applet string) {
		files = append(files, file{name: "bin/" + applet, link: "busybox"})
	}
	for _, a := range busyboxRequired {
		if !applets[a] {
			return nil, fmt.Errorf("%s has no %q applet; the end-to-end tests need %s", b.busybox, a, strings.Join(busyboxRequired, ", "))
		}
		link(a)
	}
	for _, a := range busyboxOptional {
		if applets[a] {
			link(a)
		}
	}
	return image(files, func(c *v1.Config) {
		c.Cmd = []string{"/bin/sh"}
		c.Labels = map[string]string{
			"org.opencontainers.image.title":       "idcni-test",
			"org.opencontainers.image.description": "Debian busybox-static for idcni's end-to-end test pods",
		}
	})
}

func (b *builder) pauseImage(work string) (v1.Image, error) {
	if err := b.goBuild(work, pausePackage); err != nil {
		return nil, err
	}
	f, err := binaryFile(filepath.Join(work, "pause"), "pause")
	if err != nil {
		return nil, err
	}
	return image([]file{f}, func(c *v1.Config) {
		c.Entrypoint = []string{"/pause"}
		c.Labels = map[string]string{
			"org.opencontainers.image.title":       "idcni-pause",
			"org.opencontainers.image.description": "pod sandbox process for idcni's end-to-end cluster",
		}
	})
}

// goBuild builds static linux/amd64 binaries of pkgs into dir. CGO_ENABLED=0
// is what makes them static: the images have no libc, and a binary with an
// ELF interpreter would fail there with a baffling "no such file".
// -trimpath and -s -w keep host paths and debug tables out of the image.
func (b *builder) goBuild(dir string, pkgs ...string) error {
	goBin, err := exec.LookPath("go")
	if err != nil {
		return fmt.Errorf("the go command is needed to build the binaries: %w", err)
	}
	// --version of the image's binaries names the tree they came from,
	// as `make build` does.
	ldflags := "-s -w"
	if out, err := exec.Command("git", "-C", b.moduleDir, "describe", "--always", "--dirty").Output(); err == nil {
		ldflags += " -X github.com/idcni/idcni/internal/version.Build=" + strings.TrimSpace(string(out))
	}
	args := append([]string{"build", "-trimpath", "-ldflags=" + ldflags, "-o", dir + string(filepath.Separator)}, pkgs...)
	cmd := exec.Command(goBin, args...)
	cmd.Dir = b.moduleDir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	cmd.Stdout = b.log
	cmd.Stderr = b.log
	fmt.Fprintf(b.log, "go %s\n", strings.Join(args, " "))
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go build %s: %w", strings.Join(pkgs, " "), err)
	}
	return nil
}

// file is one entry of a layer: a directory (dir), a symlink (link) or a
// regular file (data).
type file struct {
	name string // relative to /, no leading slash
	mode int64
	dir  bool
	link string
	data []byte
}

// binaryFile reads a binary for the image, refusing one that is not a static
// x86-64 ELF executable: the images have no dynamic loader.
func binaryFile(src, dst string) (file, error) {
	if err := checkStatic(src); err != nil {
		return file{}, err
	}
	data, err := os.ReadFile(src)
	if err != nil {
		return file{}, err
	}
	return file{name: dst, mode: 0o755, data: data}, nil
}

// checkStatic fails unless path is an x86-64 ELF executable without a
// PT_INTERP program header, that is one the kernel runs without ld.so.
func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 {
		return fmt.Errorf("%s is built for %v, the images are linux/amd64", path, f.Machine)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked (it has an ELF interpreter); the images have no libc", path)
		}
	}
	return nil
}

// busyboxApplets asks busybox which applets it was built with.
func busyboxApplets(bin string) (map[string]bool, error) {
	out, err := exec.Command(bin, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("%s --list: %w", bin, err)
	}
	m := map[string]bool{}
	for _, a := range strings.Fields(string(out)) {
		m[a] = true
	}
	return m, nil
}

// image is one layer holding files on top of nothing, with the config
// edited by configure. OS and architecture must be set: containerd refuses
// to unpack an image whose platform does not match the node's.
func image(files []file, configure func(*v1.Config)) (v1.Image, error) {
	layer, err := layerOf(files)
	if err != nil {
		return nil, err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS = "linux"
	cf.Architecture = "amd64"
	cf.Created = v1.Time{Time: epoch}
	cf.Config.Env = []string{defaultPath}
	configure(&cf.Config)
	return mutate.ConfigFile(img, cf)
}

// layerOf writes files into an uncompressed tar, parent directories first,
// all owned by root with the fixed epoch as mtime.
func layerOf(files []file) (v1.Layer, error) {
	entries := map[string]file{}
	for _, f := range files {
		if _, dup := entries[f.name]; dup {
			return nil, fmt.Errorf("two layer entries named %s", f.name)
		}
		entries[f.name] = f
		for dir := path.Dir(f.name); dir != "."; dir = path.Dir(dir) {
			if _, ok := entries[dir]; !ok {
				entries[dir] = file{name: dir, mode: 0o755, dir: true}
			}
		}
	}
	names := make([]string, 0, len(entries))
	for n := range entries {
		names = append(names, n)
	}
	// Lexical order puts "usr" before "usr/bin" before "usr/bin/x", so
	// every directory comes before what it holds.
	sort.Strings(names)

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, n := range names {
		f := entries[n]
		h := &tar.Header{Name: n, ModTime: epoch, Mode: f.mode, Format: tar.FormatPAX}
		switch {
		case f.dir:
			h.Typeflag = tar.TypeDir
			h.Name += "/"
		case f.link != "":
			h.Typeflag = tar.TypeSymlink
			h.Linkname = f.link
			h.Mode = 0o777
		default:
			h.Typeflag = tar.TypeReg
			h.Size = int64(len(f.data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(f.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	data := buf.Bytes()
	// Compressed caching: the digest of the gzip stream is computed once
	// here and the same bytes are written into the tarball, instead of
	// compressing a 50 MB layer twice.
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(data)), nil
	}, tarball.WithCompressedCaching)
}

// moduleDir returns the directory of the main module the go command sees
// from the working directory: the binaries are built from there.
func moduleDir() (string, error) {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}").Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return "", fmt.Errorf("go list -m: %s", bytes.TrimSpace(ee.Stderr))
		}
		return "", fmt.Errorf("go list -m: %w", err)
	}
	dir := strings.TrimSpace(string(out))
	if _, err := os.Stat(filepath.Join(dir, "cmd", "idcni-agent")); err != nil {
		return "", fmt.Errorf("run inside the idcni module: %s has no cmd/idcni-agent", dir)
	}
	return dir, nil
}
