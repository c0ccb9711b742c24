package agent

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"

	networkingv1 "k8s.io/api/networking/v1"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/identity"
)

// GET /v1/identities answers which label set, CIDR or name each number
// stands for on this node, with the pods holding it; an unknown number is
// a 404 that names the node. Verdict events get the same label sets.
func TestIdentitiesAndEventLabels(t *testing.T) {
	np := allowFrom("shop", "web-in", "web", "lb", 80)
	np.Spec.Ingress[0].From = append(np.Spec.Ingress[0].From, networkingv1.NetworkPolicyPeer{IPBlock: &networkingv1.IPBlock{CIDR: "10.0.0.0/8"}})
	ta := newTestAgent(t, newFakeMaps(), ns("shop", map[string]string{"team": "a"}), nodeObj(localNode, "192.0.2.1"),
		pod("shop", "web-1", localNode, "10.13.0.2", map[string]string{"app": "web"}),
		pod("shop", "web-2", "node-b", "10.13.1.3", map[string]string{"app": "web"}),
		pod("shop", "lb-1", "node-b", "10.13.1.2", map[string]string{"app": "lb"}), np)
	webID := ta.idOf(t, "shop", "web-1")
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+api.PathIdentities, ta.handleIdentityList)
	mux.HandleFunc("GET "+api.PathIdentities+"/{id}", ta.handleIdentityGet)
	get := func(path string) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		mux.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		return rec
	}

	var l api.IdentityList
	if err := json.Unmarshal(get(api.PathIdentities).Body.Bytes(), &l); err != nil {
		t.Fatal(err)
	}
	var web, cidr api.Identity
	for _, x := range l.Identities {
		switch {
		case x.ID == webID:
			web = x
		case x.Kind == api.KindCIDR:
			cidr = x
		}
	}
	if web.Kind != api.KindLabel || web.Labels["app"] != "web" || web.Labels[identity.NamespaceLabelPrefix+"team"] != "a" ||
		!slices.Equal(web.Pods, []string{"shop/web-1", "shop/web-2"}) {
		t.Errorf("identity %d = %+v", webID, web)
	}
	if !cidr.ID.IsCIDR() || cidr.CIDR != "10.0.0.0/8" {
		t.Errorf("CIDR identity = %+v", cidr)
	}

	rec := get(api.PathIdentities + "/" + web.ID.String())
	var one api.Identity
	if err := json.Unmarshal(rec.Body.Bytes(), &one); rec.Code != http.StatusOK || err != nil || one.Labels["app"] != "web" {
		t.Errorf("GET identity %d: %d %s", webID, rec.Code, rec.Body)
	}
	rec = get(api.PathIdentities + "/65999")
	if rec.Code != http.StatusNotFound || !strings.Contains(rec.Body.String(), "node "+localNode) || !strings.Contains(rec.Body.String(), "node-local") {
		t.Errorf("GET an unknown identity: %d %s", rec.Code, rec.Body)
	}
	if rec = get(api.PathIdentities + "/web"); rec.Code != http.StatusBadRequest {
		t.Errorf("GET identity \"web\": %d %s", rec.Code, rec.Body)
	}

	labels := newEventLabeler(ta.Agent)
	e := labels.label(api.Event{Event: bpf.Event{Src: webID, Dst: cidr.ID}})
	if e.SrcLabels["app"] != "web" || e.SrcLabels[identity.NamespaceLabel] != "shop" || e.DstLabels != nil || e.DstCIDR != "10.0.0.0/8" || e.SrcCIDR != "" {
		t.Errorf("labelled event = %+v", e)
	}
	if e := labels.label(api.Event{Event: bpf.Event{Src: identity.Host, Dst: 1001}}); e.SrcLabels != nil || e.DstLabels != nil {
		t.Errorf("reserved and manual identities got labels: %+v", e)
	}
}
