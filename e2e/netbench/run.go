package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/idcni/idcni/bpf"
)

func run(ctx context.Context, o *options) (err error) {
	for _, tool := range []string{"ip", "iptables", "iptables-restore"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s not found in PATH (make deps installs iproute2 and iptables)", tool)
		}
	}
	cl := &cleanups{}
	defer func() {
		if cerr := cl.run(); cerr != nil {
			logf("cleanup incomplete: %v", cerr)
			err = errors.Join(err, cerr)
		} else {
			fmt.Fprintln(os.Stderr, "netbench: cleaned up")
		}
	}()

	rep := newReport(o)
	tmp, err := os.MkdirTemp("", "idcni-netbench-")
	if err != nil {
		return err
	}
	cl.push("temporary directory "+tmp, func() error { return os.RemoveAll(tmp) })

	binDir := o.binDir
	if binDir == "" {
		binDir = filepath.Join(tmp, "bin")
		logf("building idcni, host-local and loopback into %s", binDir)
		if err := buildPlugins(ctx, binDir); err != nil {
			return err
		}
	}
	for _, name := range []string{"idcni", "host-local", "loopback"} {
		if _, err := os.Stat(filepath.Join(binDir, name)); err != nil {
			return fmt.Errorf("plugin %s: %w", name, err)
		}
	}
	rep.noteSource(ctx, filepath.Join(binDir, "idcni"))

	suffix := randHex(8)
	if o.nodes {
		return crossNode(ctx, o, binDir, tmp, suffix, cl)
	}
	subnet, err := pickSubnet()
	if err != nil {
		return err
	}
	n, err := newNetwork(binDir, tmp, suffix, subnet)
	if err != nil {
		return err
	}
	cl.push("pins under "+n.bpfRoot, func() error { return bpf.Unpin(n.bpfRoot) })
	cl.push("leftover links of "+n.name, n.deleteLeftLinks)
	rep.Params.Network, rep.Params.Subnet, rep.Params.BPFRoot = n.name, subnet.String(), n.bpfRoot
	logf("network %s, subnet %s, bpf root %s", n.name, subnet, n.bpfRoot)

	// The first STATUS loads and pins the datapath: once per node, not
	// part of any pod's ADD.
	t0 := time.Now()
	if err := n.status(ctx); err != nil {
		return fmt.Errorf("CNI STATUS (loads the datapath): %w", err)
	}
	rep.DatapathLoadMS = ms(time.Since(t0))
	dp, err := bpf.Open(n.bpfRoot)
	if err != nil {
		return err
	}
	cl.push("datapath handle", dp.Close)

	if !o.skipCNI {
		if err := cniLatency(ctx, o, n, cl, rep); err != nil {
			return err
		}
	}
	if !o.skipTraf {
		if err := traffic(ctx, o, n, dp, suffix, cl, rep); err != nil {
			return err
		}
	}
	rep.finish()
	rep.print(os.Stdout)
	if o.jsonPath != "" {
		if err := rep.writeJSON(o.jsonPath); err != nil {
			return err
		}
		logf("wrote %s", o.jsonPath)
	}
	return nil
}

func logf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "netbench: "+format+"\n", a...)
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// cniLatency ADDs o.cniPods pods one after another, then DELs them all,
// timing each call. No agent runs: pods start unresolved, as in the seed.
func cniLatency(ctx context.Context, o *options, n *network, cl *cleanups, rep *report) error {
	pods := make([]*pod, o.cniPods)
	for i := range pods {
		p := newPod()
		pods[i] = p
		cl.push("pod "+p.name, func() error { return n.release(p) })
		if err := p.createNetns(ctx); err != nil {
			return err
		}
	}
	logf("CNI: ADD of %d pods, one after another", len(pods))
	c := &cniReport{Pods: len(pods), Load1Start: loadavg()}
	for _, p := range pods {
		if err := ctx.Err(); err != nil {
			return err
		}
		took, err := n.add(ctx, p)
		if err != nil {
			return err
		}
		c.AddMS = append(c.AddMS, ms(took))
	}
	logf("CNI: DEL of %d pods", len(pods))
	for _, p := range pods {
		if err := ctx.Err(); err != nil {
			return err
		}
		took, err := n.del(p)
		if err != nil {
			return err
		}
		c.DelMS = append(c.DelMS, ms(took))
	}
	for _, p := range pods {
		if err := p.deleteNetns(); err != nil {
			return err
		}
	}
	c.Load1End = loadavg()
	rep.CNI = c
	return nil
}

// traffic creates the two pods and measures every configuration, round
// after round, rotating the order so no configuration always goes first.
func traffic(ctx context.Context, o *options, n *network, dp *bpf.Datapath, suffix string, cl *cleanups, rep *report) error {
	client, server := newPod(), newPod()
	for _, p := range []*pod{client, server} {
		cl.push("pod "+p.name, func() error { return n.release(p) })
		if err := p.createNetns(ctx); err != nil {
			return err
		}
		if err := n.addLoopback(ctx, p); err != nil {
			return err
		}
		if _, err := n.add(ctx, p); err != nil {
			return err
		}
	}
	chain := "IDCNI-BENCH-" + strings.ToUpper(suffix)
	b := &bench{o: o, dp: dp, client: client, server: server, subnet: n.subnet, bpfRoot: n.bpfRoot,
		chain: fwdChain{name: chain, jump: []string{"-s", n.subnet.String(), "-d", n.subnet.String(), "-j", chain}}}
	b.noteFilterTable(ctx)
	cl.push("iptables chain "+chain, b.removeIptables)
	if err := b.setIdentities(); err != nil {
		return err
	}
	rep.Pods = map[string]podInfo{
		"client": {Netns: client.name, Addr: client.addr, HostIf: client.hostIf, Identity: uint32(clientID)},
		"server": {Netns: server.name, Addr: server.addr, HostIf: server.hostIf, Identity: uint32(serverID)},
	}
	logf("pods: client %s (%s, identity %d) -> server %s:%d (%s, identity %d)",
		client.addr, client.name, clientID, server.addr, o.port, server.name, serverID)

	var configs []config
	if o.configs["bare"] {
		configs = append(configs, config{Name: "bare"})
	}
	for _, name := range []string{"idcni", "idcni-routed", "iptables"} {
		for _, r := range o.rules {
			if o.configs[name] {
				configs = append(configs, config{Name: name, Rules: r})
			}
		}
	}
	w := workload{
		clientNS: client.nsPath, serverNS: server.nsPath,
		server: netip.AddrPortFrom(server.addr, uint16(o.port)),
		warmup: o.warmup, duration: o.duration,
		clientCPU: -1, serverCPU: -1, sched: o.sched,
	}
	switch o.pin {
	case "same":
		w.clientCPU, w.serverCPU = 0, 0
	case "split":
		w.clientCPU, w.serverCPU = 0, min(1, runtime.NumCPU()-1)
	}
	if len(o.services) > 0 {
		return b.services(ctx, w, suffix, cl, rep)
	}
	rep.Configs = configs
	total := o.count * len(configs) * len(o.metrics)
	done := 0
	for round := range o.count {
		for i := range configs {
			c := configs[(i+round)%len(configs)]
			info, err := b.enter(ctx, c)
			if err != nil {
				return fmt.Errorf("enter %s: %w", c, err)
			}
			for _, m := range o.metrics {
				rec, err := b.sample(ctx, c, m, w, round, info)
				if err != nil {
					return err
				}
				rep.Samples = append(rep.Samples, rec)
				done++
				logf("[%d/%d] round %d %-16s %-6s %12.4g %s  (load %.1f, steal %.1f%%)", done, total, round+1, c, m.name, rec.Value, m.unit, rec.Load1, rec.StealPct)
			}
		}
	}
	if o.profile {
		rows, err := b.profile(ctx, configs, w, n.bpfRoot)
		if err != nil {
			return err
		}
		rep.Profile = rows
	}
	return b.removeIptables()
}

// sample is one measured window of round (from 0), with the
// configuration's info among its checks.
func (b *bench) sample(ctx context.Context, c config, m metric, w workload, round int, info map[string]any) (sampleRecord, error) {
	rec, err := b.measure(ctx, c, m, w)
	if err != nil {
		return rec, fmt.Errorf("%s %s (round %d): %w", c, m.name, round+1, err)
	}
	rec.Round = round + 1
	for k, v := range info {
		rec.Checks[k] = v
	}
	return rec, nil
}

// noteDrops records and logs the packets the datapath dropped during a
// window, by reason, when it dropped any.
func noteDrops(rec sampleRecord, c config, m metric, n uint64, before, after map[string]uint64) {
	if n == 0 {
		return
	}
	why := map[string]uint64{}
	for k, v := range after {
		if v > before[k] {
			why[k] = v - before[k]
		}
	}
	rec.Checks["datapath_drops_by_reason"] = why
	logf("note: %s %s: the datapath dropped %d packets during the run: %v", c, m.name, n, why)
}

// measure runs one workload once and checks that the traffic went where the
// configuration says: through the programs for idcni, through the chain's
// last rule for iptables, past no program for bare.
func (b *bench) measure(ctx context.Context, c config, m metric, w workload) (rec sampleRecord, err error) {
	rec = sampleRecord{Config: c.String(), Metric: m.name, Unit: m.unit, Checks: map[string]any{}}
	rec.Load1 = loadavg()
	tot0, steal0 := cpuTimes()
	defer func() {
		if tot1, steal1 := cpuTimes(); tot1 > tot0 {
			rec.StealPct = 100 * float64(steal1-steal0) / float64(tot1-tot0)
		}
	}()
	p0, d0, drops0, err := b.counters()
	if err != nil {
		return rec, err
	}
	tx0, err := txPackets(b.server.hostIf)
	if err != nil {
		return rec, err
	}
	var hits0 uint64
	if c.Name == "iptables" {
		if hits0, err = b.realRuleHits(ctx); err != nil {
			return rec, err
		}
	}
	var svc0 svcBefore
	if c.Services > 0 {
		if svc0, err = b.svcBeforeRun(ctx, c); err != nil {
			return rec, err
		}
	}
	s, err := m.run(ctx, w)
	if err != nil {
		return rec, err
	}
	rec.Value, rec.Ops, rec.ElapsedNS = s.Value, s.Ops, s.Elapsed.Nanoseconds()
	if s.Ops == 0 {
		return rec, errors.New("no traffic got through in the measured window")
	}
	p1, d1, drops1, err := b.counters()
	if err != nil {
		return rec, err
	}
	if c.Services > 0 {
		tx1, err := txPackets(b.server.hostIf)
		if err != nil {
			return rec, err
		}
		rec.Checks["datapath_passed_packets"] = p1 - p0
		rec.Checks["datapath_dropped_packets"] = d1 - d0
		noteDrops(rec, c, m, d1-d0, drops0, drops1)
		return rec, b.svcCheck(ctx, c, svc0, rec, p1-p0, tx1-tx0)
	}
	switch c.Name {
	case "bare":
		if p1 != p0 || d1 != d0 {
			return rec, fmt.Errorf("bare: the datapath counted %d packets: programs are still on the path", p1-p0+d1-d0)
		}
	case "idcni", "idcni-routed":
		// Direct delivery hands the client's packets to the server past
		// its host veth; routing sends them out through it.
		tx1, err := txPackets(b.server.hostIf)
		if err != nil {
			return rec, err
		}
		rec.Checks["server_host_veth_tx_packets"] = tx1 - tx0
		if routed := tx1-tx0 > (p1-p0)/10; routed != (c.Name == "idcni-routed") {
			return rec, fmt.Errorf("%s: the server's host veth sent %d packets while the programs passed %d: the path is not what the configuration says", c, tx1-tx0, p1-p0)
		}
		rec.Checks["datapath_passed_packets"] = p1 - p0
		rec.Checks["datapath_dropped_packets"] = d1 - d0
		if p1 == p0 {
			return rec, errors.New("idcni: the datapath counted no packets: programs are not on the path")
		}
		noteDrops(rec, c, m, d1-d0, drops0, drops1)
	case "iptables":
		hits1, err := b.realRuleHits(ctx)
		if err != nil {
			return rec, err
		}
		rec.Checks["real_rule_packets"] = hits1 - hits0
		if hits1 == hits0 {
			return rec, errors.New("iptables: no packet reached the real rule: the chain is not on the path")
		}
	}
	return rec, nil
}

// loadavg is the 1-minute load average.
func loadavg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return -1
	}
	var l float64
	if _, err := fmt.Sscanf(string(b), "%f", &l); err != nil {
		return -1
	}
	return l
}

// txPackets is the transmit counter of a host link.
func txPackets(name string) (uint64, error) {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return 0, fmt.Errorf("read statistics of %s: %w", name, err)
	}
	if l.Attrs().Statistics == nil {
		return 0, fmt.Errorf("no statistics for %s", name)
	}
	return l.Attrs().Statistics.TxPackets, nil
}
