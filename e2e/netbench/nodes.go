package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/identity"
)

// Across two nodes (-nodes): two network namespaces stand in for two
// nodes, joined by a veth pair (the underlay, MTU 1500), each with its
// own idcni datapath (own BPF root) and one pod, the client on node A and
// the server on node B. Six configurations run the same pods:
//
//   - bare-direct: no programs; each node routes the other's pod range
//     through the other's underlay address.
//   - idcni-direct: the programs on both host veths, the pods named by
//     identity on both nodes (each node's ipcache knows the remote pod),
//     and a 10-rule allow-list; routes as bare-direct.
//   - bare-vxlan: no programs; the pod ranges routed through the kernel's
//     vxlan device exactly as the agent makes it (agent/tunnel.go: VNI
//     157, UDP 8472, nolearning, MAC derived from the underlay address, a
//     permanent neighbour and FDB entry, an onlink route).
//   - idcni-vxlan: the programs and identities of idcni-direct over the
//     tunnel of bare-vxlan.
//   - iptables-direct, iptables-vxlan: no programs; each node's FORWARD
//     chain jumps to a stateful allow-list of the same 10 rules, laid out
//     as kube-router lays out a pod's firewall (iptablesRules): the
//     kernel's own way of enforcing the policy on both nodes, the
//     baseline that, unlike bare, also keeps state for every connection.
//
// The idcni configurations run with the fast path as the agent sets it up
// (agent/fastpath.go: the peer's pod range in remote_cidrs, from_net on
// the device its route names), so neither node forwards the pods'
// packets; with -stack, idcni-direct-stack and idcni-vxlan-stack run the
// same programs without it, through both nodes' forwarding, as before
// the fast path.
//
// The pods' MTU is 1450 in all of them, as the agent's CNI config gives
// them in auto and vxlan mode (uplink 1500 less 50), so direct and VXLAN
// move the same segments. The tunnel is made here with ip(8), not by the
// agent (which needs an apiserver): its parameters are the agent's, and
// e2e's TestNodesVXLAN checks the agent makes it so.

// benchNode is one node netns of the cross-node run.
type benchNode struct {
	name     string
	path     string
	underlay netip.Addr
	pods     netip.Prefix // its pod range
	net      *network
	dp       *bpf.Datapath
	floor    *floorPath
	pod      *pod
	created  bool
}

func inNode(path string, fn func() error) error {
	return ns.WithNetNSPath(path, func(ns.NetNS) error { return fn() })
}

func (n *benchNode) ip(ctx context.Context, args ...string) error {
	_, err := runCmd(ctx, "", "ip", append([]string{"-n", n.name}, args...)...)
	return err
}

// tunnelMAC is the agent's MAC of the vxlan device of the node with IPv4
// underlay address a (agent/tunnel.go).
func tunnelMAC(a netip.Addr) string {
	b := a.As4()
	return fmt.Sprintf("0e:69:%02x:%02x:%02x:%02x", b[0], b[1], b[2], b[3])
}

const crossMTU = 1450

func crossNode(ctx context.Context, o *options, binDir, tmp, suffix string, cl *cleanups) error {
	subnet, err := pickSubnet()
	if err != nil {
		return err
	}
	// The run's /24: pods of A in .0/26, of B in .64/26, the underlay
	// in .252/30; all of it inside the two namespaces.
	base := subnet.Addr().As4()
	at := func(i byte) netip.Addr { b := base; b[3] = i; return netip.AddrFrom4(b) }
	nodes := []*benchNode{
		{name: "idnb-node-a-" + suffix, underlay: at(253), pods: netip.PrefixFrom(at(0), 26)},
		{name: "idnb-node-b-" + suffix, underlay: at(254), pods: netip.PrefixFrom(at(64), 26)},
	}
	a, b := nodes[0], nodes[1]
	for i, n := range nodes {
		n.path = "/run/netns/" + n.name
		if _, err := runCmd(ctx, "", "ip", "netns", "add", n.name); err != nil {
			return err
		}
		n.created = true
		cl.push("node netns "+n.name, func() error {
			_, err := runCmd(context.Background(), "", "ip", "netns", "del", n.name)
			return err
		})
		if err := n.ip(ctx, "link", "set", "lo", "up"); err != nil {
			return err
		}
		dir := filepath.Join(tmp, n.name)
		if n.net, err = newNetwork(binDir, dir, fmt.Sprintf("%s-%d", suffix, i), n.pods); err != nil {
			return err
		}
		if err := n.net.withMTU(crossMTU); err != nil {
			return err
		}
		cl.push("pins under "+n.net.bpfRoot, func() error { return bpf.Unpin(n.net.bpfRoot) })
	}
	if err := a.ip(ctx, "link", "add", "up0", "type", "veth", "peer", "name", "up0", "netns", b.name); err != nil {
		return err
	}
	for _, n := range nodes {
		if err := n.ip(ctx, "addr", "add", netip.PrefixFrom(n.underlay, 30).String(), "dev", "up0"); err != nil {
			return err
		}
		if err := n.ip(ctx, "link", "set", "up0", "up"); err != nil {
			return err
		}
		// The tunnel, as the agent makes it; unused until a route names it.
		if err := n.ip(ctx, "link", "add", "idcni_vxlan", "address", tunnelMAC(n.underlay), "mtu", fmt.Sprint(crossMTU), "type", "vxlan",
			"id", "157", "dstport", "8472", "local", n.underlay.String(), "nolearning"); err != nil {
			return err
		}
		if err := n.ip(ctx, "link", "set", "idcni_vxlan", "up"); err != nil {
			return err
		}
	}
	for _, pair := range [][2]*benchNode{{a, b}, {b, a}} {
		n, peer := pair[0], pair[1]
		if err := n.ip(ctx, "neigh", "add", peer.underlay.String(), "lladdr", tunnelMAC(peer.underlay), "dev", "idcni_vxlan", "nud", "permanent"); err != nil {
			return err
		}
		if _, err := runCmd(ctx, "", "bridge", "-n", n.name, "fdb", "add", tunnelMAC(peer.underlay), "dev", "idcni_vxlan", "dst", peer.underlay.String(), "self", "permanent"); err != nil {
			return err
		}
	}
	// Datapaths and pods, the plugin run inside each node.
	for _, n := range nodes {
		if err := inNode(n.path, func() error { return n.net.status(ctx) }); err != nil {
			return fmt.Errorf("CNI STATUS in %s: %w", n.name, err)
		}
		if n.dp, err = bpf.Open(n.net.bpfRoot); err != nil {
			return err
		}
		cl.push("datapath handle of "+n.name, n.dp.Close)
		if n.floor, err = newFloor(); err != nil {
			return err
		}
		cl.push("floor programs of "+n.name, n.floor.Close)
		p := newPod()
		n.pod = p
		cl.push("pod "+p.name, func() error { return inNode(n.path, func() error { return n.net.release(p) }) })
		if err := p.createNetns(ctx); err != nil {
			return err
		}
		if err := inNode(n.path, func() error {
			if err := n.net.addLoopback(ctx, p); err != nil {
				return err
			}
			_, err := n.net.add(ctx, p)
			return err
		}); err != nil {
			return err
		}
	}
	if err := nameCrossPods(a, b); err != nil {
		return err
	}
	for _, n := range nodes {
		want, err := idcniPolicy(10, o.port).Compile()
		if err != nil {
			return err
		}
		if err := n.dp.ApplyPolicy(want); err != nil {
			return err
		}
	}
	logf("nodes: client %s on %s (underlay %s) -> server %s:%d on %s (underlay %s)", a.pod.addr, a.name, a.underlay, b.pod.addr, o.port, b.name, b.underlay)

	configs := slices.Clone(crossDefault)
	if o.stackPath {
		configs = append(configs, crossStack...)
	}
	if o.floor {
		configs = append(configs, crossFloor...)
	}
	if len(o.cross) > 0 {
		configs = o.cross
	}
	w := workload{
		clientNS: a.pod.nsPath, serverNS: b.pod.nsPath,
		server: netip.AddrPortFrom(b.pod.addr, uint16(o.port)),
		warmup: o.warmup, duration: o.duration, clientCPU: -1, serverCPU: -1, sched: o.sched,
	}
	switch o.pin {
	case "same":
		w.clientCPU, w.serverCPU = 0, 0
	case "split":
		w.clientCPU, w.serverCPU = 0, min(1, runtime.NumCPU()-1)
	}
	samples := map[string][]float64{}
	total, done := o.count*len(configs)*len(o.metrics), 0
	for round := range o.count {
		for i := range configs {
			c := configs[(i+round)%len(configs)]
			if err := enterCross(ctx, o, c, a, b); err != nil {
				return fmt.Errorf("enter %s: %w", c, err)
			}
			for _, m := range o.metrics {
				v, err := measureCross(ctx, c, m, w, a, b)
				if err != nil {
					return fmt.Errorf("%s %s (round %d): %w", c, m.name, round+1, err)
				}
				samples[c+" "+m.name] = append(samples[c+" "+m.name], v)
				done++
				logf("[%d/%d] round %d %-15s %-6s %12.4g %s  (load %.1f)", done, total, round+1, c, m.name, v, m.unit, loadavg())
			}
		}
	}
	printCross(os.Stdout, o, configs, samples)
	if o.jsonPath != "" {
		raw, err := json.MarshalIndent(map[string]any{"configs": configs, "samples": samples, "mtu": crossMTU}, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(o.jsonPath, raw, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// withMTU gives the network's pods mtu.
func (n *network) withMTU(mtu int) error {
	var plugin map[string]any
	if err := json.Unmarshal(n.confList.Plugins[0].Bytes, &plugin); err != nil {
		return fmt.Errorf("plugin config: %w", err)
	}
	delete(plugin, "cniVersion")
	delete(plugin, "name")
	plugin["mtu"] = mtu
	b, err := json.Marshal(map[string]any{"cniVersion": "1.1.0", "name": n.name, "plugins": []any{plugin}})
	if err != nil {
		return err
	}
	n.confList, err = libcni.ConfListFromBytes(b)
	return err
}

// nameCrossPods names both pods on both nodes: the endpoint entry of the
// local pod's host veth, and the ipcache entries of both (the remote pod
// as the agent's ipcache has every pod of the cluster).
func nameCrossPods(a, b *benchNode) error {
	ids := map[*benchNode]identity.ID{a: clientID, b: serverID}
	for _, n := range []*benchNode{a, b} {
		for peer, id := range ids {
			if err := n.dp.PutIPCache(netip.PrefixFrom(peer.pod.addr, 32), id); err != nil {
				return err
			}
		}
		var idx int
		if err := inNode(n.path, func() error {
			var err error
			idx, err = ifindex(n.pod.hostIf)
			return err
		}); err != nil {
			return err
		}
		ep, ok, err := n.dp.Endpoint(idx)
		if err != nil {
			return err
		}
		if !ok || ep.IPv4 != n.pod.addr {
			return fmt.Errorf("the plugin left no endpoint entry for %s on %s", n.pod.name, n.name)
		}
		ep.Identity = ids[n]
		if err := n.dp.PutEndpoint(idx, ep); err != nil {
			return err
		}
	}
	return nil
}

// enterCross switches the pods to configuration c: programs attached or
// not, the nodes' iptables allow-list in place or not, routes directly
// or through the tunnel, then checks that a port no rule allows is
// refused (bare) or dropped (idcni, iptables).
func enterCross(ctx context.Context, o *options, c string, a, b *benchNode) error {
	k := kindOf(c)
	for _, n := range []*benchNode{a, b} {
		if err := n.floor.detach(); err != nil {
			return fmt.Errorf("take the floor off %s: %w", n.name, err)
		}
	}
	for _, pair := range [][2]*benchNode{{a, b}, {b, a}} {
		n, peer := pair[0], pair[1]
		if err := n.forwardFilter(ctx, k.iptables, iptablesRules(crossChain, 10, a.pod.addr, b.pod.addr, o.port)); err != nil {
			return fmt.Errorf("iptables in %s: %w", n.name, err)
		}
		route := []string{"route", "replace", peer.pods.String(), "via", peer.underlay.String(), "dev", "up0"}
		if k.vxlan {
			route = []string{"route", "replace", peer.pods.String(), "via", peer.underlay.String(), "dev", "idcni_vxlan", "onlink"}
		}
		if err := n.ip(ctx, route...); err != nil {
			return err
		}
		// The fast path as the agent sets it up: the peer's pod range in
		// remote_cidrs, from_net on the device its route names.
		dev, other := "up0", "idcni_vxlan"
		if k.vxlan {
			dev, other = other, dev
		}
		var ranges []netip.Prefix
		if k.fastPath {
			ranges = []netip.Prefix{peer.pods}
		}
		if err := n.dp.SetRemoteCIDRs(ranges); err != nil {
			return err
		}
		err := inNode(n.path, func() error {
			if err := n.dp.DetachNet(other); err != nil {
				return err
			}
			if !k.fastPath {
				if err := n.dp.DetachNet(dev); err != nil {
					return err
				}
			}
			if !k.idcni {
				if err := n.dp.Detach(n.pod.hostIf); err != nil || !k.floor {
					return err
				}
				lps, err := n.dp.LocalPods()
				if err != nil {
					return err
				}
				lp, ok := lps[n.pod.addr]
				if !ok {
					return fmt.Errorf("the plugin left no local pod entry for %s", n.pod.addr)
				}
				return n.floor.attach(n.pod.addr, lp, dev, peer.pods)
			}
			if err := n.dp.AttachNet(dev); err != nil {
				return err
			}
			return n.dp.Attach(n.pod.hostIf)
		})
		if err != nil {
			return err
		}
		if _, err := n.dp.FlushConntrack(a.pod.addr, b.pod.addr); err != nil {
			return err
		}
	}
	blocked := netip.AddrPortFrom(b.pod.addr, uint16(o.port+1))
	got, err := probe(a.pod.nsPath, blocked, 300*time.Millisecond)
	if err != nil {
		return err
	}
	want := "refused"
	if k.idcni || k.iptables {
		want = "timeout"
	}
	if got != want {
		return fmt.Errorf("%s: a connection to the unlisted port %s ended in %q, want %q", c, blocked, got, want)
	}
	return nil
}

// measureCross runs one workload and checks the path: the programs of
// both nodes counted packets (idcni) or none (bare), node A's tunnel
// sent packets (vxlan) or none (direct), and the nodes' IP forwarding
// forwarded the pods' packets (bare) or next to none of them (idcni, the
// fast path: a few may take the stack while a neighbour resolves).
func measureCross(ctx context.Context, c string, m metric, w workload, a, b *benchNode) (float64, error) {
	forwarded := func() (uint64, error) {
		var sum uint64
		for _, n := range []*benchNode{a, b} {
			if err := inNode(n.path, func() error {
				v, err := forwDatagrams()
				sum += v
				return err
			}); err != nil {
				return 0, err
			}
		}
		return sum, nil
	}
	f0, err := forwarded()
	if err != nil {
		return 0, err
	}
	count := func() (passed uint64, tunnel uint64, err error) {
		for _, n := range []*benchNode{a, b} {
			cs, err := n.dp.Counters()
			if err != nil {
				return 0, 0, err
			}
			for k, v := range cs {
				if !k.Reason.Drop() {
					passed += v.Packets
				}
			}
		}
		err = inNode(a.path, func() error {
			l, err := netlink.LinkByName("idcni_vxlan")
			if err != nil {
				return err
			}
			tunnel = l.Attrs().Statistics.TxPackets
			return nil
		})
		return passed, tunnel, err
	}
	p0, t0, err := count()
	if err != nil {
		return 0, err
	}
	floorPassed := func() (out [2]uint64, err error) {
		for i, n := range []*benchNode{a, b} {
			if out[i], err = n.floor.passed(); err != nil {
				return out, err
			}
		}
		return out, nil
	}
	fl0, err := floorPassed()
	if err != nil {
		return 0, err
	}
	k := kindOf(c)
	var acc0 [2]uint64 // what the allow-lists of a and b accepted before
	if k.iptables {
		for i, n := range []*benchNode{a, b} {
			if acc0[i], err = n.accepted(ctx); err != nil {
				return 0, err
			}
		}
	}
	s, err := m.run(ctx, w)
	if err != nil {
		return 0, err
	}
	if s.Ops == 0 {
		return 0, errors.New("no traffic got through in the measured window")
	}
	p1, t1, err := count()
	if err != nil {
		return 0, err
	}
	if k.idcni != (p1 > p0) {
		return 0, fmt.Errorf("%s: the datapaths passed %d packets: the programs are not where the configuration says", c, p1-p0)
	}
	fl1, err := floorPassed()
	if err != nil {
		return 0, err
	}
	for i, n := range []*benchNode{a, b} {
		if k.floor != (fl1[i] > fl0[i]) {
			return 0, fmt.Errorf("%s: the floor programs of %s passed %d packets: the programs are not where the configuration says", c, n.name, fl1[i]-fl0[i])
		}
	}
	if k.iptables {
		for i, n := range []*benchNode{a, b} {
			got, err := n.accepted(ctx)
			if err != nil {
				return 0, err
			}
			if got <= acc0[i] {
				return 0, fmt.Errorf("%s: %s's FORWARD allow-list accepted no packet: the path is not what the configuration says", c, n.name)
			}
		}
	}
	if k.vxlan != (t1-t0 > 100) {
		return 0, fmt.Errorf("%s: node A's idcni_vxlan sent %d packets: the path is not what the configuration says", c, t1-t0)
	}
	f1, err := forwarded()
	if err != nil {
		return 0, err
	}
	if k.skipsForwarding() == (f1-f0 > 100) {
		return 0, fmt.Errorf("%s: the nodes' IP forwarding forwarded %d packets: the fast path is not what the configuration says", c, f1-f0)
	}
	return s.Value, nil
}

// forwDatagrams is the calling thread's network namespace's count of IP
// packets forwarded (Ip: ForwDatagrams in /proc/net/snmp).
func forwDatagrams() (uint64, error) {
	raw, err := os.ReadFile("/proc/thread-self/net/snmp")
	if err != nil {
		return 0, err
	}
	var names []string
	for line := range strings.Lines(string(raw)) {
		fields := strings.Fields(line)
		if len(fields) == 0 || fields[0] != "Ip:" {
			continue
		}
		if names == nil {
			names = fields
			continue
		}
		for i, name := range names {
			if name == "ForwDatagrams" && i < len(fields) {
				var v uint64
				_, err := fmt.Sscan(fields[i], &v)
				return v, err
			}
		}
	}
	return 0, errors.New("/proc/net/snmp has no Ip: ForwDatagrams")
}

// -nodes' configurations: crossDefault, crossStack with -stack,
// crossFloor with -floor; crossConfigs all of them, for -configs.
var (
	crossDefault = []string{"bare-direct", "idcni-direct", "iptables-direct", "bare-vxlan", "idcni-vxlan", "iptables-vxlan"}
	crossStack   = []string{"idcni-direct-stack", "idcni-vxlan-stack"}
	crossFloor   = []string{"floor-direct", "floor-vxlan"}
	crossConfigs = slices.Concat(crossDefault, crossStack, crossFloor)
)

// crossKind is what a -nodes configuration's name says; kindOf is the
// one place that reads it.
type crossKind struct {
	idcni, iptables, floor bool // whose programs or rules run; none: bare
	vxlan                  bool // through the tunnel, not routed directly
	fastPath               bool // idcni's fast path (remote_cidrs, from_net)
}

func kindOf(c string) crossKind {
	k := crossKind{
		idcni:    strings.HasPrefix(c, "idcni"),
		iptables: strings.HasPrefix(c, "iptables"),
		floor:    strings.HasPrefix(c, "floor"),
		vxlan:    strings.Contains(c, "vxlan"),
	}
	k.fastPath = k.idcni && !strings.HasSuffix(c, "-stack")
	return k
}

// skipsForwarding: the pods' packets pass neither node's IP forwarding
// (idcni's fast path, and the floor, which forwards the same way).
func (k crossKind) skipsForwarding() bool { return k.fastPath || k.floor }

// crossBare is the bare configuration of c's path: what c's ratio is to.
func crossBare(c string) string {
	if kindOf(c).vxlan {
		return "bare-vxlan"
	}
	return "bare-direct"
}

// crossChain is the chain of the iptables configurations in each node's
// netns.
const crossChain = "IDNB-FWD"

// forwardFilter puts the node's allow-list chain (crossChain) in place
// with rules (on), or takes it away (off, also when it is not there).
// Either way the node's netfilter conntrack entries go: each
// configuration starts as if the previous one had never run.
func (n *benchNode) forwardFilter(ctx context.Context, on bool, rules string) error {
	var err error
	if on {
		err = n.chain().install(ctx, rules)
	} else {
		err = n.chain().remove(ctx)
	}
	if err != nil {
		return err
	}
	return inNode(n.path, func() error {
		if err := netlink.ConntrackTableFlush(netlink.ConntrackTable); err != nil {
			return fmt.Errorf("flush conntrack: %w", err)
		}
		return nil
	})
}

// chain is the node's allow-list chain, in its netns, which is the run's
// own: FORWARD jumps to it for everything.
func (n *benchNode) chain() fwdChain {
	return fwdChain{name: crossChain, jump: []string{"-j", crossChain}, netns: n.name}
}

// accepted is how many packets the node's allow-list accepted so far.
func (n *benchNode) accepted(ctx context.Context) (uint64, error) {
	rules, err := n.chain().rules(ctx)
	if err != nil {
		return 0, err
	}
	var sum uint64
	for _, r := range rules {
		if r.accepts() {
			sum += r.packets
		}
	}
	return sum, nil
}

func printCross(out io.Writer, o *options, configs []string, samples map[string][]float64) {
	fmt.Fprintf(out, "\nacross two nodes (pod MTU %d): median of %d runs of %s (after %s warm-up); x = ratio to the bare configuration of the same path (paired: the median of each round's ratio); [min-max]\n\n", crossMTU, o.count, o.duration, o.warmup)
	fmt.Fprintf(out, "%-18s", "config")
	for _, m := range o.metrics {
		fmt.Fprintf(out, " %50s", m.name+" ("+m.unit+")")
	}
	fmt.Fprintln(out)
	for _, c := range configs {
		fmt.Fprintf(out, "%-18s", c)
		bare := crossBare(c)
		for _, m := range o.metrics {
			v := samples[c+" "+m.name]
			med := median(v)
			cell := fmt.Sprintf("%.4g [%.4g-%.4g]", med, slices.Min(v), slices.Max(v))
			if c != bare {
				cell += fmt.Sprintf(" %.3fx (paired %.3fx)", med/median(samples[bare+" "+m.name]), paired(v, samples[bare+" "+m.name]))
			}
			fmt.Fprintf(out, " %50s", cell)
		}
		fmt.Fprintln(out)
	}
}
