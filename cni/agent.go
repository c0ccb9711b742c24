package cni

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/idcni/idcni/agent/api"
)

// agentTimeout bounds how long ADD waits for the agent to resolve a pod.
// Runtimes give a sandbox minutes, but a pod stuck for longer than this is
// better failed and retried with a message than left hanging.
const agentTimeout = 30 * time.Second

// agentDown is the error for a required agent that does not answer. Code 11
// tells the runtime to try again later, which is right: the agent is
// typically a DaemonSet pod that is starting or restarting.
func agentDown(conf *NetConf, code uint) error {
	return types.NewError(code,
		fmt.Sprintf("idcni: idcni-agent is required (\"agentRequired\": true) but nothing answers on %s; start idcni-agent on this node, or set \"agentRequired\": false to start pods with the unresolved identity until endpointctl names them", conf.AgentSocket),
		"")
}

// connectAgent returns a client when an agent answers on the configured
// socket, and nil when none does and none is required.
func connectAgent(ctx context.Context, conf *NetConf) (*api.Client, error) {
	c := api.NewClient(conf.AgentSocket)
	if c.Running(ctx) {
		return c, nil
	}
	if conf.AgentRequired {
		return nil, agentDown(conf, types.ErrTryAgainLater)
	}
	return nil, nil
}

// registerWithAgent asks the agent to resolve the pod's identity and returns
// once the agent reports the pod's policy in the maps. The agent's own error
// message goes to the runtime unchanged: it is the one that says what is
// wrong with the pod (unknown namespace, identity space exhausted, ...).
// ok is false when the agent vanished and is not required.
func registerWithAgent(ctx context.Context, conf *NetConf, c *api.Client, req api.EndpointRequest) (ok bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, agentTimeout)
	defer cancel()
	_, err = c.RegisterEndpoint(ctx, req)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, api.ErrNoAgent):
		if conf.AgentRequired {
			return false, agentDown(conf, types.ErrTryAgainLater)
		}
		return false, nil
	case errors.Is(err, context.DeadlineExceeded):
		return false, types.NewError(types.ErrTryAgainLater,
			fmt.Sprintf("idcni: idcni-agent on %s did not resolve the pod's identity within %s", conf.AgentSocket, agentTimeout),
			err.Error())
	}
	return false, types.NewError(types.ErrInternal, err.Error(),
		fmt.Sprintf("idcni-agent on %s refused endpoint %s/%s (container %s)", conf.AgentSocket, req.PodNamespace, req.PodName, req.ContainerID))
}

// unregisterWithAgent tells a running agent the container is gone. It is
// best effort: the plugin removes the pod from the maps itself, and an agent
// that missed the news learns it from the pod's deletion in the API server.
func unregisterWithAgent(conf *NetConf, containerID string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := api.NewClient(conf.AgentSocket).DeleteEndpoint(ctx, containerID)
	if err == nil || errors.Is(err, api.ErrNoAgent) {
		return nil
	}
	return fmt.Errorf("tell idcni-agent on %s that container %s is gone: %w", conf.AgentSocket, containerID, err)
}
