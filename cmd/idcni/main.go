// Command idcni is the idcni CNI plugin. A container runtime runs it with
// CNI_COMMAND set and the network configuration on stdin; see package cni.
package main

import (
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/idcni/idcni/cni"
	"github.com/idcni/idcni/internal/kernel"
)

func main() {
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
	}, cni.Versions, "idcni CNI plugin: pods networked by veth, policed by security identity (eBPF)")
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
