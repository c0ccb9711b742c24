package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// The upgrade test (upgrade_test.go) installs the agent of an older commit
// and rolls the DaemonSet to the checkout's and back. This file builds the
// older side and gives the test the node's paths it needs.

// OldBuild is the agent image and manifest of another commit of the
// checkout, under an image tag of its own, so both builds sit side by side
// in every node's containerd and the DaemonSet can roll between them.
type OldBuild struct {
	// Commit is the full hash built, Describe what `git describe` names
	// it (what its binaries' --version show).
	Commit, Describe string
	// Image is the reference the manifest names (idcni/agent:upgrade-<hash>).
	Image string
	// Tarball is the image, for Options.Images.
	Tarball string
	// Manifest is the commit's manifests/idcni.yaml naming Image instead
	// of the checkout's :dev tag, for Options.Manifest.
	Manifest string
}

// devAgentImage is the agent image every manifests/idcni.yaml names: the
// image builder's tag, which the checkout's own build also takes.
const devAgentImage = "idcni/agent:dev"

// LayoutChangeParent is the commit before the last one that changed
// `const LayoutVersion` in bpf/layout.go: the last build whose pins have
// the previous layout, the natural OLD of an upgrade test.
func LayoutChangeParent(root string) (string, error) {
	// -G, not -S: a new number changes the line, not how often the
	// declaration occurs. Along the first parents, so that a layout
	// change merged from a branch counts at its merge, whose first parent
	// is the main line's last build of the old layout.
	out, err := git(root, "log", "-1", "-s", "--first-parent", "--diff-merges=first-parent", "--format=%H",
		"-G", "const LayoutVersion = ", "--", "bpf/layout.go")
	if err != nil {
		return "", err
	}
	change := strings.TrimSpace(out)
	if change == "" {
		return "", errors.New("no commit changed const LayoutVersion in bpf/layout.go")
	}
	parent, err := git(root, "rev-parse", "--verify", change+"^1")
	if err != nil {
		return "", fmt.Errorf("parent of the layout change %s: %w", change, err)
	}
	return strings.TrimSpace(parent), nil
}

// BuildOld builds the agent image of commit (any revision git names) from
// a temporary worktree of the checkout at root, with that commit's own
// image builder, and writes the image tarball and the manifest into dir.
// The worktree is removed again; what is in dir stays.
func BuildOld(ctx context.Context, root, commit, dir string, log io.Writer) (*OldBuild, error) {
	out, err := git(root, "rev-parse", "--verify", commit+"^{commit}")
	if err != nil {
		return nil, fmt.Errorf("upgrade from %q: %w", commit, err)
	}
	b := &OldBuild{Commit: strings.TrimSpace(out)}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	src := filepath.Join(dir, "src")
	if _, err := git(root, "worktree", "add", "--detach", src, b.Commit); err != nil {
		return nil, fmt.Errorf("worktree of %s: %w", b.Commit, err)
	}
	defer func() {
		// --force: the build leaves nothing tracked changed, but an
		// interrupted one may leave files git would refuse to drop.
		if _, err := git(root, "worktree", "remove", "--force", src); err != nil {
			fmt.Fprintf(log, "upgrade: remove the worktree %s: %v\n", src, err)
		}
	}()
	if out, err = git(src, "describe", "--always", "--dirty"); err != nil {
		return nil, err
	}
	b.Describe = strings.TrimSpace(out)
	b.Image = "idcni/agent:upgrade-" + b.Commit[:12]

	manifest, err := os.ReadFile(filepath.Join(src, "manifests", "idcni.yaml"))
	if err != nil {
		return nil, fmt.Errorf("the manifest of %s: %w", b.Commit, err)
	}
	if !bytes.Contains(manifest, []byte("image: "+devAgentImage)) {
		return nil, fmt.Errorf("the manifest of %s names no image %s to replace", b.Commit, devAgentImage)
	}
	manifest = bytes.ReplaceAll(manifest, []byte("image: "+devAgentImage), []byte("image: "+b.Image))
	b.Manifest = filepath.Join(dir, "idcni.yaml")
	if err := os.WriteFile(b.Manifest, manifest, 0o644); err != nil {
		return nil, err
	}

	built := filepath.Join(dir, "built")
	fmt.Fprintf(log, "upgrade: building the agent image of %s (%s)\n", b.Describe, b.Commit)
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, goCmd(), "run", "./e2e/image", "-out", built, "-only", "agent")
	cmd.Dir = src
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("go run ./e2e/image of %s: %w\n%s", b.Commit, err, tail(stderr.Bytes(), 20))
	}
	paths := strings.Fields(stdout.String())
	if len(paths) != 1 {
		return nil, fmt.Errorf("go run ./e2e/image -only agent of %s wrote %d tarballs, want 1: %q", b.Commit, len(paths), stdout.String())
	}
	// The old builder tags its image :dev like the checkout's: the same
	// image under a tag of its own, or the two would replace each other
	// in containerd.
	img, err := tarball.ImageFromPath(paths[0], nil)
	if err != nil {
		return nil, fmt.Errorf("read the agent image of %s: %w", b.Commit, err)
	}
	tag, err := name.NewTag(b.Image)
	if err != nil {
		return nil, err
	}
	b.Tarball = filepath.Join(dir, "agent-old.tar")
	if err := tarball.WriteToFile(b.Tarball, tag, img); err != nil {
		return nil, fmt.Errorf("retag the agent image of %s: %w", b.Commit, err)
	}
	return b, nil
}

// git runs git in dir and returns its standard output.
func git(dir string, args ...string) (string, error) {
	cmd := exec.Command("git", append([]string{"-C", dir}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("git %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// NetnsPath is the node's network namespace, as the host opens it.
func (n *Node) NetnsPath() string { return fmt.Sprintf("/proc/%d/ns/net", n.Holder.PID) }

// HostPath is where the host reaches path of the node's file system:
// through the root of its namespace holder, which sees the node's mounts.
// The node's /var/run is the host's symbolic link to /run, which the host
// would resolve against its own root, so it is resolved here; /proc is
// the host's (the nodes have no PID namespace).
func (n *Node) HostPath(path string) string {
	if strings.HasPrefix(path, "/proc/") {
		return path
	}
	if rest, ok := strings.CutPrefix(path, "/var/run/"); ok {
		path = "/run/" + rest
	}
	return filepath.Join(fmt.Sprintf("/proc/%d/root", n.Holder.PID), path)
}
