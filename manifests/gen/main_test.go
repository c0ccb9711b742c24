package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestGeneratedIsFresh fails when manifests/idcni.yaml is not what the
// parts in manifests/install/ generate: someone edited one without the
// other.
func TestGeneratedIsFresh(t *testing.T) {
	want, err := render(filepath.Join("..", "install"))
	if err != nil {
		t.Fatal(err)
	}
	have, err := os.ReadFile(filepath.Join("..", "idcni.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(have, want) {
		t.Fatal("manifests/idcni.yaml is stale: run go run ./manifests/gen from the repository root")
	}
}

func TestRender(t *testing.T) {
	dir := t.TempDir()
	for name, body := range map[string]string{
		"10-b.yaml": "kind: B\n",
		"00-a.yaml": "# about a\nkind: A\n\n",
		"notes.txt": "not a manifest",
	} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := render(dir)
	if err != nil {
		t.Fatal(err)
	}
	want := header + "---\n# Source: manifests/install/00-a.yaml\n# about a\nkind: A\n" +
		"---\n# Source: manifests/install/10-b.yaml\nkind: B\n"
	if string(got) != want {
		t.Errorf("render:\n%s\nwant:\n%s", got, want)
	}

	if err := os.WriteFile(filepath.Join(dir, "20-c.yaml"), []byte("---\nkind: C\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := render(dir); err == nil || !strings.Contains(err.Error(), "20-c.yaml") {
		t.Errorf("a part that starts with ---: err %v, want one naming it", err)
	}
	if _, err := render(t.TempDir()); err == nil {
		t.Error("an empty directory rendered without error")
	}
}

func TestCheck(t *testing.T) {
	in := t.TempDir()
	if err := os.WriteFile(filepath.Join(in, "00-a.yaml"), []byte("kind: A\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "all.yaml")
	var log bytes.Buffer
	if err := run([]string{"-in", in, "-out", out}, &log); err != nil {
		t.Fatal(err)
	}
	if err := run([]string{"-in", in, "-out", out, "-check"}, &log); err != nil {
		t.Errorf("-check right after writing: %v", err)
	}
	if err := os.WriteFile(filepath.Join(in, "00-a.yaml"), []byte("kind: A2\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := run([]string{"-in", in, "-out", out, "-check"}, &log); err == nil || !strings.Contains(err.Error(), "stale") {
		t.Errorf("-check after a part changed: err %v, want stale", err)
	}
}
