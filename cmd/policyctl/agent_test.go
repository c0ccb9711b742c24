package main

import (
	"encoding/json"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/internal/clitest"
	"github.com/idcni/idcni/manual"
	"github.com/idcni/idcni/policy"
)

// agentPeer answers the CLIs on the agent socket with the agent/api
// protocol, keeping the manual state in memory with package manual as
// idcni-agent does. It stands in for the agent so that the CLIs' side of
// the contract (use the socket when it answers, and then leave the maps and
// the state file to the agent) is tested without a Kubernetes API server.
type agentPeer struct {
	mu     sync.Mutex
	st     manual.State
	debug  *bool
	events []api.Event
	query  url.Values
	// identities answer GET /v1/identities (identity_test.go).
	identities []api.Identity
}

func (p *agentPeer) serve(t *testing.T, socket string) {
	t.Helper()
	l, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	fail := func(w http.ResponseWriter, err error) {
		w.WriteHeader(http.StatusBadRequest)
		_ = json.NewEncoder(w).Encode(api.Error{Message: err.Error()})
	}
	change := func(w http.ResponseWriter, fn func(*manual.State) error) {
		p.mu.Lock()
		defer p.mu.Unlock()
		next := p.st.Clone()
		if err := fn(&next); err != nil {
			fail(w, err)
			return
		}
		p.st = next
		_ = json.NewEncoder(w).Encode(struct{}{})
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+api.PathHealth, func(http.ResponseWriter, *http.Request) {})
	mux.HandleFunc("GET "+api.PathManualEndpoints, func(w http.ResponseWriter, _ *http.Request) {
		p.mu.Lock()
		defer p.mu.Unlock()
		out := []api.ManualEndpoint{}
		for _, b := range p.st.Bindings {
			out = append(out, api.ManualEndpoint{IP: b.IP, Identity: b.Identity})
		}
		_ = json.NewEncoder(w).Encode(out)
	})
	mux.HandleFunc("PUT "+api.PathManualEndpoints, func(w http.ResponseWriter, r *http.Request) {
		var ep api.ManualEndpoint
		_ = json.NewDecoder(r.Body).Decode(&ep)
		change(w, func(s *manual.State) error { _, err := s.Bind(ep.IP, ep.Identity); return err })
	})
	mux.HandleFunc("DELETE "+api.PathManualEndpoints, func(w http.ResponseWriter, r *http.Request) {
		ip, err := netip.ParseAddr(r.URL.Query().Get("ip"))
		if err != nil {
			fail(w, err)
			return
		}
		change(w, func(s *manual.State) error { _, err := s.Unbind(ip); return err })
	})
	mux.HandleFunc("GET "+api.PathManualRules, func(w http.ResponseWriter, _ *http.Request) {
		p.mu.Lock()
		defer p.mu.Unlock()
		_ = json.NewEncoder(w).Encode(api.RuleList{Rules: p.st.Rules})
	})
	mux.HandleFunc("POST "+api.PathManualRules, func(w http.ResponseWriter, r *http.Request) {
		var req api.RuleRequest
		_ = json.NewDecoder(r.Body).Decode(&req)
		change(w, func(s *manual.State) error { _, err := s.AddRule(req.Rule); return err })
	})
	mux.HandleFunc("POST "+api.PathManualRulesDel, func(w http.ResponseWriter, r *http.Request) {
		var req api.RuleRequest
		_ = json.NewDecoder(r.Body).Decode(&req)
		change(w, func(s *manual.State) error { _, err := s.DeleteRules(req.Rule); return err })
	})
	mux.HandleFunc("PUT "+api.PathDebug, func(w http.ResponseWriter, r *http.Request) {
		var d api.Debug
		_ = json.NewDecoder(r.Body).Decode(&d)
		p.mu.Lock()
		p.debug = &d.On
		p.mu.Unlock()
	})
	mux.HandleFunc("GET "+api.PathEvents, func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		p.query = r.URL.Query()
		evs := p.events
		p.mu.Unlock()
		enc := json.NewEncoder(w)
		for _, e := range evs {
			_ = enc.Encode(e)
		}
		w.(http.Flusher).Flush()
		<-r.Context().Done() // a stream: open until the client goes
	})
	p.handleIdentities(mux)
	srv := &http.Server{Handler: mux}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { srv.Close() })
}

func TestThroughAgent(t *testing.T) {
	t.Parallel()
	e, d := clitest.New(t)
	now := time.Now()
	p := &agentPeer{events: []api.Event{
		{Event: bpf.Event{Time: now, Src: 1001, Dst: 1002, SrcAddr: podA, DstAddr: podB, Proto: policy.ProtoICMP, Allowed: true, Reason: bpf.ReasonAllowRule, Scope: bpf.ScopeEgress}},
		// Events are missing here: the reader fell behind, and the
		// datapath's ring was full.
		{Gap: &api.Gap{Missed: 3, Lost: map[string]uint64{"no-rule": 2}}},
		{Event: bpf.Event{Time: now, Src: 1002, Dst: 1001, SrcAddr: podB, DstAddr: podA, Proto: policy.ProtoTCP, DstPort: 8080, Reason: bpf.ReasonDropDeny, Scope: bpf.ScopeEgress, Suppressed: 7},
			SrcPod: "shop/backend", DstPod: "shop/frontend"},
	}}
	p.serve(t, e.Socket)
	before := snap(t, e, d)

	r := e.MustRun("endpointctl", "add", "--ip", "10.13.0.2", "--identity", "1001")
	if !strings.Contains(r.Stdout, "through idcni-agent") {
		t.Errorf("add said:\n%s", r)
	}
	e.MustRun("endpointctl", "add", "--ip", "10.13.0.3", "--identity", "1002")
	e.MustRun("endpointctl", "del", "--ip", "10.13.0.3")
	e.MustFail("no manual endpoint has IP 10.13.0.3", false, "endpointctl", "del", "--ip", "10.13.0.3")
	e.MustRun("policyctl", "allow", "--src", "1001", "--dst", "1002", "--symmetric")
	e.MustRun("policyctl", "deny", "--src", "1002", "--dst", "1001", "--port", "8080")
	e.MustRun("policyctl", "delete", "--src", "1002", "--dst", "1001", "--port", "8080")
	e.MustFail("no manual rule matches", false, "policyctl", "delete", "--src", "1002", "--dst", "1001")
	e.MustRun("policyctl", "debug", "on")

	p.mu.Lock()
	want := manual.State{
		Bindings: []manual.Binding{{IP: podA, Identity: 1001}},
		Rules:    []policy.ManualRule{{Action: policy.Allow, Src: 1001, Dst: 1002, Symmetric: true}},
	}
	if !reflect.DeepEqual(p.st, want) || p.debug == nil || !*p.debug {
		t.Errorf("the agent got state %+v, debug %v; want %+v, debug on", p.st, p.debug, want)
	}
	p.mu.Unlock()

	var l struct {
		Rules []listedRule `json:"rules"`
	}
	r = e.MustRun("policyctl", "list", "-o", "json")
	if err := json.Unmarshal([]byte(r.Stdout), &l); err != nil || len(l.Rules) != 1 || !l.Rules[0].Symmetric {
		t.Errorf("list through the agent = %+v, %v\n%s", l, err, r)
	}
	r = e.MustRun("endpointctl", "list")
	if !strings.Contains(r.Stdout, "10.13.0.2") || !strings.Contains(r.Stdout, "1001") {
		t.Errorf("endpointctl list through the agent:\n%s", r)
	}

	// Events come from the agent's stream, filtered there and here.
	// A gap marker passes every filter: whatever was lost may have
	// matched.
	r = e.MustRun("policyctl", "monitor", "--verdict", "drop", "--namespace", "shop", "-o", "json", "-c", "1")
	lines := strings.Split(strings.TrimSpace(r.Stdout), "\n")
	var gap struct {
		Gap api.Gap `json:"gap"`
	}
	var ev eventView
	if len(lines) != 2 || json.Unmarshal([]byte(lines[0]), &gap) != nil || gap.Gap.Missed != 3 || gap.Gap.Lost["no-rule"] != 2 {
		t.Errorf("monitor through the agent: want a gap marker, then the drop:\n%s", r)
	} else if err := json.Unmarshal([]byte(lines[1]), &ev); err != nil || ev.Verdict != "drop" || ev.Reason != "deny-rule" || ev.SrcIdentity != 1002 || ev.DstPort != 8080 || ev.Proto != "tcp" || ev.SrcPod != "shop/backend" || ev.Suppressed != 7 {
		t.Errorf("monitor through the agent = %+v, %v\n%s", ev, err, r)
	}
	if !strings.Contains(r.Stderr, "through idcni-agent on "+e.Socket) {
		t.Errorf("monitor does not say it reads from the agent:\n%s", r)
	}
	p.mu.Lock()
	if p.query.Get("verdict") != "drop" || p.query.Get("namespace") != "shop" {
		t.Errorf("monitor asked the agent for %v", p.query)
	}
	p.mu.Unlock()

	r = e.MustRun("policyctl", "monitor", "-c", "2")
	if lines := strings.Split(strings.TrimSpace(r.Stdout), "\n"); len(lines) != 3 ||
		lines[1] != "--- gap: 3 events dropped because this monitor fell behind; 2 no-rule events lost (the datapath's ring was full) ---" ||
		!strings.Contains(lines[2], "(+7 earlier events of this endpoint held back by its rate limit)") || !strings.HasSuffix(lines[2], "[shop/backend -> shop/frontend]") {
		t.Errorf("monitor text through the agent:\n%s", r)
	}

	e.MustFail("idcni-agent runs on "+e.Socket+" and owns the datapath", false, "policyctl", "restore")

	// The agent owns maps and state file: the CLIs touched neither.
	if after := snap(t, e, d); !reflect.DeepEqual(after, before) {
		t.Errorf("with an agent running, the CLIs wrote the maps or the state file:\nbefore %+v\nafter  %+v", before, after)
	}
	if _, err := os.Stat(e.State); !os.IsNotExist(err) {
		t.Errorf("with an agent running, the CLIs created the state file: %v", err)
	}
}
