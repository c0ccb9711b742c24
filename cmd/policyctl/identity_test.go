package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/internal/clitest"
	"github.com/idcni/idcni/policy"
	"github.com/idcni/idcni/store"
)

// shopSet is the label set the agent gives a pod app=NAME in namespace
// shop (whose labels are team=a and the name label every namespace has).
func shopSet(t *testing.T, app string) identity.LabelSet {
	t.Helper()
	s, err := identity.FromPod(map[string]string{"app": app}, "shop",
		map[string]string{"kubernetes.io/metadata.name": "shop", "team": "a"}, identity.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func lineOf(t *testing.T, out, prefix string) string {
	t.Helper()
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, prefix) {
			return l
		}
	}
	t.Errorf("no line starting with %q in:\n%s", prefix, out)
	return ""
}

// Without an agent, policyctl identity reads the state file, read-only:
// the label sets and pods an agent left there, the manual bindings, the
// reserved names; unknown numbers are errors that say numbers are
// node-local; a file an agent holds is a clear error, not a hang.
func TestIdentityFromStateFile(t *testing.T) {
	t.Parallel()
	e, _ := clitest.New(t)

	// No state file yet: the reserved identities only, and a label
	// number is unknown, with the reason.
	r := e.MustRun("policyctl", "identity", "list")
	if !strings.Contains(lineOf(t, r.Stdout, "1 "), "host") || !strings.Contains(r.Stderr, "no state file") {
		t.Errorf("identity list without a state file:\n%s", r)
	}
	e.MustFail("no state file", false, "policyctl", "identity", "get", "65536")
	if _, err := os.Stat(e.State); !os.IsNotExist(err) {
		t.Fatalf("identity list created the state file: %v", err)
	}

	// What an agent leaves in the state file.
	a, err := identity.OpenAllocator(e.State, time.Second, identity.Config{})
	if err != nil {
		t.Fatal(err)
	}
	web, db := shopSet(t, "web"), shopSet(t, "db")
	webID, err := a.Acquire("pod/shop/web-2", web)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"web-1", "web-3", "web-4"} {
		if _, err := a.Acquire("pod/shop/"+p, web); err != nil {
			t.Fatal(err)
		}
	}
	dbID, err := a.Allocate(db)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	e.MustRun("endpointctl", "add", "--ip", "10.13.0.2", "--identity", "1001")
	e.MustRun("policyctl", "allow", "--src", "1001", "--dst", "1002")
	before, err := os.ReadFile(e.State)
	if err != nil {
		t.Fatal(err)
	}

	r = e.MustRun("policyctl", "identity", "list", "-o", "json")
	var l api.IdentityList
	if err := json.Unmarshal([]byte(r.Stdout), &l); err != nil {
		t.Fatalf("identity list -o json: %v\n%s", err, r)
	}
	var ids []identity.ID
	byID := map[identity.ID]api.Identity{}
	for _, x := range l.Identities {
		ids = append(ids, x.ID)
		byID[x.ID] = x
	}
	if want := []identity.ID{1, 2, 5, 6, 1001, 1002, webID, dbID}; !reflect.DeepEqual(ids, want) {
		t.Errorf("identity list -o json has %v, want %v", ids, want)
	}
	w := byID[webID]
	if w.Kind != "label" || !reflect.DeepEqual(w.Labels, api.LabelMap(web)) || w.Labels["app"] != "web" ||
		!reflect.DeepEqual(w.Pods, []string{"shop/web-1", "shop/web-2", "shop/web-3", "shop/web-4"}) || w.IdleSince != nil {
		t.Errorf("label identity %d = %+v", webID, w)
	}
	if d := byID[dbID]; d.Labels["app"] != "db" || d.IdleSince == nil || len(d.Pods) != 0 {
		t.Errorf("unused label identity %d = %+v", dbID, d)
	}
	if m := byID[1001]; m.Kind != "manual" || !reflect.DeepEqual(m.Addresses, []netip.Addr{podA}) {
		t.Errorf("manual identity 1001 = %+v", m)
	}
	if h := byID[identity.Host]; h.Kind != "reserved" || h.Name != "host" {
		t.Errorf("identity 1 = %+v", h)
	}

	r = e.MustRun("policyctl", "identity", "list")
	if !strings.Contains(r.Stderr, "from the state file "+e.State) {
		t.Errorf("identity list does not say where its answer comes from:\n%s", r)
	}
	if got := strings.Fields(lineOf(t, r.Stdout, fmt.Sprint(webID))); !reflect.DeepEqual(got,
		[]string{fmt.Sprint(webID), "label", "ns=shop,app=web", "shop/web-1,", "shop/web-2,", "shop/web-3,", "+1", "more"}) {
		t.Errorf("list row of %d: %q\n%s", webID, got, r)
	}
	if l := lineOf(t, r.Stdout, fmt.Sprint(dbID)); !strings.Contains(l, "ns=shop,app=db") || !strings.Contains(l, "unused since") {
		t.Errorf("list row of %d: %q", dbID, l)
	}
	if l := lineOf(t, r.Stdout, "1001 "); !strings.Contains(l, "manual") || !strings.Contains(l, "10.13.0.2") {
		t.Errorf("list row of 1001: %q", l)
	}
	if l := lineOf(t, r.Stdout, "6 "); !strings.Contains(l, "remote-node") {
		t.Errorf("list row of 6: %q", l)
	}

	r = e.MustRun("policyctl", "identity", "get", fmt.Sprint(webID))
	for _, want := range []string{"app=web", "io.kubernetes.pod.namespace=shop", "io.idcni.namespace.labels.team=a", "shop/web-4", "node"} {
		if !strings.Contains(r.Stdout, want) {
			t.Errorf("identity get %d lacks %q:\n%s", webID, want, r)
		}
	}
	var one api.Identity
	r = e.MustRun("policyctl", "identity", "get", fmt.Sprint(webID), "-o", "json")
	if err := json.Unmarshal([]byte(r.Stdout), &one); err != nil || !reflect.DeepEqual(one, w) {
		t.Errorf("identity get -o json = %+v, %v; want %+v", one, err, w)
	}
	r = e.MustRun("policyctl", "identity", "get", "host", "-o", "json")
	if err := json.Unmarshal([]byte(r.Stdout), &one); err != nil || one.ID != identity.Host || one.Name != "host" {
		t.Errorf("identity get host = %+v, %v", one, err)
	}

	for _, c := range []struct {
		want  string
		usage bool
		args  []string
	}{
		{"label identity 65999 is not allocated on this node; identity numbers are node-local", false, []string{"65999"}},
		{"manual identity 1005 is not bound to any address", false, []string{"1005"}},
		{"idcni-agent numbers those in memory", false, []string{"16777216"}},
		{"0 is not an identity", false, []string{"0"}},
		{"reserved but unused", false, []string{"3"}},
		{`bad identity "web"`, true, []string{"web"}},
		{"takes one identity", true, nil},
	} {
		e.MustFail(c.want, c.usage, "policyctl", append([]string{"identity", "get"}, c.args...)...)
	}
	if after, _ := os.ReadFile(e.State); !bytes.Equal(before, after) {
		t.Error("policyctl identity changed the state file")
	}

	// A running agent holds the file: without its socket answering,
	// the read gives up with a clear error instead of waiting for it.
	held, err := store.Open(e.State, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	e.MustFail("is locked by another process (a running idcni-agent", false, "policyctl", "identity", "list")
	if took := time.Since(start); took > 20*time.Second {
		t.Errorf("identity list waited %s for a held state file", took)
	}
	held.Close()

	r = e.MustRun("policyctl", "identity", "--help")
	if !strings.Contains(r.Stdout, "Identity numbers are node-local") {
		t.Errorf("identity --help does not explain node-locality:\n%s", r)
	}
}

// Through the agent, monitor shows the label sets the agent sends with
// each event, and says once when a label identity came without one;
// identity get passes the agent's answer and its error on.
func TestLabelsThroughAgent(t *testing.T) {
	t.Parallel()
	e, _ := clitest.New(t)
	web := api.LabelMap(shopSet(t, "web"))
	now := time.Now()
	p := &agentPeer{
		events: []api.Event{
			{Event: bpf.Event{Time: now, Src: 65537, Dst: 16777216, SrcAddr: podA, DstAddr: netip.MustParseAddr("10.1.2.3"), Proto: policy.ProtoTCP, DstPort: 443, Reason: bpf.ReasonDropNoRule, Scope: bpf.ScopeEgress},
				SrcPod: "shop/web-1", SrcLabels: web, DstCIDR: "10.0.0.0/8"},
			// 65538 was freed since: the agent has no labels for it.
			{Event: bpf.Event{Time: now, Src: identity.Host, Dst: 65538, SrcAddr: netip.MustParseAddr("10.13.0.1"), DstAddr: podB, Proto: policy.ProtoICMP, Allowed: true, Reason: bpf.ReasonAllowHost, Scope: bpf.ScopeIngress}},
			{Event: bpf.Event{Time: now, Src: 65538, Dst: 65537, SrcAddr: podB, DstAddr: podA, Proto: policy.ProtoICMP, Reason: bpf.ReasonDropNoRule, Scope: bpf.ScopeIngress},
				DstLabels: web},
		},
		identities: api.NodeIdentities([]identity.Entry{{ID: 65537, Set: shopSet(t, "web"), Users: []string{"pod/shop/web-1"}}}, nil, nil,
			map[identity.ID]netip.Prefix{16777216: netip.MustParsePrefix("10.0.0.0/8")}),
	}
	p.serve(t, e.Socket)

	r := e.MustRun("policyctl", "monitor", "-c", "3")
	lines := strings.Split(strings.TrimSpace(r.Stdout), "\n")
	if len(lines) != 3 ||
		!strings.Contains(lines[0], " DROP id 65537 (ns=shop,app=web) 10.13.0.2:0 -> id 16777216 (cidr=10.0.0.0/8) 10.1.2.3:443 tcp (no-rule, egress) [shop/web-1 -> -]") ||
		!strings.Contains(lines[1], " ALLOW id host 10.13.0.1 -> id 65538 10.13.0.3 icmp (from-host, ingress)") ||
		!strings.Contains(lines[2], " DROP id 65538 10.13.0.3 -> id 65537 (ns=shop,app=web) 10.13.0.2 icmp") {
		t.Errorf("monitor text with labels:\n%s", r)
	}
	if n := strings.Count(r.Stderr, "Warning: no label set for identity 65538"); n != 1 {
		t.Errorf("monitor said %d times that 65538 has no label set, want once:\n%s", n, r)
	}

	r = e.MustRun("policyctl", "monitor", "-c", "1", "-o", "json")
	var ev eventView
	if err := json.Unmarshal([]byte(r.Stdout), &ev); err != nil || !reflect.DeepEqual(ev.SrcLabels, web) || ev.DstLabels != nil ||
		ev.DstCIDR != "10.0.0.0/8" || ev.SrcIdentity != 65537 || ev.SrcPod != "shop/web-1" {
		t.Errorf("monitor -o json = %+v, %v\n%s", ev, err, r)
	}

	var one api.Identity
	r = e.MustRun("policyctl", "identity", "get", "65537", "-o", "json")
	if err := json.Unmarshal([]byte(r.Stdout), &one); err != nil || !reflect.DeepEqual(one.Labels, web) || !reflect.DeepEqual(one.Pods, []string{"shop/web-1"}) {
		t.Errorf("identity get through the agent = %+v, %v\n%s", one, err, r)
	}
	e.MustFail("not allocated on this node", false, "policyctl", "identity", "get", "65539")
	r = e.MustRun("policyctl", "identity", "list")
	if l := lineOf(t, r.Stdout, "16777216"); !strings.Contains(l, "cidr=10.0.0.0/8") {
		t.Errorf("identity list through the agent: %q\n%s", l, r)
	}
	if r.Stderr != "" {
		t.Errorf("identity list through the agent wrote to stderr:\n%s", r)
	}
}

// handleIdentities answers GET /v1/identities[/{id}] from a fixed list, as
// idcni-agent answers from its allocator.
func (p *agentPeer) handleIdentities(mux *http.ServeMux) {
	mux.HandleFunc("GET "+api.PathIdentities, func(w http.ResponseWriter, _ *http.Request) {
		_ = json.NewEncoder(w).Encode(api.IdentityList{Identities: p.identities})
	})
	mux.HandleFunc("GET "+api.PathIdentities+"/{id}", func(w http.ResponseWriter, r *http.Request) {
		id, err := identity.Parse(r.PathValue("id"))
		if err == nil {
			var x api.Identity
			if x, err = api.FindIdentity(p.identities, id, true); err == nil {
				_ = json.NewEncoder(w).Encode(x)
				return
			}
		}
		w.WriteHeader(http.StatusNotFound)
		_ = json.NewEncoder(w).Encode(api.Error{Message: err.Error()})
	})
}
