package agent

import (
	"fmt"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/identity"
)

// nodeIdentities is what every identity number in use stands for on this
// node (GET /v1/identities). It reads the allocator, the compiler and the
// manual view, each safe to read beside the writer loop, so it answers
// before the agent is ready too, from the state file loaded at start.
func (a *Agent) nodeIdentities() []api.Identity {
	mv := a.manualView.Load()
	addrs := map[identity.ID][]netip.Addr{}
	for _, b := range mv.Bindings {
		addrs[b.Identity] = append(addrs[b.Identity], b.IP)
	}
	var ruled []identity.ID
	for _, r := range mv.Rules {
		ruled = append(ruled, r.Src, r.Dst)
	}
	cidrs := map[identity.ID]netip.Prefix{}
	for _, c := range a.compiler.CIDRs() {
		cidrs[c.ID] = c.Prefix
	}
	return api.NodeIdentities(a.alloc.Entries(), addrs, ruled, cidrs)
}

func (a *Agent) handleIdentityList(w http.ResponseWriter, _ *http.Request) {
	reply(w, api.IdentityList{Identities: a.nodeIdentities()})
}

func (a *Agent) handleIdentityGet(w http.ResponseWriter, r *http.Request) {
	n, err := strconv.ParseUint(r.PathValue("id"), 10, 32)
	if err != nil {
		fail(w, http.StatusBadRequest, fmt.Errorf("idcni-agent: bad identity %q: want a number", r.PathValue("id")))
		return
	}
	id, err := api.FindIdentity(a.nodeIdentities(), identity.ID(n), true)
	if err != nil {
		fail(w, http.StatusNotFound, fmt.Errorf("idcni-agent on node %s: %w", a.cfg.NodeName, err))
		return
	}
	reply(w, id)
}

// eventLabeler adds label sets and CIDRs to one stream's events. Label
// identities are looked up per event (a read-locked map lookup); CIDR
// identities come from a copy of the compiler's list, since listing takes
// the compiler's lock, which a large recompile holds for long.
type eventLabeler struct {
	labels func(identity.ID) (identity.LabelSet, bool)
	cidrs  func() map[identity.ID]netip.Prefix

	mu      sync.Mutex
	known   map[identity.ID]netip.Prefix
	fetched time.Time
}

func newEventLabeler(a *Agent) *eventLabeler {
	if a == nil || a.alloc == nil || a.compiler == nil {
		return nil
	}
	return &eventLabeler{
		labels: a.alloc.ByID,
		cidrs: func() map[identity.ID]netip.Prefix {
			m := map[identity.ID]netip.Prefix{}
			for _, c := range a.compiler.CIDRs() {
				m[c.ID] = c.Prefix
			}
			return m
		},
	}
}

// label fills e's label sets and CIDRs. A nil labeler (unit tests' hubs
// without an agent) leaves e as it is.
func (l *eventLabeler) label(e api.Event) api.Event {
	if l == nil || e.Gap != nil {
		return e
	}
	e.SrcLabels, e.SrcCIDR = l.of(e.Src)
	e.DstLabels, e.DstCIDR = l.of(e.Dst)
	return e
}

func (l *eventLabeler) of(id identity.ID) (map[string]string, string) {
	switch {
	case id.IsLabel():
		if s, ok := l.labels(id); ok {
			return api.LabelMap(s), ""
		}
	case id.IsCIDR():
		if pf, ok := l.cidr(id); ok {
			return nil, pf.String()
		}
	}
	return nil, ""
}

func (l *eventLabeler) cidr(id identity.ID) (netip.Prefix, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	// The compiler does not reuse a number for another prefix while it
	// runs, but its first full compile renumbers them, so a copy is
	// trusted for a while only, and a miss takes a new one at most once
	// a second.
	age := time.Since(l.fetched)
	if pf, ok := l.known[id]; ok && age < cidrCopyTTL {
		return pf, true
	}
	if age >= time.Second {
		l.known, l.fetched = l.cidrs(), time.Now()
	}
	pf, ok := l.known[id]
	return pf, ok
}

// cidrCopyTTL is how long a stream trusts its copy of the CIDR identities.
const cidrCopyTTL = 10 * time.Second
