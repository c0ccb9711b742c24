package cnitest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"

	"github.com/idcni/idcni/bpf"
)

// RequireRoot skips tests that need CAP_NET_ADMIN and CAP_BPF.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces, veths and BPF pins")
	}
}

// RandHex returns n random hex characters.
func RandHex(n int) string {
	b := make([]byte, (n+1)/2)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)[:n]
}

// NewCNIConfig is a libcni runtime for the plugins in binDir. The exec is
// set up front: libcni fills in a nil one lazily, which races when tests
// share a CNIConfig across goroutines as a runtime does.
func NewCNIConfig(binDir, cacheDir string) *libcni.CNIConfig {
	return libcni.NewCNIConfigWithCacheDir([]string{binDir}, cacheDir, &invoke.DefaultExec{
		RawExec:       &invoke.RawExec{Stderr: os.Stderr},
		PluginDecoder: version.PluginDecoder{},
	})
}

// Options shape an Env.
type Options struct {
	// CNIVersion of the conflist; "" is 1.1.0.
	CNIVersion string
	// SubnetBits is the prefix length of the private IPAM subnet; 0 is 24.
	SubnetBits int
	// DualStack adds a private IPv6 range to the IPAM configuration.
	DualStack bool
	// Plugin holds extra fields of the idcni plugin configuration,
	// overriding the Env's defaults (e.g. "agentRequired": true).
	Plugin map[string]any
}

// Env is one private idcni network.
type Env struct {
	t        testing.TB
	BinDir   string
	Network  string
	Subnet   netip.Prefix
	Subnet6  netip.Prefix // valid with Options.DualStack
	BPFRoot  string
	DataDir  string // the plugin's records
	IPAMDir  string // host-local's reservations
	CacheDir string // libcni's cache
	Socket   string // agentSocket: a path nothing listens on unless a test serves it
	Version  string
	CNI      *libcni.CNIConfig
	plugin   map[string]any
}

// New creates an Env and registers its removal.
func New(t testing.TB, o Options) *Env {
	t.Helper()
	RequireRoot(t)
	bin, err := BinDir()
	if err != nil {
		t.Fatal(err)
	}
	if o.CNIVersion == "" {
		o.CNIVersion = "1.1.0"
	}
	if o.SubnetBits == 0 {
		o.SubnetBits = 24
	}
	tmp := t.TempDir()
	suffix := RandHex(8)
	e := &Env{
		t:        t,
		BinDir:   bin,
		Network:  "idcni-e2e-" + suffix,
		Subnet:   PickSubnet(t, o.SubnetBits),
		BPFRoot:  "/sys/fs/bpf/idcni-test-" + suffix,
		DataDir:  filepath.Join(tmp, "records"),
		IPAMDir:  filepath.Join(tmp, "ipam"),
		CacheDir: filepath.Join(tmp, "libcni-cache"),
		Socket:   filepath.Join(tmp, "agent.sock"),
		Version:  o.CNIVersion,
	}
	e.CNI = NewCNIConfig(bin, e.CacheDir)
	ranges := [][]map[string]string{{{"subnet": e.Subnet.String()}}}
	if o.DualStack {
		e.Subnet6 = PickSubnet6(t)
		ranges = append(ranges, []map[string]string{{"subnet": e.Subnet6.String()}})
	}
	e.plugin = map[string]any{
		"type":        "idcni",
		"bpfRoot":     e.BPFRoot,
		"dataDir":     e.DataDir,
		"agentSocket": e.Socket,
		"ipam": map[string]any{
			"type":    "host-local",
			"dataDir": e.IPAMDir,
			"ranges":  ranges,
		},
	}
	for k, v := range o.Plugin {
		e.plugin[k] = v
	}
	t.Cleanup(func() {
		// Links with this network's alias outlive their netns only
		// when the plugin leaked them; remove them so one failure
		// does not cascade, after the test has had its say.
		e.deleteLinks()
		if err := bpf.Unpin(e.BPFRoot); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return e
}

// PluginConf returns the idcni plugin configuration (a copy).
func (e *Env) PluginConf() map[string]any {
	b, _ := json.Marshal(e.plugin)
	var m map[string]any
	_ = json.Unmarshal(b, &m)
	return m
}

// ConfListBytes renders a conflist with the given plugin configuration.
func (e *Env) ConfListBytes(version string, plugin map[string]any) []byte {
	b, err := json.Marshal(map[string]any{
		"cniVersion": version,
		"name":       e.Network,
		"plugins":    []any{plugin},
	})
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

// ConfList is the Env's conflist at its CNI version.
func (e *Env) ConfList() *libcni.NetworkConfigList {
	return e.ConfListAt(e.Version)
}

// ConfListAt is the Env's conflist at another CNI version.
func (e *Env) ConfListAt(version string) *libcni.NetworkConfigList {
	l, err := libcni.ConfListFromBytes(e.ConfListBytes(version, e.plugin))
	if err != nil {
		e.t.Fatal(err)
	}
	return l
}

// PluginConfBytes is the single plugin configuration a runtime would pass
// on stdin (name and cniVersion injected), for driving the binary directly.
func (e *Env) PluginConfBytes(plugin map[string]any) []byte {
	m := map[string]any{"cniVersion": e.Version, "name": e.Network}
	for k, v := range plugin {
		m[k] = v
	}
	b, err := json.Marshal(m)
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

// Pod is a network namespace standing in for a pod sandbox.
type Pod struct {
	Name        string // netns name under /run/netns
	NSPath      string
	ContainerID string
	IfName      string
	Args        [][2]string // CNI_ARGS
}

// NewPod creates a netns and registers its deletion.
func (e *Env) NewPod(t testing.TB) *Pod {
	t.Helper()
	p := &Pod{
		Name:        "idct-" + RandHex(10),
		ContainerID: RandHex(64),
		IfName:      "eth0",
	}
	p.NSPath = "/run/netns/" + p.Name
	if out, err := exec.Command("ip", "netns", "add", p.Name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", p.Name, err, out)
	}
	t.Cleanup(func() { p.DeleteNetns() })
	return p
}

// DeleteNetns removes the pod's netns, as a runtime does when the sandbox
// dies before DEL.
func (p *Pod) DeleteNetns() {
	if _, err := os.Stat(p.NSPath); err == nil {
		_ = exec.Command("ip", "netns", "del", p.Name).Run()
	}
}

// Exec runs a command inside the pod.
func (p *Pod) Exec(ctx context.Context, name string, args ...string) ([]byte, error) {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", p.Name, name}, args...)...).CombinedOutput()
}

// Ping sends count pings from the pod to dst and reports whether any reply
// came back.
func (p *Pod) Ping(dst netip.Addr, count int) (bool, string) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(count+5)*time.Second)
	defer cancel()
	out, err := p.Exec(ctx, "ping", "-n", "-c", fmt.Sprint(count), "-i", "0.2", "-W", "1", dst.String())
	return err == nil, string(out)
}

// RuntimeConf is what a runtime passes for the pod.
func (e *Env) RuntimeConf(p *Pod) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{ContainerID: p.ContainerID, NetNS: p.NSPath, IfName: p.IfName, Args: p.Args}
}

// Add runs ADD for the pod through libcni and returns the result in the
// current result format.
func (e *Env) Add(p *Pod) (*current.Result, error) {
	return e.AddWith(e.ConfList(), p)
}

// AddWith runs ADD with a given conflist.
func (e *Env) AddWith(l *libcni.NetworkConfigList, p *Pod) (*current.Result, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	r, err := e.CNI.AddNetworkList(ctx, l, e.RuntimeConf(p))
	if err != nil {
		return nil, err
	}
	return current.NewResultFromResult(r)
}

// MustAdd runs ADD and fails the test on error.
func (e *Env) MustAdd(t testing.TB, p *Pod) *current.Result {
	t.Helper()
	r, err := e.Add(p)
	if err != nil {
		t.Fatalf("ADD %s: %v", p.Name, err)
	}
	return r
}

// Del runs DEL through libcni.
func (e *Env) Del(p *Pod) error {
	return e.DelWith(e.ConfList(), p)
}

// DelWith runs DEL with a given conflist.
func (e *Env) DelWith(l *libcni.NetworkConfigList, p *Pod) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	return e.CNI.DelNetworkList(ctx, l, e.RuntimeConf(p))
}

// Check runs CHECK through libcni (which passes the cached prevResult).
func (e *Env) Check(p *Pod) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return e.CNI.CheckNetworkList(ctx, e.ConfList(), e.RuntimeConf(p))
}

// Datapath opens the Env's pinned datapath.
func (e *Env) Datapath(t testing.TB) *bpf.Datapath {
	t.Helper()
	dp, err := bpf.Open(e.BPFRoot)
	if err != nil {
		t.Fatalf("open datapath: %v", err)
	}
	t.Cleanup(func() { dp.Close() })
	return dp
}

// AsCNIError returns err as a spec error, failing the test if it is not.
func AsCNIError(t testing.TB, err error) *types.Error {
	t.Helper()
	if err == nil {
		t.Fatal("expected a CNI error, got success")
	}
	// libcni wraps the plugin's error with the plugin's name.
	var te *types.Error
	if !errors.As(err, &te) {
		t.Fatalf("expected a CNI error JSON, got %T: %v", err, err)
	}
	return te
}

// deleteLinks removes links this Env's network owns.
func (e *Env) deleteLinks() {
	links, err := netlinksafe.LinkList()
	if err != nil {
		return
	}
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Alias, "idcni/"+e.Network+"/") {
			_ = netlink.LinkDel(l)
		}
	}
}

var (
	subnetMu   sync.Mutex
	subnetUsed = map[netip.Prefix]bool{}
)

// PickSubnet returns a random subnet of the given size in 10.128.0.0/9 that
// this process has not handed out and that no route on the host overlaps.
// Random in a space that large, two concurrent test processes collide with
// negligible probability.
func PickSubnet(t testing.TB, bits int) netip.Prefix {
	t.Helper()
	subnetMu.Lock()
	defer subnetMu.Unlock()
	routes, err := netlinksafe.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: 0}, 0)
	if err != nil {
		t.Fatalf("list routes: %v", err)
	}
	for range 1000 {
		n, err := rand.Int(rand.Reader, big.NewInt(1<<(bits-9)))
		if err != nil {
			t.Fatal(err)
		}
		v := uint32(10)<<24 | 1<<23 | uint32(n.Int64())<<(32-bits)
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), bits)
		if subnetUsed[p] || overlapsRoute(p, routes) {
			continue
		}
		subnetUsed[p] = true
		return p
	}
	t.Fatal("no free subnet in 10.128.0.0/9")
	return netip.Prefix{}
}

// PickSubnet6 returns a random /64 in fd1d::/16 that no route on the host
// overlaps.
func PickSubnet6(t testing.TB) netip.Prefix {
	t.Helper()
	subnetMu.Lock()
	defer subnetMu.Unlock()
	routes, err := netlinksafe.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{}, 0)
	if err != nil {
		t.Fatalf("list routes: %v", err)
	}
	for range 1000 {
		var a [16]byte
		a[0], a[1] = 0xfd, 0x1d
		if _, err := rand.Read(a[2:8]); err != nil {
			t.Fatal(err)
		}
		p := netip.PrefixFrom(netip.AddrFrom16(a), 64)
		if subnetUsed[p] || overlapsRoute(p, routes) {
			continue
		}
		subnetUsed[p] = true
		return p
	}
	t.Fatal("no free subnet in fd1d::/16")
	return netip.Prefix{}
}

// Contains reports whether a is in one of the Env's subnets.
func (e *Env) Contains(a netip.Addr) bool {
	return e.Subnet.Contains(a) || (e.Subnet6.IsValid() && e.Subnet6.Contains(a))
}

// overlaps reports whether p overlaps one of the Env's subnets.
func (e *Env) overlaps(p netip.Prefix) bool {
	return e.Subnet.Overlaps(p) || (e.Subnet6.IsValid() && e.Subnet6.Overlaps(p))
}

func overlapsRoute(p netip.Prefix, routes []netlink.Route) bool {
	for _, r := range routes {
		if r.Dst == nil {
			continue
		}
		a, _ := netip.AddrFromSlice(r.Dst.IP)
		ones, _ := r.Dst.Mask.Size()
		if ones == 0 || a.IsLinkLocalUnicast() {
			continue
		}
		if rp := netip.PrefixFrom(a.Unmap(), ones); rp.Overlaps(p) {
			return true
		}
	}
	return false
}

// Exec runs the idcni binary directly with a raw stdin, as a runtime
// would, for inputs libcni itself refuses to send (malformed JSON). pod
// may be nil.
func (e *Env) Exec(command string, stdin []byte, pod *Pod, cniArgs string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	args := &invoke.Args{Command: command, Path: e.BinDir, PluginArgsStr: cniArgs}
	if pod != nil {
		args.ContainerID, args.NetNS, args.IfName = pod.ContainerID, pod.NSPath, pod.IfName
	}
	return (&invoke.RawExec{Stderr: os.Stderr}).ExecPlugin(ctx, filepath.Join(e.BinDir, "idcni"), stdin, args.AsEnv())
}
