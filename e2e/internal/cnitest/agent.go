package cnitest

import (
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/idcni/idcni/agent/api"
)

// AgentPeer answers the plugin on the agent socket with the agent/api
// protocol (the same types and paths idcni-agent serves), with answers the
// test scripts. It exists because the plugin's side of the contract (wait
// for the answer, pass errors on verbatim, fail when a required agent is
// gone) must be tested before and independently of the agent itself.
type AgentPeer struct {
	// Register answers an endpoint registration.
	Register func(api.EndpointRequest) (api.EndpointResponse, error)

	mu       sync.Mutex
	requests []api.EndpointRequest
	deleted  []string
	srv      *http.Server
}

// ServeAgent starts p on socket until the test ends.
func ServeAgent(t testing.TB, socket string, p *AgentPeer) {
	t.Helper()
	l, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatalf("listen on %s: %v", socket, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc(api.PathHealth, func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusOK) })
	mux.HandleFunc(api.PathEndpoints, func(w http.ResponseWriter, r *http.Request) {
		id := strings.TrimPrefix(r.URL.Path, api.PathEndpoints)
		switch r.Method {
		case http.MethodPut:
			var req api.EndpointRequest
			if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
				writeError(w, http.StatusBadRequest, err)
				return
			}
			p.mu.Lock()
			p.requests = append(p.requests, req)
			p.mu.Unlock()
			resp, err := p.Register(req)
			if err != nil {
				writeError(w, http.StatusUnprocessableEntity, err)
				return
			}
			_ = json.NewEncoder(w).Encode(resp)
		case http.MethodDelete:
			p.mu.Lock()
			p.deleted = append(p.deleted, id)
			p.mu.Unlock()
			w.WriteHeader(http.StatusNoContent)
		default:
			writeError(w, http.StatusMethodNotAllowed, errors.New("method not allowed"))
		}
	})
	p.srv = &http.Server{Handler: mux}
	go func() { _ = p.srv.Serve(l) }()
	t.Cleanup(func() { p.srv.Close() })
}

func writeError(w http.ResponseWriter, code int, err error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(api.Error{Message: err.Error()})
}

// Requests returns the registrations received so far.
func (p *AgentPeer) Requests() []api.EndpointRequest {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]api.EndpointRequest(nil), p.requests...)
}

// Deleted returns the container IDs the plugin reported gone.
func (p *AgentPeer) Deleted() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.deleted...)
}
