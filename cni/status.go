package cni

import (
	"context"
	"errors"
	"fmt"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/bpf"
)

// CmdStatus implements STATUS: success means an ADD now would find a
// datapath to enforce with (and the agent, when one is required).
//
// Without a required agent, the plugin is the one that loads the datapath,
// so STATUS loads it when it is not loaded yet, as the next ADD would.
// Reporting "not loaded" instead would deadlock a runtime that uses STATUS
// to decide whether the node's network is ready, and so whether to send the
// first ADD at all. With a required agent, loading is the agent's job and
// STATUS only looks.
func CmdStatus(args *skel.CmdArgs) error {
	conf, err := LoadNetConf(args.StdinData)
	if err != nil {
		return err
	}
	notAvailable := func(format string, a ...any) error {
		return types.NewError(types.ErrPluginNotAvailable, "idcni: "+fmt.Sprintf(format, a...), "")
	}

	if conf.AgentRequired {
		if !api.NewClient(conf.AgentSocket).Running(context.Background()) {
			return agentDown(conf, types.ErrPluginNotAvailable)
		}
		dp, err := bpf.Open(conf.BPFRoot)
		if errors.Is(err, bpf.ErrNotLoaded) {
			return notAvailable("idcni-agent answers on %s, but the datapath is not loaded under %s: %v", conf.AgentSocket, conf.BPFRoot, err)
		}
		if err != nil {
			return notAvailable("cannot open the datapath under %s: %v", conf.BPFRoot, err)
		}
		dp.Close()
	} else {
		dp, err := loadDatapath(conf.BPFRoot)
		if err != nil {
			return notAvailable("cannot load the datapath under %s: %v", conf.BPFRoot, err)
		}
		dp.Close()
	}

	// IPAM is part of every ADD, so its status is ours.
	if err := invoke.DelegateStatus(context.Background(), conf.IPAM.Type, args.StdinData, nil); err != nil {
		return withPrefix(err, fmt.Sprintf("idcni: IPAM plugin %q", conf.IPAM.Type))
	}
	return nil
}
