package agent

import (
	"errors"
	"fmt"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// hostLink is what the endpoint registry needs to know of a link of the
// host's netns: enough to tell whether it is still the host veth an entry
// was registered with.
type hostLink struct {
	Index int
	Name  string
	Alias string
}

// hostLinks is the agent's view of the host's links, narrow so the
// registry's checks run without root in tests.
type hostLinks interface {
	// ByIndex returns the link with that ifindex; ok is false when there
	// is none.
	ByIndex(ifindex int) (l hostLink, ok bool, err error)
	// List returns every link.
	List() ([]hostLink, error)
}

// netlinkLinks reads the links of the agent's netns (the host's: the agent
// runs on the host network) through netlink.
type netlinkLinks struct{}

func (netlinkLinks) ByIndex(ifindex int) (hostLink, bool, error) {
	if ifindex <= 0 {
		return hostLink{}, false, nil
	}
	l, err := netlink.LinkByIndex(ifindex)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) || errors.Is(err, unix.ENODEV) {
		return hostLink{}, false, nil
	}
	if err != nil {
		return hostLink{}, false, fmt.Errorf("look up link %d: %w", ifindex, err)
	}
	a := l.Attrs()
	return hostLink{Index: a.Index, Name: a.Name, Alias: a.Alias}, true, nil
}

func (netlinkLinks) List() ([]hostLink, error) {
	ls, err := netlinksafe.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	out := make([]hostLink, 0, len(ls))
	for _, l := range ls {
		a := l.Attrs()
		out = append(out, hostLink{Index: a.Index, Name: a.Name, Alias: a.Alias})
	}
	return out, nil
}
