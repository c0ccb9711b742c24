package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
)

// The networks MeasurePodStartup compares.
const (
	// NetworkIdcni is the node's network as installed: idcni.
	NetworkIdcni = "idcni"
	// NetworkBridge is the upstream bridge plugin with host-local IPAM on
	// bridgeSubnet, the baseline: a veth into a Linux bridge, no programs,
	// no agent.
	NetworkBridge = "bridge"
)

var (
	idcniSubnet  = netip.MustParsePrefix("10.13.0.0/24")
	bridgeSubnet = netip.MustParsePrefix("10.14.0.0/24")
)

// bridgeConf sorts before 10-idcni.conflist, so while it exists containerd
// (which uses the first configuration of the directory) gives new pods the
// bridge network.
const bridgeConf = "00-bench-bridge.conflist"

// TestImage is the busybox image every test pod runs.
const TestImage = "docker.io/idcni/test:dev"

// StartupResult is the time from a pod's creation (the API call) to the
// client seeing it Ready, over a burst of pods created at once.
type StartupResult struct {
	Network string
	Pods    int
	// Parallel is how many pods were at most on their way to Ready at once.
	Parallel int
	P50      time.Duration
	P99      time.Duration
	Max      time.Duration
	// Total is from the first creation to the last pod Ready.
	Total time.Duration
}

func (r StartupResult) String() string {
	return fmt.Sprintf("%-7s %d pods, %d at a time: creation to Ready p50 %s, p99 %s, max %s; all Ready in %s",
		r.Network, r.Pods, min(r.Parallel, r.Pods), r.P50.Round(time.Millisecond), r.P99.Round(time.Millisecond),
		r.Max.Round(time.Millisecond), r.Total.Round(time.Millisecond))
}

// SetLog sets where progress lines go.
func (c *Cluster) SetLog(w io.Writer) { c.log = w }

// MeasurePodStartup creates n pods on network, at most parallel of them
// not yet Ready at any time (n: all at once, a burst; 1: one after the
// other), on the first node, and measures each one's creation to Ready,
// then deletes them. For NetworkBridge it switches the node to the bridge plugin for the duration
// and back to idcni after, checking each switch with a probe pod's address.
func (c *Cluster) MeasurePodStartup(ctx context.Context, network string, n, parallel int) (StartupResult, error) {
	res := StartupResult{Network: network, Pods: n, Parallel: parallel}
	if n < 1 || parallel < 1 {
		return res, fmt.Errorf("want at least one pod, at least one at a time (got %d, %d)", n, parallel)
	}
	subnet := idcniSubnet
	switch network {
	case NetworkIdcni:
	case NetworkBridge:
		subnet = bridgeSubnet
		if err := c.useBridge(ctx); err != nil {
			return res, err
		}
		defer func() {
			if err := c.useIdcni(context.WithoutCancel(ctx)); err != nil {
				fmt.Fprintf(c.log, "cluster: back to idcni: %v\n", err)
			}
		}()
	default:
		return res, fmt.Errorf("unknown network %q", network)
	}
	ns, err := c.tempNamespace(ctx, "bench-"+network)
	if err != nil {
		return res, err
	}
	defer c.deleteNamespace(context.WithoutCancel(ctx), ns)

	// Watch before the first create, so no Ready transition is missed.
	pw, err := c.watchPods(ctx, ns)
	if err != nil {
		return res, err
	}
	defer pw.stop()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// A slot per pod in flight: taken before its creation, given back when
	// it is seen Ready.
	slots := make(chan struct{}, parallel)
	created := make([]time.Time, n)
	var mu sync.Mutex
	errs := make(chan error, n)
	first := time.Now()
	go func() {
		for i := range n {
			select {
			case slots <- struct{}{}:
			case <-ctx.Done():
				return
			}
			go func() {
				mu.Lock()
				created[i] = time.Now()
				mu.Unlock()
				if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, c.firstNodePod(podName(i)), metav1.CreateOptions{}); err != nil {
					errs <- fmt.Errorf("create pod %s: %w", podName(i), err)
				}
			}()
		}
	}()

	ready := map[string]time.Time{}
	timeout := time.After(10 * time.Minute)
	for len(ready) < n {
		select {
		case p := <-pw.pods:
			if !podReady(p) {
				continue
			}
			if _, seen := ready[p.Name]; seen {
				continue
			}
			ready[p.Name] = time.Now()
			<-slots
			if a, err := netip.ParseAddr(p.Status.PodIP); err != nil || !subnet.Contains(a) {
				return res, fmt.Errorf("pod %s has address %q, not in %s: the node is not on %s", p.Name, p.Status.PodIP, subnet, network)
			}
		case err := <-errs:
			return res, err
		case err := <-pw.errs:
			return res, err
		case <-timeout:
			return res, fmt.Errorf("%d of %d pods Ready after 10 minutes", len(ready), n)
		case <-ctx.Done():
			return res, ctx.Err()
		}
	}
	mu.Lock()
	defer mu.Unlock()
	var lat []time.Duration
	var last time.Time
	for i := range n {
		r := ready[podName(i)]
		lat = append(lat, r.Sub(created[i]))
		if r.After(last) {
			last = r
		}
	}
	slices.Sort(lat)
	res.P50, res.P99, res.Max = quantile(lat, 0.50), quantile(lat, 0.99), lat[len(lat)-1]
	res.Total = last.Sub(first)
	return res, nil
}

// podWatch streams the pods of a namespace as they change.
type podWatch struct {
	pods   chan *corev1.Pod
	errs   chan error
	cancel context.CancelFunc
}

func (w *podWatch) stop() { w.cancel() }

// watchPods watches the pods of ns and, when the apiserver ends the watch
// (it closes a watcher that falls behind a burst of events, and on a
// loaded machine a burst of 50 pods can do that), lists them and watches
// again from the list, so no change is lost.
func (c *Cluster) watchPods(ctx context.Context, ns string) (*podWatch, error) {
	ctx, cancel := context.WithCancel(ctx)
	pw := &podWatch{pods: make(chan *corev1.Pod, 256), errs: make(chan error, 1), cancel: cancel}
	api := c.Client.CoreV1().Pods(ns)
	w, err := api.Watch(ctx, metav1.ListOptions{})
	if err != nil {
		cancel()
		return nil, err
	}
	go func() {
		defer func() { w.Stop() }()
		for {
			for ev := range w.ResultChan() {
				if p, ok := ev.Object.(*corev1.Pod); ok && (ev.Type == watch.Added || ev.Type == watch.Modified) {
					select {
					case pw.pods <- p:
					case <-ctx.Done():
						return
					}
				}
			}
			if ctx.Err() != nil {
				return
			}
			l, err := api.List(ctx, metav1.ListOptions{})
			if err == nil {
				for i := range l.Items {
					select {
					case pw.pods <- &l.Items[i]:
					case <-ctx.Done():
						return
					}
				}
				w, err = api.Watch(ctx, metav1.ListOptions{ResourceVersion: l.ResourceVersion})
			}
			if err != nil {
				if ctx.Err() == nil {
					pw.errs <- fmt.Errorf("watch the pods of %s: %w", ns, err)
				}
				return
			}
		}
	}()
	return pw, nil
}

func podName(i int) string { return fmt.Sprintf("p%03d", i) }

// quantile is the nearest-rank quantile of sorted values.
func quantile(sorted []time.Duration, q float64) time.Duration {
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// firstNodePod is a SleepPod bound to the first node: the bench switches
// that node's network only, and measures one kubelet, not the scheduler's
// spreading.
func (c *Cluster) firstNodePod(name string) *corev1.Pod {
	p := SleepPod(name, nil)
	p.Spec.NodeName = c.NodeName
	return p
}

// SleepPod is a test pod that sleeps, on the imported busybox image.
func SleepPod(name string, labels map[string]string) *corev1.Pod {
	zero := int64(0)
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
		Spec: corev1.PodSpec{
			// Nothing to wait for on deletion: sleep ignores SIGTERM as
			// PID 1, and the grace period would hold every teardown.
			TerminationGracePeriodSeconds: &zero,
			Containers: []corev1.Container{{
				Name: "main", Image: TestImage, ImagePullPolicy: corev1.PullNever,
				Command: []string{"sleep", "86400"},
			}},
		},
	}
}

// tempNamespace creates a namespace with a unique name and waits for its
// default ServiceAccount (the controller-manager makes it; pods are refused
// without it).
func (c *Cluster) tempNamespace(ctx context.Context, prefix string) (string, error) {
	ns, err := c.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{GenerateName: prefix + "-"},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", err
	}
	err = c.poll(ctx, "the default ServiceAccount of "+ns.Name, func(ctx context.Context) error {
		_, err := c.Client.CoreV1().ServiceAccounts(ns.Name).Get(ctx, "default", metav1.GetOptions{})
		return err
	})
	return ns.Name, err
}

// deleteNamespace deletes the pods of ns and waits until they are gone (so
// their CNI DEL has run and their addresses are free), then the namespace.
func (c *Cluster) deleteNamespace(ctx context.Context, ns string) {
	zero := int64(0)
	pods := c.Client.CoreV1().Pods(ns)
	_ = pods.DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: &zero}, metav1.ListOptions{})
	_ = c.poll(ctx, "the pods of "+ns+" to go", func(ctx context.Context) error {
		l, err := pods.List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		if len(l.Items) > 0 {
			return fmt.Errorf("%d pods left", len(l.Items))
		}
		return nil
	})
	_ = c.Client.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{})
}

// useBridge installs the bridge plugin and its configuration on the node
// and waits until a new pod gets a bridge address.
func (c *Cluster) useBridge(ctx context.Context) error {
	bin, err := bridgePlugin(c.Root, c.log)
	if err != nil {
		return err
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		return err
	}
	// Through a temporary name and a rename: containerd may exec the
	// directory's plugins at any moment.
	dst := filepath.Join(c.Nodes[0].dir(), "node", "cni-bin", "bridge")
	if err := os.WriteFile(dst+".tmp", data, 0o755); err != nil {
		return err
	}
	if err := os.Rename(dst+".tmp", dst); err != nil {
		return err
	}
	conf := fmt.Sprintf(`{
  "cniVersion": "1.0.0",
  "name": "bench-bridge",
  "plugins": [{
    "type": "bridge",
    "bridge": "benchbr0",
    "isGateway": true,
    "ipam": {"type": "host-local", "ranges": [[{"subnet": %q}]]}
  }]
}
`, bridgeSubnet)
	// Written in place, not renamed into the directory: containerd 1.6
	// ignores a configuration that arrives by rename (see the notes).
	if err := os.WriteFile(filepath.Join(c.Nodes[0].dir(), "node", "cni-conf", bridgeConf), []byte(conf), 0o644); err != nil {
		return err
	}
	return c.waitNetwork(ctx, bridgeSubnet)
}

// useIdcni removes the bridge configuration and waits until a new pod gets
// an idcni address again.
func (c *Cluster) useIdcni(ctx context.Context) error {
	if err := os.Remove(filepath.Join(c.Nodes[0].dir(), "node", "cni-conf", bridgeConf)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return c.waitNetwork(ctx, idcniSubnet)
}

// waitNetwork starts probe pods until one gets an address in subnet:
// containerd reloads its CNI configuration asynchronously.
func (c *Cluster) waitNetwork(ctx context.Context, subnet netip.Prefix) error {
	ns, err := c.tempNamespace(ctx, "probe")
	if err != nil {
		return err
	}
	defer c.deleteNamespace(context.WithoutCancel(ctx), ns)
	pods := c.Client.CoreV1().Pods(ns)
	deadline := time.Now().Add(time.Minute)
	for i := 0; ; i++ {
		name := fmt.Sprintf("probe-%d", i)
		if _, err := pods.Create(ctx, c.firstNodePod(name), metav1.CreateOptions{}); err != nil {
			return err
		}
		var ip string
		err := c.poll(ctx, "probe pod "+name, func(ctx context.Context) error {
			p, err := pods.Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if !podReady(p) {
				return errors.New("not Ready")
			}
			ip = p.Status.PodIP
			return nil
		})
		if err != nil {
			return err
		}
		if a, err := netip.ParseAddr(ip); err == nil && subnet.Contains(a) {
			return nil
		}
		zero := int64(0)
		if err := pods.Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil && !apierrors.IsNotFound(err) {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pods still get %s, not an address in %s, a minute after the CNI configuration changed", ip, subnet)
		}
		time.Sleep(time.Second)
	}
}
