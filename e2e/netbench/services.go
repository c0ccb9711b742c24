package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base32"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// Through a ClusterIP (-services, issue 13): the two pods of the main run,
// with idcni's programs attached and the same 10-rule allow-list, and N
// Services of which one (the benchmark's) has the server as its one
// backend. For each N, four configurations:
//
//   - idcni-podip: the client dials the server's pod IP. The N Services
//     are in idcni's service map, as in a cluster with N Services; no
//     flow is translated.
//   - idcni-clusterip: the client dials the benchmark Service's ClusterIP,
//     which idcni translates in from_pod.
//   - kube-proxy-iptables: the benchmark Service is not in idcni's map
//     (the N-1 others stay), so the client's packets reach the node's
//     stack with the ClusterIP, and the N Services are the nat rules
//     kube-proxy's iptables mode writes, loaded with one iptables-restore.
//   - kube-proxy-nftables: the same with the table kube-proxy's nftables
//     mode writes, loaded with one nft -f.
//
// ClusterIPs come from a /18 of 198.18.0.0/16 and the other Services'
// backends from the same /18 of 198.19.0.0/16 (RFC 2544's benchmarking
// range), both blackholed on this node for the run: a packet to them
// that nothing translates dies here, it never takes the default route.

// maxServices keeps every ClusterIP inside the run's /18.
const maxServices = 16000

// svcConfigs are the configurations of -services, in the order they run
// in the first round.
var svcConfigs = []string{"idcni-podip", "idcni-clusterip", "kube-proxy-iptables", "kube-proxy-nftables"}

// svcPort is the benchmark Service's port; its backend is the server's
// -port, so translation changes address and port, as a Service with a
// targetPort does.
const svcPort = 80

// podIPPort is where idcni-podip dials the server: the server's -port
// plus 2 (plus 1 is the port that must stay blocked). Through a ClusterIP
// the server sees the client's tuples to -port, dialled as the ClusterIP:
// on the same port, a SYN of one configuration would meet the server's
// TIME_WAIT sockets of the other's connections, whose sequence numbers and
// timestamps the client drew for another destination, and stall for a
// retransmission.
func podIPPort(serverPort int) int { return serverPort + 2 }

// svcBackendPort is the other Services' backends' port.
const svcBackendPort = 8080

// svcMark is kube-proxy's masquerade mark bit.
const svcMark = "0x4000"

// svcPlan is where the N Services of one step live.
type svcPlan struct {
	n        int
	real     int          // index of the benchmark Service: the middle of kube-proxy's lists
	cips     netip.Prefix // ClusterIPs
	backends netip.Prefix // the other Services' backends
	cluster  netip.Prefix // the pods' range (kube-proxy's --cluster-cidr)
	server   netip.AddrPort
}

// svcEntry is one Service: a frontend and its backends.
type svcEntry struct {
	name     string // namespace/name:port, as kube-proxy's comments say it
	cip      netip.Addr
	port     uint16
	backends []netip.AddrPort
}

func addrAdd(a netip.Addr, n int) netip.Addr {
	b := a.As4()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	v += uint32(n)
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

func (p svcPlan) service(i int) svcEntry {
	// The benchmark Service keeps its ClusterIP from one step to the
	// next (only its place in kube-proxy's lists moves): the server's
	// TIME_WAIT sockets of the last step must meet the same client tuple.
	e := svcEntry{name: fmt.Sprintf("nb/svc-%05d:p", i), cip: addrAdd(p.cips.Addr(), 2+i)}
	if i == p.real {
		e.cip = addrAdd(p.cips.Addr(), 1)
		e.port = svcPort
		e.backends = []netip.AddrPort{p.server}
	} else {
		e.port = uint16(1024 + i%30000)
		e.backends = []netip.AddrPort{netip.AddrPortFrom(addrAdd(p.backends.Addr(), 1+i), svcBackendPort)}
	}
	e.name += fmt.Sprint(e.port)
	return e
}

func (p svcPlan) frontend() netip.AddrPort { return netip.AddrPortFrom(p.service(p.real).cip, svcPort) }

// svcHash is the 13-character name kube-proxy derives from a Service port
// (or endpoint) for its chains: base32 of a SHA-256 of the name.
func svcHash(s string) string {
	h := sha256.Sum256([]byte(s))
	return base32.StdEncoding.EncodeToString(h[:])[:13]
}

// kpChains names the iptables chains of the run: kube-proxy's KUBE-*
// names with the run's own prefix, so no real kube-proxy's chain is
// touched (28 characters at most, iptables' limit).
type kpChains struct{ prefix string }

func (k kpChains) services() string    { return k.prefix + "-SERVICES" }
func (k kpChains) nodeports() string   { return k.prefix + "-NODEPORTS" }
func (k kpChains) postrouting() string { return k.prefix + "-POSTROUTING" }
func (k kpChains) markMasq() string    { return k.prefix + "-MARK-MASQ" }
func (k kpChains) svc(e svcEntry) string {
	return k.prefix + "-SVC-" + svcHash(e.name+"/tcp")
}
func (k kpChains) sep(e svcEntry, b netip.AddrPort) string {
	return k.prefix + "-SEP-" + svcHash(e.name+"/tcp/"+b.String())
}

// jumps are the rules that hook the run's chains into the nat table's
// base chains. kube-proxy's jump unconditionally; these only for the
// run's ClusterIPs and pods, so nobody else's traffic meets the run's
// chains (the benchmark's packets meet the same rules either way).
func (k kpChains) jumps(p svcPlan) [][]string {
	return [][]string{
		{"PREROUTING", "-d", p.cips.String(), "-m", "comment", "--comment", "kubernetes service portals", "-j", k.services()},
		{"OUTPUT", "-d", p.cips.String(), "-m", "comment", "--comment", "kubernetes service portals", "-j", k.services()},
		{"POSTROUTING", "-s", p.cluster.String(), "-m", "comment", "--comment", "kubernetes postrouting rules", "-j", k.postrouting()},
	}
}

func (k kpChains) all(p svcPlan) []string {
	chains := []string{k.services(), k.nodeports(), k.postrouting(), k.markMasq()}
	for i := range p.n {
		e := p.service(i)
		chains = append(chains, k.svc(e))
		for _, b := range e.backends {
			chains = append(chains, k.sep(e, b))
		}
	}
	return chains
}

func quoteArgs(args []string) string {
	out := make([]string, len(args))
	for i, a := range args {
		if strings.ContainsAny(a, " ;") {
			a = `"` + a + `"`
		}
		out[i] = a
	}
	return strings.Join(out, " ")
}

// iptablesServices renders the nat table kube-proxy's iptables mode
// writes for p's Services, for one iptables-restore --noflush:
// KUBE-SERVICES (one rule per Service port, then the NODEPORTS jump that
// must come last), per Service a KUBE-SVC chain (masquerade mark for
// traffic from outside the cluster range, then one KUBE-SEP per endpoint,
// picked by statistic when there are several), per endpoint a KUBE-SEP
// chain (hairpin mark, DNAT), KUBE-MARK-MASQ and KUBE-POSTROUTING.
func iptablesServices(k kpChains, p svcPlan) string {
	var sb strings.Builder
	sb.WriteString("*nat\n")
	for _, c := range k.all(p) {
		fmt.Fprintf(&sb, ":%s - [0:0]\n", c)
	}
	for _, j := range k.jumps(p) {
		fmt.Fprintf(&sb, "-A %s\n", quoteArgs(j))
	}
	for i := range p.n {
		e := p.service(i)
		fmt.Fprintf(&sb, "-A %s -d %s/32 -p tcp -m comment --comment \"%s cluster IP\" -m tcp --dport %d -j %s\n",
			k.services(), e.cip, e.name, e.port, k.svc(e))
	}
	fmt.Fprintf(&sb, "-A %s -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j %s\n",
		k.services(), k.nodeports())
	for i := range p.n {
		writeIptablesService(&sb, k, p, p.service(i))
	}
	fmt.Fprintf(&sb, "-A %s -j MARK --set-xmark %s/%s\n", k.markMasq(), svcMark, svcMark)
	fmt.Fprintf(&sb, "-A %s -m mark ! --mark %s/%s -j RETURN\n", k.postrouting(), svcMark, svcMark)
	fmt.Fprintf(&sb, "-A %s -j MARK --set-xmark %s/0x0\n", k.postrouting(), svcMark)
	fmt.Fprintf(&sb, "-A %s -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n", k.postrouting())
	sb.WriteString("COMMIT\n")
	return sb.String()
}

// writeIptablesService writes one Service's KUBE-SVC and KUBE-SEP chains.
func writeIptablesService(sb *strings.Builder, k kpChains, p svcPlan, e svcEntry) {
	fmt.Fprintf(sb, "-A %s ! -s %s -d %s/32 -p tcp -m comment --comment \"%s cluster IP\" -m tcp --dport %d -j %s\n",
		k.svc(e), p.cluster, e.cip, e.name, e.port, k.markMasq())
	for j, b := range e.backends {
		left := len(e.backends) - j
		if left > 1 {
			fmt.Fprintf(sb, "-A %s -m comment --comment \"%s -> %s\" -m statistic --mode random --probability %.10f -j %s\n",
				k.svc(e), e.name, b, 1/float64(left), k.sep(e, b))
		} else {
			fmt.Fprintf(sb, "-A %s -m comment --comment \"%s -> %s\" -j %s\n", k.svc(e), e.name, b, k.sep(e, b))
		}
	}
	for _, b := range e.backends {
		fmt.Fprintf(sb, "-A %s -s %s/32 -m comment --comment %s -j %s\n", k.sep(e, b), b.Addr(), e.name, k.markMasq())
		fmt.Fprintf(sb, "-A %s -p tcp -m comment --comment %s -m tcp -j DNAT --to-destination %s\n", k.sep(e, b), e.name, b)
	}
}

// iptablesServicesRemoval flushes and deletes every chain of the run in
// one iptables-restore --noflush (the jumps go first, one by one).
func iptablesServicesRemoval(k kpChains, p svcPlan) string {
	var sb strings.Builder
	sb.WriteString("*nat\n")
	chains := k.all(p)
	for _, c := range chains {
		fmt.Fprintf(&sb, ":%s - [0:0]\n", c)
	}
	for _, c := range chains {
		fmt.Fprintf(&sb, "-X %s\n", c)
	}
	sb.WriteString("COMMIT\n")
	return sb.String()
}

// nftName is a chain name kube-proxy's nftables mode would give: a short
// hash, then the readable name.
func nftName(kind, what string) string { return kind + "-" + svcHash(what)[:8] + "-" + what }

func nftSvcChain(e svcEntry) string {
	return nftName("service", strings.Replace(e.name, ":p", "/tcp/p", 1))
}

func nftEpChain(e svcEntry, b netip.AddrPort) string {
	return nftName("endpoint", strings.Replace(e.name, ":p", "/tcp/p", 1)+"__"+b.Addr().String()+"/"+fmt.Sprint(b.Port()))
}

// nftServices renders the table kube-proxy's nftables mode writes, under
// the run's own name, for one nft -f: the service-ips verdict map keyed by
// address . protocol . port, one service chain per Service port (the
// masquerade mark, then numgen over its endpoints), one endpoint chain per
// endpoint (hairpin mark, dnat), the masquerading chain and the three nat
// base chains. The benchmark Service's endpoint chain counts its
// packets, so the run can tell the table was on the path. As with
// iptables, the hooks only send the run's ClusterIPs and pods on.
func nftServices(table string, p svcPlan) string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "table ip %s {\n", table)
	sb.WriteString("\tcomment \"rules for kube-proxy (netbench)\"\n")
	fmt.Fprintf(&sb, "\tchain mark-for-masquerade {\n\t\tmeta mark set meta mark or %s\n\t}\n", svcMark)
	fmt.Fprintf(&sb, "\tchain masquerading {\n\t\tmeta mark & %s == 0 return\n\t\tmeta mark set meta mark xor %s\n\t\tmasquerade fully-random\n\t}\n", svcMark, svcMark)
	sb.WriteString("\tmap service-ips {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t\tcomment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\"\n\t}\n")
	sb.WriteString("\tmap service-nodeports {\n\t\ttype inet_proto . inet_service : verdict\n\t\tcomment \"NodePort traffic\"\n\t}\n")
	sb.WriteString("\tchain services {\n\t\tip daddr . meta l4proto . th dport vmap @service-ips\n" +
		"\t\tfib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n\t}\n")
	fmt.Fprintf(&sb, "\tchain nat-prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tip daddr %s jump services\n\t}\n", p.cips)
	fmt.Fprintf(&sb, "\tchain nat-output {\n\t\ttype nat hook output priority -100; policy accept;\n\t\tip daddr %s jump services\n\t}\n", p.cips)
	fmt.Fprintf(&sb, "\tchain nat-postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tip saddr %s jump masquerading\n\t}\n", p.cluster)
	for i := range p.n {
		e := p.service(i)
		fmt.Fprintf(&sb, "\tchain %s {\n\t\tip daddr %s tcp dport %d ip saddr != %s jump mark-for-masquerade\n", nftSvcChain(e), e.cip, e.port, p.cluster)
		fmt.Fprintf(&sb, "\t\tnumgen random mod %d vmap {", len(e.backends))
		for j, b := range e.backends {
			if j > 0 {
				sb.WriteString(",")
			}
			fmt.Fprintf(&sb, " %d : goto %s", j, nftEpChain(e, b))
		}
		sb.WriteString(" }\n\t}\n")
		for _, b := range e.backends {
			count := ""
			if i == p.real {
				count = "counter "
			}
			fmt.Fprintf(&sb, "\tchain %s {\n\t\tip saddr %s jump mark-for-masquerade\n\t\tmeta l4proto tcp %sdnat to %s\n\t}\n", nftEpChain(e, b), b.Addr(), count, b)
		}
	}
	sb.WriteString("}\n")
	// The elements apart, as kube-proxy adds them, in one transaction.
	if p.n > 0 {
		fmt.Fprintf(&sb, "add element ip %s service-ips {\n", table)
		for i := range p.n {
			e := p.service(i)
			fmt.Fprintf(&sb, "\t%s . tcp . %d : goto %s,\n", e.cip, e.port, nftSvcChain(e))
		}
		sb.WriteString("}\n")
	}
	return sb.String()
}

// svcState is what the -services run has put on the node.
type svcState struct {
	plan     svcPlan
	chains   kpChains
	table    string // nft table
	routes   []netip.Prefix
	ipt      bool // the iptables chains may exist
	nft      bool // the nft table may exist
	nftNat   bool // table ip nat did not exist before the run: remove it once empty
	inMap    bool // the benchmark Service is in idcni's map
	loadedMS map[string]float64
}

// pickSvcRanges picks a /18 of 198.18.0.0/16 for ClusterIPs and the same
// /18 of 198.19.0.0/16 for backends that no route of this node overlaps
// (another run blackholes its own).
func pickSvcRanges() (cips, backends netip.Prefix, err error) {
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return cips, backends, fmt.Errorf("list routes: %w", err)
	}
	overlaps := func(p netip.Prefix) bool {
		for _, r := range routes {
			if r.Dst == nil {
				continue
			}
			a, _ := netip.AddrFromSlice(r.Dst.IP)
			ones, _ := r.Dst.Mask.Size()
			if ones > 0 && netip.PrefixFrom(a.Unmap(), ones).Overlaps(p) {
				return true
			}
		}
		return false
	}
	var b [1]byte
	if _, err := rand.Read(b[:]); err != nil {
		return cips, backends, err
	}
	for i := range 4 {
		q := byte((int(b[0]) + i) % 4 * 64)
		c := netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 18, q, 0}), 18)
		k := netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 19, q, 0}), 18)
		if !overlaps(c) && !overlaps(k) {
			return c, k, nil
		}
	}
	return cips, backends, errors.New("every /18 of 198.18.0.0/16 (or its twin in 198.19.0.0/16) has a route: other runs?")
}

func blackhole(p netip.Prefix) *netlink.Route {
	return &netlink.Route{Dst: prefixNet(p), Type: unix.RTN_BLACKHOLE, Table: unix.RT_TABLE_MAIN}
}

// svcPolicy is the main run's 10-rule allow-list, client -> server on
// podIPPort too, and client -> world on
// the Service port: under kube-proxy alone the client's packets leave it
// for the ClusterIP, which no pod owns, and its egress judges them so.
// Translated flows are judged by the backend and never use that rule.
func svcPolicy(serverPort int) *policy.Set {
	s := idcniPolicy(10, serverPort)
	pp := uint16(podIPPort(serverPort))
	s.Rules = append(s.Rules, policy.ManualRule{Action: policy.Allow, Src: clientID, Dst: serverID,
		Proto: policy.ProtoTCP, Ports: policy.PortRange{Lo: pp, Hi: pp}}.Expand()...)
	s.Rules = append(s.Rules, policy.ManualRule{Action: policy.Allow, Src: clientID, Dst: identity.World,
		Proto: policy.ProtoTCP, Ports: policy.PortRange{Lo: svcPort, Hi: svcPort}}.Expand()...)
	return s
}

// svcSetup prepares the node for -services: ranges, blackhole routes, the
// policy, and the names of the run's chains and table.
func (b *bench) svcSetup(ctx context.Context, suffix string, cl *cleanups) error {
	cips, backends, err := pickSvcRanges()
	if err != nil {
		return err
	}
	st := &svcState{
		plan:     svcPlan{cips: cips, backends: backends, cluster: b.subnet, server: netip.AddrPortFrom(b.server.addr, uint16(b.o.port))},
		chains:   kpChains{prefix: "NB" + strings.ToUpper(suffix[:6])},
		table:    "idcni-nb-" + suffix,
		loadedMS: map[string]float64{},
	}
	b.svc = st
	for _, p := range []netip.Prefix{cips, backends} {
		if err := netlink.RouteAdd(blackhole(p)); err != nil {
			return fmt.Errorf("blackhole route for %s: %w", p, err)
		}
		st.routes = append(st.routes, p)
		cl.push("blackhole route "+p.String(), func() error {
			if err := netlink.RouteDel(blackhole(p)); err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("delete blackhole route %s: %w", p, err)
			}
			return nil
		})
	}
	if exists, _ := nftTableState(ctx, "nat"); !exists {
		st.nftNat = true
	}
	cl.push("kube-proxy rules of the run", func() error {
		return errors.Join(b.svcRemoveIptables(), b.svcRemoveNft(), flushConntrack(b.subnet))
	})
	cl.push("services in the datapath", b.svcClearMap)
	want, err := svcPolicy(b.o.port).Compile()
	if err != nil {
		return err
	}
	if err := b.dp.ApplyPolicy(want); err != nil {
		return err
	}
	have, err := b.dp.Policy()
	if err != nil {
		return err
	}
	if len(have.Entries) != len(want.Entries) {
		return fmt.Errorf("policy map has %d entries after writing %d", len(have.Entries), len(want.Entries))
	}
	for _, p := range []*pod{b.client, b.server} {
		if ok, err := b.dp.Attached(p.hostIf); err != nil || !ok {
			return fmt.Errorf("the plugin left no programs on %s (%v)", p.hostIf, err)
		}
	}
	return nil
}

func (b *bench) svcClearMap() error {
	have, err := b.dp.Services()
	if err != nil {
		return err
	}
	var errs []error
	for fe := range have {
		errs = append(errs, b.dp.DeleteService(fe))
	}
	return errors.Join(errs...)
}

func frontendOf(e svcEntry) bpf.ServiceFrontend {
	return bpf.ServiceFrontend{Addr: e.cip, Port: e.port, Proto: unix.IPPROTO_TCP}
}

func serviceOf(e svcEntry) bpf.Service {
	var s bpf.Service
	for _, b := range e.backends {
		s.Backends = append(s.Backends, bpf.ServiceBackend{Addr: b.Addr(), Port: b.Port()})
	}
	return s
}

// svcFill makes n the step's Service count: kube-proxy's rules of the
// last step go, and idcni's map holds exactly the n Services.
func (b *bench) svcFill(n int) error {
	st := b.svc
	if err := errors.Join(b.svcRemoveIptables(), b.svcRemoveNft()); err != nil {
		return err
	}
	if err := b.svcClearMap(); err != nil {
		return err
	}
	st.plan.n, st.plan.real = n, n/2
	t0 := time.Now()
	if err := b.svcWriteFillers(); err != nil {
		return err
	}
	e := st.plan.service(st.plan.real)
	if err := b.dp.PutService(frontendOf(e), serviceOf(e)); err != nil {
		return err
	}
	st.inMap = true
	st.loadedMS[fmt.Sprintf("idcni-map/%d", n)] = ms(time.Since(t0))
	// Read back through the datapath's own API: every Service, with its
	// backend, as the plan has it.
	have, err := b.dp.Services()
	if err != nil {
		return err
	}
	if len(have) != n {
		return fmt.Errorf("the service map holds %d Services after writing %d", len(have), n)
	}
	for i := range n {
		e := st.plan.service(i)
		s, ok := have[frontendOf(e)]
		if !ok || len(s.Backends) != 1 || s.Backends[0] != serviceOf(e).Backends[0] {
			return fmt.Errorf("service %d (%s:%d) reads back as %+v", i, e.cip, e.port, s)
		}
	}
	return nil
}

// svcWriteFillers writes the N-1 other Services through the datapath's
// API, as the agent does.
func (b *bench) svcWriteFillers() error {
	st := b.svc
	for i := range st.plan.n {
		if i == st.plan.real {
			continue
		}
		e := st.plan.service(i)
		if err := b.dp.PutService(frontendOf(e), serviceOf(e)); err != nil {
			return fmt.Errorf("write Service %d of %d: %w", i, st.plan.n, err)
		}
	}
	return nil
}

// svcRealInMap puts the benchmark Service in idcni's map or takes it out.
func (b *bench) svcRealInMap(in bool) error {
	st := b.svc
	if st.inMap == in {
		return nil
	}
	e := st.plan.service(st.plan.real)
	var err error
	if in {
		err = b.dp.PutService(frontendOf(e), serviceOf(e))
	} else {
		err = b.dp.DeleteService(frontendOf(e))
	}
	if err != nil {
		return err
	}
	st.inMap = in
	return nil
}

func (b *bench) svcInstallIptables(ctx context.Context) error {
	st := b.svc
	st.ipt = true
	t0 := time.Now()
	if _, err := runCmd(ctx, iptablesServices(st.chains, st.plan), "iptables-restore", "-w", "--noflush"); err != nil {
		return err
	}
	st.loadedMS[fmt.Sprintf("kube-proxy-iptables/%d", st.plan.n)] = ms(time.Since(t0))
	return nil
}

// svcRemoveIptables is idempotent and runs on a fresh context: it is
// also cleanup after an interrupt.
func (b *bench) svcRemoveIptables() error {
	st := b.svc
	if st == nil || !st.ipt {
		return nil
	}
	ctx := context.Background()
	for _, j := range st.chains.jumps(st.plan) {
		for range 100 {
			if _, err := runCmd(ctx, "", "iptables", append([]string{"-w", "-t", "nat", "-D"}, j...)...); err != nil {
				break
			}
		}
	}
	if _, err := runCmd(ctx, "", "iptables", "-w", "-t", "nat", "-S", st.chains.services()); err == nil {
		if _, err := runCmd(ctx, iptablesServicesRemoval(st.chains, st.plan), "iptables-restore", "-w", "--noflush"); err != nil {
			return err
		}
	}
	st.ipt = false
	if st.nftNat {
		if exists, empty := nftTableState(ctx, "nat"); exists && empty {
			if _, err := runCmd(ctx, "", "nft", "delete", "table", "ip", "nat"); err != nil {
				return err
			}
		}
	}
	return flushConntrack(b.subnet)
}

func (b *bench) svcInstallNft(ctx context.Context) error {
	st := b.svc
	st.nft = true
	t0 := time.Now()
	if _, err := runCmd(ctx, nftServices(st.table, st.plan), "nft", "-f", "-"); err != nil {
		return err
	}
	st.loadedMS[fmt.Sprintf("kube-proxy-nftables/%d", st.plan.n)] = ms(time.Since(t0))
	return nil
}

func (b *bench) svcRemoveNft() error {
	st := b.svc
	if st == nil || !st.nft {
		return nil
	}
	ctx := context.Background()
	if _, err := runCmd(ctx, "", "nft", "list", "table", "ip", st.table); err == nil {
		if _, err := runCmd(ctx, "", "nft", "delete", "table", "ip", st.table); err != nil {
			return err
		}
	}
	st.nft = false
	return flushConntrack(b.subnet)
}

// svcEnter switches to configuration c of the current step.
func (b *bench) svcEnter(ctx context.Context, c config) (map[string]any, error) {
	st := b.svc
	info := map[string]any{"services": st.plan.n, "cluster_ip": st.plan.frontend().String()}
	var err error
	switch c.Name {
	case "idcni-podip", "idcni-clusterip":
		err = errors.Join(b.svcRemoveIptables(), b.svcRemoveNft(), b.svcRealInMap(true))
	case "kube-proxy-iptables":
		if err = errors.Join(b.svcRemoveNft(), b.svcRealInMap(false)); err == nil && !st.ipt {
			err = b.svcInstallIptables(ctx)
		}
	case "kube-proxy-nftables":
		if err = errors.Join(b.svcRemoveIptables(), b.svcRealInMap(false)); err == nil && !st.nft {
			err = b.svcInstallNft(ctx)
		}
	default:
		err = fmt.Errorf("unknown configuration %q", c.Name)
	}
	if err != nil {
		return nil, err
	}
	if c.Name == "idcni-podip" || c.Name == "idcni-clusterip" {
		info["idcni_services"] = st.plan.n
	} else {
		info["idcni_services"] = st.plan.n - 1
	}
	// No flow of another configuration carries over: a reused source
	// port must meet this configuration's path.
	if _, err := b.dp.FlushConntrack(b.client.addr, b.server.addr); err != nil {
		return nil, err
	}
	if err := flushConntrack(b.subnet); err != nil {
		return nil, err
	}
	// The path works before it is measured: the ClusterIP leads to the
	// server's port, where nobody listens yet (refused), and a port the
	// allow-list leaves out stays dropped.
	got, err := probe(b.client.nsPath, st.plan.frontend(), time.Second)
	if err != nil {
		return nil, err
	}
	if got != "refused" {
		return nil, fmt.Errorf("%s: a connection to the ClusterIP %s ended in %q, want refused (the server's closed port): the Service does not lead to the server", c, st.plan.frontend(), got)
	}
	blocked := netip.AddrPortFrom(b.server.addr, uint16(b.o.port+1))
	if got, err = probe(b.client.nsPath, blocked, 300*time.Millisecond); err != nil {
		return nil, err
	} else if got != "timeout" {
		return nil, fmt.Errorf("%s: a connection to the unlisted port %s ended in %q, want timeout", c, blocked, got)
	}
	info["blocked_port_probe"] = got
	if _, err := b.dp.FlushConntrack(b.client.addr, b.server.addr); err != nil {
		return nil, err
	}
	return info, flushConntrack(b.subnet)
}

// svcWorkload points w at the pod IP or at the ClusterIP.
func (b *bench) svcWorkload(c config, w workload) workload {
	if c.Name == "idcni-podip" {
		w.server = netip.AddrPortFrom(b.server.addr, uint16(podIPPort(b.o.port)))
		w.listenPort = 0
	} else {
		w.server = b.svc.plan.frontend()
		w.listenPort = b.o.port
	}
	return w
}

// svcBefore is what svcCheck compares with after the window.
type svcBefore struct{ dnat uint64 }

func (b *bench) svcBeforeRun(ctx context.Context, c config) (svcBefore, error) {
	var s svcBefore
	var err error
	switch c.Name {
	case "kube-proxy-iptables":
		s.dnat, err = b.svcIptablesDNATs(ctx)
	case "kube-proxy-nftables":
		s.dnat, err = b.svcNftDNATs(ctx)
	}
	return s, err
}

// svcIptablesDNATs reads the packet counter of the benchmark Service's
// DNAT rule.
func (b *bench) svcIptablesDNATs(ctx context.Context) (uint64, error) {
	st := b.svc
	e := st.plan.service(st.plan.real)
	chain := st.chains.sep(e, e.backends[0])
	out, err := runCmd(ctx, "", "iptables", "-w", "-t", "nat", "-S", chain, "-v")
	if err != nil {
		return 0, err
	}
	for l := range strings.SplitSeq(out, "\n") {
		if !strings.Contains(l, "-j DNAT") {
			continue
		}
		idx := strings.Index(l, " -c ")
		if idx < 0 {
			return 0, fmt.Errorf("no counters in %q", l)
		}
		var pk, by uint64
		if _, err := fmt.Sscanf(l[idx:], " -c %d %d", &pk, &by); err != nil {
			return 0, fmt.Errorf("counters of %q: %w", l, err)
		}
		return pk, nil
	}
	return 0, fmt.Errorf("no DNAT rule in %s", chain)
}

// svcNftDNATs reads the counter of the benchmark Service's endpoint chain.
func (b *bench) svcNftDNATs(ctx context.Context) (uint64, error) {
	st := b.svc
	e := st.plan.service(st.plan.real)
	out, err := runCmd(ctx, "", "nft", "list", "chain", "ip", st.table, nftEpChain(e, e.backends[0]))
	if err != nil {
		return 0, err
	}
	i := strings.Index(out, "counter packets ")
	if i < 0 {
		return 0, fmt.Errorf("no counter in the endpoint chain: %s", out)
	}
	var pk, by uint64
	if _, err := fmt.Sscanf(out[i:], "counter packets %d bytes %d", &pk, &by); err != nil {
		return 0, err
	}
	return pk, nil
}

// svcFlows counts idcni's conntrack entries to the ClusterIP range, and
// those to the benchmark Service's frontend.
func (b *bench) svcFlows() (toRange, toFrontend int, err error) {
	flows, err := b.dp.Conntrack()
	if err != nil {
		return 0, 0, err
	}
	fe := b.svc.plan.frontend()
	for _, f := range flows {
		if b.svc.plan.cips.Contains(f.Dst) {
			toRange++
			if f.Dst == fe.Addr() && f.DstPort == fe.Port() {
				toFrontend++
			}
		}
	}
	return toRange, toFrontend, nil
}

// netfilterDNATs counts the node's conntrack entries of flows to the
// frontend whose replies come from the server: flows netfilter translated.
func (b *bench) netfilterDNATs() (int, error) {
	flows, err := netlink.ConntrackTableList(netlink.ConntrackTable, netlink.InetFamily(unix.AF_INET))
	if err != nil {
		return 0, fmt.Errorf("list conntrack: %w", err)
	}
	fe := b.svc.plan.frontend()
	n := 0
	for _, f := range flows {
		dst, _ := netip.AddrFromSlice(f.Forward.DstIP)
		src, _ := netip.AddrFromSlice(f.Reverse.SrcIP)
		if dst.Unmap() == fe.Addr() && f.Forward.DstPort == fe.Port() && src.Unmap() == b.server.addr && f.Reverse.SrcPort == uint16(b.o.port) {
			n++
		}
	}
	return n, nil
}

// svcCheck checks that the window's traffic took the path c names.
func (b *bench) svcCheck(ctx context.Context, c config, before svcBefore, rec sampleRecord, passed, routedTx uint64) error {
	toRange, toFE, err := b.svcFlows()
	if err != nil {
		return err
	}
	rec.Checks["idcni_flows_to_clusterip_range"] = toRange
	if passed == 0 {
		return fmt.Errorf("%s: the datapath counted no packets: programs are not on the path", c)
	}
	// Direct delivery hands the client's packets to the server past its
	// host veth; the node's stack sends them out through it.
	viaStack := routedTx > passed/10
	rec.Checks["server_host_veth_tx_packets"] = routedTx
	switch c.Name {
	case "idcni-podip":
		if toRange != 0 {
			return fmt.Errorf("%s: idcni holds %d flows to ClusterIPs: something dialled a Service", c, toRange)
		}
		if viaStack {
			return fmt.Errorf("%s: the server's host veth sent %d packets while the programs passed %d: not delivered directly", c, routedTx, passed)
		}
	case "idcni-clusterip":
		if toFE == 0 {
			return fmt.Errorf("%s: idcni holds no flow to %s: nothing was translated", c, b.svc.plan.frontend())
		}
		if viaStack {
			return fmt.Errorf("%s: the server's host veth sent %d packets while the programs passed %d: not delivered directly", c, routedTx, passed)
		}
		nf, err := b.netfilterDNATs()
		if err != nil {
			return err
		}
		if nf != 0 {
			return fmt.Errorf("%s: netfilter translated %d flows: the node's stack saw the ClusterIP", c, nf)
		}
	case "kube-proxy-iptables", "kube-proxy-nftables":
		if !viaStack {
			return fmt.Errorf("%s: the server's host veth sent %d packets while the programs passed %d: the node's stack is not on the path", c, routedTx, passed)
		}
		var after uint64
		if c.Name == "kube-proxy-iptables" {
			after, err = b.svcIptablesDNATs(ctx)
		} else {
			after, err = b.svcNftDNATs(ctx)
		}
		if err != nil {
			return err
		}
		rec.Checks["kube_proxy_dnat_packets"] = after - before.dnat
		if after == before.dnat {
			return fmt.Errorf("%s: the benchmark Service's DNAT counted nothing: the rules are not on the path", c)
		}
		nf, err := b.netfilterDNATs()
		if err != nil {
			return err
		}
		rec.Checks["netfilter_dnat_flows"] = nf
		if nf == 0 {
			return fmt.Errorf("%s: netfilter holds no flow to %s answered by the server", c, b.svc.plan.frontend())
		}
	}
	return nil
}

// services runs -services: for each Service count, every configuration,
// round after round in rotating order.
func (b *bench) services(ctx context.Context, w workload, suffix string, cl *cleanups, rep *report) error {
	if _, err := exec.LookPath("nft"); err != nil && b.o.svcConfigs["kube-proxy-nftables"] {
		return errors.New("nft not found in PATH: kube-proxy-nftables needs it (apt-get install nftables, or leave it out of -configs)")
	}
	if err := b.svcSetup(ctx, suffix, cl); err != nil {
		return err
	}
	st := b.svc
	rep.Params.ClusterIPs, rep.Params.Backends = st.plan.cips.String(), st.plan.backends.String()
	logf("services: ClusterIPs in %s, other backends in %s (both blackholed here), chains %s-*, table ip %s",
		st.plan.cips, st.plan.backends, st.chains.prefix, st.table)
	var names []string
	for _, n := range svcConfigs {
		if b.o.svcConfigs[n] {
			names = append(names, n)
		}
	}
	for _, n := range b.o.services {
		for _, name := range names {
			rep.Configs = append(rep.Configs, config{Name: name, Rules: 10, Services: n})
		}
	}
	total := len(b.o.services) * b.o.count * len(names) * len(b.o.metrics)
	done := 0
	for _, n := range b.o.services {
		if err := b.svcFill(n); err != nil {
			return fmt.Errorf("%d Services: %w", n, err)
		}
		logf("services: %d in idcni's map (%.0f ms); the benchmark one, %s -> %s, is number %d", n,
			st.loadedMS[fmt.Sprintf("idcni-map/%d", n)], st.plan.frontend(), st.plan.server, st.plan.real)
		for round := range b.o.count {
			for i := range names {
				c := config{Name: names[(i+round)%len(names)], Rules: 10, Services: n}
				info, err := b.svcEnter(ctx, c)
				if err != nil {
					return fmt.Errorf("enter %s: %w", c, err)
				}
				if ms, ok := st.loadedMS[c.String()]; ok {
					info["rules_load_ms"] = ms
				}
				cw := b.svcWorkload(c, w)
				for _, m := range b.o.metrics {
					rec, err := b.sample(ctx, c, m, cw, round, info)
					if err != nil {
						return err
					}
					rep.Samples = append(rep.Samples, rec)
					done++
					logf("[%d/%d] round %d %-26s %-6s %12.4g %s  (load %.1f, steal %.1f%%)", done, total, round+1, c, m.name, rec.Value, m.unit, rec.Load1, rec.StealPct)
				}
			}
		}
		if b.o.profile {
			var cs []config
			for _, name := range names {
				cs = append(cs, config{Name: name, Rules: 10, Services: n})
			}
			rows, err := b.profile(ctx, cs, w, b.bpfRoot)
			if err != nil {
				return err
			}
			rep.Profile = append(rep.Profile, rows...)
		}
	}
	rep.RulesLoadMS = st.loadedMS
	return errors.Join(b.svcRemoveIptables(), b.svcRemoveNft(), b.svcClearMap())
}
