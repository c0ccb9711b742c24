package bpf

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"slices"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// PutEndpoint writes the endpoint behind the host veth with this ifindex.
// An ep without a conntrack slot keeps the one the entry has: identities
// and addresses have several writers (the agent, endpointctl), the table
// has one (the plugin that made the veth), and moving a live pod to
// another table would forget its flows.
func (d *Datapath) PutEndpoint(ifindex int, ep Endpoint) error {
	if ep.ConntrackSlot == 0 {
		var old datapathEndpoint
		if err := d.objs.Endpoints.Lookup(uint32(ifindex), &old); err == nil {
			ep.ConntrackSlot = old.CtSlot
		}
	}
	v, err := ep.toKernel()
	if err != nil {
		return err
	}
	if err := d.objs.Endpoints.Update(uint32(ifindex), &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write endpoint %d: %w", ifindex, mapFull(err, "endpoints"))
	}
	return nil
}

// DeleteEndpoint removes an endpoint, and before it the local pod entries
// of its addresses that name its host veth: they carry its conntrack
// slot, and from_net delivers a known flow's packets by them without
// asking the endpoint, so none may outlive it. A missing endpoint is not
// an error.
func (d *Datapath) DeleteEndpoint(ifindex int) error {
	ep, ok, err := d.Endpoint(ifindex)
	if err != nil {
		return err
	}
	if ok {
		for _, a := range ep.Addrs() {
			if err := d.DeleteLocalPod(a, ifindex); err != nil {
				return fmt.Errorf("delete endpoint %d: %w", ifindex, err)
			}
		}
	}
	err = d.objs.Endpoints.Delete(uint32(ifindex))
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete endpoint %d: %w", ifindex, err)
	}
	return nil
}

// Endpoint returns the endpoint behind ifindex.
func (d *Datapath) Endpoint(ifindex int) (Endpoint, bool, error) {
	var v datapathEndpoint
	err := d.objs.Endpoints.Lookup(uint32(ifindex), &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return Endpoint{}, false, nil
	}
	if err != nil {
		return Endpoint{}, false, fmt.Errorf("read endpoint %d: %w", ifindex, err)
	}
	return endpointFromKernel(v), true, nil
}

// Endpoints returns every endpoint by ifindex.
func (d *Datapath) Endpoints() (map[int]Endpoint, error) {
	out := map[int]Endpoint{}
	var k uint32
	var v datapathEndpoint
	it := d.objs.Endpoints.Iterate()
	for it.Next(&k, &v) {
		out[int(k)] = endpointFromKernel(v)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list endpoints: %w", err)
	}
	return out, nil
}

// LocalPod is where from_pod hands packets for a pod on this node, past the
// node's routing: the pod's host veth, the pod interface's MAC address and
// the host veth's (the pod's gateway).
type LocalPod struct {
	Ifindex int              `json:"ifindex"`
	MAC     net.HardwareAddr `json:"mac"`
	HostMAC net.HardwareAddr `json:"hostMAC"`
	// ConntrackSlot is the pod's endpoint's, which PutLocalPod copies into
	// the entry (whatever lp says): from_net and from_pod's delivery find
	// the pod's flows by it without the endpoint. 0 in an entry written
	// by a build of pin layout 3 (the migration fills it in).
	ConntrackSlot uint32 `json:"conntrackSlot,omitzero"`
}

// PutLocalPod makes from_pod deliver packets for a directly to lp. The
// endpoint behind lp.Ifindex must be in place: the entry carries its
// conntrack slot.
func (d *Datapath) PutLocalPod(a netip.Addr, lp LocalPod) error {
	if !a.IsValid() {
		return fmt.Errorf("local pod: invalid address")
	}
	if lp.Ifindex <= 0 || len(lp.MAC) != 6 || len(lp.HostMAC) != 6 {
		return fmt.Errorf("local pod %s: need an ifindex and two 6-byte MAC addresses, got %d, %q, %q", a, lp.Ifindex, lp.MAC, lp.HostMAC)
	}
	ep, ok, err := d.Endpoint(lp.Ifindex)
	if err != nil {
		return fmt.Errorf("local pod %s: %w", a, err)
	}
	if !ok {
		return fmt.Errorf("local pod %s: no endpoint behind ifindex %d: write the endpoint first", a, lp.Ifindex)
	}
	v := datapathLocalPod{Ifindex: uint32(lp.Ifindex), CtSlot: ep.ConntrackSlot}
	copy(v.Mac[:], lp.MAC)
	copy(v.HostMac[:], lp.HostMAC)
	k := addr16(a)
	if err := d.objs.LocalPods.Update(&k, &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write local pod %s: %w", a, mapFull(err, "local_pods"))
	}
	return nil
}

// DeleteLocalPod removes a's entry if it still names the host veth
// ifindex: the kernel reuses addresses, and the entry may be another pod's
// by now. A missing entry is not an error.
func (d *Datapath) DeleteLocalPod(a netip.Addr, ifindex int) error {
	k := addr16(a)
	var v datapathLocalPod
	err := d.objs.LocalPods.Lookup(&k, &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) || (err == nil && int(v.Ifindex) != ifindex) {
		return nil
	}
	if err == nil {
		err = d.objs.LocalPods.Delete(&k)
	}
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete local pod %s: %w", a, err)
	}
	return nil
}

// LocalPods returns every local pod entry by address.
func (d *Datapath) LocalPods() (map[netip.Addr]LocalPod, error) {
	out := map[netip.Addr]LocalPod{}
	var k [16]byte
	var v datapathLocalPod
	it := d.objs.LocalPods.Iterate()
	for it.Next(&k, &v) {
		out[addrFrom16(k)] = LocalPod{Ifindex: int(v.Ifindex), MAC: bytes.Clone(v.Mac[:]), HostMAC: bytes.Clone(v.HostMac[:]), ConntrackSlot: v.CtSlot}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list local pods: %w", err)
	}
	return out, nil
}

// fillLocalPodSlots gives the local pod entries that name no conntrack
// slot (written by a build of pin layout 3) their endpoint's, and returns
// how many it filled. An entry deleted meanwhile stays deleted.
func (d *Datapath) fillLocalPodSlots() (int, error) {
	var k [16]byte
	var v datapathLocalPod
	missing := map[[16]byte]datapathLocalPod{}
	it := d.objs.LocalPods.Iterate()
	for it.Next(&k, &v) {
		if v.CtSlot == 0 {
			missing[k] = v
		}
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("list local pods: %w", err)
	}
	filled := 0
	for k, v := range missing {
		ep, ok, err := d.Endpoint(int(v.Ifindex))
		if err != nil || !ok || ep.ConntrackSlot == 0 {
			continue // no endpoint (yet): from_net asks it, as layout 3 did
		}
		v.CtSlot = ep.ConntrackSlot
		err = d.objs.LocalPods.Update(&k, &v, ebpf.UpdateExist)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			continue
		}
		if err != nil {
			return filled, fmt.Errorf("write local pod %s: %w", addrFrom16(k), err)
		}
		filled++
	}
	return filled, nil
}

// PutIPCache maps a prefix (a pod's /32 or /128, or a CIDR) to an identity.
func (d *Datapath) PutIPCache(p netip.Prefix, id identity.ID) error {
	if !p.IsValid() {
		return fmt.Errorf("invalid prefix %s", p)
	}
	k := ipcacheKey(p)
	v := datapathIpcacheValue{Identity: uint32(id)}
	if err := d.objs.Ipcache.Update(&k, &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write ipcache %s: %w", p, mapFull(err, "ipcache"))
	}
	return nil
}

// IPCacheCapacity is how many prefixes the ipcache holds at most.
func (d *Datapath) IPCacheCapacity() int {
	return int(d.objs.Ipcache.MaxEntries())
}

// DeleteIPCache removes a prefix; a missing one is not an error.
func (d *Datapath) DeleteIPCache(p netip.Prefix) error {
	k := ipcacheKey(p)
	err := d.objs.Ipcache.Delete(&k)
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete ipcache %s: %w", p, err)
	}
	return nil
}

// IPCacheLookup resolves an address as the datapath does (longest prefix);
// ok is false when nothing matches, which the datapath treats as world.
func (d *Datapath) IPCacheLookup(a netip.Addr) (identity.ID, bool, error) {
	k := ipcacheKey(netip.PrefixFrom(a, a.BitLen()))
	var v datapathIpcacheValue
	err := d.objs.Ipcache.Lookup(&k, &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return identity.World, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("look up %s in ipcache: %w", a, err)
	}
	return identity.ID(v.Identity), true, nil
}

// IPCache returns every ipcache entry.
func (d *Datapath) IPCache() (map[netip.Prefix]identity.ID, error) {
	out := map[netip.Prefix]identity.ID{}
	var k datapathIpcacheKey
	var v datapathIpcacheValue
	it := d.objs.Ipcache.Iterate()
	for it.Next(&k, &v) {
		out[prefixFromKey(k)] = identity.ID(v.Identity)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list ipcache: %w", err)
	}
	return out, nil
}

// Policy reads the policy and identity maps back as a MapState.
func (d *Datapath) Policy() (*policy.MapState, error) {
	ms := &policy.MapState{Entries: map[policy.Key]*policy.Entry{}, Identities: map[identity.ID]policy.IdentityFlags{}}
	var k datapathPolicyKey
	var v datapathPolicyValue
	it := d.objs.Policy.Iterate()
	for it.Next(&k, &v) {
		ms.Entries[policyKeyFromKernel(k)] = policyEntryFromKernel(v)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list policy: %w", err)
	}
	var id, flags uint32
	it = d.objs.Identities.Iterate()
	for it.Next(&id, &flags) {
		ms.Identities[identity.ID(id)] = policy.IdentityFlags(flags)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list identities: %w", err)
	}
	return ms, nil
}

// ApplyPolicy makes the policy and identity maps hold exactly want. New and
// changed entries are written before stale ones are removed, so an allow
// that stays valid is never missing; then the revision moves on so every
// established flow is checked again on its next packet.
func (d *Datapath) ApplyPolicy(want *policy.MapState) error {
	have, err := d.Policy()
	if err != nil {
		return err
	}
	upsert, del := policy.Diff(have, want)
	// Refuse what cannot fit before writing anything: a policy is in the
	// maps whole or not at all.
	if max := int(d.objs.Policy.MaxEntries()); len(want.Entries) > max {
		return fmt.Errorf("policy needs %d map entries; the policy map holds at most %d (raise its size)", len(want.Entries), max)
	}
	if max := int(d.objs.Identities.MaxEntries()); len(want.Identities) > max {
		return fmt.Errorf("policy names %d identities; the identities map holds at most %d", len(want.Identities), max)
	}
	var flagDel []identity.ID
	for id := range have.Identities {
		if _, ok := want.Identities[id]; !ok {
			flagDel = append(flagDel, id)
		}
	}
	flags := map[identity.ID]policy.IdentityFlags{}
	for id, f := range want.Identities {
		if hf, ok := have.Identities[id]; !ok || hf != f {
			flags[id] = f
		}
	}
	if err := d.WritePolicy(len(have.Entries), upsert, del, flags, flagDel); err != nil {
		return err
	}
	return d.BumpRevision()
}

// PolicyCapacity is how many entries the policy map holds at most.
func (d *Datapath) PolicyCapacity() int { return int(d.objs.Policy.MaxEntries()) }

// WritePolicy changes the policy and identity maps: entries, then flags,
// then deletions. Rules first when flags close a direction keeps every
// allowed flow allowed (flags first would briefly deny), rules first when
// flags open one lets nothing through early (an open direction ignores
// rules), so every single lookup sees the old or the new policy. have is
// how many entries the map holds now: when the upserts do not fit beside
// the stale entries, the deletions go first and stale allows end a moment
// early. It does not move the revision: the caller decides whether the
// change revokes anything.
func (d *Datapath) WritePolicy(have int, upsert map[policy.Key]*policy.Entry, del []policy.Key, flags map[identity.ID]policy.IdentityFlags, flagDel []identity.ID) error {
	if have+len(upsert) > d.PolicyCapacity() {
		if err := d.deletePolicyEntries(del); err != nil {
			return err
		}
		del = nil
	}
	ids := make([]uint32, 0, len(flags))
	vals := make([]uint32, 0, len(flags))
	for id, f := range flags {
		ids = append(ids, uint32(id))
		vals = append(vals, uint32(f))
	}
	if err := d.writePolicyEntries(upsert); err != nil {
		return err
	}
	if err := batchUpdate(d.objs.Identities, ids, vals, "identities"); err != nil {
		return err
	}
	if err := d.deletePolicyEntries(del); err != nil {
		return err
	}
	for _, id := range flagDel {
		if err := d.objs.Identities.Delete(uint32(id)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete identity flags of %s: %w", id, err)
		}
	}
	return nil
}

func (d *Datapath) deletePolicyEntries(del []policy.Key) error {
	for _, k := range del {
		kk := policyKey(k)
		if err := d.objs.Policy.Delete(&kk); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete policy entry: %w", err)
		}
	}
	return nil
}

func (d *Datapath) writePolicyEntries(entries map[policy.Key]*policy.Entry) error {
	keys := make([]datapathPolicyKey, 0, len(entries))
	vals := make([]datapathPolicyValue, 0, len(entries))
	for k, e := range entries {
		v, err := policyValue(e)
		if err != nil {
			return fmt.Errorf("policy entry %+v: %w", k, err)
		}
		keys = append(keys, policyKey(k))
		vals = append(vals, v)
	}
	return batchUpdate(d.objs.Policy, keys, vals, "policy")
}

// batchUpdate writes many entries in few syscalls. Check the capacity first:
// a full map would otherwise take part of a change and refuse the rest.
func batchUpdate[K, V any](m *ebpf.Map, keys []K, vals []V, name string) error {
	if len(keys) == 0 {
		return nil
	}
	const chunk = 4096
	for i := 0; i < len(keys); i += chunk {
		j := min(i+chunk, len(keys))
		if _, err := m.BatchUpdate(keys[i:j], vals[i:j], nil); err != nil {
			if errors.Is(err, ebpf.ErrNotSupported) {
				for n := i; n < j; n++ {
					if err := m.Update(&keys[n], &vals[n], ebpf.UpdateAny); err != nil {
						return fmt.Errorf("write %s: %w", name, mapFull(err, name))
					}
				}
				continue
			}
			return fmt.Errorf("write %s: %w", name, mapFull(err, name))
		}
	}
	return nil
}

// ErrMapFull is wrapped by every write a map refused for want of room.
var ErrMapFull = errors.New("map is full")

// sizeOption names the Options field that sizes each map that has one.
var sizeOption = map[string]string{"policy": "PolicyEntries", "conntrack": "ConntrackEntries", "ipcache": "IPCacheEntries"}

// mapFull turns the kernel's "no room" on insert into an error an operator
// can act on. Hash and array maps say E2BIG; an LPM trie (the ipcache) says
// ENOSPC.
func mapFull(err error, name string) error {
	if !errors.Is(err, unix.E2BIG) && !errors.Is(err, unix.ENOSPC) {
		return err
	}
	how := "its max_entries in the datapath object"
	if f, ok := sizeOption[name]; ok {
		how = "its size (bpf.Options." + f + ")"
	}
	return fmt.Errorf("%s %w: %w (raise %s or remove entries)", name, ErrMapFull, err, how)
}

// Revision returns the current policy revision.
func (d *Datapath) Revision() (uint32, error) {
	cfg, err := d.config()
	return cfg.Rev, err
}

// BumpRevision moves the policy revision on: every conntrack entry admitted
// under an older one is checked again on its next packet. It is safe to call
// concurrently with itself and SetDebug from any goroutine or process: see
// updateConfig.
func (d *Datapath) BumpRevision() error {
	return d.updateConfig(func(cfg *datapathConfig) {
		cfg.Rev++
		if cfg.Rev == 0 {
			cfg.Rev = 1 // 0 means "never checked" in conntrack entries
		}
	})
}

// SetDebug switches the seed-style trace lines on or off.
func (d *Datapath) SetDebug(on bool) error {
	return d.updateConfig(func(cfg *datapathConfig) {
		cfg.Debug = uint32(b2u(on))
	})
}

// Debug reports whether trace lines are on.
func (d *Datapath) Debug() (bool, error) {
	cfg, err := d.config()
	return cfg.Debug != 0, err
}

func (d *Datapath) config() (datapathConfig, error) {
	var cfg datapathConfig
	if err := d.objs.Config.Lookup(uint32(0), &cfg); err != nil {
		return cfg, fmt.Errorf("read config map: %w", err)
	}
	return cfg, nil
}

// updateConfig read-modify-writes the config entry. The entry holds both the
// revision and the debug switch and the kernel only replaces it whole, so two
// unserialised writers lose one's change: a lost revision bump lets flows
// admitted under a revoked policy live on. Writers are serialised in this
// handle by cfgMu and across handles and processes (the agent, policyctl
// without an agent) by a flock on the pinned progs directory. That is a lock
// of its own, not the root lock of Lock, so callers that already hold the
// root lock (ApplyPolicy under manual.Apply) do not deadlock, and nothing
// else takes it while holding it. The C struct, and so the map layout, stays
// as it is.
func (d *Datapath) updateConfig(change func(*datapathConfig)) error {
	d.cfgMu.Lock()
	defer d.cfgMu.Unlock()
	unlock, err := lockDir(filepath.Join(d.root, "progs"))
	if err != nil {
		return fmt.Errorf("lock config entry: %w", err)
	}
	defer unlock()
	cfg, err := d.config()
	if err != nil {
		return err
	}
	change(&cfg)
	if err := d.objs.Config.Update(uint32(0), &cfg, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write config map: %w", err)
	}
	return nil
}

// Lock serialises writers in different processes (plugin instances and the
// CLIs) around read-modify-write sequences such as ApplyPolicy.
func (d *Datapath) Lock() (unlock func(), err error) {
	return lockDir(d.root)
}

// SetRemoteCIDRs makes the remote_cidrs map hold exactly want: other
// nodes' pod ranges, between whose pods and this node's the datapath
// skips the node's forwarding (from_pod's fast path, from_net). Entries
// not in want are removed first, so a range that moved to this node stops
// being sent away before anything else changes; an empty want turns the
// fast path off.
func (d *Datapath) SetRemoteCIDRs(want []netip.Prefix) error {
	keep := map[netip.Prefix]bool{}
	for _, p := range want {
		if !p.IsValid() || p != p.Masked() {
			return fmt.Errorf("remote pod range %s: not a network prefix", p)
		}
		keep[p] = true
	}
	have, err := d.RemoteCIDRs()
	if err != nil {
		return err
	}
	for _, p := range have {
		if keep[p] {
			delete(keep, p)
			continue
		}
		k := ipcacheKey(p)
		if err := d.objs.RemoteCidrs.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete remote pod range %s: %w", p, err)
		}
	}
	for p := range keep {
		k := ipcacheKey(p)
		// The datapath keeps the range's next hop in the rest of the
		// value; a range written anew starts with none.
		if err := d.objs.RemoteCidrs.Update(&k, datapathRemoteRange{Present: 1}, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("write remote pod range %s: %w", p, mapFull(err, "remote_cidrs"))
		}
	}
	return nil
}

// RemoteCIDRs lists the remote_cidrs map, sorted.
func (d *Datapath) RemoteCIDRs() ([]netip.Prefix, error) {
	var out []netip.Prefix
	var k datapathIpcacheKey
	var v datapathRemoteRange
	it := d.objs.RemoteCidrs.Iterate()
	for it.Next(&k, &v) {
		out = append(out, prefixFromKey(k))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list remote pod ranges: %w", err)
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return out, nil
}
