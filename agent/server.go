package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/manual"
	"github.com/idcni/idcni/policy"
)

// serveAPI listens on the unix socket. The socket is root-only: whoever
// can write to it can rename identities.
func (a *Agent) serveAPI(ctx context.Context) (*http.Server, error) {
	if err := os.MkdirAll(filepath.Dir(a.cfg.Socket), 0o700); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	if err := os.Remove(a.cfg.Socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale socket %s: %w", a.cfg.Socket, err)
	}
	l, err := net.Listen("unix", a.cfg.Socket)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", a.cfg.Socket, err)
	}
	if err := os.Chmod(a.cfg.Socket, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("restrict %s to root: %w", a.cfg.Socket, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+api.PathHealth, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-a.ready:
			reply(w, map[string]string{"status": "ready"})
		default:
			fail(w, http.StatusServiceUnavailable, errors.New("idcni-agent is starting: informer caches not synced yet"))
		}
	})
	mux.HandleFunc("PUT "+api.PathEndpoints+"{id}", a.handleRegister)
	mux.HandleFunc("DELETE "+api.PathEndpoints+"{id}", a.handleUnregister)
	mux.HandleFunc("GET "+api.PathManualEndpoints, a.handleManualList)
	// Changes wait for readiness (readyOnly); the lists answer from the
	// state file loaded at start.
	mux.HandleFunc("PUT "+api.PathManualEndpoints, a.readyOnly(a.handleManualBind))
	mux.HandleFunc("DELETE "+api.PathManualEndpoints, a.readyOnly(a.handleManualUnbind))
	mux.HandleFunc("GET "+api.PathManualRules, a.handleRuleList)
	mux.HandleFunc("POST "+api.PathManualRules, a.readyOnly(a.handleRuleAdd))
	mux.HandleFunc("POST "+api.PathManualRulesDel, a.readyOnly(a.handleRuleDelete))
	mux.HandleFunc("PUT "+api.PathDebug, a.readyOnly(a.handleDebug))
	mux.HandleFunc("GET "+api.PathEvents, streaming(a.events.serve))
	mux.HandleFunc("GET "+api.PathIdentities, a.handleIdentityList)
	mux.HandleFunc("GET "+api.PathIdentities+"/{id}", a.handleIdentityGet)
	srv := &http.Server{
		Handler:     limitBody(mux),
		BaseContext: func(net.Listener) context.Context { return ctx },
		// The socket is root-only, but root includes every plugin run
		// and every tool, and a stuck or buggy one must not hold the
		// agent's connections forever: a request arrives in full
		// within these bounds or the connection is closed.
		ReadHeaderTimeout: apiReadHeaderTimeout,
		ReadTimeout:       apiReadTimeout,
		// Longer than the plugin waits for a registration (cni's
		// agentTimeout, 30s), so the deadline never cuts an answer a
		// client still waits for. The event stream lifts it.
		WriteTimeout:   apiWriteTimeout,
		IdleTimeout:    apiIdleTimeout,
		MaxHeaderBytes: maxHeaderBytes,
	}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("local API stopped", "err", err)
		}
	}()
	return srv, nil
}

// Bounds of the local API.
const (
	apiReadHeaderTimeout = 10 * time.Second
	apiReadTimeout       = 30 * time.Second
	apiWriteTimeout      = 60 * time.Second
	apiIdleTimeout       = 90 * time.Second
	// maxRequestBody bounds a request's body: the largest the tools send
	// is one manual rule or endpoint, a few hundred bytes of JSON.
	maxRequestBody = 1 << 20
)

// limitBody caps every request body at maxRequestBody: a JSON decoder
// reads as long as the value goes on, so a client could otherwise make the
// agent buffer any amount of memory.
func limitBody(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.Body = http.MaxBytesReader(w, r.Body, maxRequestBody)
		h.ServeHTTP(w, r)
	})
}

// streaming lifts the connection's read and write deadlines for a handler
// that streams until the client leaves (GET /v1/events). Left in place,
// the write deadline would cut the stream, and the read deadline, hit by
// the server's background read, would cancel the request's context.
func streaming(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		if err := rc.SetReadDeadline(time.Time{}); err != nil {
			fail(w, http.StatusInternalServerError, fmt.Errorf("idcni-agent: lift the read deadline of a stream: %w", err))
			return
		}
		if err := rc.SetWriteDeadline(time.Time{}); err != nil {
			fail(w, http.StatusInternalServerError, fmt.Errorf("idcni-agent: lift the write deadline of a stream: %w", err))
			return
		}
		h(w, r)
	}
}

// decode reads a request's JSON body into v, answering 413 when the body
// is over maxRequestBody and 400 when it is not JSON of the right shape.
func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	err := json.NewDecoder(r.Body).Decode(v)
	if err == nil {
		return true
	}
	if mbe, ok := errors.AsType[*http.MaxBytesError](err); ok {
		fail(w, http.StatusRequestEntityTooLarge, fmt.Errorf("idcni-agent: request body over %d bytes", mbe.Limit))
		return false
	}
	fail(w, http.StatusBadRequest, fmt.Errorf("idcni-agent: bad request body: %w", err))
	return false
}

func reply(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

func fail(w http.ResponseWriter, code int, err error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(api.Error{Message: err.Error()})
}

// errNotReady is the answer to a change asked of an agent that is not ready.
var errNotReady = errors.New("idcni-agent is not ready yet: it has not synced with the Kubernetes API server and written the maps, and refuses changes until it has; retry once it is ready (policyctl status, or GET " + api.PathHealth + ")")

// readyOnly refuses a change with 503 until the agent is ready. A change
// writes the maps from the agent's view of the cluster (flush), and before
// the caches synced that view is empty: one manual PUT while the API
// server was unreachable emptied the ipcache and left every local pod
// unresolved. It answers at once rather than waiting, since a CLI cannot
// tell a slow start from a hung agent.
func (a *Agent) readyOnly(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-a.ready:
			h(w, r)
		default:
			fail(w, http.StatusServiceUnavailable, errNotReady)
		}
	}
}

// waitReady holds requests until the caches are synced: answering earlier
// would resolve pods against an empty cluster.
func (a *Agent) waitReady(w http.ResponseWriter, r *http.Request) bool {
	select {
	case <-a.ready:
		return true
	case <-r.Context().Done():
		fail(w, http.StatusServiceUnavailable, errors.New("idcni-agent is starting: informer caches not synced yet"))
		return false
	}
}

// handleRegister resolves a new local pod and answers only once its
// identity, ipcache entry, endpoint and policy are in the maps.
func (a *Agent) handleRegister(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	var req api.EndpointRequest
	if !decode(w, r, &req) {
		return
	}
	req.ContainerID = r.PathValue("id")
	if req.PodNamespace == "" || req.PodName == "" {
		fail(w, http.StatusBadRequest, errors.New("idcni-agent: the runtime passed no K8S_POD_NAMESPACE/K8S_POD_NAME in CNI_ARGS, so the pod cannot be resolved"))
		return
	}
	if !a.waitReady(w, r) {
		return
	}
	pod, err := a.pods.Pods(req.PodNamespace).Get(req.PodName)
	if apierrors.IsNotFound(err) {
		// The informer may lag the kubelet: ask the API server.
		pod, err = a.client.CoreV1().Pods(req.PodNamespace).Get(r.Context(), req.PodName, metav1.GetOptions{})
	}
	if err != nil {
		fail(w, http.StatusNotFound, fmt.Errorf("idcni-agent: pod %s/%s: %w", req.PodNamespace, req.PodName, err))
		return
	}
	for i, addr := range req.Addresses {
		req.Addresses[i] = addr.Unmap()
	}
	a.pending.put(req.ContainerID, endpointChange{register: req, pod: pod})
	if err := a.submit(r.Context(), key{kind: kindEndpoint, name: req.ContainerID}); err != nil {
		code := http.StatusInternalServerError
		if errors.Is(err, errLinkNotOwned) {
			code = http.StatusConflict
		}
		fail(w, code, fmt.Errorf("idcni-agent: pod %s/%s: %w", req.PodNamespace, req.PodName, err))
		return
	}
	id, _ := a.compiler.PodIdentity(req.PodNamespace, req.PodName)
	a.metrics.addSeconds.Observe(time.Since(start).Seconds())
	a.log.Info("endpoint registered", "pod", req.PodNamespace+"/"+req.PodName, "container", short(req.ContainerID),
		"identity", id, "took", time.Since(start).Round(time.Microsecond))
	reply(w, api.EndpointResponse{Identity: id})
}

func short(id string) string { return id[:min(12, len(id))] }

// handleUnregister forgets a container's endpoint. The plugin removes its
// own map entries; the writer removes the endpoint entry only while it is
// still this container's (a late DEL must not hit the pod that got the
// ifindex since), and the pod's ipcache entry goes when the API server
// reports the pod gone.
func (a *Agent) handleUnregister(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if !a.waitReady(w, r) {
		return
	}
	a.pending.put(id, endpointChange{remove: true})
	if err := a.submit(r.Context(), key{kind: kindEndpoint, name: id}); err != nil {
		fail(w, http.StatusInternalServerError, err)
		return
	}
	reply(w, struct{}{})
}

// changeManual hands a manual change to the writer, which checks it,
// writes it, and saves it once it is in force.
func (a *Agent) changeManual(w http.ResponseWriter, r *http.Request, change func(*manual.State) error) {
	done := make(chan error, 1)
	a.pendingManual.add(manualChange{change: change, done: done})
	a.queue.Add(key{kind: kindManual})
	var err error
	select {
	case err = <-done:
	case <-r.Context().Done():
		err = errors.Join(errors.New("idcni-agent: the change is queued but not written yet"), r.Context().Err())
	}
	if _, ok := errors.AsType[badRequest](err); ok {
		fail(w, http.StatusBadRequest, err)
		return
	}
	if err != nil {
		fail(w, http.StatusInternalServerError, err)
		return
	}
	reply(w, struct{}{})
}

func (a *Agent) handleManualList(w http.ResponseWriter, r *http.Request) {
	out := []api.ManualEndpoint{}
	for _, b := range a.manualView.Load().Bindings {
		out = append(out, api.ManualEndpoint{IP: b.IP, Identity: b.Identity})
	}
	reply(w, out)
}

func (a *Agent) handleManualBind(w http.ResponseWriter, r *http.Request) {
	var ep api.ManualEndpoint
	if !decode(w, r, &ep) {
		return
	}
	a.changeManual(w, r, func(s *manual.State) error { _, err := s.Bind(ep.IP, ep.Identity); return err })
}

func (a *Agent) handleManualUnbind(w http.ResponseWriter, r *http.Request) {
	ip, err := netip.ParseAddr(r.URL.Query().Get("ip"))
	if err != nil {
		fail(w, http.StatusBadRequest, fmt.Errorf("bad ip: %w", err))
		return
	}
	a.changeManual(w, r, func(s *manual.State) error { _, err := s.Unbind(ip.Unmap()); return err })
}

func (a *Agent) handleRuleList(w http.ResponseWriter, r *http.Request) {
	reply(w, api.RuleList{Rules: append([]policy.ManualRule{}, a.manualView.Load().Rules...)})
}

func (a *Agent) handleRuleAdd(w http.ResponseWriter, r *http.Request) {
	var req api.RuleRequest
	if !decode(w, r, &req) {
		return
	}
	a.changeManual(w, r, func(s *manual.State) error { _, err := s.AddRule(req.Rule); return err })
}

func (a *Agent) handleRuleDelete(w http.ResponseWriter, r *http.Request) {
	var req api.RuleRequest
	if !decode(w, r, &req) {
		return
	}
	a.changeManual(w, r, func(s *manual.State) error { _, err := s.DeleteRules(req.Rule); return err })
}

func (a *Agent) handleDebug(w http.ResponseWriter, r *http.Request) {
	var d api.Debug
	if !decode(w, r, &d) {
		return
	}
	if err := a.dp.SetDebug(d.On); err != nil {
		fail(w, http.StatusInternalServerError, err)
		return
	}
	reply(w, struct{}{})
}

// eventFilter is the query of GET /v1/events.
type eventFilter struct {
	pod, namespace string
	identity       identity.ID
	verdict        string // "", "allow" or "drop"
}

func parseEventFilter(q map[string][]string) (eventFilter, error) {
	get := func(k string) string {
		if v := q[k]; len(v) > 0 {
			return v[0]
		}
		return ""
	}
	f := eventFilter{pod: get("pod"), namespace: get("namespace"), verdict: strings.ToLower(get("verdict"))}
	if s := get("identity"); s != "" {
		n, err := strconv.ParseUint(s, 10, 32)
		if err != nil {
			return f, fmt.Errorf("bad identity %q", s)
		}
		f.identity = identity.ID(n)
	}
	if f.verdict != "" && f.verdict != "allow" && f.verdict != "drop" {
		return f, fmt.Errorf("bad verdict %q: want allow or drop", f.verdict)
	}
	return f, nil
}

func (f eventFilter) match(e api.Event) bool {
	if f.identity != 0 && e.Src != f.identity && e.Dst != f.identity {
		return false
	}
	if f.verdict == "allow" && !e.Allowed || f.verdict == "drop" && e.Allowed {
		return false
	}
	if f.pod != "" || f.namespace != "" {
		ok := false
		for _, p := range []string{e.SrcPod, e.DstPod} {
			ns, name, _ := strings.Cut(p, "/")
			if (f.namespace == "" || ns == f.namespace) && (f.pod == "" || name == f.pod || p == f.pod) && p != "" {
				ok = true
			}
		}
		return ok
	}
	return true
}
