package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
)

// cniPlugins are what the shipped conflist runs: the idcni plugin and the
// upstream plugins it delegates to (host-local for IPAM; loopback, which
// every CRI runtime runs for the pod's lo).
var cniPlugins = []string{"idcni", "host-local", "loopback"}

// installTmpPrefix names the temporary files install-cni writes before
// renaming them into place; a run that died half way leaves files with this
// prefix, and the next run removes them.
const installTmpPrefix = ".idcni-install-"

// addInstallCNI registers install-cni under the agent's command. The first
// subcommand would make cobra add a "completion" command too; an agent
// image has no shell to complete in, so that one stays off.
func addInstallCNI(root *cobra.Command) {
	root.CompletionOptions.DisableDefaultCmd = true
	root.AddCommand(installCNICommand())
}

// installCNICommand is `idcni-agent install-cni`, the DaemonSet's init
// container: it puts the plugin binaries shipped in the agent image onto
// the node, where the container runtime execs them.
func installCNICommand() *cobra.Command {
	var (
		binDir  string
		srcDir  string
		plugins []string
	)
	cmd := &cobra.Command{
		Use:   "install-cni",
		Short: "Copy the CNI plugin binaries next to this binary into the node's CNI bin directory",
		Long: `install-cni copies the idcni, host-local and loopback plugins from the directory
this binary sits in (in the agent image: /usr/bin) into --bin-dir, the node's
CNI bin directory mounted into the init container.

Every plugin is written to a temporary file in --bin-dir and renamed over the
old one, so the kubelet's runtime, which may exec a plugin at any moment, sees
either the old binary or the new one and never a half-written file. All
sources are checked before anything is written.`,
		Example: `  # the DaemonSet's init container, with the node's /opt/cni/bin at /host/opt/cni/bin
  idcni-agent install-cni --bin-dir /host/opt/cni/bin`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if srcDir == "" {
				exe, err := os.Executable()
				if err != nil {
					return fmt.Errorf("find this binary's directory (pass --src-dir): %w", err)
				}
				if exe, err = filepath.EvalSymlinks(exe); err != nil {
					return fmt.Errorf("find this binary's directory (pass --src-dir): %w", err)
				}
				srcDir = filepath.Dir(exe)
			}
			return installCNI(srcDir, binDir, plugins, cmd.OutOrStdout())
		},
	}
	f := cmd.Flags()
	f.StringVar(&binDir, "bin-dir", "/opt/cni/bin", "the node's CNI bin directory (created if missing)")
	f.StringVar(&srcDir, "src-dir", "", "where the plugins are (default: the directory of this binary)")
	f.StringSliceVar(&plugins, "plugins", cniPlugins, "plugin binaries to install")
	return cmd
}

// installCNI copies every plugin from src to dst, mode 0755, each through a
// temporary file renamed into place.
func installCNI(src, dst string, plugins []string, log io.Writer) error {
	if len(plugins) == 0 {
		return errors.New("no plugins to install")
	}
	// Check every source first: a missing one is a broken image, and
	// failing before the first write keeps the node on one consistent set.
	for _, p := range plugins {
		if p == "" || strings.ContainsRune(p, '/') {
			return fmt.Errorf("plugin %q: want a file name", p)
		}
		st, err := os.Stat(filepath.Join(src, p))
		if err != nil {
			return fmt.Errorf("plugin %s: %w", p, err)
		}
		if !st.Mode().IsRegular() {
			return fmt.Errorf("plugin %s: %s is not a regular file", p, filepath.Join(src, p))
		}
	}
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", dst, err)
	}
	removeStaleTemps(dst)
	for _, p := range plugins {
		n, err := installFile(filepath.Join(src, p), dst, p)
		if err != nil {
			return fmt.Errorf("install %s: %w", p, err)
		}
		fmt.Fprintf(log, "installed %s (%d bytes)\n", filepath.Join(dst, p), n)
	}
	// The renames are durable only once the directory is synced: without
	// it a crash right after could bring back the old entries.
	return syncDir(dst)
}

// installFile copies src to dir/name through a temporary file in dir (the
// same filesystem, so the rename is atomic) and returns the bytes copied.
func installFile(src, dir, name string) (int64, error) {
	in, err := os.Open(src)
	if err != nil {
		return 0, err
	}
	defer in.Close()
	tmp, err := os.CreateTemp(dir, installTmpPrefix+name+"-")
	if err != nil {
		return 0, err
	}
	defer os.Remove(tmp.Name()) // removes nothing once renamed
	n, err := io.Copy(tmp, in)
	if err == nil {
		// CreateTemp makes 0600: the runtime may exec plugins as any
		// user, and 0755 is what every CNI bin directory holds.
		err = tmp.Chmod(0o755)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return 0, err
	}
	if err := os.Rename(tmp.Name(), filepath.Join(dir, name)); err != nil {
		return 0, err
	}
	return n, nil
}

// removeStaleTemps deletes temporary files an interrupted run left behind.
// Errors are ignored: a leftover costs disk space, not correctness.
func removeStaleTemps(dir string) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), installTmpPrefix) {
			_ = os.Remove(filepath.Join(dir, e.Name()))
		}
	}
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}
