// Command pause is the pod sandbox process of the idcni/pause:dev image: it
// holds the pod's namespaces open by doing nothing, reaps the orphans a
// shared PID namespace hands it as PID 1, and exits on SIGTERM or SIGINT.
//
// containerd needs a sandbox image before it can start any pod, and this
// machine has no registry to pull the upstream one from, so the end-to-end
// cluster imports this one instead.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"golang.org/x/sys/unix"
)

func main() {
	// Subscribe before anything else: a SIGTERM that arrives between the
	// start and Notify would otherwise kill us with the default action
	// (or, as PID 1, be dropped and leave the sandbox hanging).
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)

	// As PID 1 the kernel hands us every orphan of the namespace. Outside
	// PID 1 (a pod without its own PID namespace never runs us there, but
	// tests do) a child subreaper gets its descendants' orphans the same
	// way, so reaping works and can be tested either way.
	if os.Getpid() != 1 {
		_ = unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
	}
	// Children may have exited before Notify: reap them now, then on every
	// SIGCHLD (signals coalesce, so one SIGCHLD can stand for many exits).
	reap()
	for s := range sigs {
		switch s {
		case syscall.SIGCHLD:
			reap()
		default:
			fmt.Fprintf(os.Stderr, "pause: %v, exiting\n", s)
			os.Exit(0)
		}
	}
}

// reap collects every exited child without blocking.
func reap() {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if err == unix.EINTR {
			continue
		}
		if pid <= 0 || err != nil {
			return // no child has exited (0) or none is left (ECHILD)
		}
	}
}
