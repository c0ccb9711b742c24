// Command idcni is the idcni CNI plugin. A container runtime runs it with
// CNI_COMMAND set and the network configuration on stdin; see package cni.
package main

import (
	"fmt"
	"os"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/idcni/idcni/cni"
	"github.com/idcni/idcni/internal/kernel"
	"github.com/idcni/idcni/internal/version"
)

func main() {
	// A runtime never passes arguments (CNI_COMMAND and stdin say it
	// all), so --version is for people: which build and which pin layout
	// this node's plugin is. CNI_COMMAND=VERSION still answers the spec
	// versions, as the runtime expects.
	if len(os.Args) == 2 && os.Args[1] == "--version" {
		fmt.Println(version.String("idcni"))
		return
	}
	skel.PluginMainFuncs(skel.CNIFuncs{
		Add:    needKernel(cni.CmdAdd, types.ErrInternal),
		Check:  needKernel(cni.CmdCheck, types.ErrInternal),
		Status: needKernel(cni.CmdStatus, types.ErrPluginNotAvailable),
		// DEL and GC only remove what an earlier run made: they must
		// work on any kernel, or a node that was downgraded (or an ADD
		// that half-failed) could never be cleaned up. VERSION
		// describes the binary, not the node.
		Del: cni.CmdDel,
		GC:  cni.CmdGC,
	}, cni.Versions, "idcni CNI plugin: pods networked by veth, policed by security identity (eBPF); "+version.String("idcni"))
}

// needKernel refuses a command on a kernel the datapath cannot run on, with
// a message naming the running kernel and the minimum, before anything is
// allocated; otherwise the first sign would be a verifier log or an EPERM.
// STATUS answers "plugin not available" (code 50), so a runtime that asks
// before sending pods knows why the node's network never gets ready.
func needKernel(cmd func(*skel.CmdArgs) error, code uint) func(*skel.CmdArgs) error {
	return func(args *skel.CmdArgs) error {
		if err := kernel.Check(); err != nil {
			return types.NewError(code, "idcni: "+err.Error(), "")
		}
		return cmd(args)
	}
}
