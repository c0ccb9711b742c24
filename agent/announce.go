package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Announcing new pods closes most of the propagation race (issue 12).
//
// Other nodes learn a pod's address, and so its identity, from its
// status.podIPs, which the kubelet writes only once the pod's containers
// run and its next relist has seen them: to every other node a pod that
// talks at once is an unknown address (world) for hundreds of
// milliseconds, and its first packets to a pod that admits only its
// identity are dropped. The plugin knows the address when it has set up
// the veth, before any container of the pod exists; the agent announces it
// then, in a ConfigMap of its node in its own namespace, and takes it out
// again once the status has it. The other agents use an announced address
// only for a pod whose status has none yet.
//
// Why not write the status: the kubelet patches the status from its own
// view, which has no address until its relist, and so removes an address
// written before it (measured: the address appeared, vanished 600 ms later,
// came back 300 ms after that). Why not an annotation on the pod: whoever
// may edit a pod may edit its annotations, and could claim another pod's
// address; the announcement ConfigMaps are in the agents' namespace, which
// only the agents may write, and an announced address is believed only
// inside the announcing node's pod CIDRs, for a pod scheduled on that
// node, with the pod's UID.

// announceLabel marks the announcement ConfigMaps; the agents watch only
// those.
const (
	announceLabel = "app.kubernetes.io/component"
	announceValue = "idcni-announce"
	// announceTTL bounds how long an announcement stays without the
	// kubelet writing the status (a pod stuck before its containers run);
	// a removal the agent missed cannot leave it forever.
	announceTTL = 2 * time.Minute
)

// announced is one pod in an announcement.
type announced struct {
	Pod  string       `json:"pod"` // namespace/name
	UID  string       `json:"uid"`
	IPs  []netip.Addr `json:"ips"`
	Node string       `json:"-"`
	at   time.Time
}

// announcement is the ConfigMap's payload (data key "pods").
type announcement struct {
	Node string      `json:"node"`
	Pods []announced `json:"pods"`
}

// announceName is the ConfigMap of a node: a node name is up to 253
// characters, and so is a ConfigMap name, so long ones are hashed.
func announceName(node string) string {
	const prefix = "idcni-announce-"
	if len(prefix)+len(node) <= 253 {
		return prefix + node
	}
	h := sha256.Sum256([]byte(node))
	return prefix + hex.EncodeToString(h[:16])
}

// announcer keeps this node's announcement, off the writer loop: an API
// call must not hold the maps' writes, and a CNI ADD never waits for it.
// The writer loop adds and removes pods; run writes the ConfigMap.
type announcer struct {
	a    *Agent
	name string

	mu   sync.Mutex
	want map[string]announced // by pod key
	kick chan struct{}
}

func newAnnouncer(a *Agent) *announcer {
	return &announcer{a: a, name: announceName(a.cfg.NodeName), want: map[string]announced{}, kick: make(chan struct{}, 1)}
}

// add announces a registered pod. Without its UID (a plugin older than
// this agent) nothing is announced: the kubelet's status will tell.
func (n *announcer) add(ns, name, uid string, addrs []netip.Addr) {
	if n == nil || uid == "" || len(addrs) == 0 {
		return
	}
	n.mu.Lock()
	n.want[ns+"/"+name] = announced{Pod: ns + "/" + name, UID: uid, IPs: slices.Clone(addrs), at: time.Now()}
	n.mu.Unlock()
	n.poke()
}

// remove takes a pod out, once its status has its addresses or it is gone.
func (n *announcer) remove(podKey string) {
	if n == nil {
		return
	}
	n.mu.Lock()
	_, had := n.want[podKey]
	delete(n.want, podKey)
	n.mu.Unlock()
	if had {
		n.poke()
	}
}

func (n *announcer) poke() {
	select {
	case n.kick <- struct{}{}:
	default:
	}
}

// run writes the ConfigMap whenever the announcement changes, starting
// from an empty one: what an earlier run announced is stale or in the
// status by now.
func (n *announcer) run(ctx context.Context) {
	n.poke()
	expire := time.NewTicker(announceTTL / 4)
	defer expire.Stop()
	var failing bool
	for {
		select {
		case <-ctx.Done():
			return
		case <-n.kick:
		case <-expire.C:
			n.expire()
		}
		if err := n.write(ctx); err != nil {
			if !failing {
				n.a.log.Warn("announcing new pods to other nodes failed; they learn them from the kubelet's status instead", "configmap", n.a.cfg.AnnounceNamespace+"/"+n.name, "err", err)
			}
			failing = true
			n.a.metrics.announceErrors.Inc()
			// Again after a pause, whatever changes meanwhile.
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Second):
			}
			n.poke()
			continue
		}
		failing = false
	}
}

func (n *announcer) expire() {
	n.mu.Lock()
	defer n.mu.Unlock()
	for k, p := range n.want {
		if time.Since(p.at) > announceTTL {
			delete(n.want, k)
		}
	}
}

// write makes the ConfigMap hold the current announcement.
func (n *announcer) write(ctx context.Context) error {
	n.mu.Lock()
	payload := announcement{Node: n.a.cfg.NodeName, Pods: make([]announced, 0, len(n.want))}
	for _, p := range n.want {
		payload.Pods = append(payload.Pods, p)
	}
	n.mu.Unlock()
	slices.SortFunc(payload.Pods, func(x, y announced) int { return strings.Compare(x.Pod, y.Pod) })
	body, err := json.Marshal(payload)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	cms := n.a.client.CoreV1().ConfigMaps(n.a.cfg.AnnounceNamespace)
	cm := &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: n.name, Labels: map[string]string{announceLabel: announceValue}},
		Data:       map[string]string{"pods": string(body)},
	}
	_, err = cms.Update(ctx, cm, metav1.UpdateOptions{FieldManager: "idcni-agent"})
	if apierrors.IsNotFound(err) {
		_, err = cms.Create(ctx, cm, metav1.CreateOptions{FieldManager: "idcni-agent"})
	}
	if err != nil {
		return fmt.Errorf("write configmap %s/%s: %w", n.a.cfg.AnnounceNamespace, n.name, err)
	}
	n.a.metrics.announced.Set(float64(len(payload.Pods)))
	return nil
}

// syncAnnouncement takes another node's announcement into the index of
// announced pods (the writer loop), and resyncs each pod it changed.
func (a *Agent) syncAnnouncement(name string) error {
	var pods []announced
	if cm, err := a.announcements.ConfigMaps(a.cfg.AnnounceNamespace).Get(name); err == nil {
		var p announcement
		if err := json.Unmarshal([]byte(cm.Data["pods"]), &p); err != nil {
			a.log.Warn("ignoring an announcement that does not parse", "configmap", name, "err", err)
		} else if p.Node != a.cfg.NodeName && name == announceName(p.Node) {
			// A ConfigMap speaks for the node its name says, and for
			// no other.
			for _, x := range p.Pods {
				x.Node = p.Node
				pods = append(pods, x)
			}
		}
	} else if !apierrors.IsNotFound(err) {
		return err
	}
	before := a.announcedBy[name]
	now := make(map[string]announced, len(pods))
	for _, p := range pods {
		now[p.Pod] = p
	}
	if len(now) == 0 {
		delete(a.announcedBy, name)
	} else {
		a.announcedBy[name] = now
	}
	changed := map[string]bool{}
	for k, p := range before {
		if q, ok := now[k]; !ok || q.UID != p.UID || !slices.Equal(q.IPs, p.IPs) {
			changed[k] = true
			delete(a.announcedPod, k)
		}
	}
	for k, p := range now {
		if q, ok := before[k]; !ok || q.UID != p.UID || !slices.Equal(q.IPs, p.IPs) {
			changed[k] = true
		}
		a.announcedPod[k] = p
	}
	for k := range changed {
		ns, podName, _ := strings.Cut(k, "/")
		if err := a.syncPod(ns, podName); err != nil {
			return err
		}
	}
	return nil
}

// withAnnouncedAddrs gives a pod of another node whose status has no
// address yet the addresses its node announced: only with the pod's UID,
// for a pod scheduled on the announcing node, inside that node's pod
// CIDRs.
func (a *Agent) withAnnouncedAddrs(pod *corev1.Pod) *corev1.Pod {
	if len(podAddrs(pod)) > 0 {
		return pod
	}
	p, ok := a.announcedPod[pod.Namespace+"/"+pod.Name]
	if !ok || p.UID != string(pod.UID) || p.Node != pod.Spec.NodeName || len(p.IPs) == 0 {
		return pod
	}
	node, err := a.nodes.Get(p.Node)
	if err != nil {
		return pod
	}
	cidrs := podCIDRsOf(node)
	for _, ip := range p.IPs {
		if !slices.ContainsFunc(cidrs, func(c netip.Prefix) bool { return c.Contains(ip) }) {
			return pod
		}
	}
	return withStatusAddrs(pod, p.IPs)
}
