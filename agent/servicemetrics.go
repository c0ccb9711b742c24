package agent

import "github.com/prometheus/client_golang/prometheus"

// serviceMetrics are the service map's gauges and counters, set by the
// writer loop after each write (the state is the loop's alone, so a
// scrape does not read it).
type serviceMetrics struct {
	frontends   prometheus.Gauge
	backends    prometheus.Gauge
	waiting     prometheus.Gauge
	writeErrors *prometheus.CounterVec
	writes      *prometheus.CounterVec
}

func (m *metrics) registerServices() {
	g := func(name, help string) prometheus.Gauge {
		return prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "idcni", Name: name, Help: help})
	}
	sm := &serviceMetrics{
		frontends: g("service_frontends", "Service frontends (ClusterIP, port, protocol) in the service map: pods' flows to them are translated to a backend."),
		backends:  g("service_backends", "Backends of all frontends in the service map (an endpoint counts once per frontend it serves)."),
		waiting:   g("service_frontends_waiting", "Service frontends waiting for room in a full service map (each Service has a ServiceNotTranslated Event)."),
		writeErrors: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "idcni", Name: "service_map_write_errors_total",
			Help: "Service map writes that failed and wait for a retry, by cause: full (no room) or error."}, []string{"cause"}),
	}
	sm.writes = m.writes
	m.reg.MustRegister(sm.frontends, sm.backends, sm.waiting, sm.writeErrors)
	m.svc = sm
}

// observeServices records one write of the service map and the sizes it
// left.
func (m *metrics) observeServices(s *serviceSync, f svcFlush) {
	sm := m.svc
	if sm == nil {
		return
	}
	if f.put > 0 {
		sm.writes.WithLabelValues("services", "put").Add(float64(f.put))
	}
	if f.deleted > 0 {
		sm.writes.WithLabelValues("services", "delete").Add(float64(f.deleted))
	}
	if f.refused > 0 {
		sm.writeErrors.WithLabelValues("full").Add(float64(f.refused))
	}
	if f.failed > 0 {
		sm.writeErrors.WithLabelValues("error").Add(float64(f.failed))
	}
	backends := 0
	for _, v := range s.written {
		backends += len(v.Backends)
	}
	sm.frontends.Set(float64(len(s.written)))
	sm.backends.Set(float64(backends))
	sm.waiting.Set(float64(len(s.full)))
}
