// Package kube runs a real Kubernetes control plane (etcd and kube-apiserver,
// no controller-manager, no scheduler, no kubelet) for tests, so the agent's
// informers, RBAC and status handling meet the real API machinery instead of
// a fake clientset.
//
// Every cluster gets its own ports on 127.0.0.1, its own CA and its own
// directories, so clusters in parallel tests, or in two test processes, never
// meet. Everything is torn down by t.Cleanup, and the daemons die with the
// test process even when it is killed before its cleanups run.
package kube

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/idcni/idcni/e2e/internal/pki"
)

// Options tune Start. The zero value is a working cluster.
type Options struct {
	// BinDir holds kube-apiserver. Empty: see Binaries.
	BinDir string
	// ServiceCIDR is the apiserver's --service-cluster-ip-range. Default
	// 10.96.0.0/16; it is never routed, so it need not be free on the host.
	ServiceCIDR string
	// AuthorizationMode is the apiserver's --authorization-mode. Default
	// "Node,RBAC", as in real clusters, so a test can check the agent's RBAC
	// with a restricted client (Cluster.UserConfig); the admin client is in
	// system:masters and passes either way.
	AuthorizationMode string
	// APIServerArgs are appended to the apiserver's command line; a flag
	// given here overrides the default one.
	APIServerArgs []string
	// ReadyTimeout bounds the wait for etcd and then for the apiserver's
	// /readyz. Default 2 minutes: a 2-core machine running other tests can
	// take a while to start an apiserver.
	ReadyTimeout time.Duration
}

// Cluster is a running control plane.
type Cluster struct {
	// Config is an admin (system:masters) client configuration.
	Config *rest.Config
	// Client is a clientset built from Config.
	Client kubernetes.Interface
	// Kubeconfig is the path of a kubeconfig file for the same admin, for
	// kubectl and for binaries under test (--kubeconfig).
	Kubeconfig string
	// URL is the apiserver's address, https://127.0.0.1:PORT.
	URL string
	// EtcdURL is etcd's client address, http://127.0.0.1:PORT.
	EtcdURL string
	// BinDir holds the Kubernetes binaries the cluster runs (kubelet and
	// kubectl too when they came from scripts/build-kube.sh).
	BinDir string
	// Dir holds the certificates, the logs (etcd.log, kube-apiserver.log)
	// and etcd's data: $TMPDIR/idcni-kube-<pid>-*, removed when the test
	// ends (or, if the test process was killed, by a later Start).
	Dir string
	// CAFile and CAKeyFile are the cluster CA, for tests that issue
	// certificates of their own (a kubelet's, say).
	CAFile, CAKeyFile string
	// StartupTime is how long Start took, binaries already built.
	StartupTime time.Duration

	ca        *pki.Authority
	pkiDir    string
	etcd      *process
	apiserver *process

	stopOnce     sync.Once
	stopErr      error
	tailsPrinted bool
}

// Start runs etcd and kube-apiserver and returns once the apiserver is ready
// and the "default" namespace has a "default" ServiceAccount. It fails the
// test (with the daemons' log tails) if anything goes wrong; t.Cleanup stops
// the cluster and removes its files, and prints the log tails when the test
// failed.
func Start(t testing.TB, opts Options) *Cluster {
	t.Helper()
	if opts.ServiceCIDR == "" {
		opts.ServiceCIDR = "10.96.0.0/16"
	}
	if opts.AuthorizationMode == "" {
		opts.AuthorizationMode = "Node,RBAC"
	}
	if opts.ReadyTimeout == 0 {
		opts.ReadyTimeout = 2 * time.Minute
	}
	binDir := opts.BinDir
	if binDir == "" {
		var err error
		if binDir, err = Binaries(); err != nil {
			t.Fatalf("kube: %v", err)
		}
	}
	etcdBin, err := Etcd()
	if err != nil {
		t.Fatalf("kube: %v", err)
	}

	start := time.Now()
	dir, err := newClusterDir()
	if err != nil {
		t.Fatalf("kube: %v", err)
	}
	c := &Cluster{BinDir: binDir, Dir: dir}
	t.Cleanup(func() {
		if t.Failed() {
			c.logTails(t)
		}
		if err := c.Stop(); err != nil {
			t.Errorf("kube: %v", err)
		}
		// Only once the daemons are gone: etcd would recreate files.
		if err := os.RemoveAll(c.Dir); err != nil {
			t.Errorf("kube: remove cluster directory: %v", err)
		}
	})
	if err := c.start(etcdBin, opts); err != nil {
		c.logTails(t)
		t.Fatalf("kube: %v", err)
	}
	c.StartupTime = time.Since(start)
	t.Logf("kube: apiserver %s ready in %s (etcd %s, dir %s)", c.URL, c.StartupTime.Round(time.Millisecond), c.EtcdURL, c.Dir)
	return c
}

func (c *Cluster) start(etcdBin string, opts Options) error {
	c.pkiDir = filepath.Join(c.Dir, "pki")
	if err := os.Mkdir(c.pkiDir, 0o700); err != nil {
		return fmt.Errorf("create PKI directory: %w", err)
	}
	var err error
	if c.ca, err = pki.New(c.pkiDir); err != nil {
		return err
	}
	c.CAFile, c.CAKeyFile = c.ca.CertFile, c.ca.KeyFile

	ctx, cancel := context.WithTimeout(context.Background(), opts.ReadyTimeout)
	defer cancel()
	if err := c.startEtcd(ctx, etcdBin); err != nil {
		return err
	}
	if err := c.startAPIServer(ctx, opts); err != nil {
		return err
	}
	// The apiserver creates the default namespace in a post-start hook that
	// /readyz does not wait for, and without a controller-manager nobody
	// creates its ServiceAccount, which every pod needs to be admitted.
	if err := c.EnsureDefaultServiceAccount(ctx, metav1.NamespaceDefault); err != nil {
		return err
	}
	// The agents' namespace, as manifests/idcni.yaml makes it: each agent
	// announces its node's new pods there (agent/announce.go).
	if _, err := c.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: AgentNamespace}}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create namespace %s: %w", AgentNamespace, err)
	}
	return nil
}

// AgentNamespace is the agents' namespace on every cluster the tests start.
const AgentNamespace = "idcni-system"

// dirPrefix starts the name of every cluster directory, followed by the
// test process's pid.
const dirPrefix = "idcni-kube-"

// newClusterDir creates the cluster's directory, named after this process,
// after removing those of processes that are gone. A test binary killed by
// -timeout runs no cleanup, and etcd's preallocated WAL alone makes each
// such leftover over 100 MB; t.TempDir would leave them forever.
func newClusterDir() (string, error) {
	stale, _ := filepath.Glob(filepath.Join(os.TempDir(), dirPrefix+"*"))
	for _, d := range stale {
		pidText, _, _ := strings.Cut(strings.TrimPrefix(filepath.Base(d), dirPrefix), "-")
		pid, err := strconv.Atoi(pidText)
		if err != nil || pid <= 0 {
			continue
		}
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			os.RemoveAll(d) // best effort: a leftover costs only disk
		}
	}
	dir, err := os.MkdirTemp("", dirPrefix+strconv.Itoa(os.Getpid())+"-")
	if err != nil {
		return "", fmt.Errorf("create cluster directory: %w", err)
	}
	return dir, nil
}

// bindAttempts is how often a daemon is restarted on fresh ports after
// losing one to another process between freePorts and its bind.
const bindAttempts = 3

func (c *Cluster) startEtcd(ctx context.Context, bin string) error {
	dataDir := filepath.Join(c.Dir, "etcd")
	for attempt := 1; ; attempt++ {
		ports, err := freePorts(2)
		if err != nil {
			return err
		}
		client := "http://127.0.0.1:" + strconv.Itoa(ports[0])
		peer := "http://127.0.0.1:" + strconv.Itoa(ports[1])
		// A half-initialised data directory from a failed attempt would
		// make etcd refuse the new peer URL.
		if err := os.RemoveAll(dataDir); err != nil {
			return fmt.Errorf("clear etcd data directory: %w", err)
		}
		args := []string{
			"--name=idcni-e2e",
			"--data-dir=" + dataDir,
			"--listen-client-urls=" + client,
			"--advertise-client-urls=" + client,
			// The peer port is bound even for one member; left at its
			// default (2380) it would collide with any other etcd.
			"--listen-peer-urls=" + peer,
			"--initial-advertise-peer-urls=" + peer,
			"--initial-cluster=idcni-e2e=" + peer,
			"--initial-cluster-state=new",
			"--logger=zap",
			"--log-outputs=stderr",
		}
		c.etcd, err = startProcess("etcd", filepath.Join(c.Dir, "etcd.log"), bin, args, daemonEnv())
		if err != nil {
			return err
		}
		err = waitFor(ctx, c.etcd, func(ctx context.Context) error { return etcdHealthy(ctx, client) })
		if err == nil {
			c.EtcdURL = client
			return nil
		}
		if c.etcd.bindConflict() && attempt < bindAttempts {
			continue
		}
		return fmt.Errorf("etcd did not become healthy: %w", err)
	}
}

func etcdHealthy(ctx context.Context, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url+"/health", nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var h struct {
		Health string `json:"health"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&h); err != nil {
		return fmt.Errorf("decode /health: %w", err)
	}
	if h.Health != "true" {
		return fmt.Errorf("/health says %q", h.Health)
	}
	return nil
}

func (c *Cluster) startAPIServer(ctx context.Context, opts Options) error {
	serviceIP, err := firstServiceIP(opts.ServiceCIDR)
	if err != nil {
		return err
	}
	host, _ := os.Hostname()
	servingDNS := []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}
	if host != "" {
		servingDNS = append(servingDNS, host)
	}
	serving, servingKey, err := c.ca.Issue(pki.Leaf{
		Name: "apiserver", CN: "kube-apiserver", Server: true,
		DNS: servingDNS,
		IPs: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback, serviceIP},
	})
	if err != nil {
		return err
	}
	// The apiserver's client identity towards kubelets (exec, logs), for
	// tests that add a kubelet.
	kubeletClient, kubeletClientKey, err := c.ca.Issue(pki.Leaf{
		Name: "apiserver-kubelet-client", CN: "kube-apiserver-kubelet-client",
		Orgs: []string{"system:masters"}, Client: true,
	})
	if err != nil {
		return err
	}
	saKey, saPub, err := c.ca.KeyPair("sa")
	if err != nil {
		return err
	}
	adminCert, adminKey, err := c.ca.Issue(pki.Leaf{
		Name: "admin", CN: "idcni-e2e-admin", Orgs: []string{"system:masters"}, Client: true,
	})
	if err != nil {
		return err
	}

	for attempt := 1; ; attempt++ {
		ports, err := freePorts(1)
		if err != nil {
			return err
		}
		c.URL = "https://127.0.0.1:" + strconv.Itoa(ports[0])
		args := []string{
			"--etcd-servers=" + c.EtcdURL,
			"--bind-address=127.0.0.1",
			"--advertise-address=127.0.0.1",
			"--secure-port=" + strconv.Itoa(ports[0]),
			"--cert-dir=" + c.pkiDir,
			"--tls-cert-file=" + serving,
			"--tls-private-key-file=" + servingKey,
			"--client-ca-file=" + c.ca.CertFile,
			"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
			"--service-account-key-file=" + saPub,
			"--service-account-signing-key-file=" + saKey,
			"--service-cluster-ip-range=" + opts.ServiceCIDR,
			"--authorization-mode=" + opts.AuthorizationMode,
			// Nothing would serve the kubernetes Service's endpoints, and the
			// reconciler would keep rewriting them to the loopback address.
			"--endpoint-reconciler-type=none",
			// Flow control only adds start-up work (its bootstrap
			// configuration objects) and queuing that a test never needs.
			"--enable-priority-and-fairness=false",
			"--allow-privileged=true",
			"--kubelet-client-certificate=" + kubeletClient,
			"--kubelet-client-key=" + kubeletClientKey,
			// A test kubelet registers under the host name, which resolves
			// to loopback, so exec and logs stay on 127.0.0.1.
			"--kubelet-preferred-address-types=Hostname,InternalIP",
			"--profiling=false",
		}
		args = append(args, opts.APIServerArgs...)
		c.apiserver, err = startProcess("kube-apiserver", filepath.Join(c.Dir, "kube-apiserver.log"),
			filepath.Join(c.BinDir, "kube-apiserver"), args, daemonEnv())
		if err != nil {
			return err
		}
		c.Config = &rest.Config{
			Host: c.URL,
			TLSClientConfig: rest.TLSClientConfig{
				CAFile: c.ca.CertFile, CertFile: adminCert, KeyFile: adminKey,
			},
			// Tests create objects in bursts; client-go's default of 5 QPS
			// would make them wait on the client, not on the server.
			QPS:   100,
			Burst: 200,
		}
		c.Client, err = kubernetes.NewForConfig(c.Config)
		if err != nil {
			return fmt.Errorf("admin clientset: %w", err)
		}
		err = waitFor(ctx, c.apiserver, c.readyz)
		if err == nil {
			break
		}
		if c.apiserver.bindConflict() && attempt < bindAttempts {
			continue
		}
		return fmt.Errorf("kube-apiserver did not become ready: %w", err)
	}
	c.Kubeconfig = filepath.Join(c.Dir, "kubeconfig")
	if err := pki.WriteKubeconfig(c.Kubeconfig, c.URL, c.ca.CertFile, adminCert, adminKey); err != nil {
		return err
	}
	return nil
}

func (c *Cluster) readyz(ctx context.Context) error {
	body, err := c.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
	if err != nil {
		return fmt.Errorf("/readyz: %w: %s", err, body)
	}
	return nil
}

// waitFor polls check until it succeeds, the process exits, or ctx ends; the
// error says which, with the check's last error.
func waitFor(ctx context.Context, p *process, check func(context.Context) error) error {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		last = check(cctx)
		cancel()
		if last == nil {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("%s exited (%v); last check: %w", p.name, p.err, last)
		case <-ctx.Done():
			return fmt.Errorf("%s: %w; last check: %w", p.name, ctx.Err(), last)
		case <-tick.C:
		}
	}
}

// firstServiceIP is the ClusterIP of the kubernetes Service: the first
// address of the service range, which the serving certificate must name.
func firstServiceIP(cidr string) (net.IP, error) {
	_, ipnet, err := net.ParseCIDR(cidr)
	if err != nil {
		return nil, fmt.Errorf("service CIDR %q: %w", cidr, err)
	}
	ip := append(net.IP(nil), ipnet.IP...)
	ip[len(ip)-1]++
	return ip, nil
}

// Stop stops the apiserver, then etcd. It is safe to call more than once and
// runs anyway in the test's cleanup; the files stay until the test ends.
func (c *Cluster) Stop() error {
	c.stopOnce.Do(func() {
		var errs []error
		// The apiserver first, so it does not log a storm of etcd errors.
		// It stops in about a second, but waits several for open watches
		// (a test's informers) to go; its state is thrown away, so it is
		// not worth the wait.
		for _, d := range []struct {
			p     *process
			grace time.Duration
		}{{c.apiserver, 2 * time.Second}, {c.etcd, 5 * time.Second}} {
			if d.p == nil {
				continue
			}
			if err := d.p.stop(d.grace); err != nil {
				errs = append(errs, err)
			}
		}
		c.stopErr = errors.Join(errs...)
	})
	return c.stopErr
}

// logTails prints the end of each daemon's log to the test log.
func (c *Cluster) logTails(t testing.TB) {
	t.Helper()
	if c.tailsPrinted {
		return
	}
	c.tailsPrinted = true
	// The apiserver's first: when both fail, etcd is usually why, but
	// the apiserver's log says so too, and says it first.
	for _, p := range []*process{c.apiserver, c.etcd} {
		if p != nil {
			t.Logf("kube: last lines of %s:\n%s", p.logPath, p.logTail(30))
		}
	}
}

// UserConfig returns a client configuration and a kubeconfig file for user
// in groups, authenticated by a client certificate of the cluster CA: a
// client that RBAC restricts, such as the agent under its own ClusterRole.
func (c *Cluster) UserConfig(user string, groups ...string) (*rest.Config, string, error) {
	stem := "user-" + sanitize(user)
	cert, key, err := c.ca.Issue(pki.Leaf{Name: stem, CN: user, Orgs: groups, Client: true})
	if err != nil {
		return nil, "", err
	}
	path := filepath.Join(c.Dir, stem+".kubeconfig")
	if err := pki.WriteKubeconfig(path, c.URL, c.ca.CertFile, cert, key); err != nil {
		return nil, "", err
	}
	cfg := &rest.Config{
		Host:            c.URL,
		TLSClientConfig: rest.TLSClientConfig{CAFile: c.ca.CertFile, CertFile: cert, KeyFile: key},
		QPS:             c.Config.QPS,
		Burst:           c.Config.Burst,
	}
	return cfg, path, nil
}

// sanitize makes a user name usable in a file name (system:node:x has
// colons).
func sanitize(s string) string {
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '.' {
			return r
		}
		return '_'
	}, s)
}

// CreateNamespace creates a namespace with labels, and its "default"
// ServiceAccount (see EnsureDefaultServiceAccount), failing the test on error.
func (c *Cluster) CreateNamespace(t testing.TB, name string, labels map[string]string) *corev1.Namespace {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ns, err := c.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("kube: create namespace %s: %v", name, err)
	}
	if err := c.EnsureDefaultServiceAccount(ctx, name); err != nil {
		t.Fatalf("kube: %v", err)
	}
	return ns
}

// EnsureDefaultServiceAccount creates the "default" ServiceAccount of a
// namespace unless it exists. A controller-manager would do it; without one
// the ServiceAccount admission plugin rejects every pod of the namespace. It
// waits for the namespace to appear, since the apiserver creates the system
// namespaces asynchronously.
func (c *Cluster) EnsureDefaultServiceAccount(ctx context.Context, namespace string) error {
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default", Namespace: namespace}}
	for {
		_, err := c.Client.CoreV1().ServiceAccounts(namespace).Create(ctx, sa, metav1.CreateOptions{})
		switch {
		case err == nil, apierrors.IsAlreadyExists(err):
			return nil
		case !apierrors.IsNotFound(err):
			return fmt.Errorf("create ServiceAccount %s/default: %w", namespace, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("create ServiceAccount %s/default: namespace missing: %w", namespace, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}
