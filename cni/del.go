package cni

import (
	"context"
	"errors"
	"fmt"
	"net/netip"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/skel"

	"github.com/idcni/idcni/bpf"
)

// CmdDel implements DEL. It must succeed however much of the attachment is
// already gone: the netns (the kernel then deleted the veth pair), the
// record, the pins, or all of it for a container this node never saw.
func CmdDel(args *skel.CmdArgs) error {
	conf, err := LoadNetConf(args.StdinData)
	if err != nil {
		return err
	}
	records, err := openRecords(conf.DataDir, conf.Name, false)
	if err != nil {
		return fmt.Errorf("idcni: %w", err)
	}
	defer records.Close()

	rec, err := records.Get(args.ContainerID, args.IfName)
	if err != nil {
		return fmt.Errorf("idcni: %w", err)
	}
	if rec == nil {
		// Without a record, the name still leads to the link, and the
		// link to the datapath entries; IPAM knows the container by ID.
		rec = &Record{Network: conf.Name, ContainerID: args.ContainerID, IfName: args.IfName,
			HostIfName: HostVethName(args.ContainerID, args.IfName)}
	}
	if err := teardown(conf, rec, func() error {
		return invoke.DelegateDel(context.Background(), conf.IPAM.Type, args.StdinData, nil)
	}); err != nil {
		return err
	}
	return records.Delete(args.ContainerID, args.IfName)
}

// teardown removes everything an attachment may hold except its record:
// the agent's registration, the link (with its routes and neighbour
// entries), the datapath state, and the IPAM reservation (releaseIPAM). The
// order matters: the link goes before the map entries so no packet passes
// unjudged in between, and the address goes back to IPAM last, once nothing
// refers to it any more.
func teardown(conf *NetConf, rec *Record, releaseIPAM func() error) error {
	if err := unregisterWithAgent(conf, rec.ContainerID); err != nil {
		warn("%v", err)
	}

	var errs []error
	ifindex := rec.HostIfIndex
	addrs := rec.Addresses
	link, err := lookupHostVeth(rec.HostIfName)
	if err != nil {
		errs = append(errs, err)
	} else if link != nil && !ownsLink(conf, rec, link) {
		// A link with our name that we cannot vouch for (someone
		// else's, or one our failed ADD ran into) is not ours to
		// delete, nor are the datapath entries of its ifindex.
		warn("leaving %s alone: its alias %q does not name container %s interface %s of network %q", rec.HostIfName, link.alias, rec.ContainerID, rec.IfName, conf.Name)
		link = nil
	} else if link != nil {
		// The live link is the best witness of the ifindex; a record
		// written before the veth existed has none.
		ifindex = link.link.Attrs().Index
		if err := deleteHostVeth(rec.HostIfName); err != nil {
			errs = append(errs, err)
		}
	}

	dp, err := bpf.Open(conf.BPFRoot)
	switch {
	case errors.Is(err, bpf.ErrNotLoaded):
		// Nothing was ever pinned here, so no map holds the pod.
	case err != nil:
		// Pins this build cannot open (another version's layout, a
		// map someone replaced) hold nothing DEL could clean, and
		// failing would keep the address and have the kubelet retry
		// forever: the pod would stick in Terminating. The link is
		// gone (its programs and its endpoint key went with it), and
		// no ADD of this build can put a pod under these pins (it
		// refuses them the same way), so the address is safe to hand
		// back. What stays in the maps goes with the pins when they
		// are replaced or removed.
		warn("leaving the datapath entries of %s/%s (ifindex %d, addresses %v) in place: %v", rec.ContainerID, rec.IfName, ifindex, addrsOrUnknown(addrs), err)
	default:
		if link == nil && len(addrs) == 0 {
			// Neither the link nor a record vouches for the
			// ifindex: leave the entry to GC rather than risk
			// another pod's.
			ifindex = 0
		}
		if err := release(dp, rec.HostIfName, ifindex, addrs); err != nil {
			errs = append(errs, err)
		}
		dp.Close()
	}
	if len(errs) > 0 {
		// Keep the IPAM reservation until the datapath no longer
		// refers to the address: handing it to a new pod now could give
		// that pod this one's identity.
		return fmt.Errorf("idcni: delete attachment %s/%s: %w", rec.ContainerID, rec.IfName, errors.Join(errs...))
	}

	if releaseIPAM != nil {
		if err := releaseIPAM(); err != nil {
			return withPrefix(err, fmt.Sprintf("idcni: release the addresses %v of container %s through IPAM plugin %q", addrsOrUnknown(addrs), rec.ContainerID, conf.IPAM.Type))
		}
	}
	return nil
}

// ownsLink reports whether a host veth is the attachment's: its alias says
// so, or, for a plugin killed before it set the alias, the record holds the
// link's ifindex.
func ownsLink(conf *NetConf, rec *Record, l *hostLinkState) bool {
	if l.alias == linkAlias(conf.Name, rec.ContainerID, rec.IfName) {
		return true
	}
	return l.alias == "" && rec.HostIfIndex != 0 && rec.HostIfIndex == l.link.Attrs().Index
}

func addrsOrUnknown(addrs []netip.Addr) any {
	if len(addrs) == 0 {
		return "(unknown)"
	}
	return addrs
}
