// Package cli is the plumbing endpointctl and policyctl share: global flags,
// the choice between idcni-agent and the pinned maps, error reporting and
// output formats. The commands themselves live in cmd/endpointctl and
// cmd/policyctl; package manual holds what they change.
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/internal/version"
	"github.com/idcni/idcni/manual"
	"github.com/idcni/idcni/store"
)

// StateLockTimeout is how long a command waits for the state file when
// another process holds it. Commands take well under a second, so a wait
// this long only runs out when an agent or a stuck command keeps the file.
const StateLockTimeout = 3 * time.Second

// Globals are the flags every command of both tools takes.
type Globals struct {
	BPFRoot     string
	StatePath   string
	AgentSocket string
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// AddGlobalFlags registers the global flags on root, defaulting to the
// environment so tests and unusual installs need no flags on every call.
func (g *Globals) AddGlobalFlags(root *cobra.Command) {
	f := root.PersistentFlags()
	f.StringVar(&g.BPFRoot, "bpf-root", bpf.RootFromEnv(), "bpffs directory the datapath is pinned under (env IDCNI_BPF_ROOT)")
	f.StringVar(&g.StatePath, "state", envOr("IDCNI_STATE", store.DefaultPath), "state file that keeps manual endpoints and rules across reboots (env IDCNI_STATE)")
	f.StringVar(&g.AgentSocket, "agent-socket", envOr("IDCNI_AGENT_SOCKET", api.DefaultSocket), "idcni-agent API socket; when an agent answers there, changes go through it (env IDCNI_AGENT_SOCKET)")
}

// RequireRoot fails unless the process runs as root: the pinned maps need
// CAP_BPF and the state file is root's.
func RequireRoot(tool string) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("must run as root: %s reads and writes the pinned BPF maps and the root-only state file (try sudo)", tool)
	}
	return nil
}

// Agent returns a client when idcni-agent answers on the socket, nil when
// no agent runs and the command should work on the maps itself. An agent
// that is still starting counts as running: it owns the maps and the state
// file, so a change goes to it and it answers why it refuses (not ready),
// rather than the tool writing around it.
func (g *Globals) Agent(ctx context.Context) *api.Client {
	c := api.NewClient(g.AgentSocket)
	if c.Answering(ctx) {
		return c
	}
	return nil
}

// OpenDatapath opens the pinned datapath without ever loading it: loading
// is the plugin's and the agent's job.
func (g *Globals) OpenDatapath() (*bpf.Datapath, error) {
	d, err := bpf.Open(g.BPFRoot)
	if errors.Is(err, bpf.ErrNotLoaded) {
		return nil, fmt.Errorf("%w; if it is pinned elsewhere, pass --bpf-root or set IDCNI_BPF_ROOT", err)
	}
	if err != nil {
		return nil, fmt.Errorf("open datapath under %s: %w", g.BPFRoot, err)
	}
	return d, nil
}

// OpenState opens the state file, creating it when missing.
func (g *Globals) OpenState() (*store.DB, error) {
	return store.Open(g.StatePath, StateLockTimeout)
}

// UpdateManual changes the manual state in the state file and the maps
// together (manual.Update), opening and closing both: every change a tool
// makes without an agent goes through here. report, when not nil, runs after
// a successful change with the maps still open, for messages that describe
// the result.
func (g *Globals) UpdateManual(fn func(*manual.State) error, report func(*bpf.Datapath)) error {
	d, err := g.OpenDatapath()
	if err != nil {
		return err
	}
	defer d.Close()
	db, err := g.OpenState()
	if err != nil {
		return err
	}
	defer db.Close()
	if _, _, err := manual.Update(db, d, fn); err != nil {
		return err
	}
	if report != nil {
		report(d)
	}
	return nil
}

// OpenStateReadOnly opens an existing state file for reading only, for
// commands that look: a missing file is store.ErrNoFile, and a running
// agent's lock an error after StateLockTimeout, not a hang.
func (g *Globals) OpenStateReadOnly() (*store.DB, error) {
	return store.OpenReadOnly(g.StatePath, StateLockTimeout)
}

// OpenStateIfExists opens the state file, or returns nil when there is
// none, so a listing does not create one.
func (g *Globals) OpenStateIfExists() (*store.DB, error) {
	if _, err := os.Stat(g.StatePath); errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	return g.OpenState()
}

// usageError is an error in how the command was called (unknown flag,
// missing flag, wrong arguments): Execute prints the usage after it.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// UsageErrorf returns an error that makes Execute print the usage too.
func UsageErrorf(format string, a ...any) error {
	return usageError{fmt.Errorf(format, a...)}
}

// RequireFlags returns a usage error naming the flags that were not given.
// Cobra's own required flags would do, but their error skips the usage.
func RequireFlags(cmd *cobra.Command, names ...string) error {
	var missing []string
	for _, n := range names {
		if !cmd.Flags().Changed(n) {
			missing = append(missing, "--"+n)
		}
	}
	if len(missing) > 0 {
		return UsageErrorf("required flag(s) %s not set", strings.Join(missing, ", "))
	}
	return nil
}

// NoArgs is cobra.NoArgs with a usage error.
func NoArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return UsageErrorf("%q takes no arguments, got %q", cmd.CommandPath(), args)
	}
	return nil
}

// Execute runs root and returns the exit code. Errors are one line on
// stderr; errors in how the command was called are followed by its usage,
// runtime errors are not (a usage dump would bury what went wrong).
func Execute(root *cobra.Command) int {
	root.SilenceErrors = true
	root.SilenceUsage = true
	// --version: the build and the pin layout it reads and writes.
	root.Version = version.Build
	root.SetVersionTemplate(version.String(root.Name()) + "\n")
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	// Ctrl-C ends monitor and restore --wait through the context; other
	// commands finish their (short) work rather than stop half way.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return 0
	}
	msg := strings.Join(strings.Fields(strings.ReplaceAll(err.Error(), "\n", "; ")), " ")
	fmt.Fprintf(os.Stderr, "Error: %s\n", msg)
	var ue usageError
	if errors.As(err, &ue) || strings.HasPrefix(err.Error(), "unknown command") {
		if cmd == nil {
			cmd = root
		}
		fmt.Fprintf(os.Stderr, "\n%s", cmd.UsageString())
	}
	return 1
}

// Output is the -o/--output flag of listings.
type Output string

const (
	OutputText Output = "text"
	OutputJSON Output = "json"
)

// AddOutputFlag registers -o/--output on a listing command.
func AddOutputFlag(cmd *cobra.Command, o *Output) {
	*o = OutputText
	cmd.Flags().StringVarP((*string)(o), "output", "o", string(OutputText), "output format: text or json")
}

// Check fails with a usage error on an unknown format.
func (o Output) Check() error {
	if o != OutputText && o != OutputJSON {
		return UsageErrorf("unknown output format %q: want text or json", string(o))
	}
	return nil
}

// PrintJSON writes v as indented JSON.
func PrintJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// Table writes aligned columns, like kubectl get.
func Table(w io.Writer, header string, rows [][]string) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, header)
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	return tw.Flush()
}

// Warn writes a warning line to stderr.
func Warn(cmd *cobra.Command, format string, a ...any) {
	fmt.Fprintf(cmd.ErrOrStderr(), "Warning: "+format+"\n", a...)
}

// Local is the local pod that holds an address: its host veth.
type Local struct {
	Interface string      `json:"interface,omitempty"`
	Ifindex   int         `json:"ifindex"`
	Identity  identity.ID `json:"identity"`
}

// LocalEndpoints maps every address of a local pod to the pod's host veth.
func LocalEndpoints(d *bpf.Datapath) (map[netip.Addr]Local, error) {
	eps, err := d.Endpoints()
	if err != nil {
		return nil, err
	}
	out := map[netip.Addr]Local{}
	for idx, ep := range eps {
		l := Local{Ifindex: idx, Identity: ep.Identity}
		// The veth may be gone while its entry is not; the index is
		// still worth showing.
		if ifc, err := net.InterfaceByIndex(idx); err == nil {
			l.Interface = ifc.Name
		}
		for _, a := range []netip.Addr{ep.IPv4, ep.IPv6} {
			if a.IsValid() {
				out[a] = l
			}
		}
	}
	return out, nil
}

// Summarize shortens a list of findings to its first and a count.
func Summarize(lines []string) string {
	switch len(lines) {
	case 0:
		return ""
	case 1:
		return lines[0]
	}
	return fmt.Sprintf("%s, and %d more", lines[0], len(lines)-1)
}

// LoadState reads the manual state from the state file without creating
// one: a missing file is an empty state.
func (g *Globals) LoadState() (manual.State, error) {
	db, err := g.OpenStateIfExists()
	if err != nil || db == nil {
		return manual.State{}, err
	}
	defer db.Close()
	return manual.Load(db)
}
