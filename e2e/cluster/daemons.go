package cluster

import (
	"context"
	"fmt"
	"github.com/idcni/idcni/e2e/internal/pki"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// apiPort is the apiserver's port. Every daemon listens inside the node's
// network namespace, so fixed, well-known ports never collide with another
// cluster or anything on the host.
const apiPort = 6443

// serviceCIDR is the Services' range: kube-proxy on every node translates
// it (services.go); it is never routed between nodes.
const serviceCIDR = "10.96.0.0/16"

// clusterCIDR is the pods' range: the controller-manager gives each Node a
// /24 of it (spec.podCIDRs), which the agent writes into the CNI config.
// The first, and on this single node the only one, is 10.13.0.0/24, the
// range the seed's conflist fixed.
const clusterCIDR = "10.13.0.0/16"

// certs holds the paths of the cluster's certificates and kubeconfigs.
type certs struct {
	ca                                  *pki.Authority
	apiCert, apiKey                     string
	kubeletClientCert, kubeletClientKey string // the apiserver's, towards kubelets
	saKey, saPub                        string
	admin, adminNode                    string // admin kubeconfigs: from the host, on the node
	controllerManager, scheduler        string
	kubeProxy                           string // issued when the first kube-proxy starts
}

// makePKI issues the cluster's certificates and kubeconfigs, and every
// node's. The control plane reaches the apiserver at 127.0.0.1 in the first
// node's namespace; the host and the kubelets at the first node's address.
func (c *Cluster) makePKI() error {
	ca, err := pki.New(filepath.Join(c.Dir, "pki"))
	if err != nil {
		return err
	}
	p := &certs{ca: ca}
	node := net.IP(c.NodeIP.AsSlice())
	if p.apiCert, p.apiKey, err = ca.Issue(pki.Leaf{
		Name: "apiserver", CN: "kube-apiserver", Server: true,
		DNS: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local", c.NodeName},
		IPs: []net.IP{net.IPv4(127, 0, 0, 1), node, net.IPv4(10, 96, 0, 1)},
	}); err != nil {
		return err
	}
	if p.kubeletClientCert, p.kubeletClientKey, err = ca.Issue(pki.Leaf{
		Name: "apiserver-kubelet-client", CN: "kube-apiserver-kubelet-client", Orgs: []string{"system:masters"}, Client: true,
	}); err != nil {
		return err
	}
	if p.saKey, p.saPub, err = ca.KeyPair("sa"); err != nil {
		return err
	}
	local := fmt.Sprintf("https://127.0.0.1:%d", apiPort)
	c.APIServer = fmt.Sprintf("https://%s:%d", c.NodeIP, apiPort)
	for _, k := range []struct {
		dst          *string
		file, server string
		cn           string
		orgs         []string
	}{
		{&p.admin, "admin.kubeconfig", c.APIServer, "idcni-cluster-admin", []string{"system:masters"}},
		{&p.adminNode, "admin-node.kubeconfig", local, "idcni-cluster-admin", []string{"system:masters"}},
		// The built-in identities the default RBAC policy grants each
		// component's rights to.
		{&p.controllerManager, "controller-manager.kubeconfig", local, "system:kube-controller-manager", nil},
		{&p.scheduler, "scheduler.kubeconfig", local, "system:kube-scheduler", nil},
	} {
		name := strings.TrimSuffix(k.file, ".kubeconfig")
		if *k.dst, err = ca.Kubeconfig(filepath.Join(c.Dir, k.file), k.server, name, k.cn, k.orgs...); err != nil {
			return err
		}
	}
	c.Kubeconfig = p.admin
	c.pki = p
	for _, n := range c.Nodes {
		if err := c.nodePKI(n); err != nil {
			return err
		}
	}
	return nil
}

// nodePKI issues the node's kubelet serving pair, for its name and address
// (the apiserver dials the InternalIP for exec and logs), and its
// kubeconfig.
func (c *Cluster) nodePKI(n *Node) error {
	ca := c.pki.ca
	var err error
	if n.kubeletCert, n.kubeletKey, err = ca.Issue(pki.Leaf{
		Name: "kubelet-serving-" + n.ID, CN: n.Name, Server: true, DNS: []string{n.Name}, IPs: []net.IP{net.IP(n.IP.AsSlice())},
	}); err != nil {
		return err
	}
	// The Node authorizer and NodeRestriction know a kubelet by this.
	n.kubeconfig, err = ca.Kubeconfig(filepath.Join(c.Dir, "kubelet-"+n.ID+".kubeconfig"), c.APIServer,
		"kubelet-"+n.ID, "system:node:"+n.Name, "system:nodes")
	return err
}

// startDaemon starts argv in cgroup cg (its daemons group) and in the
// namespaces of ns (nsArgs), logging to logs/<name>.log.
func (c *Cluster) startDaemon(name, cg string, ns []string, argv ...string) error {
	cmd, err := c.command(cg, ns, argv...)
	if err != nil {
		return err
	}
	logPath := filepath.Join(c.Dir, "logs", name+".log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close() // the child has its own descriptor
	fmt.Fprintf(logf, "+ %s\n", strings.Join(argv, " "))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	c.track(name, cg, cmd)
	return nil
}

// controlDaemon starts a daemon of the control plane: in the first node's
// namespaces but the cluster's own daemons cgroup, not the node's.
func (c *Cluster) controlDaemon(name string, argv ...string) error {
	return c.startDaemon(name, c.Cgroup+"/daemons", nsArgs(c.Nodes[0].Holder.PID, true), argv...)
}

// nodeDaemon starts a daemon of node n, in its namespaces and cgroup.
func (c *Cluster) nodeDaemon(n *Node, name string, argv ...string) error {
	return c.startDaemon(name+"-"+n.ID, n.Cgroup()+"/daemons", nsArgs(n.Holder.PID, true), argv...)
}

// track reaps a started process and notes when it exits. A persistent
// cluster's daemons are adopted by init when this process exits.
func (c *Cluster) track(name, cg string, cmd *exec.Cmd) {
	done := make(chan struct{})
	c.mu.Lock()
	c.procs = append(c.procs, &daemon{name: name, cgroup: cg, cmd: cmd, done: done})
	c.mu.Unlock()
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
}

// daemon is a process this one started.
type daemon struct {
	name   string
	cgroup string // the cgroup it started in: a removed node's are forgotten
	cmd    *exec.Cmd
	done   chan struct{}
}

// exited returns the name of a tracked daemon that has exited, if any: a
// wait that a dead daemon can never satisfy stops at once with its log.
func (c *Cluster) exited() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, d := range c.procs {
		select {
		case <-d.done:
			return d.name
		default:
		}
	}
	return ""
}

func (c *Cluster) startEtcd() error {
	return c.controlDaemon("etcd", c.bins.Etcd,
		"--name=node",
		"--data-dir="+filepath.Join(c.Dir, "etcd"),
		"--listen-client-urls=http://127.0.0.1:2379",
		"--advertise-client-urls=http://127.0.0.1:2379",
		"--listen-peer-urls=http://127.0.0.1:2380",
		"--initial-advertise-peer-urls=http://127.0.0.1:2380",
		"--initial-cluster=node=http://127.0.0.1:2380",
		"--initial-cluster-state=new",
		"--logger=zap", "--log-outputs=stderr",
	)
}

func (c *Cluster) startAPIServer() error {
	p := c.pki
	return c.controlDaemon("kube-apiserver", c.bins.APIServer,
		"--etcd-servers=http://127.0.0.1:2379",
		"--bind-address=0.0.0.0",
		"--advertise-address="+c.NodeIP.String(),
		fmt.Sprintf("--secure-port=%d", apiPort),
		"--cert-dir="+filepath.Join(c.Dir, "pki"),
		"--tls-cert-file="+p.apiCert, "--tls-private-key-file="+p.apiKey,
		"--client-ca-file="+p.ca.CertFile,
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+p.saPub,
		"--service-account-signing-key-file="+p.saKey,
		"--service-cluster-ip-range="+serviceCIDR,
		"--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NodeRestriction",
		// The kubernetes Service's endpoint is the advertised address, so
		// pods (CoreDNS's client) reach the apiserver at 10.96.0.1 through
		// kube-proxy. The agent is told the address itself: it must run
		// before any Service works.
		"--endpoint-reconciler-type=lease",
		"--allow-privileged=true",
		"--kubelet-client-certificate="+p.kubeletClientCert,
		"--kubelet-client-key="+p.kubeletClientKey,
		"--kubelet-certificate-authority="+p.ca.CertFile,
		"--kubelet-preferred-address-types=InternalIP",
		"--profiling=false",
	)
}

func (c *Cluster) startControllerManager() error {
	p := c.pki
	return c.controlDaemon("kube-controller-manager", c.bins.ControllerManager,
		"--kubeconfig="+p.controllerManager,
		"--leader-elect=false",
		// Each controller under its own ServiceAccount, as kubeadm runs it:
		// the default RBAC policy grants the controllers' rights to those.
		"--use-service-account-credentials=true",
		"--service-account-private-key-file="+p.saKey,
		// Published in every namespace as kube-root-ca.crt, which every
		// pod's projected token volume mounts.
		"--root-ca-file="+p.ca.CertFile,
		// Node IPAM: every Node gets its pod CIDR here; without it the
		// agent writes no CNI config.
		"--allocate-node-cidrs=true",
		"--cluster-cidr="+clusterCIDR,
		"--node-cidr-mask-size=24",
		"--service-cluster-ip-range="+serviceCIDR,
		"--secure-port=0",
		"--profiling=false",
	)
}

func (c *Cluster) startScheduler() error {
	return c.controlDaemon("kube-scheduler", c.bins.Scheduler,
		"--kubeconfig="+c.pki.scheduler,
		"--leader-elect=false",
		"--secure-port=0",
		"--profiling=false",
	)
}

// containerdConfig follows the measured notes: OOM score adjustments
// restricted (root here lacks CAP_SYS_RESOURCE, so a negative one fails
// every sandbox), cgroupfs, the imported sandbox image, and the CNI
// directories at their standard paths, which the node's mounts make its own.
func (c *Cluster) containerdConfig(n *Node) string {
	d := filepath.Join(n.dir(), "containerd")
	q := func(s string) string { return fmt.Sprintf("%q", s) }
	return fmt.Sprintf(`version = 2
root = %s
state = %s
# Snapshotters that cannot work here only log errors at start.
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = %s

[ttrpc]
  address = %s

[plugins."io.containerd.internal.v1.opt"]
  path = %s

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/idcni/pause:dev"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
`, q(filepath.Join(d, "root")), q(filepath.Join(d, "state")), q(n.ContainerdSocket()), q(n.ContainerdSocket()+".ttrpc"), q(filepath.Join(d, "opt")))
}

func (c *Cluster) startContainerd(n *Node) error {
	cfg := filepath.Join(n.dir(), "containerd", "config.toml")
	if err := os.WriteFile(cfg, []byte(c.containerdConfig(n)), 0o644); err != nil {
		return err
	}
	return c.nodeDaemon(n, "containerd", c.bins.Containerd, "--config", cfg)
}

// waitContainerd waits until the node's containerd answers on its socket.
func (c *Cluster) waitContainerd(ctx context.Context, n *Node) error {
	return c.poll(ctx, "containerd on "+n.Name, func(ctx context.Context) error {
		out, err := exec.CommandContext(ctx, c.bins.Ctr, "--address", n.ContainerdSocket(), "version").CombinedOutput()
		if err != nil {
			return fmt.Errorf("%w: %s", err, strings.TrimSpace(string(out)))
		}
		return nil
	})
}

// kubeletConfig follows the measured notes (cgroupfs, no swap check, cgroup
// v1 allowed, loopback health endpoint, no read-only port) and keeps
// everything the kubelet writes in the run directory or the node's mounts.
func (c *Cluster) kubeletConfig(n *Node) string {
	p := c.pki
	q := func(s string) string { return fmt.Sprintf("%q", s) }
	return fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: %s
port: 10250
healthzBindAddress: 127.0.0.1
healthzPort: 10248
readOnlyPort: 0
tlsCertFile: %s
tlsPrivateKeyFile: %s
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: %s
authorization:
  mode: Webhook
containerRuntimeEndpoint: %s
cgroupDriver: cgroupfs
# The node's own cgroup, under the cluster's: the kubelets of the nodes do
# not share (and fight over) one tree, removing the node kills its cgroup
# and teardown the cluster's.
cgroupRoot: %s
failSwapOn: false
failCgroupV1: false
# Sets the host's kernel tunables anyway; teardown restores them.
protectKernelDefaults: false
# The flexvolume directory would otherwise be created under /usr.
volumePluginDir: %s
# Neither image garbage collection nor eviction: the images were imported,
# nothing could pull them back, and the disk is shared with other tests.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%%"
  nodefs.inodesFree: "1%%"
  imagefs.available: "1%%"
# Faster status reports: the node turns Ready a few seconds after the
# agent writes the CNI configuration instead of up to 10 s later.
nodeStatusUpdateFrequency: 4s
# The kube-dns Service (services.go): every pod's resolv.conf names it.
clusterDomain: %s
clusterDNS: [%s]
serializeImagePulls: false
`, q(n.IP.String()), q(n.kubeletCert), q(n.kubeletKey), q(p.ca.CertFile), q("unix://"+n.ContainerdSocket()),
		q("/"+n.Cgroup()), q(filepath.Join(n.dir(), "kubelet", "volume-plugins")), q(ClusterDomain), q(DNSServiceIP))
}

func (c *Cluster) startKubelet(n *Node) error {
	cfg := filepath.Join(n.dir(), "kubelet", "config.yaml")
	if err := os.WriteFile(cfg, []byte(c.kubeletConfig(n)), 0o644); err != nil {
		return err
	}
	return c.nodeDaemon(n, "kubelet", c.bins.Kubelet,
		"--config="+cfg,
		"--kubeconfig="+n.kubeconfig,
		"--root-dir="+filepath.Join(n.dir(), "kubelet"),
		"--hostname-override="+n.Name,
		// The InternalIP: the apiserver dials the kubelet there, and the
		// agents route the node's pod CIDR through it.
		"--node-ip="+n.IP.String(),
	)
}

// poll runs check until it succeeds or ctx ends, failing early when a
// daemon exited (then the error carries its log's tail).
func (c *Cluster) poll(ctx context.Context, what string, check func(context.Context) error) error {
	var last error
	for {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		last = check(cctx)
		cancel()
		if last == nil {
			return nil
		}
		if name := c.exited(); name != "" {
			return fmt.Errorf("waiting for %s: %s exited:\n%s", what, name, tailFile(filepath.Join(c.Dir, "logs", name+".log"), 25))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w; last: %v", what, ctx.Err(), last)
		case <-time.After(200 * time.Millisecond):
		}
	}
}
