package manual

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sort"

	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/desired"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// Apply makes the datapath hold st: every binding in the ipcache and on the
// local endpoint that has its address, and the manual rules as the whole of
// the policy and identity maps. It is idempotent and converges from any
// starting point, which makes it the restore after a reboot too. Everything
// is computed and checked before the first write, and it all happens under
// the datapath's lock, so plugin instances and other CLIs see no half-done
// change.
//
// Apply is for a node without idcni-agent: with one, the agent owns the
// policy maps and merges PolicyRules into its own policy.
func Apply(d *bpf.Datapath, st State) error {
	if err := st.Validate(); err != nil {
		return err
	}
	ms, err := st.Compile()
	if err != nil {
		return err
	}
	unlock, err := d.Lock()
	if err != nil {
		return fmt.Errorf("lock datapath: %w", err)
	}
	defer unlock()
	if err := SyncBindings(d, st.Bindings); err != nil {
		return err
	}
	// ApplyPolicy bumps the policy revision last, which also makes every
	// established flow be judged again under identities changed above.
	if err := d.ApplyPolicy(ms); err != nil {
		return fmt.Errorf("write manual policy to the datapath: %w", err)
	}
	return nil
}

// bindingPlan is the set of writes that brings the ipcache and endpoints
// maps to a list of bindings.
type bindingPlan struct {
	putIPCache  map[netip.Prefix]identity.ID
	putEndpoint map[int]bpf.Endpoint
	delIPCache  []netip.Prefix
}

func (p *bindingPlan) empty() bool {
	return len(p.putIPCache) == 0 && len(p.putEndpoint) == 0 && len(p.delIPCache) == 0
}

// planBindings compares the maps with the bindings, asking package
// desired what each entry must hold. The manual identity range belongs to
// this package: a local endpoint carrying a manual identity with no
// binding behind it is left over from a removed binding and goes back to
// the unresolved identity (5), which is denied everything, as when the
// plugin created it; an ipcache host entry in the manual range that no
// binding and no local pod claims is removed. Endpoints of other
// identities (the plugin's unresolved pods, an agent's) keep theirs.
func planBindings(eps map[int]bpf.Endpoint, ipc map[netip.Prefix]identity.ID, bindings []Binding) (*bindingPlan, error) {
	bound := make(map[netip.Addr]identity.ID, len(bindings))
	for _, b := range bindings {
		bound[b.IP] = b.Identity
	}
	lookup := func(a netip.Addr) (identity.ID, bool) { id, ok := bound[a]; return id, ok }
	p := &bindingPlan{putIPCache: map[netip.Prefix]identity.ID{}, putEndpoint: map[int]bpf.Endpoint{}}
	want := map[netip.Addr]desired.Claims{}
	ours := map[netip.Addr]bool{}
	for _, b := range bindings {
		want[b.IP] = desired.Claims{Binding: b.Identity}
	}
	// Sorted so that errors name the same endpoint on every run.
	idxs := slices.Sorted(maps.Keys(eps))
	for _, idx := range idxs {
		ep := eps[idx]
		addrs := ep.Addrs()
		var first identity.ID
		for _, a := range addrs {
			if id, ok := bound[a]; ok {
				if first != identity.Unknown && first != id {
					return nil, fmt.Errorf("the pod on ifindex %d has addresses %s bound to different identities (%s and %s); a pod has one identity: bind both addresses to the same one", idx, joinAddrs(addrs), first, id)
				}
				first = id
			}
		}
		own := ep.Identity
		if own.IsManual() {
			own = identity.Unknown // a binding's, gone or still there
		}
		id := desired.EndpointIdentity(own, addrs, lookup)
		if ep.Identity != id {
			ep.Identity = id
			p.putEndpoint[idx] = ep
		}
		// Every address of the pod resolves to its identity, bound or
		// not, so its IPv6 replies are judged like its IPv4 ones.
		for _, a := range addrs {
			c := want[a]
			c.Local = id
			want[a] = c
			if id.IsManual() || eps[idx].Identity.IsManual() {
				ours[a] = true
			}
		}
	}
	for a, c := range want {
		id, _ := c.Identity()
		pfx := desired.HostPrefix(a)
		// An endpoint of another identity is not ours to rewrite, unless
		// its address still resolves to a manual identity: a binding
		// half undone, where the pod's own identity is the truth.
		if c.Binding == identity.Unknown && !ours[a] && !ipc[pfx].IsManual() {
			continue
		}
		if have, ok := ipc[pfx]; !ok || have != id {
			p.putIPCache[pfx] = id
		}
	}
	for pfx, id := range ipc {
		a := pfx.Addr()
		if !id.IsManual() || pfx.Bits() != a.BitLen() {
			continue
		}
		if _, ok := want[a]; !ok {
			p.delIPCache = append(p.delIPCache, pfx)
		}
	}
	slices.SortFunc(p.delIPCache, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return p, nil
}

func joinAddrs(addrs []netip.Addr) string {
	s := ""
	for i, a := range addrs {
		if i > 0 {
			s += " and "
		}
		s += a.String()
	}
	return s
}

// SyncBindings brings the ipcache and endpoints maps in line with bindings
// (see Apply for the rules). The caller holds d.Lock(), and bumps the
// policy revision afterwards so flows see the new identities: Apply does
// both; the agent, which writes its own policy, calls this directly.
func SyncBindings(d *bpf.Datapath, bindings []Binding) error {
	eps, err := d.Endpoints()
	if err != nil {
		return err
	}
	ipc, err := d.IPCache()
	if err != nil {
		return err
	}
	p, err := planBindings(eps, ipc, bindings)
	if err != nil {
		return err
	}
	// The ipcache first: a pod switched to a new identity finds its
	// peers' addresses already resolved.
	for pfx, id := range p.putIPCache {
		if err := d.PutIPCache(pfx, id); err != nil {
			return err
		}
	}
	for idx, ep := range p.putEndpoint {
		if err := d.PutEndpoint(idx, ep); err != nil {
			return err
		}
	}
	for _, pfx := range p.delIPCache {
		if err := d.DeleteIPCache(pfx); err != nil {
			return err
		}
	}
	return nil
}

// Drift lists, one line each, where the datapath does not hold st: after a
// reboot every binding and rule shows up here until the state is restored.
// Nil means the datapath matches.
func Drift(d *bpf.Datapath, st State) ([]string, error) {
	eps, err := d.Endpoints()
	if err != nil {
		return nil, err
	}
	ipc, err := d.IPCache()
	if err != nil {
		return nil, err
	}
	p, err := planBindings(eps, ipc, st.Bindings)
	if err != nil {
		return nil, err
	}
	var out []string
	if !p.empty() {
		bound := map[netip.Prefix]identity.ID{}
		for _, b := range st.Bindings {
			bound[desired.HostPrefix(b.IP)] = b.Identity
		}
		pfxs := make([]netip.Prefix, 0, len(p.putIPCache))
		for pfx := range p.putIPCache {
			pfxs = append(pfxs, pfx)
		}
		slices.SortFunc(pfxs, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
		for _, pfx := range pfxs {
			want := p.putIPCache[pfx]
			if id, ok := bound[pfx]; ok && id == want {
				out = append(out, fmt.Sprintf("endpoint %s is not identity %s in the datapath", pfx.Addr(), want))
			} else if have, ok := ipc[pfx]; ok {
				out = append(out, fmt.Sprintf("ipcache entry %s is identity %s, should be %s", pfx, have, want))
			} else {
				out = append(out, fmt.Sprintf("ipcache entry %s is missing, should be identity %s", pfx, want))
			}
		}
		idxs := make([]int, 0, len(p.putEndpoint))
		for idx := range p.putEndpoint {
			idxs = append(idxs, idx)
		}
		sort.Ints(idxs)
		for _, idx := range idxs {
			out = append(out, fmt.Sprintf("the pod on ifindex %d should be identity %s, is %s", idx, p.putEndpoint[idx].Identity, eps[idx].Identity))
		}
		for _, pfx := range p.delIPCache {
			out = append(out, fmt.Sprintf("ipcache entry %s -> %s has no manual endpoint behind it", pfx, ipc[pfx]))
		}
	}
	want, err := st.Compile()
	if err != nil {
		return nil, err
	}
	have, err := d.Policy()
	if err != nil {
		return nil, err
	}
	if !samePolicy(have, want) {
		out = append(out, "the policy maps do not hold the manual rules")
	}
	return out, nil
}

func samePolicy(a, b *policy.MapState) bool {
	up, del := policy.Diff(a, b)
	if len(up) != 0 || len(del) != 0 || len(a.Identities) != len(b.Identities) {
		return false
	}
	for id, f := range b.Identities {
		if af, ok := a.Identities[id]; !ok || af != f {
			return false
		}
	}
	return true
}
