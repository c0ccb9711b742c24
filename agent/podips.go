package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/util/workqueue"
)

// Publishing a new pod's addresses closes most of the propagation race.
//
// Other nodes learn a pod's address, and so its identity, from its
// status.podIPs. The kubelet writes them only after the pod's containers
// have started and its next PLEG relist (every second) has seen them: a pod
// that talks at once is, to every other node, an unknown address (world)
// for up to a second or more, and its first SYNs to a pod that admits only
// its identity are dropped. The plugin knows the addresses when it has set
// up the veth, before any container of the pod exists, so the agent writes
// them into the status then, as Cilium publishes a CiliumEndpoint at
// endpoint creation. The kubelet later writes the same addresses (both come
// from the one CNI result), so nothing changes for it.
//
// The status subresource, not an annotation: a pod's owner can edit its
// annotations and so could claim someone else's address; pods/status is
// granted to the kubelet and the agent only. The patch carries the pod's
// UID, which the API server refuses to change, so a registration of an old
// pod never writes into a new pod of the same name, and it is sent only
// while the status holds no address, so it never overrides the kubelet.

// podIPs is one publication: the pod (by UID) and the addresses its
// plugin registered, comma-joined so the item is comparable and the
// queue dedupes repeats.
type podIPs struct {
	namespace, name, uid string
	addrs                string
}

// podIPPublisher patches new pods' status.podIPs off the writer loop: an
// API call must not hold the maps' writes, and a CNI ADD never waits for
// it.
type podIPPublisher struct {
	a     *Agent
	queue workqueue.TypedRateLimitingInterface[podIPs]
}

func newPodIPPublisher(a *Agent) *podIPPublisher {
	return &podIPPublisher{a: a, queue: workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.NewTypedItemExponentialFailureRateLimiter[podIPs](100*time.Millisecond, 10*time.Second),
		workqueue.TypedRateLimitingQueueConfig[podIPs]{Name: "pod-ips"})}
}

// publish queues a registration's addresses for its pod's status. Without
// the pod's UID (a plugin older than this agent) nothing is published:
// the kubelet will, later.
func (p *podIPPublisher) publish(ns, name, uid string, addrs []netip.Addr) {
	if p == nil || uid == "" || len(addrs) == 0 {
		return
	}
	// The kubelet lists an IPv4 address first when a pod has one
	// (containerd's default preference): the same order, so its later
	// write is not a reordering.
	sorted := slices.Clone(addrs)
	slices.SortStableFunc(sorted, func(x, y netip.Addr) int {
		switch {
		case x.Is4() == y.Is4():
			return 0
		case x.Is4():
			return -1
		}
		return 1
	})
	s := make([]string, len(sorted))
	for i, a := range sorted {
		s[i] = a.String()
	}
	p.queue.Add(podIPs{namespace: ns, name: name, uid: uid, addrs: strings.Join(s, ",")})
}

func (p *podIPPublisher) run(ctx context.Context) {
	go func() { <-ctx.Done(); p.queue.ShutDown() }()
	wait.UntilWithContext(ctx, func(ctx context.Context) {
		for p.next(ctx) {
		}
	}, time.Second)
}

func (p *podIPPublisher) next(ctx context.Context) bool {
	item, quit := p.queue.Get()
	if quit {
		return false
	}
	defer p.queue.Done(item)
	err := p.patch(ctx, item)
	switch {
	case err == nil:
		p.queue.Forget(item)
	case p.queue.NumRequeues(item) < 5:
		p.queue.AddRateLimited(item)
	default:
		// The kubelet writes the addresses anyway: losing this only
		// leaves the race as wide as it was without publishing.
		p.a.log.Warn("publishing a pod's addresses failed; the kubelet will", "pod", item.namespace+"/"+item.name, "err", err)
		p.a.metrics.podIPsPublished.WithLabelValues("failed").Inc()
		p.queue.Forget(item)
	}
	return true
}

// patch writes item's addresses into its pod's status, unless the pod is
// gone, is another pod by now, or has addresses already.
func (p *podIPPublisher) patch(ctx context.Context, item podIPs) error {
	if pod, err := p.a.pods.Pods(item.namespace).Get(item.name); err == nil {
		if string(pod.UID) != item.uid || len(pod.Status.PodIPs) > 0 || pod.Status.PodIP != "" {
			p.a.metrics.podIPsPublished.WithLabelValues("skipped").Inc()
			return nil
		}
	}
	body, err := podIPsPatch(item)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err = p.a.client.CoreV1().Pods(item.namespace).Patch(ctx, item.name, types.MergePatchType, body, metav1.PatchOptions{FieldManager: "idcni-agent"}, "status")
	switch {
	case apierrors.IsNotFound(err), apierrors.IsInvalid(err), apierrors.IsConflict(err):
		// Gone, or another pod of the same name (its UID differs).
		p.a.metrics.podIPsPublished.WithLabelValues("skipped").Inc()
		return nil
	case err != nil:
		return fmt.Errorf("patch status of pod %s/%s: %w", item.namespace, item.name, err)
	}
	p.a.metrics.podIPsPublished.WithLabelValues("published").Inc()
	return nil
}

// podIPsPatch is the merge patch: the UID as a precondition (the API
// server refuses a change of it), podIP the first address, as the API
// requires of podIPs[0].
func podIPsPatch(item podIPs) ([]byte, error) {
	addrs := strings.Split(item.addrs, ",")
	ips := make([]corev1.PodIP, len(addrs))
	for i, a := range addrs {
		ips[i] = corev1.PodIP{IP: a}
	}
	return json.Marshal(map[string]any{
		"metadata": map[string]any{"uid": item.uid},
		"status":   map[string]any{"podIP": addrs[0], "podIPs": ips},
	})
}
