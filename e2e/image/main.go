// Command image builds idcni's container images without Docker or a
// registry, as tarballs that `ctr -n k8s.io images import` loads:
//
//	docker.io/idcni/agent:dev  idcni-agent (entrypoint), the idcni, host-local
//	                           and loopback plugins, endpointctl and policyctl,
//	                           all static, in /usr/bin
//	docker.io/idcni/test:dev   Debian's busybox-static, for test pods
//	docker.io/idcni/pause:dev  the pod sandbox (./e2e/image/pause)
//	coredns, agnhost           one binary built elsewhere (-coredns, -agnhost),
//	                           under the tag given with it
//
// Usage, from anywhere inside the module:
//
//	go run ./e2e/image -out DIR [-only agent,test,pause] [-busybox PATH]
//	    [-coredns PATH -coredns-tag REF] [-agnhost PATH -agnhost-tag REF]
//
// It prints the path of every tarball it wrote, one a line, and nothing
// else on stdout; build progress goes to stderr.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
)

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

func run(args []string, stdout, stderr io.Writer) error {
	fl := flag.NewFlagSet("image", flag.ContinueOnError)
	fl.SetOutput(stderr)
	out := fl.String("out", "", "directory for the tarballs (created if missing); required")
	only := fl.String("only", "", "comma-separated images to build: agent, test, pause (default: all)")
	busybox := fl.String("busybox", "/bin/busybox", "static busybox for the test image; Debian's busybox-static is installed when it is missing")
	corednsBin := fl.String("coredns", "", "static CoreDNS binary: also build the coredns image (tag -coredns-tag)")
	corednsTag := fl.String("coredns-tag", "", "the coredns image's reference")
	agnhostBin := fl.String("agnhost", "", "static agnhost binary: also build the agnhost image (tag -agnhost-tag)")
	agnhostTag := fl.String("agnhost-tag", "", "the agnhost image's reference (the one the e2e suite names)")
	fl.Usage = func() {
		fmt.Fprintln(stderr, "usage: go run ./e2e/image -out DIR [-only agent,test,pause] [-busybox PATH]")
		fl.PrintDefaults()
	}
	if err := fl.Parse(args); err != nil {
		return err
	}
	if *out == "" || fl.NArg() > 0 {
		fl.Usage()
		return errors.New("-out is required and there are no arguments")
	}
	pre := map[string]prebuilt{}
	for _, p := range []struct{ name, bin, tag string }{{"coredns", *corednsBin, *corednsTag}, {"agnhost", *agnhostBin, *agnhostTag}} {
		if p.bin == "" && p.tag == "" {
			continue
		}
		if p.bin == "" || p.tag == "" {
			return fmt.Errorf("-%s and -%s-tag go together", p.name, p.name)
		}
		if _, err := name.ParseReference(p.tag); err != nil {
			return fmt.Errorf("-%s-tag %q: %w", p.name, p.tag, err)
		}
		pre[p.name] = prebuilt{bin: p.bin, tag: p.tag}
	}
	chosen, err := choose(*only, pre)
	if err != nil {
		return err
	}
	dir, err := filepath.Abs(*out)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b := &builder{busybox: *busybox, log: stderr, prebuilt: pre}
	if b.moduleDir, err = moduleDir(); err != nil {
		return err
	}
	for _, s := range chosen {
		if s.name == "test" {
			if err := ensureBusybox(b.busybox, stderr); err != nil {
				return err
			}
		}
		p, err := b.write(s, dir)
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, p)
	}
	return nil
}

// choose turns -only into the specs to build, in their fixed order, the
// images of prebuilt binaries last.
func choose(only string, pre map[string]prebuilt) ([]spec, error) {
	all := slices.Clone(specs)
	for _, n := range []string{"coredns", "agnhost"} {
		if p, ok := pre[n]; ok {
			all = append(all, spec{n, p.tag, func(b *builder, _ string) (v1.Image, error) { return b.prebuiltImage(n) }})
		}
	}
	if only == "" {
		return all, nil
	}
	want := map[string]bool{}
	for _, n := range strings.Split(only, ",") {
		n = strings.TrimSpace(n)
		if !slices.ContainsFunc(all, func(s spec) bool { return s.name == n }) {
			if _, ok := prebuiltSpecs[n]; ok {
				return nil, fmt.Errorf("-only: image %q needs -%s and -%s-tag", n, n, n)
			}
			return nil, fmt.Errorf("-only: unknown image %q (want agent, test, pause, coredns or agnhost)", n)
		}
		want[n] = true
	}
	var out []spec
	for _, s := range all {
		if want[s.name] {
			out = append(out, s)
		}
	}
	return out, nil
}

// ensureBusybox installs Debian's busybox-static when the default busybox
// is missing. Only the default path is installed for: a busybox named with
// -busybox is the caller's choice, and a missing one is an error. A
// dynamically linked /bin/busybox (Debian's plain busybox package) is
// refused by the build with a hint rather than replaced behind the caller's
// back, since the two packages conflict.
func ensureBusybox(path string, log io.Writer) error {
	if _, err := os.Stat(path); err == nil || path != "/bin/busybox" {
		return nil
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("%s is missing: install Debian's busybox-static (apt-get install busybox-static) or pass -busybox", path)
	}
	fmt.Fprintln(log, "installing busybox-static (apt-get install busybox-static)")
	cmd := exec.Command("apt-get", "install", "-y", "--no-install-recommends", "busybox-static")
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	cmd.Stdout = log
	cmd.Stderr = log
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("apt-get install busybox-static: %w", err)
	}
	return nil
}
