// Command idcni is the idcni CNI plugin. A container runtime runs it with
// CNI_COMMAND set and the network configuration on stdin; see package cni.
package main

import (
	"github.com/containernetworking/cni/pkg/skel"

	"github.com/idcni/idcni/cni"
)

func main() {
	skel.PluginMainFuncs(skel.CNIFuncs{
		Add:    cni.CmdAdd,
		Del:    cni.CmdDel,
		Check:  cni.CmdCheck,
		Status: cni.CmdStatus,
		GC:     cni.CmdGC,
	}, cni.Versions, "idcni CNI plugin: pods networked by veth, policed by security identity (eBPF)")
}
