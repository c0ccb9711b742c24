package agent

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/idcni/idcni/bpf"
)

// metrics are the agent's Prometheus metrics. Packet counters are read
// from the datapath at scrape time, so they cost nothing between scrapes.
type metrics struct {
	reg              *prometheus.Registry
	synced           prometheus.Gauge
	identities       prometheus.Gauge
	endpoints        prometheus.Gauge
	ipcache          prometheus.Gauge
	policyEntries    prometheus.Gauge
	reconcileSeconds prometheus.Histogram
	flushSeconds     prometheus.Histogram
	addSeconds       prometheus.Histogram
	reconcileErrors  prometheus.Counter
	events           *prometheus.CounterVec
	writes           *prometheus.CounterVec
	revisionBumps    prometheus.Counter
	policiesRefused  prometheus.Gauge
	overflow         prometheus.Gauge
	auditDrift       *prometheus.CounterVec
	nodeRoutes       *prometheus.GaugeVec
	tunnelPeers      prometheus.Gauge
	announced        prometheus.Gauge
	announceErrors   prometheus.Counter
	noRoute          prometheus.Gauge
	masquerade       prometheus.Gauge
	attachRepairs    prometheus.Counter
	unattached       prometheus.Gauge
	svc              *serviceMetrics // nil without a service map
}

func newMetrics(a *Agent) *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	f := func(name, help string) prometheus.GaugeOpts {
		return prometheus.GaugeOpts{Namespace: "idcni", Name: name, Help: help}
	}
	m.synced = prometheus.NewGauge(f("informers_synced", "1 once the informer caches are synced."))
	m.identities = prometheus.NewGauge(f("identities", "Identities with rules or isolation in the policy map."))
	m.endpoints = prometheus.NewGauge(f("endpoints", "Local endpoints in the endpoint map."))
	m.ipcache = prometheus.NewGauge(f("ipcache_entries", "Entries in the ipcache (pods of the cluster and CIDRs)."))
	m.policyEntries = prometheus.NewGauge(f("policy_map_entries", "Entries in the policy map."))
	buckets := prometheus.ExponentialBuckets(0.0005, 2, 14)
	m.reconcileSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: "idcni", Name: "reconcile_latency_seconds",
		Help: "Time from a change in the cluster to its enforcement in the maps.", Buckets: buckets})
	m.flushSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: "idcni", Name: "map_write_seconds",
		Help: "Time to compute and write the desired state to the maps.", Buckets: buckets})
	m.addSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: "idcni", Name: "endpoint_add_seconds",
		Help: "Time the agent spends inside a CNI ADD.", Buckets: buckets})
	m.reconcileErrors = prometheus.NewCounter(prometheus.CounterOpts{Namespace: "idcni", Name: "reconcile_errors_total",
		Help: "Reconciles that failed and were retried."})
	m.events = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "idcni", Name: "verdict_events_total",
		Help: "Verdict events read from the datapath."}, []string{"verdict", "reason"})
	m.writes = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "idcni", Name: "map_writes_total",
		Help: "Map entries the agent wrote or deleted, by map and operation."}, []string{"map", "op"})
	m.revisionBumps = prometheus.NewCounter(prometheus.CounterOpts{Namespace: "idcni", Name: "policy_revision_bumps_total",
		Help: "Policy revision changes: writes that could revoke what established flows rely on, so every flow was checked again."})
	m.policiesRefused = prometheus.NewGauge(f("policies_refused", "NetworkPolicies left out because their rules do not fit the policy map (each has a PolicyRefused Event)."))
	m.overflow = prometheus.NewGauge(f("map_overflow", "Subjects and ipcache entries waiting for room in a full map."))
	m.auditDrift = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "idcni", Name: "audit_drift_total",
		Help: "Map entries the periodic audit found different from what the agent wrote, and repaired, by map."}, []string{"map"})
	m.nodeRoutes = prometheus.NewGaugeVec(f("node_routes", "Routes the agent programmed to other nodes' pod CIDRs, by way: direct (through the node's InternalIP on a connected subnet) or vxlan (through the tunnel)."), []string{"via"})
	m.tunnelPeers = prometheus.NewGauge(f("tunnel_peers", "Nodes the VXLAN tunnel has an FDB entry for."))
	m.noRoute = prometheus.NewGauge(f("node_routes_missing", "Other nodes' pod CIDRs with no route: --routing-mode=direct and the node's InternalIP is not on a connected subnet, no tunnel endpoint (no InternalIP of the tunnel's family on either end), a pod CIDR that overlaps this node's, or a route the agent did not make holds the destination."))
	m.announced = prometheus.NewGauge(f("announced_pods", "New local pods whose addresses this node announces to the others until the kubelet writes them into the pods' status."))
	m.announceErrors = prometheus.NewCounter(prometheus.CounterOpts{Namespace: "idcni", Name: "announce_errors_total",
		Help: "Failed writes of this node's announcement ConfigMap (other nodes then learn new pods from the kubelet's status only)."})
	m.masquerade = prometheus.NewGauge(f("masquerade", "1 while the agent's nftables table masquerades pod traffic leaving the cluster (--masquerade), 0 when off."))
	m.attachRepairs = prometheus.NewCounter(prometheus.CounterOpts{Namespace: "idcni", Name: "attach_repairs_total",
		Help: "Local pods whose host veth the audit found without the current programs attached, and attached them to again."})
	m.unattached = prometheus.NewGauge(f("endpoints_unattached", "Local pods whose host veth has no programs attached and the last audit could not attach them: their traffic is not policed."))
	m.reg.MustRegister(m.attachRepairs, m.unattached, m.masquerade, m.announced, m.announceErrors, m.nodeRoutes, m.tunnelPeers, m.noRoute, m.synced, m.identities, m.endpoints, m.ipcache, m.policyEntries, m.reconcileSeconds,
		m.flushSeconds, m.addSeconds, m.reconcileErrors, m.events, m.writes, m.revisionBumps, m.policiesRefused, m.overflow, m.auditDrift,
		&datapathCollector{a: a}, &flowCollector{a: a}, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// registerNFT adds the counters of the agent's nftables table, read at
// scrape time.
func (m *metrics) registerNFT(t *nftTable) {
	m.reg.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "idcni", Name: "masqueraded_connections_total",
			Help: "Connections from this node's pods masqueraded to the node's address as they left the cluster (nftables table inet idcni)."},
			func() float64 { return t.counter(counterMasqueraded) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "idcni", Name: "tunnel_rejected_packets_total",
			Help: "UDP packets to the tunnel port (--tunnel-port) from an address that is no Node's, dropped (nftables table inet idcni)."},
			func() float64 { return t.counter(counterTunnelRejects) }))
}

// observeFlush records one flush: what it wrote, how long it took, how
// long the oldest change in it waited, and the sizes it left.
func (m *metrics) observeFlush(f flushStats, took, waited time.Duration, s *nodeState) {
	m.flushSeconds.Observe(took.Seconds())
	m.reconcileSeconds.Observe(waited.Seconds())
	for _, w := range []struct {
		m, op string
		n     int
	}{{"ipcache", "put", f.ipcPut}, {"ipcache", "delete", f.ipcDel}, {"endpoints", "put", f.epPut}, {"endpoints", "delete", f.epDel}, {"policy", "put", f.polPut}, {"policy", "delete", f.polDel}} {
		if w.n > 0 {
			m.writes.WithLabelValues(w.m, w.op).Add(float64(w.n))
		}
	}
	m.overflow.Set(float64(len(f.overflow) + f.ipcFull))
	m.ipcache.Set(float64(len(s.ipc)))
	m.endpoints.Set(float64(len(s.eps)))
	m.identities.Set(float64(len(s.flags)))
	m.policyEntries.Set(float64(len(s.pol)))
}

func (m *metrics) observeEvent(ev bpf.Event) {
	verdict := "allow"
	if !ev.Allowed {
		verdict = "drop"
	}
	m.events.WithLabelValues(verdict, ev.Reason.String()).Inc()
}

// datapathCollector reads the per-CPU packet counters on every scrape.
type datapathCollector struct{ a *Agent }

var (
	packetsDesc = prometheus.NewDesc("idcni_packets_total", "Packets decided by the datapath, by verdict, reason and direction.",
		[]string{"verdict", "reason", "direction"}, nil)
	bytesDesc = prometheus.NewDesc("idcni_bytes_total", "Bytes decided by the datapath, by verdict, reason and direction.",
		[]string{"verdict", "reason", "direction"}, nil)
	statsDesc = prometheus.NewDesc("idcni_datapath_errors_total", "Datapath failures: conntrack or fragment inserts that failed, events lost.",
		[]string{"error"}, nil)
)

func (c *datapathCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- packetsDesc
	ch <- bytesDesc
	ch <- statsDesc
}

func (c *datapathCollector) Collect(ch chan<- prometheus.Metric) {
	counters, err := c.a.dp.Counters()
	if err == nil {
		for k, v := range counters {
			verdict := "allow"
			if k.Reason.Drop() {
				verdict = "drop"
			}
			ch <- prometheus.MustNewConstMetric(packetsDesc, prometheus.CounterValue, float64(v.Packets), verdict, k.Reason.String(), k.Scope.String())
			ch <- prometheus.MustNewConstMetric(bytesDesc, prometheus.CounterValue, float64(v.Bytes), verdict, k.Reason.String(), k.Scope.String())
		}
	}
	stats, err := c.a.dp.Stats()
	if err == nil {
		for s, v := range stats {
			ch <- prometheus.MustNewConstMetric(statsDesc, prometheus.CounterValue, float64(v), s.String())
		}
	}
}

// Deadlines of the metrics listener. A scrape of a large node takes well
// under a second to render; the write deadline leaves room for a slow
// network, not for a client that stopped reading.
const (
	metricsReadHeaderTimeout = 5 * time.Second
	metricsReadTimeout       = 10 * time.Second
	metricsWriteTimeout      = 30 * time.Second
	metricsIdleTimeout       = 60 * time.Second
)

// maxHeaderBytes bounds a request's headers on both listeners; the
// requests they serve carry a handful of short headers.
const maxHeaderBytes = 16 << 10

// serveMetrics serves /metrics, /healthz (the process answers) and /readyz
// (caches synced, maps written) for the DaemonSet's probes.
func (a *Agent) serveMetrics() (*http.Server, error) {
	l, err := net.Listen("tcp", a.cfg.MetricsAddr)
	if err != nil {
		return nil, fmt.Errorf("listen for metrics on %s: %w", a.cfg.MetricsAddr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(a.metrics.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-a.ready:
			_, _ = w.Write([]byte("ok\n"))
		default:
			http.Error(w, "informer caches not synced", http.StatusServiceUnavailable)
		}
	})
	srv := &http.Server{
		Handler: mux,
		// The agent runs in the host network, so everything that can
		// reach the node (every pod that may talk to the host) can
		// reach this port. Without deadlines, a client that sends a
		// request a byte at a time, or never reads the answer, holds
		// a connection and a goroutine forever (slowloris). Prometheus
		// and the kubelet's probes send one small GET and read at once.
		ReadHeaderTimeout: metricsReadHeaderTimeout,
		ReadTimeout:       metricsReadTimeout,
		WriteTimeout:      metricsWriteTimeout,
		IdleTimeout:       metricsIdleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
	}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("metrics listener stopped", "err", err)
		}
	}()
	return srv, nil
}
