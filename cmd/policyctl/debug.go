package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/idcni/idcni/internal/cli"
)

// tracefs is where the kernel's trace pipe lives on current kernels; older
// ones only have it under debugfs.
const (
	tracefs       = "/sys/kernel/tracing"
	legacyTracing = "/sys/kernel/debug/tracing"
)

// tracePipe returns the trace pipe, mounting tracefs when the machine has
// not (a fresh machine may not have it mounted).
func tracePipe() (string, error) {
	pipe := filepath.Join(tracefs, "trace_pipe")
	if exists(pipe) {
		return pipe, nil
	}
	err := os.MkdirAll(tracefs, 0o755)
	if err == nil {
		err = unix.Mount("tracefs", tracefs, "tracefs", 0, "")
	}
	if err == nil && exists(pipe) {
		return pipe, nil
	}
	if legacy := filepath.Join(legacyTracing, "trace_pipe"); exists(legacy) {
		return legacy, nil
	}
	if err == nil {
		err = errors.New("no trace_pipe in it")
	}
	return "", fmt.Errorf("mount tracefs at %s: %w (try: mount -t tracefs nodev %s)", tracefs, err, tracefs)
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

func newDebug(g *cli.Globals) *cobra.Command {
	return &cobra.Command{
		Use:   "debug [on|off]",
		Short: "Switch the datapath's trace lines on or off",
		Long: `Switch the datapath's trace lines on or off. With no argument, say whether
they are on.

When on, the datapath writes one line per verdict to the kernel trace pipe,
/sys/kernel/tracing/trace_pipe (policyctl mounts tracefs there if it is not
mounted):

  TC: ALLOW id 1001 -> id 1002
  TC: DENY id 1002 -> id 1001 (deny rule)

Every traced packet costs time, so trace lines are off by default; switch
them off when done. 'policyctl monitor' shows the same verdicts with
addresses and ports, without the cost.`,
		Example: `  policyctl debug on
  cat /sys/kernel/tracing/trace_pipe
  policyctl debug off`,
		ValidArgs: []string{"on", "off"},
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 1 || (len(args) == 1 && args[0] != "on" && args[0] != "off") {
				return cli.UsageErrorf("want 'on' or 'off', got %q", args)
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := cli.RequireRoot(tool); err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if len(args) == 0 {
				d, err := g.OpenDatapath()
				if err != nil {
					return err
				}
				defer d.Close()
				on, err := d.Debug()
				if err != nil {
					return err
				}
				fmt.Fprintf(out, "debug trace lines are %s\n", onOff(on))
				return nil
			}
			on := args[0] == "on"
			if err := setDebug(cmd, g, on); err != nil {
				return err
			}
			if !on {
				fmt.Fprintln(out, "debug trace lines off")
				return nil
			}
			pipe, err := tracePipe()
			if err != nil {
				// The switch is on; only reading the lines needs more.
				cli.Warn(cmd, "%v", err)
				pipe = filepath.Join(tracefs, "trace_pipe")
			}
			fmt.Fprintf(out, "debug trace lines on; read them with: cat %s\n", pipe)
			return nil
		},
	}
}

func setDebug(cmd *cobra.Command, g *cli.Globals, on bool) error {
	ctx := cmd.Context()
	if c := g.Agent(ctx); c != nil {
		if err := c.SetDebug(ctx, on); err != nil {
			return fmt.Errorf("idcni-agent: switch debug %s: %w", onOff(on), err)
		}
		return nil
	}
	d, err := g.OpenDatapath()
	if err != nil {
		return err
	}
	defer d.Close()
	unlock, err := d.Lock()
	if err != nil {
		return fmt.Errorf("lock datapath: %w", err)
	}
	defer unlock()
	if err := d.SetDebug(on); err != nil {
		return fmt.Errorf("switch debug %s: %w", onOff(on), err)
	}
	return nil
}

func onOff(on bool) string {
	if on {
		return "on"
	}
	return "off"
}
