package agent

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
)

// NFTableName is the nftables table (family inet) the agent owns. It is the
// only table it ever changes: kubelet's, kube-proxy's and the
// administrator's tables are never read or written, and one of another
// family with the same name (`table ip idcni`) is not this one. The agent
// rebuilds it whole at start, so nothing a crashed or older agent left
// survives, then keeps its sets equal to the Nodes; `idcni-agent
// --uninstall` deletes it. `nft list table inet idcni` shows it.
const NFTableName = "idcni"

// The sets of the table. Every set is an interval set of addresses, so
// prefixes and single addresses share one form.
const (
	setLocalPods4 = "local-pods4" // this node's pod CIDRs
	setLocalPods6 = "local-pods6"
	setCluster4   = "cluster4" // destinations never masqueraded
	setCluster6   = "cluster6"
	setNodes4     = "nodes4" // every Node's InternalIPs and ExternalIPs
	setNodes6     = "nodes6"

	counterMasqueraded   = "masqueraded"
	counterTunnelRejects = "tunnel-rejected"
)

// nftPlan is what the table must hold, decided from the Nodes alone.
type nftPlan struct {
	// Masquerade puts the postrouting chain in: pod traffic from
	// LocalPods to anything outside Cluster leaves with the node's
	// address.
	Masquerade bool
	// TunnelPort is the UDP port of the VXLAN tunnel; the input chain
	// drops what arrives on it from anything but Nodes. 0: no filter.
	TunnelPort uint16
	// Each set's content, by set name, as disjoint sorted ranges.
	Sets map[string][]addrRange
}

// addrRange is the addresses from First to Last, both in.
type addrRange struct {
	First, Last netip.Addr
}

func (r addrRange) String() string {
	if r.First == r.Last {
		return r.First.String()
	}
	return r.First.String() + "-" + r.Last.String()
}

// planNFT decides the table's content. localCIDRs are this node's pod
// CIDRs (its Node's, or --pod-cidr); noMasq the extra destinations that
// keep a pod's address (--no-masquerade-cidr).
func planNFT(nodes []*corev1.Node, localCIDRs, noMasq []netip.Prefix, masquerade bool, tunnelPort uint16) nftPlan {
	var cluster, nodeAddrs []netip.Prefix
	for _, n := range nodes {
		cluster = append(cluster, podCIDRsOf(n)...)
		for _, addr := range hostAddrs(n) {
			nodeAddrs = append(nodeAddrs, netip.PrefixFrom(addr, addr.BitLen()))
		}
	}
	// This node's pod CIDRs from --pod-cidr may be missing from its
	// Node; its pods are still pods of the cluster.
	cluster = append(cluster, localCIDRs...)
	cluster = append(cluster, nodeAddrs...)
	cluster = append(cluster, noMasq...)
	p := nftPlan{Masquerade: masquerade, TunnelPort: tunnelPort, Sets: map[string][]addrRange{}}
	for _, s := range []struct {
		v4, v6 string
		in     []netip.Prefix
	}{{setLocalPods4, setLocalPods6, localCIDRs}, {setCluster4, setCluster6, cluster}, {setNodes4, setNodes6, nodeAddrs}} {
		var in4, in6 []netip.Prefix
		for _, pfx := range s.in {
			if pfx.Addr().Is4() {
				in4 = append(in4, pfx)
			} else {
				in6 = append(in6, pfx)
			}
		}
		p.Sets[s.v4] = mergeRanges(in4)
		p.Sets[s.v6] = mergeRanges(in6)
	}
	return p
}

// mergeRanges turns prefixes of one family into the disjoint, sorted
// ranges the kernel's interval sets take: overlapping and adjacent ones
// become one, since an interval set refuses overlapping elements.
func mergeRanges(in []netip.Prefix) []addrRange {
	rs := make([]addrRange, 0, len(in))
	for _, p := range in {
		p = p.Masked()
		rs = append(rs, addrRange{First: p.Addr(), Last: lastAddr(p)})
	}
	slices.SortFunc(rs, func(a, b addrRange) int {
		return cmp.Or(a.First.Compare(b.First), a.Last.Compare(b.Last))
	})
	var out []addrRange
	for _, r := range rs {
		if n := len(out); n > 0 {
			prev := &out[n-1]
			next := prev.Last.Next()
			if r.First.Compare(prev.Last) <= 0 || (next.IsValid() && r.First == next) {
				if r.Last.Compare(prev.Last) > 0 {
					prev.Last = r.Last
				}
				continue
			}
		}
		out = append(out, r)
	}
	return out
}

// lastAddr is the last address of p.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// setElements is an interval set's elements for ranges: each range opens
// at its first address and closes (an interval-end element) at the address
// after its last. A range that runs to the family's last address has no
// end: there is no address after it, and an open interval runs to the end,
// as nft writes 0.0.0.0/0.
func setElements(rs []addrRange) []nftables.SetElement {
	out := make([]nftables.SetElement, 0, 2*len(rs))
	for _, r := range rs {
		out = append(out, nftables.SetElement{Key: r.First.AsSlice()})
		if end := r.Last.Next(); end.IsValid() {
			out = append(out, nftables.SetElement{Key: end.AsSlice(), IntervalEnd: true})
		}
	}
	return out
}

// nftTable keeps the agent's table equal to the plan. It runs in the
// writer loop; the metrics' scrape reads its counters concurrently.
type nftTable struct {
	// conn opens a connection to nftables in the agent's netns.
	conn func() (*nftables.Conn, error)
	// applied is the plan in the kernel; nil until the table is built,
	// and again after a failed update, so the next sync rebuilds it.
	applied *nftPlan
	// built is set once this agent built the table: the counters an
	// earlier run left are not this run's.
	built bool

	mu sync.Mutex
	// base holds each counter's value at the last rebuild: a rebuild
	// makes new counters, and the metrics must not go backwards.
	base map[string]uint64
}

func newNFTable() *nftTable {
	return &nftTable{conn: func() (*nftables.Conn, error) { return nftables.New() }, base: map[string]uint64{}}
}

func idcniTable() *nftables.Table {
	return &nftables.Table{Family: nftables.TableFamilyINet, Name: NFTableName}
}

func nftSet(t *nftables.Table, name string) *nftables.Set {
	kt := nftables.TypeIPAddr
	if name[len(name)-1] == '6' {
		kt = nftables.TypeIP6Addr
	}
	return &nftables.Set{Table: t, Name: name, KeyType: kt, Interval: true}
}

// sync makes the table the plan. The first time, and after any failure,
// it rebuilds the table whole in one transaction (delete and create
// again: no packet meets a half-built table, nothing stale survives);
// otherwise only the sets that changed are flushed and refilled, all in
// one transaction, so a packet sees the old sets or the new ones.
func (t *nftTable) sync(p nftPlan) (rebuilt bool, err error) {
	if t.applied == nil || t.applied.Masquerade != p.Masquerade || t.applied.TunnelPort != p.TunnelPort {
		return true, t.rebuild(p)
	}
	var changed []string
	for _, name := range sortedKeys(p.Sets) {
		if !slices.Equal(p.Sets[name], t.applied.Sets[name]) {
			changed = append(changed, name)
		}
	}
	if len(changed) == 0 {
		return false, nil
	}
	c, err := t.conn()
	if err != nil {
		return false, fmt.Errorf("nftables: %w", err)
	}
	tab := idcniTable()
	for _, name := range changed {
		s := nftSet(tab, name)
		c.FlushSet(s)
		if err := c.SetAddElements(s, setElements(p.Sets[name])); err != nil {
			return false, fmt.Errorf("nftables set %s: %w", name, err)
		}
	}
	if err := c.Flush(); err != nil {
		// Someone may have deleted the table or a set; build it
		// again next time.
		t.applied = nil
		return false, fmt.Errorf("update the sets of table inet %s: %w", NFTableName, err)
	}
	t.applied = &p
	return false, nil
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// rebuild replaces the table with the plan's, in one transaction.
func (t *nftTable) rebuild(p nftPlan) error {
	// What the counters hold goes into the base first: the rebuild
	// starts them from zero. The lock keeps a scrape from reading the
	// old counters on top of the base that already holds them.
	t.mu.Lock()
	defer t.mu.Unlock()
	if vals, err := t.readCounters(); err == nil && t.built {
		for k, v := range vals {
			t.base[k] += v
		}
	}
	c, err := t.conn()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	tab := idcniTable()
	// Add (a no-op if it is there), delete, add: the table an earlier
	// run left goes with everything in it, whether it exists or not.
	c.AddTable(tab)
	c.DelTable(tab)
	c.AddTable(tab)
	sets := map[string]*nftables.Set{}
	for _, name := range sortedKeys(p.Sets) {
		s := nftSet(tab, name)
		if err := c.AddSet(s, setElements(p.Sets[name])); err != nil {
			return fmt.Errorf("nftables set %s: %w", name, err)
		}
		sets[name] = s
	}
	c.AddObj(&nftables.CounterObj{Table: tab, Name: counterMasqueraded})
	c.AddObj(&nftables.CounterObj{Table: tab, Name: counterTunnelRejects})
	if p.Masquerade {
		// Source NAT's own priority, after kube-proxy's DNAT (in
		// prerouting and output): a pod's packet to a Service's
		// ClusterIP has a pod, the chosen backend, as its destination
		// by the time it gets here, so it is not masqueraded and the
		// backend sees the client pod's address.
		ch := c.AddChain(&nftables.Chain{Table: tab, Name: "postrouting", Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource})
		for _, fam := range []nftFamily{ipv4, ipv6} {
			// A NAT chain sees the first packet of a connection only,
			// so the counter counts connections.
			e := slices.Concat(fam.match(),
				fam.lookup(fam.src, sets[fam.set(setLocalPods4)], false),
				fam.lookup(fam.dst, sets[fam.set(setCluster4)], true),
				[]expr.Any{&expr.Objref{Type: int(nftables.ObjTypeCounter), Name: counterMasqueraded}, &expr.Masq{}})
			c.AddRule(&nftables.Rule{Table: tab, Chain: ch, Exprs: e})
		}
	}
	if p.TunnelPort != 0 {
		// In every routing mode, not only when a tunnel is up: in
		// direct mode nothing of idcni listens there, so it costs
		// nothing, and node-to-node tunnels of anyone else on that
		// port still pass (their peers are nodes); and the filter is
		// in place before a Node event brings the first tunnel up,
		// not raced with it. A pod's packets to the port are dropped
		// like any other non-node's: the tunnel must not carry what a
		// pod forged as another node's pod's.
		//
		// Input, before the filter chains at priority 0: a drop here
		// is final whatever other tables accept, and a packet
		// dropped before conntrack confirms it leaves no entry, so a
		// flood of forged packets does not fill the conntrack table.
		ch := c.AddChain(&nftables.Chain{Table: tab, Name: "input", Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityRef(-200)})
		port := binary.BigEndian.AppendUint16(nil, p.TunnelPort)
		for _, fam := range []nftFamily{ipv4, ipv6} {
			e := slices.Concat(fam.match(),
				[]expr.Any{
					&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
					&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_UDP}},
					&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
					&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: port},
				},
				fam.lookup(fam.src, sets[fam.set(setNodes4)], true),
				[]expr.Any{&expr.Objref{Type: int(nftables.ObjTypeCounter), Name: counterTunnelRejects},
					&expr.Verdict{Kind: expr.VerdictDrop}})
			c.AddRule(&nftables.Rule{Table: tab, Chain: ch, Exprs: e})
		}
	}
	if err := c.Flush(); err != nil {
		t.applied = nil
		return fmt.Errorf("build table inet %s: %w", NFTableName, err)
	}
	t.applied = &p
	t.built = true
	return nil
}

// nftFamily is how a rule of the inet table matches one IP family.
type nftFamily struct {
	proto    byte
	src, dst uint32 // offsets of the addresses in the network header
	size     uint32
	v6       bool
}

var (
	ipv4 = nftFamily{proto: unix.NFPROTO_IPV4, src: 12, dst: 16, size: 4}
	ipv6 = nftFamily{proto: unix.NFPROTO_IPV6, src: 8, dst: 24, size: 16, v6: true}
)

// set is the family's name of a set named for IPv4.
func (f nftFamily) set(name4 string) string {
	if f.v6 {
		return name4[:len(name4)-1] + "6"
	}
	return name4
}

// match restricts a rule of the inet table to the family.
func (f nftFamily) match() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{f.proto}},
	}
}

// lookup matches the address at off in s (not in s with invert).
func (f nftFamily) lookup(off uint32, s *nftables.Set, invert bool) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: f.size},
		&expr.Lookup{SourceRegister: 1, SetName: s.Name, SetID: s.ID, Invert: invert},
	}
}

// readCounters reads the table's named counters (packets).
func (t *nftTable) readCounters() (map[string]uint64, error) {
	c, err := t.conn()
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	out := map[string]uint64{}
	for _, name := range []string{counterMasqueraded, counterTunnelRejects} {
		o, err := c.GetObject(&nftables.CounterObj{Table: idcniTable(), Name: name})
		if err != nil {
			return nil, fmt.Errorf("read counter %s of table inet %s: %w", name, NFTableName, err)
		}
		if co, ok := o.(*nftables.CounterObj); ok {
			out[name] = co.Packets
		}
	}
	return out, nil
}

// counter is a counter's packets since the agent started, across rebuilds;
// what it cannot read counts as nothing new.
func (t *nftTable) counter(name string) float64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	vals, err := t.readCounters()
	if err != nil {
		return float64(t.base[name])
	}
	return float64(t.base[name] + vals[name])
}

// RemoveNFTable deletes the agent's table, if there is one, and nothing
// else: `idcni-agent --uninstall`.
func RemoveNFTable() error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	_, err = c.ListTableOfFamily(NFTableName, nftables.TableFamilyINet)
	// No table; or a kernel without nftables (no nfnetlink, or no
	// nf_tables to load), which cannot hold one: --uninstall cleans up
	// on any kernel.
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EPROTONOSUPPORT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("look up table inet %s: %w", NFTableName, err)
	}
	c.DelTable(idcniTable())
	if err := c.Flush(); err != nil {
		return fmt.Errorf("delete table inet %s: %w", NFTableName, err)
	}
	return nil
}

// rangesOf turns an interval set's elements, as the kernel lists them (in
// any order), back into ranges: each opening element runs to the address
// before the next end element, or to the family's last address when none
// follows. An end element that closes nothing is left out.
func rangesOf(els []nftables.SetElement) []addrRange {
	type el struct {
		addr netip.Addr
		end  bool
	}
	var sorted []el
	for _, e := range els {
		if a, ok := netip.AddrFromSlice(e.Key); ok {
			sorted = append(sorted, el{a, e.IntervalEnd})
		}
	}
	slices.SortFunc(sorted, func(a, b el) int { return a.addr.Compare(b.addr) })
	var out []addrRange
	open := false
	for _, e := range sorted {
		switch {
		case !e.end:
			if open {
				// Two openings in a row: the first ran up to this one.
				out[len(out)-1].Last = e.addr.Prev()
			}
			out = append(out, addrRange{First: e.addr})
			open = true
		case open:
			out[len(out)-1].Last = e.addr.Prev()
			open = false
		}
	}
	if open {
		out[len(out)-1].Last = lastAddr(netip.PrefixFrom(out[len(out)-1].First, 0))
	}
	return out
}

// driftedSets returns the sets whose elements in the kernel are not the
// ones last written.
func (t *nftTable) driftedSets() ([]string, error) {
	c, err := t.conn()
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	var out []string
	for _, name := range sortedKeys(t.applied.Sets) {
		els, err := c.GetSetElements(nftSet(idcniTable(), name))
		if err != nil {
			return nil, fmt.Errorf("read set %s of table inet %s: %w", name, NFTableName, err)
		}
		if !slices.Equal(rangesOf(els), t.applied.Sets[name]) {
			out = append(out, name)
		}
	}
	return out, nil
}

// present reports whether the agent's table is in the kernel.
func (t *nftTable) present() (bool, error) {
	c, err := t.conn()
	if err != nil {
		return false, fmt.Errorf("nftables: %w", err)
	}
	_, err = c.ListTableOfFamily(NFTableName, nftables.TableFamilyINet)
	if errors.Is(err, unix.ENOENT) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("look up table inet %s: %w", NFTableName, err)
	}
	return true, nil
}

// syncNFT makes the agent's nftables table follow the Nodes: this node's
// pod CIDRs, every pod CIDR and node address of the cluster, the node
// addresses the tunnel accepts. It runs on the same node keys as the
// routes.
func (a *Agent) syncNFT() error {
	if a.nft == nil {
		return nil
	}
	nodes, local, err := a.nodesAndLocalCIDRs()
	if err != nil {
		return err
	}
	p := planNFT(nodes, local, a.cfg.NoMasqueradeCIDRs, a.cfg.Masquerade, a.cfg.TunnelPort)
	rebuilt, err := a.nft.sync(p)
	if err != nil {
		return err
	}
	if a.cfg.Masquerade {
		a.metrics.masquerade.Set(1)
	} else {
		a.metrics.masquerade.Set(0)
	}
	sizes := []any{}
	for _, name := range sortedKeys(p.Sets) {
		sizes = append(sizes, name, len(p.Sets[name]))
	}
	if rebuilt {
		a.log.Info("nftables table inet "+NFTableName+" built", append([]any{"masquerade", p.Masquerade,
			"tunnelPortFilter", p.TunnelPort}, sizes...)...)
	} else {
		a.log.Debug("nftables sets", sizes...)
	}
	return nil
}

// auditNFT builds the table again if someone deleted it (`nft flush
// ruleset`, a firewall reload) or changed a set's elements, and counts
// that as drift.
func (a *Agent) auditNFT() error {
	if a.nft == nil || a.nft.applied == nil {
		return a.syncNFT()
	}
	ok, err := a.nft.present()
	if err != nil {
		return err
	}
	var why string
	if !ok {
		why = "is gone"
	} else {
		drifted, err := a.nft.driftedSets()
		if err != nil {
			return err
		}
		if len(drifted) > 0 {
			why = fmt.Sprintf("has sets changed by someone else (%s)", strings.Join(drifted, ", "))
		}
	}
	if why != "" {
		a.log.Warn("nftables table inet " + NFTableName + " " + why + ": building it again")
		a.metrics.auditDrift.WithLabelValues("nftables").Inc()
		a.nft.applied = nil
	}
	return a.syncNFT()
}
