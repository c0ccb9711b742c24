package cni

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/bpf"
)

const ipamOK = `"ipam": {"type": "host-local", "ranges": [[{"subnet": "10.13.0.0/24"}]]}`

func TestLoadNetConfDefaults(t *testing.T) {
	conf, err := LoadNetConf([]byte(`{"cniVersion": "1.1.0", "name": "idcni", "type": "idcni", ` + ipamOK + `}`))
	if err != nil {
		t.Fatal(err)
	}
	if conf.BPFRoot != DefaultBPFRoot || conf.DataDir != DefaultDataDir || conf.AgentSocket != api.DefaultSocket || conf.MTU != DefaultMTU || conf.AgentRequired || conf.LocalDelivery != LocalDirect || conf.ConntrackPerPod != bpf.DefaultConntrackPerEndpoint {
		t.Errorf("defaults = %+v", conf)
	}
	if conf.IPAM.Type != "host-local" || conf.Name != "idcni" || conf.CNIVersion != "1.1.0" {
		t.Errorf("standard fields = %+v", conf.PluginConf)
	}
}

func TestLoadNetConfFields(t *testing.T) {
	conf, err := LoadNetConf([]byte(`{"cniVersion": "1.0.0", "name": "n", "type": "idcni",
		"bpfRoot": "/sys/fs/bpf/other", "dataDir": "/tmp/records", "agentSocket": "/run/x.sock",
		"agentRequired": true, "mtu": 9000, "localDelivery": "routed", "conntrackPerPod": 4096, ` + ipamOK + `,
		"cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}],
		"runtimeConfig": {"portMappings": []}, "unknownField": 1}`))
	if err != nil {
		t.Fatal(err)
	}
	if conf.BPFRoot != "/sys/fs/bpf/other" || conf.DataDir != "/tmp/records" || conf.AgentSocket != "/run/x.sock" || !conf.AgentRequired || conf.MTU != 9000 || conf.LocalDelivery != LocalRouted || conf.ConntrackPerPod != 4096 {
		t.Errorf("fields = %+v", conf)
	}
	if len(conf.ValidAttachments) != 1 || conf.ValidAttachments[0] != (types.GCAttachment{ContainerID: "c1", IfName: "eth0"}) {
		t.Errorf("valid attachments = %+v", conf.ValidAttachments)
	}
}

func TestLoadNetConfErrors(t *testing.T) {
	for _, tc := range []struct {
		name, conf string
		code       uint
		msg        string // substring the person needs to see
	}{
		{"not JSON", `{"name": "n",`, types.ErrDecodingFailure, "cannot parse the network configuration"},
		{"wrong type", `{"name": "n", "mtu": "big", ` + ipamOK + `}`, types.ErrDecodingFailure, "cannot parse"},
		{"agentRequired not bool", `{"name": "n", "agentRequired": "yes", ` + ipamOK + `}`, types.ErrDecodingFailure, "cannot parse"},
		{"no name", `{` + ipamOK + `}`, types.ErrInvalidNetworkConfig, `no "name"`},
		{"no ipam", `{"name": "n"}`, types.ErrInvalidNetworkConfig, `"ipam" has no "type"`},
		{"ipam without type", `{"name": "n", "ipam": {"subnet": "10.0.0.0/24"}}`, types.ErrInvalidNetworkConfig, "host-local"},
		{"relative bpfRoot", `{"name": "n", "bpfRoot": "bpf", ` + ipamOK + `}`, types.ErrInvalidNetworkConfig, `"bpfRoot" must be an absolute path`},
		{"unclean dataDir", `{"name": "n", "dataDir": "/var/lib/../x/", ` + ipamOK + `}`, types.ErrInvalidNetworkConfig, `use "/var/x"`},
		{"relative socket", `{"name": "n", "agentSocket": "agent.sock", ` + ipamOK + `}`, types.ErrInvalidNetworkConfig, `"agentSocket" must be an absolute path`},
		{"bpffs itself", `{"name": "n", "bpfRoot": "/sys/fs/bpf", ` + ipamOK + `}`, types.ErrInvalidNetworkConfig, "directory of its own"},
		{"mtu too small", `{"name": "n", "mtu": 67, ` + ipamOK + `}`, types.ErrInvalidNetworkConfig, `"mtu" 67 is out of range`},
		{"mtu too large", `{"name": "n", "mtu": 65536, ` + ipamOK + `}`, types.ErrInvalidNetworkConfig, "68-65535"},
		{"unknown localDelivery", `{"name": "n", "localDelivery": "bypass", ` + ipamOK + `}`, types.ErrInvalidNetworkConfig, `"localDelivery" must be "direct" or "routed", got "bypass"`},
		{"negative mtu", `{"name": "n", "mtu": -1, ` + ipamOK + `}`, types.ErrInvalidNetworkConfig, "out of range"},
		{"tiny conntrack table", `{"name": "n", "conntrackPerPod": 10, ` + ipamOK + `}`, types.ErrInvalidNetworkConfig, `"conntrackPerPod" 10 is out of range: use 256-1048576 flows`},
		{"huge conntrack table", `{"name": "n", "conntrackPerPod": 1073741824, ` + ipamOK + `}`, types.ErrInvalidNetworkConfig, `"conntrackPerPod" 1073741824 is out of range`},
		{"negative conntrack table", `{"name": "n", "conntrackPerPod": -1, ` + ipamOK + `}`, types.ErrDecodingFailure, "cannot parse"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := LoadNetConf([]byte(tc.conf))
			var te *types.Error
			if !errors.As(err, &te) {
				t.Fatalf("error = %v (%T), want *types.Error", err, err)
			}
			if te.Code != tc.code || !strings.Contains(te.Msg, tc.msg) {
				t.Errorf("error = code %d %q, want code %d containing %q", te.Code, te.Msg, tc.code, tc.msg)
			}
		})
	}
}

func TestMTUBoundsAccepted(t *testing.T) {
	for _, mtu := range []int{68, 1280, 65535} {
		b, _ := json.Marshal(map[string]any{"name": "n", "mtu": mtu, "ipam": map[string]string{"type": "host-local"}})
		if _, err := LoadNetConf(b); err != nil {
			t.Errorf("mtu %d: %v", mtu, err)
		}
	}
}

// The shipped conflist must be one the plugin accepts, with the seed's
// subnet.
func TestShippedConflist(t *testing.T) {
	_, file, _, _ := runtime.Caller(0)
	path := filepath.Join(filepath.Dir(file), "..", "manifests", "cni", "10-idcni.conflist")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	list, err := libcni.ConfListFromBytes(b)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if list.Name != "idcni" || list.CNIVersion != "1.1.0" || len(list.Plugins) != 1 || list.Plugins[0].Network.Type != "idcni" {
		t.Fatalf("%s: name %q version %q plugins %d", path, list.Name, list.CNIVersion, len(list.Plugins))
	}
	// What a runtime hands the plugin: the plugin entry with name and
	// cniVersion injected.
	p, err := libcni.InjectConf(list.Plugins[0], map[string]any{"name": list.Name, "cniVersion": list.CNIVersion})
	if err != nil {
		t.Fatal(err)
	}
	conf, err := LoadNetConf(p.Bytes)
	if err != nil {
		t.Fatalf("plugin rejects %s: %v", path, err)
	}
	if !strings.Contains(string(p.Bytes), `"subnet":"10.13.0.0/24"`) || conf.IPAM.Type != "host-local" {
		t.Errorf("%s: want host-local on 10.13.0.0/24, got %s", path, p.Bytes)
	}
}

func TestParsePodArgs(t *testing.T) {
	got, err := ParsePodArgs("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1;OTHER=x")
	if err != nil {
		t.Fatal(err)
	}
	if got.Namespace != "default" || got.Name != "web-0" || got.InfraID != "abc" || got.UID != "u-1" {
		t.Errorf("ParsePodArgs = %+v", got)
	}
	// Values may contain '='; only the first one separates.
	got, err = ParsePodArgs("K8S_POD_NAMESPACE=ns;K8S_POD_NAME=a=b;")
	if err != nil || got.Name != "a=b" {
		t.Errorf("ParsePodArgs with '=' in value = %+v, %v", got, err)
	}
	for _, empty := range []string{"", ";", "IgnoreUnknown=true"} {
		got, err := ParsePodArgs(empty)
		if err != nil || got.Namespace != "" || got.Name != "" {
			t.Errorf("ParsePodArgs(%q) = %+v, %v", empty, got, err)
		}
	}
}

func TestParsePodArgsErrors(t *testing.T) {
	for _, tc := range []struct{ args, msg string }{
		{"K8S_POD_NAME", "is not KEY=VALUE"},
		{"=x", "is not KEY=VALUE"},
		{"K8S_POD_NAME=web", "both K8S_POD_NAMESPACE and K8S_POD_NAME"},
		{"K8S_POD_NAMESPACE=default", "both K8S_POD_NAMESPACE and K8S_POD_NAME"},
	} {
		_, err := ParsePodArgs(tc.args)
		var te *types.Error
		if !errors.As(err, &te) || te.Code != types.ErrInvalidEnvironmentVariables || !strings.Contains(te.Msg, tc.msg) {
			t.Errorf("ParsePodArgs(%q) = %v, want code %d containing %q", tc.args, err, types.ErrInvalidEnvironmentVariables, tc.msg)
		}
	}
}

func TestHostVethName(t *testing.T) {
	a := HostVethName("0123456789abcdef", "eth0")
	if len(a) != 14 || !strings.HasPrefix(a, HostVethPrefix) {
		t.Errorf("HostVethName = %q, want idc + 11 hex characters", a)
	}
	if a != HostVethName("0123456789abcdef", "eth0") {
		t.Error("HostVethName is not deterministic")
	}
	if a == HostVethName("0123456789abcdef", "eth1") || a == HostVethName("0123456789abcdee", "eth0") {
		t.Error("HostVethName does not depend on both container ID and interface")
	}
	// The documented contract other tools may rely on: "idc" and the
	// first 11 hex characters of sha256(containerID+ifName).
	sum := sha256.Sum256([]byte("abceth0"))
	if got, want := HostVethName("abc", "eth0"), "idc"+hex.EncodeToString(sum[:])[:11]; got != want {
		t.Errorf("HostVethName(abc, eth0) = %q, want %q", got, want)
	}
}

func TestLinkAliasRoundTrip(t *testing.T) {
	alias := linkAlias("idcni", "c0ffee.1_x-y", "net1")
	cid, ifName, ok := parseLinkAlias("idcni", alias)
	if !ok || cid != "c0ffee.1_x-y" || ifName != "net1" {
		t.Errorf("parseLinkAlias(%q) = %q, %q, %v", alias, cid, ifName, ok)
	}
	for _, other := range []string{"", "idcni/other/c/eth0", "idcni/idcni/c", "idcni/idcni//eth0", "idcni/idcni/c/", "something else"} {
		if _, _, ok := parseLinkAlias("idcni", other); ok {
			t.Errorf("parseLinkAlias(%q) accepted an alias of another network or malformed", other)
		}
	}
	// A network whose name is a prefix of another's must not claim its
	// links.
	if _, _, ok := parseLinkAlias("idc", linkAlias("idcni", "c", "eth0")); ok {
		t.Error("network idc claims links of network idcni")
	}
}

// ParseLinkAlias, for the agent, reads the network as well.
func TestParseLinkAliasAnyNetwork(t *testing.T) {
	net, cid, ifName, ok := ParseLinkAlias(linkAlias("idcni-e2e.1", "c0ffee", "net1"))
	if !ok || net != "idcni-e2e.1" || cid != "c0ffee" || ifName != "net1" {
		t.Errorf("ParseLinkAlias = %q, %q, %q, %v", net, cid, ifName, ok)
	}
	for _, bad := range []string{"", "idcni/", "idcni//c/eth0", "idcni/n/c", "idcni/n//eth0", "idcni/n/c/eth0/x", "calico/n/c/eth0"} {
		if _, _, _, ok := ParseLinkAlias(bad); ok {
			t.Errorf("ParseLinkAlias(%q) accepted a malformed alias", bad)
		}
	}
}
