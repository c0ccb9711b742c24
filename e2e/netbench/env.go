package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/idcni/idcni/cni"
)

// randHex returns n random hex digits.
func randHex(n int) string {
	b := make([]byte, (n+1)/2)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)[:n]
}

// command runs a helper program in its own process group, so a Ctrl-C at
// the terminal reaches netbench (which then cleans up) and not the helper
// doing the cleaning.
func command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return cmd
}

// runCmd runs a helper and returns its combined output in the error.
func runCmd(ctx context.Context, stdin string, name string, args ...string) (string, error) {
	cmd := command(ctx, name, args...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// repoRoot is the directory of the idcni module's go.mod.
func repoRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("run netbench from inside the idcni module (go run ./e2e/netbench), or pass -bin")
	}
	return filepath.Dir(mod), nil
}

// buildPlugins builds the plugin and the two plugins it needs next to it on
// CNI_PATH from this tree, so the run never measures a stale bin/.
func buildPlugins(ctx context.Context, dir string) error {
	root, err := repoRoot()
	if err != nil {
		return err
	}
	for _, p := range []struct{ name, pkg string }{
		{"idcni", "./cmd/idcni"},
		{"host-local", "github.com/containernetworking/plugins/plugins/ipam/host-local"},
		{"loopback", "github.com/containernetworking/plugins/plugins/main/loopback"},
	} {
		cmd := command(ctx, "go", "build", "-o", filepath.Join(dir, p.name), p.pkg)
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go build %s: %v\n%s", p.pkg, err, out)
		}
	}
	return nil
}

// network is the run's private idcni network.
type network struct {
	name     string
	subnet   netip.Prefix
	bpfRoot  string
	binDir   string
	dataDir  string // the plugin's records
	ipamDir  string // host-local's reservations
	cni      *libcni.CNIConfig
	confList *libcni.NetworkConfigList
	loList   *libcni.NetworkConfigList
}

func newNetwork(binDir, tmp, suffix string, subnet netip.Prefix) (*network, error) {
	n := &network{
		name:    "idcni-bench-" + suffix,
		subnet:  subnet,
		bpfRoot: "/sys/fs/bpf/idcni-bench-" + suffix,
		binDir:  binDir,
		dataDir: filepath.Join(tmp, "records"),
		ipamDir: filepath.Join(tmp, "ipam"),
	}
	// The exec is given up front: libcni fills in a nil one lazily.
	n.cni = libcni.NewCNIConfigWithCacheDir([]string{binDir}, filepath.Join(tmp, "libcni-cache"), &invoke.DefaultExec{
		RawExec:       &invoke.RawExec{Stderr: os.Stderr},
		PluginDecoder: version.PluginDecoder{},
	})
	// The shipped conflist (manifests/cni/10-idcni.conflist) with private
	// paths and subnet, and no agent: the socket path has nothing behind it.
	conf := map[string]any{
		"cniVersion": "1.1.0",
		"name":       n.name,
		"plugins": []any{map[string]any{
			"type":        "idcni",
			"bpfRoot":     n.bpfRoot,
			"dataDir":     n.dataDir,
			"agentSocket": filepath.Join(tmp, "no-agent.sock"),
			"ipam": map[string]any{
				"type":    "host-local",
				"dataDir": n.ipamDir,
				"ranges":  [][]map[string]string{{{"subnet": subnet.String()}}},
			},
		}},
	}
	b, err := json.Marshal(conf)
	if err != nil {
		return nil, err
	}
	if n.confList, err = libcni.ConfListFromBytes(b); err != nil {
		return nil, fmt.Errorf("conflist: %w", err)
	}
	// The loopback network a runtime adds to every sandbox besides the pod
	// network (containerd does), so lo is up in the pods as in a cluster.
	lo := fmt.Sprintf(`{"cniVersion":"1.1.0","name":"%s-lo","plugins":[{"type":"loopback"}]}`, n.name)
	if n.loList, err = libcni.ConfListFromBytes([]byte(lo)); err != nil {
		return nil, fmt.Errorf("loopback conflist: %w", err)
	}
	return n, nil
}

// status runs STATUS, which loads and pins the datapath when it is not yet:
// a node does that once, not per pod.
func (n *network) status(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	return n.cni.GetStatusNetworkList(ctx, n.confList)
}

// pod is a network namespace plugged into the network.
type pod struct {
	name        string // under /run/netns
	nsPath      string
	containerID string
	hostIf      string
	addr        netip.Addr
	added       bool
	loAdded     bool
	nsCreated   bool
}

func newPod() *pod {
	p := &pod{name: "idnb-" + randHex(10), containerID: randHex(64)}
	p.nsPath = "/run/netns/" + p.name
	p.hostIf = cni.HostVethName(p.containerID, "eth0")
	return p
}

func (p *pod) createNetns(ctx context.Context) error {
	if _, err := runCmd(ctx, "", "ip", "netns", "add", p.name); err != nil {
		return err
	}
	p.nsCreated = true
	return nil
}

func (p *pod) deleteNetns() error {
	if !p.nsCreated {
		return nil
	}
	if _, err := os.Stat(p.nsPath); errors.Is(err, os.ErrNotExist) {
		p.nsCreated = false
		return nil
	}
	// A fresh context: cleanup also runs after the run's was cancelled.
	if _, err := runCmd(context.Background(), "", "ip", "netns", "del", p.name); err != nil {
		return err
	}
	p.nsCreated = false
	return nil
}

func (n *network) rt(p *pod) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{ContainerID: p.containerID, NetNS: p.nsPath, IfName: "eth0"}
}

// add runs ADD for the pod network and returns how long it took. An
// interrupt lets a running ADD finish (tens of milliseconds) rather than
// killing the plugin halfway; the caller stops before the next.
func (n *network) add(ctx context.Context, p *pod) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
	defer cancel()
	p.added = true // a failed ADD still needs its DEL
	t0 := time.Now()
	r, err := n.cni.AddNetworkList(ctx, n.confList, n.rt(p))
	took := time.Since(t0)
	if err != nil {
		return took, fmt.Errorf("CNI ADD of %s: %w", p.name, err)
	}
	res, err := current.NewResultFromResult(r)
	if err != nil {
		return took, fmt.Errorf("CNI ADD of %s: result: %w", p.name, err)
	}
	for _, ipc := range res.IPs {
		if a, ok := netip.AddrFromSlice(ipc.Address.IP); ok && a.Unmap().Is4() {
			p.addr = a.Unmap()
		}
	}
	if !p.addr.IsValid() || !n.subnet.Contains(p.addr) {
		return took, fmt.Errorf("CNI ADD of %s: no IPv4 address in %s in the result %v", p.name, n.subnet, res.IPs)
	}
	return took, nil
}

// addLoopback brings lo up through the loopback plugin, as a runtime does.
func (n *network) addLoopback(ctx context.Context, p *pod) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	p.loAdded = true
	rt := &libcni.RuntimeConf{ContainerID: p.containerID, NetNS: p.nsPath, IfName: "lo"}
	if _, err := n.cni.AddNetworkList(ctx, n.loList, rt); err != nil {
		return fmt.Errorf("CNI ADD of lo in %s: %w", p.name, err)
	}
	return nil
}

// del runs DEL and returns how long it took. It runs on a fresh context:
// cleanup runs after an interrupt too.
func (n *network) del(p *pod) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var errs []error
	if p.loAdded {
		rt := &libcni.RuntimeConf{ContainerID: p.containerID, NetNS: p.nsPath, IfName: "lo"}
		if err := n.cni.DelNetworkList(ctx, n.loList, rt); err != nil {
			errs = append(errs, fmt.Errorf("CNI DEL of lo in %s: %w", p.name, err))
		} else {
			p.loAdded = false
		}
	}
	var took time.Duration
	if p.added {
		t0 := time.Now()
		err := n.cni.DelNetworkList(ctx, n.confList, n.rt(p))
		took = time.Since(t0)
		if err != nil {
			errs = append(errs, fmt.Errorf("CNI DEL of %s: %w", p.name, err))
		} else {
			p.added = false
		}
	}
	return took, errors.Join(errs...)
}

// release undoes a pod whatever state it is in: DEL, then the netns.
func (n *network) release(p *pod) error {
	_, err := n.del(p)
	return errors.Join(err, p.deleteNetns())
}

// deleteLeftLinks removes links the plugin tagged with this network's alias,
// which only exist when a DEL failed or an ADD was killed halfway.
func (n *network) deleteLeftLinks() error {
	links, err := netlink.LinkList()
	if err != nil {
		return fmt.Errorf("list links: %w", err)
	}
	var errs []error
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Alias, "idcni/"+n.name+"/") {
			if err := netlink.LinkDel(l); err != nil {
				errs = append(errs, fmt.Errorf("delete leftover link %s: %w", l.Attrs().Name, err))
			}
		}
	}
	return errors.Join(errs...)
}

// pickSubnet returns a random 10.213.X.0/24 that no route on the host
// overlaps. Other runs (and the e2e tests, which pick in 10.128.0.0/9) see
// this run's /32 pod routes and stay away.
func pickSubnet() (netip.Prefix, error) {
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("list routes: %w", err)
	}
	for range 256 {
		var b [1]byte
		if _, err := rand.Read(b[:]); err != nil {
			return netip.Prefix{}, err
		}
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 213, b[0], 0}), 24)
		free := true
		for _, r := range routes {
			if r.Dst == nil {
				continue
			}
			a, _ := netip.AddrFromSlice(r.Dst.IP)
			ones, _ := r.Dst.Mask.Size()
			if ones > 0 && netip.PrefixFrom(a.Unmap(), ones).Overlaps(p) {
				free = false
				break
			}
		}
		if free {
			return p, nil
		}
	}
	return netip.Prefix{}, errors.New("no free /24 in 10.213.0.0/16")
}
