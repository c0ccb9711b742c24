package main

//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -go-package main -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" floor ../../bpf/kernel/floor.c

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/idcni/idcni/bpf"
)

// floorPath is one node's floor datapath (floor.c, configurations
// floor-*): what keeping state per connection costs on this machine, with
// idcni's forwarding past the stack and nothing else. Its maps are its
// own, never pinned; its links live only while a floor configuration runs.
type floorPath struct {
	objs  floorObjects
	links []link.Link
}

func newFloor() (*floorPath, error) {
	f := &floorPath{}
	if err := loadFloorObjects(&f.objs, nil); err != nil {
		return nil, fmt.Errorf("load the floor programs: %w", err)
	}
	return f, nil
}

// attach puts the floor on the pod's host veth (its packets leaving the
// pod) and on dev (packets from the other node), in the calling thread's
// netns, for pod (its address and its local pod entry, as the plugin
// wrote it) and peer, the other node's pod range; every flow the last
// configuration left is forgotten.
func (f *floorPath) attach(pod netip.Addr, lp bpf.LocalPod, dev string, peer netip.Prefix) error {
	if len(f.links) > 0 {
		return errors.New("the floor is attached already")
	}
	up, err := netlink.LinkByName(dev)
	if err != nil {
		return err
	}
	cfg := floorFloorConfig{
		PodIfindex: uint32(lp.Ifindex),
		PodAddr:    be32(pod.AsSlice()),
		RemoteNet:  be32(peer.Masked().Addr().AsSlice()),
		RemoteMask: be32(net.CIDRMask(peer.Bits(), 32)),
	}
	copy(cfg.PodMac[:], lp.MAC)
	copy(cfg.HostMac[:], lp.HostMAC)
	if err := f.objs.FloorConfig.Put(uint32(0), cfg); err != nil {
		return fmt.Errorf("write the floor's config: %w", err)
	}
	if err := f.objs.FloorNexthop.Put(uint32(0), floorNexthop{}); err != nil {
		return fmt.Errorf("clear the floor's next hop: %w", err)
	}
	for _, m := range []*ebpf.Map{f.objs.FloorCtOut, f.objs.FloorCtIn} {
		if err := clearMap(m); err != nil {
			return err
		}
	}
	for _, a := range []struct {
		ifindex int
		prog    *ebpf.Program
	}{{lp.Ifindex, f.objs.FloorFromPod}, {up.Attrs().Index, f.objs.FloorFromNet}} {
		l, err := link.AttachTCX(link.TCXOptions{Interface: a.ifindex, Program: a.prog, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return errors.Join(fmt.Errorf("attach the floor to ifindex %d: %w", a.ifindex, err), f.detach())
		}
		f.links = append(f.links, l)
	}
	return nil
}

// detach takes the floor off; nothing when it is not on.
func (f *floorPath) detach() error {
	var errs []error
	for _, l := range f.links {
		errs = append(errs, l.Close())
	}
	f.links = nil
	return errors.Join(errs...)
}

// passed is how many packets the floor sent past the stack.
func (f *floorPath) passed() (uint64, error) {
	var per []uint64
	if err := f.objs.FloorPassed.Lookup(uint32(0), &per); err != nil {
		return 0, fmt.Errorf("read the floor's count: %w", err)
	}
	var n uint64
	for _, v := range per {
		n += v
	}
	return n, nil
}

func (f *floorPath) Close() error {
	return errors.Join(f.detach(), f.objs.Close())
}

func clearMap(m *ebpf.Map) error {
	var k floorCtKey
	for m.NextKey(nil, &k) == nil {
		if err := m.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("clear %s: %w", m, err)
		}
	}
	return nil
}

// be32 is 4 bytes in network order (an IPv4 address or mask) as the
// kernel's __u32 holding them reads on this machine.
func be32(b []byte) uint32 { return binary.NativeEndian.Uint32(b) }
