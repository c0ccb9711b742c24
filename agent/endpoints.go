package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"strings"

	bolt "go.etcd.io/bbolt"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/cni"
	"github.com/idcni/idcni/store"
)

var endpointBucket = []byte("agent/endpoints")

// endpointRegistry holds the local endpoints the plugin registered, by
// container ID, in memory and in the state file: after a restart the agent
// knows which veth belongs to which pod without asking the plugin again.
//
// An entry names its host veth by ifindex, which the kernel reuses. It is
// trusted only while the link at that ifindex is the one the plugin made
// for it (linkOwnedBy): claim checks that at registration, verify at every
// audit, and rebuild re-creates entries from the host's links and the
// plugin's records when the state file lost them.
type endpointRegistry struct {
	db   *store.DB
	byID map[string]api.EndpointRequest
	// pods maps "ns/name" to a container ID: every flush asks it for every
	// pod of the cluster.
	pods map[string]string
}

func openEndpointRegistry(db *store.DB) (*endpointRegistry, error) {
	r := &endpointRegistry{db: db, byID: map[string]api.EndpointRequest{}, pods: map[string]string{}}
	err := db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(endpointBucket)
		if err != nil {
			return err
		}
		return b.ForEach(func(k, v []byte) error {
			var ep api.EndpointRequest
			if err := json.Unmarshal(v, &ep); err != nil {
				return fmt.Errorf("endpoint record %q: %w", k, err)
			}
			r.index(ep)
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("read endpoint registry: %w", err)
	}
	return r, nil
}

func (r *endpointRegistry) put(ep api.EndpointRequest) error {
	v, err := json.Marshal(ep)
	if err != nil {
		return err
	}
	err = r.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(endpointBucket).Put([]byte(ep.ContainerID), v)
	})
	if err != nil {
		return fmt.Errorf("store endpoint %s: %w", ep.ContainerID, err)
	}
	r.index(ep)
	return nil
}

func (r *endpointRegistry) index(ep api.EndpointRequest) {
	r.byID[ep.ContainerID] = ep
	r.pods[ep.PodNamespace+"/"+ep.PodName] = ep.ContainerID
}

func (r *endpointRegistry) remove(containerID string) (api.EndpointRequest, bool, error) {
	ep, ok := r.byID[containerID]
	if !ok {
		return ep, false, nil
	}
	err := r.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(endpointBucket).Delete([]byte(containerID))
	})
	if err != nil {
		return ep, true, fmt.Errorf("forget endpoint %s: %w", containerID, err)
	}
	delete(r.byID, containerID)
	if key := ep.PodNamespace + "/" + ep.PodName; r.pods[key] == containerID {
		delete(r.pods, key)
	}
	return ep, true, nil
}

func (r *endpointRegistry) byPod(ns, name string) (api.EndpointRequest, bool) {
	id, ok := r.pods[ns+"/"+name]
	if !ok {
		return api.EndpointRequest{}, false
	}
	return r.byID[id], true
}

func (r *endpointRegistry) all() []api.EndpointRequest {
	out := make([]api.EndpointRequest, 0, len(r.byID))
	for _, ep := range r.byID {
		out = append(out, ep)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ContainerID < out[j].ContainerID })
	return out
}

// errLinkNotOwned is the answer to a registration whose host veth is not
// the link at its ifindex.
var errLinkNotOwned = errors.New("the host veth is not the link at its ifindex")

// linkOwnedBy reports whether l is the host veth ep was registered with:
// the link at ep's ifindex, named ep.HostIfName, with the alias the plugin
// sets at ADD naming ep's container and interface (cni.ParseLinkAlias),
// in network when network is not "".
//
// That binding is what a reused ifindex cannot fake: the kernel hands a
// dead pod's ifindex to the next link, never its alias. A new pod's host
// veth carries its own container ID in its alias (and a name hashed from
// it), so no entry of an older container passes for it; an unrelated link
// has no idcni alias at all. Only root on the host can set an alias, and
// root can rewrite the maps anyway.
func linkOwnedBy(l hostLink, ep api.EndpointRequest, network string) bool {
	net, cid, ifName, ok := cni.ParseLinkAlias(l.Alias)
	return ok && l.Index == ep.HostIfIndex && l.Name == ep.HostIfName && cid == ep.ContainerID &&
		(ep.IfName == "" || ifName == ep.IfName) && (network == "" || net == network)
}

// describeLink says what is at an ifindex, for errors and logs.
func describeLink(l hostLink, ok bool) string {
	if !ok {
		return "no link"
	}
	return fmt.Sprintf("link %s with alias %q", l.Name, l.Alias)
}

// claim checks a registration before it is stored: its ifindex must hold
// its host veth (linkOwnedBy), or the request fails with errLinkNotOwned.
// Entries of other containers at the same ifindex are stale (their veth is
// gone: the index is this one's now) and are forgotten, returned as
// displaced.
func (r *endpointRegistry) claim(links hostLinks, req api.EndpointRequest, network string) (displaced []api.EndpointRequest, err error) {
	l, ok, err := links.ByIndex(req.HostIfIndex)
	if err != nil {
		return nil, err
	}
	if !ok || !linkOwnedBy(l, req, network) {
		return nil, fmt.Errorf("%w: ifindex %d holds %s, not host veth %s of container %s interface %s",
			errLinkNotOwned, req.HostIfIndex, describeLink(l, ok), req.HostIfName, req.ContainerID, req.IfName)
	}
	for _, ep := range r.all() {
		if ep.HostIfIndex != req.HostIfIndex || ep.ContainerID == req.ContainerID {
			continue
		}
		if _, _, err := r.remove(ep.ContainerID); err != nil {
			return displaced, err
		}
		displaced = append(displaced, ep)
	}
	return displaced, nil
}

// verify checks every entry against the host's links and forgets, in
// memory and in the state file, those whose host veth is gone or whose
// ifindex now holds another link (linkOwnedBy): a DEL the agent missed
// while it was down, or a pod gone with its netns. It returns what it
// forgot. An entry whose link cannot be read stays; the error says which.
func (r *endpointRegistry) verify(links hostLinks, network string) (pruned []api.EndpointRequest, err error) {
	var errs []error
	for _, ep := range r.all() {
		l, ok, err := links.ByIndex(ep.HostIfIndex)
		if err != nil {
			errs = append(errs, fmt.Errorf("endpoint of container %s: %w", short(ep.ContainerID), err))
			continue
		}
		if ok && linkOwnedBy(l, ep, network) {
			continue
		}
		if _, _, err := r.remove(ep.ContainerID); err != nil {
			errs = append(errs, err)
			continue
		}
		pruned = append(pruned, ep)
	}
	return pruned, errors.Join(errs...)
}

// liveVeth is a link of the host carrying the alias of one of the
// network's attachments.
type liveVeth struct {
	link                       hostLink
	network, container, ifName string
}

// missing lists the network's host veths (by alias; any network when
// network is "") that no entry names: registrations the state file lost,
// or that never reached the agent.
func (r *endpointRegistry) missing(links []hostLink, network string) []liveVeth {
	var out []liveVeth
	for _, l := range links {
		net, cid, ifName, ok := cni.ParseLinkAlias(l.Alias)
		if !ok || (network != "" && net != network) {
			continue
		}
		if ep, ok := r.byID[cid]; ok && linkOwnedBy(l, ep, network) {
			continue
		}
		out = append(out, liveVeth{link: l, network: net, container: cid, ifName: ifName})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].link.Index < out[j].link.Index })
	return out
}

// rebuild re-creates the entries of live host veths the registry is
// missing (after the state file was lost, or a registration that never
// arrived) from what survives outside it:
//
//   - links, the host's: which veths are the network's, and whose (alias);
//   - the plugin's records (records, read only when something is
//     missing): the attachment's addresses and, from CNI_ARGS, its pod;
//   - eps, the datapath's endpoints map: the addresses, when no record has
//     them;
//   - podAt, the informer cache: the local pod holding an address.
//
// A veth is attributed to the pod its record names, or else to the pod
// the API server reports at its addresses; it is skipped, and said so in
// skipped, when the two disagree, when neither names a pod, or when no
// address is known. An unreadable record only costs its own veth.
func (r *endpointRegistry) rebuild(links []hostLink, network string, eps map[int]bpf.Endpoint,
	records func() ([]*cni.Record, error), podAt func(netip.Addr) (string, bool)) (added []api.EndpointRequest, skipped []string, err error) {
	miss := r.missing(links, network)
	if len(miss) == 0 {
		return nil, nil, nil
	}
	recs, rerr := records()
	if rerr != nil {
		rerr = fmt.Errorf("read the plugin's records: %w", rerr)
	}
	byAttachment := map[string]*cni.Record{}
	for _, rec := range recs {
		byAttachment[rec.Network+"/"+rec.ContainerID+"/"+rec.IfName] = rec
	}
	skip := func(v liveVeth, format string, a ...any) {
		skipped = append(skipped, fmt.Sprintf("host veth %s (ifindex %d, container %s, interface %s): ",
			v.link.Name, v.link.Index, short(v.container), v.ifName)+fmt.Sprintf(format, a...))
	}
	var errs []error
	for _, v := range miss {
		rec := byAttachment[v.network+"/"+v.container+"/"+v.ifName]
		if rec != nil && rec.HostIfName != v.link.Name {
			rec = nil // the record of another veth of the attachment
		}
		var addrs []netip.Addr
		if rec != nil && len(rec.Addresses) > 0 {
			addrs = rec.Addresses
		} else if ep, ok := eps[v.link.Index]; ok {
			addrs = endpointAddrs(ep)
		}
		if len(addrs) == 0 {
			skip(v, "neither a record nor an endpoint entry gives its addresses")
			continue
		}
		var atAddr string
		conflict := false
		for _, a := range addrs {
			if p, ok := podAt(a); ok {
				if atAddr != "" && atAddr != p {
					conflict = true
				}
				atAddr = p
			}
		}
		var pod string
		if rec != nil && rec.PodName != "" {
			pod = rec.PodNamespace + "/" + rec.PodName
		}
		switch {
		case conflict:
			skip(v, "its addresses %v belong to different pods", addrs)
			continue
		case pod != "" && atAddr != "" && pod != atAddr:
			skip(v, "its record names pod %s, but the API server reports %s at %v", pod, atAddr, addrs)
			continue
		case pod == "" && atAddr == "":
			skip(v, "no record names its pod and no local pod has its addresses %v", addrs)
			continue
		case pod == "":
			pod = atAddr
		}
		if cur, ok := r.byID[v.container]; ok {
			skip(v, "container already has an entry, for host veth %s (ifindex %d)", cur.HostIfName, cur.HostIfIndex)
			continue
		}
		ns, name, _ := strings.Cut(pod, "/")
		ep := api.EndpointRequest{ContainerID: v.container, IfName: v.ifName, HostIfName: v.link.Name,
			HostIfIndex: v.link.Index, Addresses: addrs, PodNamespace: ns, PodName: name}
		if rec != nil {
			ep.Netns = rec.Netns
		}
		if err := r.put(ep); err != nil {
			errs = append(errs, err)
			continue
		}
		added = append(added, ep)
	}
	return added, skipped, errors.Join(append(errs, rerr)...)
}

// endpointAddrs lists the valid addresses of a datapath endpoint.
func endpointAddrs(ep bpf.Endpoint) []netip.Addr {
	var out []netip.Addr
	for _, a := range []netip.Addr{ep.IPv4, ep.IPv6} {
		if a.IsValid() {
			out = append(out, a)
		}
	}
	return out
}
