package main

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakePlugins writes a source directory holding the plugins with the given
// contents, mode 0700 so the test sees install-cni set 0755 itself.
func fakePlugins(t *testing.T, content map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, c := range content {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(c), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func runAgent(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := command()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	err := cmd.Execute()
	return out.String(), err
}

func checkInstalled(t *testing.T, dir string, want map[string]string) {
	t.Helper()
	for name, c := range want {
		p := filepath.Join(dir, name)
		got, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != c {
			t.Errorf("%s holds %q, want %q", p, got, c)
		}
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode() != 0o755 {
			t.Errorf("%s has mode %v, want -rwxr-xr-x", p, st.Mode())
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), installTmpPrefix) {
			t.Errorf("temporary file %s left in %s", e.Name(), dir)
		}
	}
}

func TestInstallCNI(t *testing.T) {
	plugins := map[string]string{"idcni": "idcni v2", "host-local": "host-local v2", "loopback": "loopback v2"}
	src := fakePlugins(t, plugins)
	dst := filepath.Join(t.TempDir(), "opt", "cni", "bin") // created by install-cni

	out, err := runAgent(t, "install-cni", "--src-dir", src, "--bin-dir", dst)
	if err != nil {
		t.Fatalf("install-cni: %v\n%s", err, out)
	}
	checkInstalled(t, dst, plugins)
	for name := range plugins {
		if !strings.Contains(out, filepath.Join(dst, name)) {
			t.Errorf("output does not name %s:\n%s", name, out)
		}
	}

	// Upgrade over an older set, with a foreign plugin and the leftover of
	// a run that died: the old files are replaced, not rewritten in place,
	// so a process that has the old binary open (a runtime exec'ing it)
	// keeps reading the old, whole content.
	old := map[string]string{"idcni": "idcni v1 (a longer, older binary)", "host-local": "host-local v1", "loopback": "loopback v1"}
	dst = t.TempDir()
	for name, c := range old {
		if err := os.WriteFile(filepath.Join(dst, name), []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dst, "bridge"), []byte("someone else's"), 0o755); err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(dst, installTmpPrefix+"idcni-123")
	if err := os.WriteFile(stale, []byte("half"), 0o600); err != nil {
		t.Fatal(err)
	}
	running, err := os.Open(filepath.Join(dst, "idcni"))
	if err != nil {
		t.Fatal(err)
	}
	defer running.Close()

	if out, err := runAgent(t, "install-cni", "--src-dir", src, "--bin-dir", dst); err != nil {
		t.Fatalf("install-cni over an old set: %v\n%s", err, out)
	}
	checkInstalled(t, dst, plugins)
	if got, err := io.ReadAll(running); err != nil || string(got) != old["idcni"] {
		t.Errorf("the open old idcni reads %q (%v), want its old content %q: the file was rewritten in place", got, err, old["idcni"])
	}
	if got, _ := os.ReadFile(filepath.Join(dst, "bridge")); string(got) != "someone else's" {
		t.Errorf("another plugin in the bin directory was touched: %q", got)
	}
}

// A source missing from the image fails the whole install before anything
// is written, so the node never runs a mix of two releases.
func TestInstallCNIMissingSource(t *testing.T) {
	src := fakePlugins(t, map[string]string{"idcni": "new", "host-local": "new"}) // no loopback
	dst := t.TempDir()
	if err := os.WriteFile(filepath.Join(dst, "idcni"), []byte("old"), 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := runAgent(t, "install-cni", "--src-dir", src, "--bin-dir", dst)
	if err == nil || !strings.Contains(err.Error(), "loopback") {
		t.Fatalf("install-cni without loopback: err %v, want one naming loopback\n%s", err, out)
	}
	if got, _ := os.ReadFile(filepath.Join(dst, "idcni")); string(got) != "old" {
		t.Errorf("idcni was replaced (%q) although the install failed", got)
	}
	if _, err := os.Stat(filepath.Join(dst, "host-local")); !os.IsNotExist(err) {
		t.Errorf("host-local was installed although the install failed: %v", err)
	}
}

func TestInstallCNIBadPluginName(t *testing.T) {
	src := fakePlugins(t, map[string]string{"idcni": "x"})
	if out, err := runAgent(t, "install-cni", "--src-dir", src, "--bin-dir", t.TempDir(), "--plugins", "../idcni"); err == nil {
		t.Fatalf("install-cni --plugins ../idcni succeeded:\n%s", out)
	}
}

// Without --src-dir the plugins are taken from the directory of the running
// binary, as in the image where everything sits in /usr/bin.
func TestInstallCNIDefaultSource(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	exe, err = filepath.EvalSymlinks(exe)
	if err != nil {
		t.Fatal(err)
	}
	name := filepath.Base(exe) // the test binary stands in for a plugin
	dst := t.TempDir()
	if out, err := runAgent(t, "install-cni", "--bin-dir", dst, "--plugins", name); err != nil {
		t.Fatalf("install-cni from the binary's directory: %v\n%s", err, out)
	}
	want, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(dst, name))
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("installed %s differs from the binary (%v)", name, err)
	}
}
