// Package cni is the idcni CNI plugin: it wires a pod into the host with a
// veth pair, puts the TC programs of the datapath on the host end and enters
// the pod in the datapath's maps under its security identity.
package cni

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/idcni/idcni/agent/api"
	"github.com/idcni/idcni/bpf"
	"github.com/idcni/idcni/desired"
	"github.com/idcni/idcni/identity"
)

// CmdAdd implements ADD.
func CmdAdd(args *skel.CmdArgs) (err error) {
	conf, err := LoadNetConf(args.StdinData)
	if err != nil {
		return err
	}
	pod, err := ParsePodArgs(args.Args)
	if err != nil {
		return err
	}
	podNS, err := ns.GetNS(args.Netns)
	if err != nil {
		return types.NewError(types.ErrInvalidNetNS, fmt.Sprintf("idcni: cannot open the pod's netns %q: %v", args.Netns, err), "")
	}
	defer podNS.Close()

	ctx := context.Background()
	// Ask the agent first: with a required agent down, failing before
	// anything is allocated is cheapest for everyone.
	agent, err := connectAgent(ctx, conf)
	if err != nil {
		return err
	}

	dp, err := loadDatapath(conf.BPFRoot)
	if err != nil {
		return types.NewError(types.ErrInternal, fmt.Sprintf("idcni: cannot load the datapath under %s: %v", conf.BPFRoot, err), "")
	}
	defer dp.Close()

	records, err := openRecords(conf.DataDir, conf.Name, false)
	if err != nil {
		return fmt.Errorf("idcni: %w", err)
	}
	defer records.Close()

	if old, err := records.Get(args.ContainerID, args.IfName); err != nil {
		return fmt.Errorf("idcni: %w", err)
	} else if old != nil {
		return types.NewError(types.ErrInternal,
			fmt.Sprintf("idcni: container %s already has interface %s in network %q (host veth %s); the runtime must DEL it before adding it again", args.ContainerID, args.IfName, conf.Name, old.HostIfName), "")
	}

	a := &adder{
		conf:    conf,
		args:    args,
		pod:     pod,
		podNS:   podNS,
		dp:      dp,
		records: records,
		agent:   agent,
		rec: &Record{
			Network:     conf.Name,
			ContainerID: args.ContainerID,
			IfName:      args.IfName,
			Netns:       args.Netns,
			HostIfName:  HostVethName(args.ContainerID, args.IfName),
			// For the agent, should it have to rebuild its registry.
			PodNamespace: pod.Namespace,
			PodName:      pod.Name,
		},
	}
	result, err := a.add(ctx)
	if err != nil {
		if uerr := a.undo.run(); uerr != nil {
			// The original error is what the person needs to fix; the
			// leftovers are for DEL, which the runtime calls next.
			return withDetails(err, fmt.Sprintf("cleaning up after the failure also failed (%v); the runtime's DEL of container %s will retry", uerr, args.ContainerID))
		}
		return err
	}
	return types.PrintResult(result, conf.CNIVersion)
}

// adder carries one ADD through its steps.
type adder struct {
	conf    *NetConf
	args    *skel.CmdArgs
	pod     PodArgs
	podNS   ns.NetNS
	dp      *bpf.Datapath
	records *recordStore
	agent   *api.Client
	rec     *Record
	undo    undo
}

func (a *adder) add(ctx context.Context) (*current.Result, error) {
	conf, args, rec := a.conf, a.args, a.rec

	// The record goes first so that DEL and GC can find whatever a
	// plugin killed halfway through leaves behind.
	if err := a.records.Put(rec); err != nil {
		return nil, fmt.Errorf("idcni: %w", err)
	}
	a.undo.push("record", func() error { return a.records.Delete(args.ContainerID, args.IfName) })

	ipamResult, err := invoke.DelegateAdd(ctx, conf.IPAM.Type, args.StdinData, nil)
	if err != nil {
		return nil, withPrefix(err, fmt.Sprintf("idcni: IPAM plugin %q", conf.IPAM.Type))
	}
	a.undo.push("IPAM allocation", func() error {
		return invoke.DelegateDel(ctx, conf.IPAM.Type, args.StdinData, nil)
	})
	ipam, err := current.NewResultFromResult(ipamResult)
	if err != nil {
		return nil, fmt.Errorf("idcni: cannot read the answer of IPAM plugin %q: %w", conf.IPAM.Type, err)
	}
	addrs, extraRoutes, err := podAddresses(ipam, conf.MTU)
	if err != nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("idcni: %v (IPAM plugin %q)", err, conf.IPAM.Type), "")
	}
	rec.Addresses = addrs
	if err := a.records.Put(rec); err != nil {
		return nil, fmt.Errorf("idcni: %w", err)
	}

	hostIf, podIf, err := createVeth(a.podNS, args.IfName, rec.HostIfName, conf.MTU)
	if err != nil {
		return nil, fmt.Errorf("idcni: %w", err)
	}
	// Deleting the host end takes the pod end and every route and
	// neighbour entry of both ends with it, so this one undo covers the
	// link configuration below too.
	a.undo.push("veth pair", func() error { return deleteHostVeth(rec.HostIfName) })
	rec.HostIfIndex = hostIf.Index
	if err := a.records.Put(rec); err != nil {
		return nil, fmt.Errorf("idcni: %w", err)
	}

	if _, err := configureHost(rec.HostIfName, linkAlias(conf.Name, args.ContainerID, args.IfName), podIf.HardwareAddr, addrs); err != nil {
		return nil, fmt.Errorf("idcni: %w", err)
	}
	if err := enableForwarding(addrs); err != nil {
		return nil, fmt.Errorf("idcni: %w", err)
	}

	// Enforcement comes before the pod has an address: from its first
	// packet on, the pod is the unresolved identity, which is denied,
	// until someone names it.
	var local *bpf.LocalPod
	if conf.LocalDelivery == LocalDirect {
		local = &bpf.LocalPod{Ifindex: rec.HostIfIndex, MAC: podIf.HardwareAddr, HostMAC: hostIf.HardwareAddr}
	}
	if err := enforce(a.dp, &a.undo, rec.HostIfName, rec.HostIfIndex, identity.Unresolved, addrs, local, a.conf.ConntrackPerPod); err != nil {
		return nil, fmt.Errorf("idcni: %w", err)
	}

	if err := configurePod(a.podNS, args.IfName, hostIf.HardwareAddr, addrs, extraRoutes); err != nil {
		return nil, fmt.Errorf("idcni: %w", err)
	}

	if a.agent != nil {
		a.undo.push("registration with idcni-agent", func() error { return unregisterWithAgent(conf, args.ContainerID) })
		_, err := registerWithAgent(ctx, conf, a.agent, api.EndpointRequest{
			ContainerID:  args.ContainerID,
			Netns:        args.Netns,
			IfName:       args.IfName,
			HostIfName:   rec.HostIfName,
			HostIfIndex:  rec.HostIfIndex,
			Addresses:    addrs,
			PodNamespace: a.pod.Namespace,
			PodName:      a.pod.Name,
			PodUID:       a.pod.UID,
		})
		if err != nil {
			return nil, err
		}
	}

	rec.Complete = true
	if err := a.records.Put(rec); err != nil {
		return nil, fmt.Errorf("idcni: %w", err)
	}
	return buildResult(ipam, rec, hostIf, podIf, extraRoutes), nil
}

// podAddresses picks the pod's addresses out of the IPAM answer: at most
// one per family, as the datapath keeps one IPv4 and one IPv6 address per
// endpoint. It also returns IPAM's routes other than the default ones.
func podAddresses(ipam *current.Result, mtu int) (addrs []netip.Addr, routes []netip.Prefix, err error) {
	var v4, v6 int
	for _, c := range ipam.IPs {
		a, ok := netip.AddrFromSlice(c.Address.IP)
		if !ok {
			return nil, nil, fmt.Errorf("IPAM returned an invalid address %q", c.Address.String())
		}
		a = a.Unmap()
		if a.Is4() {
			v4++
		} else {
			v6++
		}
		addrs = append(addrs, a)
	}
	switch {
	case len(addrs) == 0:
		return nil, nil, errors.New("IPAM returned no address for the pod")
	case v4 > 1 || v6 > 1:
		return nil, nil, fmt.Errorf("IPAM returned %d IPv4 and %d IPv6 addresses, but a pod gets at most one of each: configure one range set per family", v4, v6)
	case v6 > 0 && mtu < minMTUIPv6:
		return nil, nil, fmt.Errorf("\"mtu\" %d is below %d, the minimum for the IPv6 address IPAM returned", mtu, minMTUIPv6)
	}
	for _, r := range ipam.Routes {
		a, ok := netip.AddrFromSlice(r.Dst.IP)
		if !ok {
			continue
		}
		ones, _ := r.Dst.Mask.Size()
		p := netip.PrefixFrom(a.Unmap(), ones).Masked()
		if p.Bits() > 0 {
			routes = append(routes, p)
		}
	}
	return addrs, routes, nil
}

// buildResult describes the attachment in the spec's terms: interface 0 is
// the host end, 1 the pod end, which holds the addresses.
func buildResult(ipam *current.Result, rec *Record, hostIf, podIf net.Interface, extra []netip.Prefix) *current.Result {
	res := &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{
			{Name: hostIf.Name, Mac: hostIf.HardwareAddr.String()},
			{Name: podIf.Name, Mac: podIf.HardwareAddr.String(), Sandbox: rec.Netns, Mtu: podIf.MTU},
		},
		DNS: ipam.DNS,
	}
	for _, a := range rec.Addresses {
		res.IPs = append(res.IPs, &current.IPConfig{
			Interface: current.Int(1),
			Address:   *ipNet(desired.HostPrefix(a)),
			Gateway:   gatewayFor(a).AsSlice(),
		})
	}
	for _, dst := range podRoutes(rec.Addresses, extra) {
		res.Routes = append(res.Routes, &types.Route{Dst: *ipNet(dst), GW: gatewayFor(dst.Addr()).AsSlice()})
	}
	return res
}

// withPrefix puts context in front of an error's message while keeping a
// delegated plugin's error code.
func withPrefix(err error, prefix string) error {
	var te *types.Error
	if errors.As(err, &te) {
		return types.NewError(te.Code, prefix+": "+te.Msg, te.Details)
	}
	return fmt.Errorf("%s: %w", prefix, err)
}

// withDetails adds a sentence to the details of err, keeping its code.
func withDetails(err error, details string) error {
	var te *types.Error
	if !errors.As(err, &te) {
		te = types.NewError(types.ErrInternal, err.Error(), "")
	}
	d := te.Details
	if d != "" {
		d += "; "
	}
	return types.NewError(te.Code, te.Msg, d+details)
}

// warn writes to the runtime's log: a plugin's stderr is where containerd
// and CRI-O look.
func warn(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "idcni: warning: "+format+"\n", a...)
}
