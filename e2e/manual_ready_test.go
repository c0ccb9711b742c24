package e2e

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/internal/clitest"
	"github.com/idcni/idcni/policy"
)

// notReadyMessage is what a starting agent's refusal says, to the API
// client and through it to the CLIs.
const notReadyMessage = "idcni-agent is not ready yet"

// endpointctlBin is endpointctl from IDCNI_E2E_BIN, or built from the
// working tree into the test's own directory.
func endpointctlBin(t *testing.T) string {
	t.Helper()
	if d := os.Getenv("IDCNI_E2E_BIN"); d != "" {
		return filepath.Join(d, "endpointctl")
	}
	bin := filepath.Join(t.TempDir(), "endpointctl")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/idcni/idcni/cmd/endpointctl").CombinedOutput(); err != nil {
		t.Fatalf("build endpointctl: %v\n%s", err, out)
	}
	return bin
}

// Issue 11, defect 5: a manual change asked of an agent whose informers
// never synced (its API server is unreachable) wrote the maps from an empty
// view of the cluster. The real agent binary, with its own pins and socket,
// must refuse every change with 503 and a JSON error saying it is not
// ready, show that through endpointctl, answer the lists, and leave the
// maps as they were.
func TestAgentRefusesManualChangesUntilReady(t *testing.T) {
	t.Parallel()
	a := startLoneAgent(t)
	d, err := bpf.Open(a.bpfRoot)
	if err != nil {
		t.Fatalf("open the agent's datapath: %v", err)
	}
	defer d.Close()
	before := clitest.SnapshotMaps(t, d)
	hc := a.httpClient("unix", a.socket)

	// The precondition: the agent serves but is not ready, and never will
	// be, with no API server.
	resp, err := hc.Get("http://agent" + api.PathHealth)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("GET %s = %s, want 503: the agent must not be ready without an API server", api.PathHealth, resp.Status)
	}

	body := func(v any) []byte {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	rule := api.RuleRequest{Rule: policy.ManualRule{Action: policy.Allow, Src: 1001, Dst: 1002, Proto: policy.ProtoTCP, Ports: policy.PortRange{Lo: 80, Hi: 80}}}
	changes := []struct {
		method, path string
		body         []byte
	}{
		{http.MethodPut, api.PathManualEndpoints, body(api.ManualEndpoint{IP: netip.MustParseAddr("10.99.0.7"), Identity: 1001})},
		{http.MethodDelete, api.PathManualEndpoints + "?ip=10.99.0.7", nil},
		{http.MethodPost, api.PathManualRules, body(rule)},
		{http.MethodPost, api.PathManualRulesDel, body(rule)},
		{http.MethodPut, api.PathDebug, body(api.Debug{On: !before.Debug})},
	}
	for _, c := range changes {
		req, err := http.NewRequest(c.method, "http://agent"+c.path, bytes.NewReader(c.body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", c.method, c.path, err)
		}
		var e api.Error
		decErr := json.NewDecoder(resp.Body).Decode(&e)
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable {
			t.Errorf("%s %s before ready = %s, want 503", c.method, c.path, resp.Status)
			continue
		}
		if ct := resp.Header.Get("Content-Type"); ct != "application/json" || decErr != nil || !strings.Contains(e.Message, notReadyMessage) {
			t.Errorf("%s %s: 503 with Content-Type %q, body %+v (%v); want a JSON error saying %q", c.method, c.path, ct, e, decErr, notReadyMessage)
		}
	}

	// The lists answer from the state file.
	for _, path := range []string{api.PathManualEndpoints, api.PathManualRules} {
		resp, err := hc.Get("http://agent" + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s before ready = %s, want 200", path, resp.Status)
		}
	}

	// The CLI goes to the starting agent (it owns the maps and the state
	// file) and shows its refusal.
	cmd := exec.Command(endpointctlBin(t), "add", "--ip", "10.99.0.8", "--identity", "1001",
		"--agent-socket", a.socket, "--bpf-root", a.bpfRoot, "--state", a.state)
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), notReadyMessage) {
		t.Errorf("endpointctl add against a starting agent: err %v, output:\n%s\nwant a failure saying %q", err, out, notReadyMessage)
	}

	if after := clitest.SnapshotMaps(t, d); !reflect.DeepEqual(before, after) {
		t.Errorf("the maps changed while the agent was not ready:\nbefore %+v\nafter  %+v", before, after)
	}
}
