package cluster

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// The propagation race (issue 12): a pod on node B that talks before node
// A's agent has learned its address is world to A, and A's pods that admit
// only B's pod's identity drop its packets. MeasurePropagation measures the
// window as an application sees it: clients on B, each pinging an isolated
// server on A (whose policy admits them) every 10 ms from the moment their
// container starts; the time of the first reply is when A first admitted
// the client. Times come from the container log's timestamps (the runtime
// stamps each line as it is written) and from a watch of the pods.

// PropagationResult is one run of MeasurePropagation.
type PropagationResult struct {
	Pods int
	// FromReady is pod Ready (as a watch saw it) to the first packet A
	// admitted; negative when A admitted the pod before it was Ready.
	FromReady Quantiles
	// FromStart is the client's container start (its first log line) to
	// the first packet A admitted: how long a pod that talks at once is
	// dropped.
	FromStart Quantiles
	// Dropped counts clients whose first ping was not answered (the
	// first reply's sequence number is above 0): each such client lost
	// packets to the race.
	Dropped int
}

// Quantiles summarise latencies.
type Quantiles struct{ P50, P99, Max time.Duration }

func quantiles(d []time.Duration) Quantiles {
	s := slices.Clone(d)
	slices.Sort(s)
	return Quantiles{P50: quantile(s, 0.50), P99: quantile(s, 0.99), Max: s[len(s)-1]}
}

func (q Quantiles) String() string {
	ms := func(d time.Duration) string { return fmt.Sprintf("%.0f ms", d.Seconds()*1000) }
	return fmt.Sprintf("p50 %s, p99 %s, max %s", ms(q.P50), ms(q.P99), ms(q.Max))
}

func (r PropagationResult) String() string {
	return fmt.Sprintf("%d pods: Ready -> first packet admitted %s; container start -> admitted %s; %d of %d lost their first packet",
		r.Pods, r.FromReady, r.FromStart, r.Dropped, r.Pods)
}

// MeasurePropagation runs n clients on node client against a server on
// node server, parallel at a time.
func (c *Cluster) MeasurePropagation(ctx context.Context, server, client string, n, parallel int) (PropagationResult, error) {
	var res PropagationResult
	ns, err := c.tempNamespace(ctx, "propagation")
	if err != nil {
		return res, err
	}
	defer c.deleteNamespace(context.WithoutCancel(ctx), ns)
	pods := c.Client.CoreV1().Pods(ns)

	_, err = c.Client.NetworkingV1().NetworkPolicies(ns).Create(ctx, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "server"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "server"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{
				PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "client"}},
			}}}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return res, err
	}
	srv := SleepPod("server", map[string]string{"app": "server"})
	srv.Spec.NodeName = server
	if _, err := pods.Create(ctx, srv, metav1.CreateOptions{}); err != nil {
		return res, err
	}
	var target string
	if err := c.poll(ctx, "the server pod", func(ctx context.Context) error {
		p, err := pods.Get(ctx, "server", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if !podReady(p) || p.Status.PodIP == "" {
			return fmt.Errorf("not ready")
		}
		target = p.Status.PodIP
		return nil
	}); err != nil {
		return res, err
	}

	w, err := c.watchPods(ctx, ns)
	if err != nil {
		return res, err
	}
	defer w.stop()
	var mu sync.Mutex
	ready := map[string]time.Time{}
	go func() {
		for p := range w.pods {
			if podReady(p) {
				mu.Lock()
				if _, ok := ready[p.Name]; !ok {
					ready[p.Name] = time.Now()
				}
				mu.Unlock()
			}
		}
	}()

	var fromReady, fromStart []time.Duration
	for first := 0; first < n; first += parallel {
		var names []string
		for i := first; i < min(n, first+parallel); i++ {
			p := SleepPod(fmt.Sprintf("c%03d", i), map[string]string{"role": "client"})
			p.Spec.NodeName = client
			// The first reply ends the ping; its line and "start" carry
			// the runtime's timestamps.
			p.Spec.Containers[0].Command = []string{"sh", "-c",
				"echo start; ping -i 0.01 -W 1 " + target + " | grep -m1 'bytes from'; sleep 86400"}
			if _, err := pods.Create(ctx, p, metav1.CreateOptions{}); err != nil {
				return res, err
			}
			names = append(names, p.Name)
		}
		for _, name := range names {
			var start, admitted time.Time
			var seq int
			err := c.poll(ctx, "the first reply to "+name, func(ctx context.Context) error {
				var err error
				start, admitted, seq, err = c.firstReply(ctx, ns, name)
				return err
			})
			if err != nil {
				return res, err
			}
			mu.Lock()
			r, ok := ready[name]
			mu.Unlock()
			if !ok {
				if err := c.poll(ctx, name+" Ready", func(context.Context) error {
					mu.Lock()
					defer mu.Unlock()
					if r, ok = ready[name]; !ok {
						return fmt.Errorf("not ready")
					}
					return nil
				}); err != nil {
					return res, err
				}
			}
			fromReady = append(fromReady, admitted.Sub(r))
			fromStart = append(fromStart, admitted.Sub(start))
			if seq > 0 {
				res.Dropped++
			}
		}
		// The next batch meets a quiet node.
		zero := int64(0)
		for _, name := range names {
			_ = pods.Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
		}
	}
	res.Pods = len(fromReady)
	res.FromReady, res.FromStart = quantiles(fromReady), quantiles(fromStart)
	return res, nil
}

// firstReply reads a client's log: the time of its "start" line, of its
// first reply, and that reply's sequence number.
func (c *Cluster) firstReply(ctx context.Context, ns, name string) (start, reply time.Time, seq int, err error) {
	body, err := c.Client.CoreV1().Pods(ns).GetLogs(name, &corev1.PodLogOptions{Timestamps: true}).DoRaw(ctx)
	if err != nil {
		return start, reply, 0, err
	}
	sc := bufio.NewScanner(strings.NewReader(string(body)))
	for sc.Scan() {
		ts, line, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			continue
		}
		t, perr := time.Parse(time.RFC3339Nano, ts)
		if perr != nil {
			continue
		}
		switch {
		case line == "start":
			start = t
		case strings.Contains(line, "bytes from"):
			// "64 bytes from 10.13.1.5: seq=12 ttl=63 time=0.120 ms"
			if _, s, ok := strings.Cut(line, "seq="); ok {
				f, _, _ := strings.Cut(s, " ")
				_, _ = fmt.Sscan(f, &seq)
			}
			reply = t
		}
	}
	if start.IsZero() || reply.IsZero() {
		return start, reply, 0, fmt.Errorf("no reply yet")
	}
	return start, reply, seq, nil
}

// SetAgentArg adds (value non-empty) or removes an agent flag on the
// DaemonSet and waits for the rollout: benchmarks compare settings on one
// cluster in one run.
func (c *Cluster) SetAgentArg(ctx context.Context, flag, value string) error {
	dss := c.Client.AppsV1().DaemonSets(agentNamespace)
	ds, err := dss.Get(ctx, agentDaemonSet, metav1.GetOptions{})
	if err != nil {
		return err
	}
	i := slices.IndexFunc(ds.Spec.Template.Spec.Containers, func(c corev1.Container) bool { return c.Name == agentContainer })
	if i < 0 {
		return fmt.Errorf("DaemonSet %s/%s has no container %s", agentNamespace, agentDaemonSet, agentContainer)
	}
	args := slices.DeleteFunc(slices.Clone(ds.Spec.Template.Spec.Containers[i].Args), func(a string) bool {
		return a == flag || strings.HasPrefix(a, flag+"=")
	})
	if value != "" {
		args = append(args, flag+"="+value)
	}
	patch, err := json.Marshal([]map[string]any{{"op": "replace", "path": fmt.Sprintf("/spec/template/spec/containers/%d/args", i), "value": args}})
	if err != nil {
		return err
	}
	if _, err := dss.Patch(ctx, agentDaemonSet, types.JSONPatchType, patch, metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("set %s on the agent: %w", flag, err)
	}
	return c.WaitAgentRollout(ctx)
}
