package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// maxRules keeps the policy (two map entries per rule) inside the policy
// map's 65536 entries.
const maxRules = 30000

// Identities of the two pods and the ranges the filler rules use: manual
// identities (256-65535) that no pod of this run has.
const (
	clientID      identity.ID = 1001
	serverID      identity.ID = 1002
	fillerSrcBase identity.ID = 10000 // fillerSrcBase + i/fillerFanout
	fillerDstBase identity.ID = 40000 // fillerDstBase + i%fillerFanout
	fillerFanout              = 200
)

// config is one way of running the same two pods.
type config struct {
	Name  string `json:"name"` // bare, idcni, idcni-routed, iptables; with -services: see services.go
	Rules int    `json:"rules"`
	// Services is the number of Services of a -services configuration.
	Services int `json:"services,omitempty"`
}

func (c config) String() string {
	if c.Services > 0 {
		return fmt.Sprintf("%s/%d", c.Name, c.Services)
	}
	if c.Rules == 0 {
		return c.Name
	}
	return fmt.Sprintf("%s/%d", c.Name, c.Rules)
}

// filler is the i-th filler rule: between two identities (or addresses) of
// no pod of this run, on a port that is not the server's.
type filler struct {
	src, dst     identity.ID
	srcIP, dstIP netip.Addr
	port         uint16
}

func fillerRule(i, serverPort int) filler {
	a, b := i/fillerFanout, i%fillerFanout
	port := uint16(1024 + i%30000)
	if int(port) == serverPort {
		port++
	}
	return filler{
		src: fillerSrcBase + identity.ID(a), dst: fillerDstBase + identity.ID(b),
		// 198.18.0.0/15 is the benchmarking range (RFC 2544): nothing
		// here sends from or to it.
		srcIP: netip.AddrFrom4([4]byte{198, 18, byte(a >> 8), byte(a)}),
		dstIP: netip.AddrFrom4([4]byte{198, 19, byte(b >> 8), byte(b)}),
		port:  port,
	}
}

// idcniPolicy is the allow-list with n rules as policyctl would write it:
// the real rule (client -> server, TCP, server port) and n-1 fillers.
func idcniPolicy(n, serverPort int) *policy.Set {
	s := &policy.Set{}
	for i := range n - 1 {
		f := fillerRule(i, serverPort)
		s.Rules = append(s.Rules, policy.ManualRule{Action: policy.Allow, Src: f.src, Dst: f.dst,
			Proto: policy.ProtoTCP, Ports: policy.PortRange{Lo: f.port, Hi: f.port}}.Expand()...)
	}
	s.Rules = append(s.Rules, policy.ManualRule{Action: policy.Allow, Src: clientID, Dst: serverID,
		Proto: policy.ProtoTCP, Ports: policy.PortRange{Lo: uint16(serverPort), Hi: uint16(serverPort)}}.Expand()...)
	return s
}

// bench holds what the configurations act on.
type bench struct {
	o      *options
	dp     *bpf.Datapath
	client *pod
	server *pod
	subnet netip.Prefix
	chain  fwdChain // iptables chain of this run
	ipt    bool     // the jump and chain exist
	// nftFilter: iptables is the nf_tables flavour and its filter table
	// did not exist before the run. iptables-nft creates it with a
	// FORWARD base chain and leaves it when the last rule goes; that
	// empty chain would still put a netfilter hook on every forwarded
	// packet of the bare and idcni runs after the first iptables run.
	nftFilter bool
	// locals are the pods' local pod entries as the plugin wrote them:
	// idcni keeps them (direct delivery), idcni-routed removes them.
	locals map[netip.Addr]bpf.LocalPod
	// svc is the -services run's state (services.go).
	svc     *svcState
	bpfRoot string
}

// isIdcni reports whether c runs idcni's programs.
func (c config) isIdcni() bool {
	switch c.Name {
	case "idcni", "idcni-routed", "idcni-podip", "idcni-clusterip":
		return true
	}
	return false
}

// setIdentities names the two pods as endpointctl add would: endpoint
// entry of the host veth and ipcache entry of the address.
func (b *bench) setIdentities() error {
	for _, p := range []struct {
		pod *pod
		id  identity.ID
	}{{b.client, clientID}, {b.server, serverID}} {
		idx, err := ifindex(p.pod.hostIf)
		if err != nil {
			return err
		}
		ep, ok, err := b.dp.Endpoint(idx)
		if err != nil {
			return err
		}
		if !ok || ep.IPv4 != p.pod.addr {
			return fmt.Errorf("the plugin left no endpoint entry for %s (%s, ifindex %d)", p.pod.name, p.pod.addr, idx)
		}
		if err := b.dp.PutIPCache(netip.PrefixFrom(p.pod.addr, 32), p.id); err != nil {
			return err
		}
		ep.Identity = p.id
		if err := b.dp.PutEndpoint(idx, ep); err != nil {
			return err
		}
	}
	all, err := b.dp.LocalPods()
	if err != nil {
		return err
	}
	b.locals = map[netip.Addr]bpf.LocalPod{}
	for _, p := range []*pod{b.client, b.server} {
		lp, ok := all[p.addr]
		if !ok {
			return fmt.Errorf("the plugin left no local pod entry for %s (%s)", p.name, p.addr)
		}
		b.locals[p.addr] = lp
	}
	return nil
}

// setLocal makes the two pods deliver to each other directly, or through
// the node's routing.
func (b *bench) setLocal(direct bool) error {
	for a, lp := range b.locals {
		var err error
		if direct {
			err = b.dp.PutLocalPod(a, lp)
		} else {
			err = b.dp.DeleteLocalPod(a, lp.Ifindex)
		}
		if err != nil {
			return err
		}
	}
	// Flows remember whether their far end was a local pod.
	_, err := b.dp.FlushConntrack(b.client.addr, b.server.addr)
	return err
}

// applyPolicy writes the n-rule policy and checks that the map holds
// exactly it, fillers included. It returns the number of policy map
// entries.
func (b *bench) applyPolicy(n int) (int, error) {
	want, err := idcniPolicy(n, b.o.port).Compile()
	if err != nil {
		return 0, err
	}
	if err := b.dp.ApplyPolicy(want); err != nil {
		return 0, err
	}
	have, err := b.dp.Policy()
	if err != nil {
		return 0, err
	}
	if len(have.Entries) != len(want.Entries) {
		return 0, fmt.Errorf("policy map has %d entries after writing %d", len(have.Entries), len(want.Entries))
	}
	for k, e := range want.Entries {
		if h, ok := have.Entries[k]; !ok || !h.Equal(e) {
			return 0, fmt.Errorf("policy map lacks %+v", k)
		}
	}
	// The last filler and the real rule, spelled out once more.
	if n > 1 {
		f := fillerRule(n-2, b.o.port)
		k := policy.Key{Subject: f.dst, Peer: f.src, Direction: policy.Ingress, Proto: policy.ProtoTCP}
		if e, ok := have.Entries[k]; !ok || len(e.Allow) != 1 || e.Allow[0].Lo != f.port {
			return 0, fmt.Errorf("filler rule %d (%s -> %s tcp/%d) is not in the policy map", n-2, f.src, f.dst, f.port)
		}
	}
	k := policy.Key{Subject: serverID, Peer: clientID, Direction: policy.Ingress, Proto: policy.ProtoTCP}
	if _, ok := have.Entries[k]; !ok {
		return 0, errors.New("the client -> server rule is not in the policy map")
	}
	return len(have.Entries), nil
}

// enter switches the pods to configuration c.
func (b *bench) enter(ctx context.Context, c config) (map[string]any, error) {
	info := map[string]any{}
	switch c.Name {
	case "bare":
		if err := b.removeIptables(); err != nil {
			return nil, err
		}
		if err := b.detach(); err != nil {
			return nil, err
		}
	case "idcni", "idcni-routed":
		if err := b.removeIptables(); err != nil {
			return nil, err
		}
		if err := b.setLocal(c.Name == "idcni"); err != nil {
			return nil, err
		}
		entries, err := b.applyPolicy(c.Rules)
		if err != nil {
			return nil, fmt.Errorf("write %d rules: %w", c.Rules, err)
		}
		info["policy_map_entries"] = entries
		for _, p := range []*pod{b.client, b.server} {
			if err := b.dp.Attach(p.hostIf); err != nil {
				return nil, err
			}
			if ok, err := b.dp.Attached(p.hostIf); err != nil || !ok {
				return nil, fmt.Errorf("programs not attached to %s after Attach: %v", p.hostIf, err)
			}
		}
	case "iptables":
		if err := b.detach(); err != nil {
			return nil, err
		}
		if err := b.installIptables(ctx, c.Rules); err != nil {
			return nil, err
		}
		info["chain"] = b.chain.name
		info["chain_rules"] = c.Rules + 2
	default:
		return nil, fmt.Errorf("unknown configuration %q", c.Name)
	}
	// Enforcement check: a port no rule allows. Bare must answer with a
	// RST (the path works, nothing filters); the others must drop the SYN.
	blocked := netip.AddrPortFrom(b.server.addr, uint16(b.o.port+1))
	got, err := probe(b.client.nsPath, blocked, 300*time.Millisecond)
	if err != nil {
		return nil, err
	}
	want := "timeout"
	if c.Name == "bare" {
		want = "refused"
	}
	if got != want {
		return nil, fmt.Errorf("%s: a connection to the unlisted port %s ended in %q, want %q: the configuration is not what it claims", c, blocked, got, want)
	}
	info["blocked_port_probe"] = got
	return info, nil
}

func (b *bench) detach() error {
	for _, p := range []*pod{b.client, b.server} {
		if err := b.dp.Detach(p.hostIf); err != nil {
			return err
		}
		if ok, err := b.dp.Attached(p.hostIf); err != nil || ok {
			return fmt.Errorf("programs still attached to %s after Detach (%v)", p.hostIf, err)
		}
	}
	return nil
}

// counters sums the datapath's packet counters into passed and dropped,
// and returns the drops by reason.
func (b *bench) counters() (passed, dropped uint64, drops map[string]uint64, err error) {
	cs, err := b.dp.Counters()
	if err != nil {
		return 0, 0, nil, err
	}
	drops = map[string]uint64{}
	for k, c := range cs {
		if k.Reason.Drop() {
			dropped += c.Packets
			drops[k.Reason.String()+"@"+k.Scope.String()] += c.Packets
		} else {
			passed += c.Packets
		}
	}
	return passed, dropped, drops, nil
}

// iptablesRules renders the chain as kube-router lays out a pod's
// firewall: established flows first, then the allow-list with the real
// rule last, then DROP.
func iptablesRules(chain string, n int, client, server netip.Addr, port int) string {
	var sb strings.Builder
	sb.WriteString("*filter\n")
	fmt.Fprintf(&sb, ":%s - [0:0]\n", chain)
	fmt.Fprintf(&sb, "-A %s -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n", chain)
	for i := range n - 1 {
		f := fillerRule(i, port)
		fmt.Fprintf(&sb, "-A %s -s %s/32 -d %s/32 -p tcp -m tcp --dport %d -j ACCEPT\n", chain, f.srcIP, f.dstIP, f.port)
	}
	fmt.Fprintf(&sb, "-A %s -s %s/32 -d %s/32 -p tcp -m tcp --dport %d -j ACCEPT\n", chain, client, server, port)
	fmt.Fprintf(&sb, "-A %s -j DROP\n", chain)
	sb.WriteString("COMMIT\n")
	return sb.String()
}

// installIptables (re)fills the chain with n rules and makes sure FORWARD
// jumps to it for traffic inside the run's subnet (and only that: the DROP
// must not touch anybody else's forwarded traffic).
func (b *bench) installIptables(ctx context.Context, n int) error {
	b.ipt = true // from here on, cleanup has something to remove
	if err := b.chain.install(ctx, iptablesRules(b.chain.name, n, b.client.addr, b.server.addr, b.o.port)); err != nil {
		return err
	}
	rules, err := b.chain.rules(ctx)
	if err != nil {
		return err
	}
	if len(rules) != n+2 {
		return fmt.Errorf("chain %s has %d rules, want %d", b.chain.name, len(rules), n+2)
	}
	return nil
}

// removeIptables deletes the jump and the chain. It is idempotent and uses
// a fresh context, as it also runs as cleanup after an interrupt.
func (b *bench) removeIptables() error {
	if !b.ipt {
		return nil
	}
	ctx := context.Background()
	if err := b.chain.remove(ctx); err != nil {
		return err
	}
	b.ipt = false
	if err := b.dropEmptyFilterTable(ctx); err != nil {
		return err
	}
	return flushConntrack(b.subnet)
}

// realRuleHits reads the packet counter of the real rule (the last ACCEPT)
// of the chain: packets that went through every filler before it.
func (b *bench) realRuleHits(ctx context.Context) (uint64, error) {
	rules, err := b.chain.rules(ctx)
	if err != nil {
		return 0, err
	}
	want := fmt.Sprintf("-d %s/32", b.server.addr)
	for _, r := range slices.Backward(rules) {
		if strings.Contains(r.spec, want) && r.accepts() {
			return r.packets, nil
		}
	}
	return 0, fmt.Errorf("no rule for %s in %s", b.server.addr, b.chain.name)
}

// fwdChain is an iptables chain the FORWARD chain jumps to: an iptables
// configuration's allow-list, on the host or in a node's netns.
type fwdChain struct {
	name string
	jump []string // the FORWARD rule that jumps to it, past "FORWARD"
	// netns names the network namespace the chain is in; "" is the
	// host's.
	netns string
}

// iptables runs an iptables(8) command (or iptables-restore) where the
// chain is.
func (f fwdChain) iptables(ctx context.Context, stdin string, args ...string) (string, error) {
	if f.netns == "" {
		return runCmd(ctx, stdin, args[0], args[1:]...)
	}
	return runCmd(ctx, stdin, "ip", append([]string{"netns", "exec", f.netns}, args...)...)
}

// install fills the chain with rules (iptables-restore input declaring
// it) and makes FORWARD jump to it, once.
func (f fwdChain) install(ctx context.Context, rules string) error {
	// --noflush keeps every other chain; declaring ours flushes it first.
	if _, err := f.iptables(ctx, rules, "iptables-restore", "-w", "--noflush"); err != nil {
		return err
	}
	if _, err := f.iptables(ctx, "", append([]string{"iptables", "-w", "-C", "FORWARD"}, f.jump...)...); err != nil {
		if _, err := f.iptables(ctx, "", append([]string{"iptables", "-w", "-I", "FORWARD", "1"}, f.jump...)...); err != nil {
			return err
		}
	}
	return nil
}

// remove deletes every jump to the chain and the chain; it is
// idempotent.
func (f fwdChain) remove(ctx context.Context) error {
	for range 100 { // every copy of the jump
		if _, err := f.iptables(ctx, "", append([]string{"iptables", "-w", "-D", "FORWARD"}, f.jump...)...); err != nil {
			break
		}
	}
	if _, err := f.iptables(ctx, "", "iptables", "-w", "-S", f.name); err == nil {
		if _, err := f.iptables(ctx, "", "iptables", "-w", "-F", f.name); err != nil {
			return err
		}
		if _, err := f.iptables(ctx, "", "iptables", "-w", "-X", f.name); err != nil {
			return err
		}
	}
	if _, err := f.iptables(ctx, "", append([]string{"iptables", "-w", "-C", "FORWARD"}, f.jump...)...); err == nil {
		return fmt.Errorf("the jump to %s is still in FORWARD", f.name)
	}
	return nil
}

// chainRule is one rule of a chain with its packet counter.
type chainRule struct {
	spec    string // as iptables -S prints it
	packets uint64
}

func (r chainRule) accepts() bool { return strings.Contains(r.spec, "-j ACCEPT") }

// rules lists the chain's rules, in order, with their packet counters.
func (f fwdChain) rules(ctx context.Context) ([]chainRule, error) {
	out, err := f.iptables(ctx, "", "iptables", "-w", "-S", f.name, "-v")
	if err != nil {
		return nil, err
	}
	var rules []chainRule
	for line := range strings.Lines(out) {
		if !strings.HasPrefix(line, "-A "+f.name+" ") {
			continue // the chain's own declaration
		}
		r := chainRule{spec: strings.TrimSpace(line)}
		i := strings.Index(line, " -c ")
		if i < 0 {
			return nil, fmt.Errorf("no counters in %q", r.spec)
		}
		var bytes uint64
		if _, err := fmt.Sscanf(line[i:], " -c %d %d", &r.packets, &bytes); err != nil {
			return nil, fmt.Errorf("counters of %q: %w", r.spec, err)
		}
		rules = append(rules, r)
	}
	return rules, nil
}

// ifindex returns the index of a host link.
func ifindex(name string) (int, error) {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return 0, fmt.Errorf("look up %s: %w", name, err)
	}
	return l.Attrs().Index, nil
}

// flushConntrack removes the netfilter conntrack entries of the run's
// subnet, which the iptables configurations create and which would
// otherwise linger until they time out.
func flushConntrack(subnet netip.Prefix) error {
	f := &netlink.ConntrackFilter{}
	if err := f.AddIPNet(netlink.ConntrackOrigSrcIP, prefixNet(subnet)); err != nil {
		return err
	}
	if _, err := netlink.ConntrackDeleteFilters(netlink.ConntrackTable, netlink.InetFamily(unix.AF_INET), f); err != nil {
		return fmt.Errorf("flush conntrack entries of %s: %w", subnet, err)
	}
	return nil
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// filterTableState says whether nft's "table ip filter" exists and whether
// it is empty: no rules, and every base chain with policy accept.
func filterTableState(ctx context.Context) (exists, empty bool) {
	return nftTableState(ctx, "filter")
}

// nftTableState is filterTableState for any "table ip NAME".
func nftTableState(ctx context.Context, name string) (exists, empty bool) {
	out, err := runCmd(ctx, "", "nft", "list", "table", "ip", name)
	if err != nil {
		return false, true
	}
	for l := range strings.SplitSeq(out, "\n") {
		l = strings.TrimSpace(l)
		switch {
		case l == "", l == "}", strings.HasPrefix(l, "table ip "+name), strings.HasPrefix(l, "chain ") && strings.HasSuffix(l, "{"):
		case strings.HasPrefix(l, "type "+name+" hook") && strings.HasSuffix(l, "policy accept;"):
		default:
			return true, false
		}
	}
	return true, true
}

// noteFilterTable records, before the first iptables run, whether the
// filter table is ours to remove once it is empty again.
func (b *bench) noteFilterTable(ctx context.Context) {
	out, err := runCmd(ctx, "", "iptables", "--version")
	if err != nil || !strings.Contains(out, "nf_tables") {
		return
	}
	if _, err := runCmd(ctx, "", "nft", "--version"); err != nil {
		return
	}
	exists, _ := filterTableState(ctx)
	b.nftFilter = !exists
}

func (b *bench) dropEmptyFilterTable(ctx context.Context) error {
	if !b.nftFilter {
		return nil
	}
	if exists, empty := filterTableState(ctx); exists && empty {
		if _, err := runCmd(ctx, "", "nft", "delete", "table", "ip", "filter"); err != nil {
			return err
		}
	}
	return nil
}
