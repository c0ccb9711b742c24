// Command image builds idcni's container images without Docker or a
// registry, as tarballs that `ctr -n k8s.io images import` loads:
//
//	docker.io/idcni/agent:dev  idcni-agent (entrypoint), the idcni, host-local
//	                           and loopback plugins, endpointctl and policyctl,
//	                           all static, in /usr/bin
//	docker.io/idcni/test:dev   Debian's busybox-static, for test pods
//	docker.io/idcni/pause:dev  the pod sandbox (./e2e/image/pause)
//
// Usage, from anywhere inside the module:
//
//	go run ./e2e/image -out DIR [-only agent,test,pause] [-busybox PATH]
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
	chosen, err := choose(*only)
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
	b := &builder{busybox: *busybox, log: stderr}
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

// choose turns -only into the specs to build, in their fixed order.
func choose(only string) ([]spec, error) {
	if only == "" {
		return specs, nil
	}
	want := map[string]bool{}
	for _, n := range strings.Split(only, ",") {
		n = strings.TrimSpace(n)
		if !slices.ContainsFunc(specs, func(s spec) bool { return s.name == n }) {
			return nil, fmt.Errorf("-only: unknown image %q (want agent, test or pause)", n)
		}
		want[n] = true
	}
	var out []spec
	for _, s := range specs {
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
