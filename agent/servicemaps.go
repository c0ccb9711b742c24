package agent

import (
	"strconv"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"

	"github.com/idcni/idcni/bpf"
)

// datapathServices is the datapath's service map in the agent's types.
type datapathServices struct{ dp *bpf.Datapath }

var _ serviceMaps = datapathServices{}

func (d datapathServices) PutService(fe svcFrontend, v svcValue) error {
	s := bpf.Service{AffinityTimeout: v.AffinityTimeout}
	for _, b := range v.Backends {
		s.Backends = append(s.Backends, bpf.ServiceBackend{Addr: b.Addr, Port: b.Port})
	}
	return d.dp.PutService(toBPFFrontend(fe), s)
}

func (d datapathServices) DeleteService(fe svcFrontend) error {
	return d.dp.DeleteService(toBPFFrontend(fe))
}

func (d datapathServices) Services() (map[svcFrontend]svcValue, error) {
	in, err := d.dp.Services()
	if err != nil {
		return nil, err
	}
	out := make(map[svcFrontend]svcValue, len(in))
	for fe, s := range in {
		v := svcValue{AffinityTimeout: s.AffinityTimeout}
		for _, b := range s.Backends {
			v.Backends = append(v.Backends, svcBackend{Addr: b.Addr, Port: b.Port})
		}
		out[svcFrontend{Addr: fe.Addr, Port: fe.Port, Proto: protocolName(fe.Proto)}] = v
	}
	return out, nil
}

// protocolName and protocolNumber map between the API's protocols and IP
// protocol numbers. A number the API has no name for (a map written by
// hand) keeps its digits, so the start can still delete its frontend.
func protocolName(p uint8) corev1.Protocol {
	switch p {
	case unix.IPPROTO_TCP:
		return corev1.ProtocolTCP
	case unix.IPPROTO_UDP:
		return corev1.ProtocolUDP
	case unix.IPPROTO_SCTP:
		return corev1.ProtocolSCTP
	}
	return corev1.Protocol(strconv.Itoa(int(p)))
}

func protocolNumber(p corev1.Protocol) uint8 {
	switch p {
	case corev1.ProtocolTCP:
		return unix.IPPROTO_TCP
	case corev1.ProtocolUDP:
		return unix.IPPROTO_UDP
	case corev1.ProtocolSCTP:
		return unix.IPPROTO_SCTP
	}
	n, _ := strconv.ParseUint(string(p), 10, 8)
	return uint8(n)
}

func toBPFFrontend(fe svcFrontend) bpf.ServiceFrontend {
	return bpf.ServiceFrontend{Addr: fe.Addr, Port: fe.Port, Proto: protocolNumber(fe.Proto)}
}
