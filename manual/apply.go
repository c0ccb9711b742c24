package manual

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"

	"github.com/idcni/idcni/bpf"
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

// hostPrefix is the ipcache key of one address.
func hostPrefix(a netip.Addr) netip.Prefix {
	return netip.PrefixFrom(a, a.BitLen())
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

// planBindings compares the maps with the bindings. The manual identity
// range belongs to this package: a local endpoint or ipcache host entry
// carrying a manual identity with no binding behind it is left over from a
// removed binding and is undone. An endpoint goes back to the unresolved
// identity (5), which is denied everything, as when the plugin created it;
// an ipcache entry of an address no local pod has is removed.
func planBindings(eps map[int]bpf.Endpoint, ipc map[netip.Prefix]identity.ID, bindings []Binding) (*bindingPlan, error) {
	bound := make(map[netip.Addr]identity.ID, len(bindings))
	for _, b := range bindings {
		bound[b.IP] = b.Identity
	}
	p := &bindingPlan{putIPCache: map[netip.Prefix]identity.ID{}, putEndpoint: map[int]bpf.Endpoint{}}
	put := func(a netip.Addr, id identity.ID) {
		if have, ok := ipc[hostPrefix(a)]; !ok || have != id {
			p.putIPCache[hostPrefix(a)] = id
		}
	}
	local := map[netip.Addr]bool{}
	// Sorted so that errors name the same endpoint on every run.
	idxs := make([]int, 0, len(eps))
	for idx := range eps {
		idxs = append(idxs, idx)
	}
	sort.Ints(idxs)
	for _, idx := range idxs {
		ep := eps[idx]
		var addrs []netip.Addr
		for _, a := range []netip.Addr{ep.IPv4, ep.IPv6} {
			if a.IsValid() {
				addrs = append(addrs, a)
				local[a] = true
			}
		}
		want := identity.Unknown
		for _, a := range addrs {
			id, ok := bound[a]
			if !ok {
				continue
			}
			if want != identity.Unknown && want != id {
				return nil, fmt.Errorf("the pod on ifindex %d has addresses %s bound to different identities (%s and %s); a pod has one identity: bind both addresses to the same one", idx, joinAddrs(addrs), want, id)
			}
			want = id
		}
		if want == identity.Unknown {
			if !ep.Identity.IsManual() {
				// Not ours (the plugin's unresolved pod, or an
				// agent's), but an address of it still resolving to
				// a manual identity is a binding half undone: the
				// pod's own identity is the truth.
				for _, a := range addrs {
					if ipc[hostPrefix(a)].IsManual() {
						put(a, ep.Identity)
					}
				}
				continue
			}
			want = identity.Unresolved
		}
		if ep.Identity != want {
			ep.Identity = want
			p.putEndpoint[idx] = ep
		}
		// Every address of the pod resolves to its identity, bound or
		// not, so its IPv6 replies are judged like its IPv4 ones.
		for _, a := range addrs {
			put(a, want)
		}
	}
	for _, b := range bindings {
		if !local[b.IP] {
			put(b.IP, b.Identity)
		}
	}
	for pfx, id := range ipc {
		a := pfx.Addr()
		if !id.IsManual() || pfx.Bits() != a.BitLen() || local[a] {
			continue
		}
		if _, ok := bound[a]; !ok {
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
			bound[hostPrefix(b.IP)] = b.Identity
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
