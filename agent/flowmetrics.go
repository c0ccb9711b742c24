package agent

import (
	"net/netip"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/idcni/idcni/bpf"
)

// flowCollector reads, at scrape time, what the datapath counted of each
// endpoint's conntrack table and of the events it did not send. A pod
// whose table is full forgets its own idle flows; a node whose events are
// lost or held back has a monitor with gaps: both must be seen.
type flowCollector struct{ a *Agent }

var (
	ctEntriesDesc = prometheus.NewDesc("idcni_conntrack_entries", "Entries in an endpoint's conntrack table of the flows it opened or admitted, expired ones included (slot 0: the node's shared table).",
		[]string{"slot", "pod", "table"}, nil)
	ctCapacityDesc = prometheus.NewDesc("idcni_conntrack_capacity", "Size of each of an endpoint's two conntrack tables.",
		[]string{"slot", "pod"}, nil)
	ctCreatedDesc = prometheus.NewDesc("idcni_conntrack_flows_created_total", "Flows added to an endpoint's conntrack table.",
		[]string{"slot", "pod", "table"}, nil)
	ctEvictedDesc = prometheus.NewDesc("idcni_conntrack_evictions_total", "Flows added to a full conntrack table, each pushing out the endpoint's least recently used flow of that table.",
		[]string{"slot", "pod", "table"}, nil)
	eventsNotSentDesc = prometheus.NewDesc("idcni_events_not_sent_total", "Verdict events the datapath did not send, by reason and cause (ring-full: the reader fell behind; rate-limit: the endpoint's budget of events per second was spent).",
		[]string{"reason", "cause"}, nil)
)

func (c *flowCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{ctEntriesDesc, ctCapacityDesc, ctCreatedDesc, ctEvictedDesc, eventsNotSentDesc} {
		ch <- d
	}
}

func (c *flowCollector) Collect(ch chan<- prometheus.Metric) {
	if usage, err := c.a.dp.ConntrackUsage(); err == nil {
		pods := c.podsBySlot()
		for _, u := range usage {
			slot := strconv.FormatUint(uint64(u.Slot), 10)
			ch <- prometheus.MustNewConstMetric(ctCapacityDesc, prometheus.GaugeValue, float64(u.Capacity), slot, pods[u.Slot])
			for table, t := range map[string]bpf.TableUsage{"opened": u.Opened, "admitted": u.Admitted} {
				labels := []string{slot, pods[u.Slot], table}
				ch <- prometheus.MustNewConstMetric(ctEntriesDesc, prometheus.GaugeValue, float64(t.Entries), labels...)
				ch <- prometheus.MustNewConstMetric(ctCreatedDesc, prometheus.CounterValue, float64(t.Created), labels...)
				ch <- prometheus.MustNewConstMetric(ctEvictedDesc, prometheus.CounterValue, float64(t.Evicted), labels...)
			}
		}
	}
	if losses, err := c.a.dp.EventLosses(); err == nil {
		for _, r := range bpf.Reasons() {
			l := losses[r]
			ch <- prometheus.MustNewConstMetric(eventsNotSentDesc, prometheus.CounterValue, float64(l.Lost), r.String(), "ring-full")
			ch <- prometheus.MustNewConstMetric(eventsNotSentDesc, prometheus.CounterValue, float64(l.Suppressed), r.String(), "rate-limit")
		}
	}
}

// podsBySlot names the pod ("ns/name") behind each conntrack slot, as far
// as the agent knows the pods behind the endpoints' addresses.
func (c *flowCollector) podsBySlot() map[uint32]string {
	out := map[uint32]string{}
	eps, err := c.a.dp.Endpoints()
	if err != nil {
		return out
	}
	for _, ep := range eps {
		if ep.ConntrackSlot == 0 {
			continue
		}
		for _, addr := range []netip.Addr{ep.IPv4, ep.IPv6} {
			if name := c.a.events.podAt(addr); name != "" {
				out[ep.ConntrackSlot] = name
				break
			}
		}
	}
	return out
}
