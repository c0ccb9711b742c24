package cluster

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// buildImages builds the agent, test and pause images with the project's
// image builder (go run ./e2e/image), from the checkout as it is, so the
// agent under test is the code under test.
func (c *Cluster) buildImages(ctx context.Context) ([]string, error) {
	out := filepath.Join(c.Dir, "images")
	logPath := filepath.Join(c.Dir, "logs", "images.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	var stdout bytes.Buffer
	cmd := exec.CommandContext(ctx, goCmd(), "run", "./e2e/image", "-out", out,
		"-coredns", c.bins.CoreDNS, "-coredns-tag", c.bins.corednsTag())
	cmd.Dir = c.Root
	cmd.Stdout, cmd.Stderr = &stdout, logf
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("go run ./e2e/image: %w\n%s", err, tailFile(logPath, 20))
	}
	var paths []string
	for _, l := range strings.Split(stdout.String(), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			paths = append(paths, l)
		}
	}
	if len(paths) == 0 {
		return nil, fmt.Errorf("go run ./e2e/image wrote no image")
	}
	return paths, nil
}

// importImages loads the tarballs into the node's containerd's k8s.io namespace, where
// the CRI plugin finds them: no registry exists, so every pod uses an
// imported image.
func (c *Cluster) importImages(ctx context.Context, n *Node, paths []string) error {
	for _, p := range paths {
		out, err := exec.CommandContext(ctx, c.bins.Ctr, "--address", n.ContainerdSocket(), "--namespace", "k8s.io",
			"images", "import", p).CombinedOutput()
		if err != nil {
			return fmt.Errorf("ctr images import %s: %w\n%s", p, err, tail(out, 10))
		}
	}
	return nil
}

// ImportImages imports image tarballs into every node's containerd, for a
// running cluster (one Load returned, too): images that Up did not import,
// such as the upstream suites' agnhost.
func (c *Cluster) ImportImages(ctx context.Context, paths ...string) error {
	if c.bins == nil {
		return fmt.Errorf("cluster %s: no nsenter on this host", c.Name)
	}
	if c.bins.Ctr == "" {
		// A loaded cluster knows only the tools its commands need.
		ctr, err := lookPath("ctr")
		if err != nil {
			return err
		}
		c.bins.Ctr = ctr
	}
	c.mu.Lock()
	nodes := append([]*Node(nil), c.Nodes...)
	c.mu.Unlock()
	return forNodes(nodes, func(n *Node) error { return c.importImages(ctx, n, paths) })
}

// agentNamespace and agentDaemonSet are where manifests/idcni.yaml puts the
// agent.
const (
	agentNamespace = "idcni-system"
	agentDaemonSet = "idcni-agent"
	agentContainer = "agent"
)

// installIdcni does what an operator of a cluster without kube-proxy does,
// as the manifest's ConfigMap describes: tell the agent where the apiserver
// is (no kube-proxy serves the in-cluster address), apply the manifest, and
// wait for the DaemonSet's rollout. The agents then write the CNI
// configuration and the nodes turn Ready.
//
// The setting goes in first, in a ConfigMap of the manifest's name that
// `kubectl apply` then completes: apply keeps the keys it did not set, so
// the first agents start with it. Patching it in after the apply would
// need a restart of the DaemonSet, a second rollout that goes one node at
// a time once the first agents are ready.
func (c *Cluster) installIdcni(ctx context.Context, manifest string) error {
	if _, err := c.Kubectl(ctx, "create", "namespace", agentNamespace); err != nil {
		return err
	}
	// The first node's address on the segment: every node reaches it
	// there, the far one through the router.
	if _, err := c.Kubectl(ctx, "-n", agentNamespace, "create", "configmap", agentDaemonSet,
		"--from-literal=kubernetes-service-host="+c.NodeIP.String(),
		fmt.Sprintf("--from-literal=kubernetes-service-port=%d", apiPort)); err != nil {
		return err
	}
	if _, err := c.Kubectl(ctx, "apply", "-f", manifest); err != nil {
		return err
	}
	cm, err := c.Client.CoreV1().ConfigMaps(agentNamespace).Get(ctx, agentDaemonSet, metav1.GetOptions{})
	if err != nil {
		return err
	}
	if cm.Data["kubernetes-service-host"] != c.NodeIP.String() {
		return fmt.Errorf("configmap %s/%s after kubectl apply: kubernetes-service-host %q, want %s", agentNamespace, agentDaemonSet, cm.Data["kubernetes-service-host"], c.NodeIP)
	}
	return c.WaitAgentRollout(ctx)
}

// WaitAgentRollout waits until the agent's DaemonSet is rolled out and
// ready on every node.
func (c *Cluster) WaitAgentRollout(ctx context.Context) error {
	return c.poll(ctx, "the idcni agent's rollout", func(ctx context.Context) error {
		_, err := c.Kubectl(ctx, "-n", agentNamespace, "rollout", "status", "daemonset/"+agentDaemonSet, "--timeout=5s")
		return err
	})
}
