package bpf

import (
	"fmt"
	"os"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/internal/pkttest"
	"github.com/idcni/idcni/policy"
)

// BenchmarkDatapath measures the kernel's own time per packet
// (BPF_PROG_TEST_RUN's duration over b.N repetitions, reported as ns/pkt)
// for the from_pod program: an established flow, and a new flow each
// packet, with 10,
// 10,000 and 1,000,000 rules in the policy map. The baseline is a program
// that only returns TC_ACT_OK, run the same way in the same process.
//
//	go test -run '^$' -bench Datapath -benchtime 2000000x ./bpf/
func BenchmarkDatapath(b *testing.B) {
	baseSpec, err := loadBaseline()
	if err != nil {
		b.Fatal(err)
	}
	var base baselineObjects
	if err := baseSpec.LoadAndAssign(&base, nil); err != nil {
		b.Fatal(err)
	}
	defer base.Close()

	for _, rules := range []int{10, 10_000, 1_000_000} {
		b.Run(fmt.Sprintf("rules=%d", rules), func(b *testing.B) {
			p := newPair(b, 2, Options{PolicyEntries: uint32(max(65536, rules+rules/4))})
			if os.Getenv("IDCNI_BENCH_NO_READER") == "" {
				drainEvents(b, p.d)
			}
			a := p.endpoint(0, Endpoint{Identity: idA, IPv4: ipA})
			bIf := p.endpoint(1, Endpoint{Identity: idB, IPv4: ipB})
			ms, err := benchRules(rules).Compile()
			if err != nil {
				b.Fatal(err)
			}
			if err := p.d.ApplyPolicy(ms); err != nil {
				b.Fatal(err)
			}
			if got := len(ms.Entries); got < rules*9/10 {
				b.Fatalf("only %d policy entries for %d rules", got, rules)
			}
			syn := pkttest.Packet{Src: ipA, Dst: ipB, Proto: pkttest.TCP, SrcPort: 1, DstPort: 80, TCPFlags: pkttest.SYN}
			ack := syn
			ack.TCPFlags = pkttest.ACK

			b.Run("established", func(b *testing.B) {
				if r, err := p.run(syn.Frame(), ScopeEgress, a, 0); err != nil || (r != ReasonAllowRule && r != ReasonAllowEstablished) {
					b.Fatalf("first packet: %s %v", r, err)
				}
				benchRepeat(b, p, p.d.objs.FromPod, ack.Frame(), a)
			})
			b.Run("established-baseline", func(b *testing.B) {
				benchRepeat(b, p, base.Pass, ack.Frame(), a)
			})
			// Every repetition a new flow: the benchmark program counts
			// the ports up before running the datapath, and its baseline
			// only counts.
			bench := loadBenchProgs(b, p.d)
			b.Run("new", func(b *testing.B) {
				benchRepeat(b, p, bench.BenchNewFlow, syn.Frame(), a)
			})
			b.Run("new-baseline", func(b *testing.B) {
				benchRepeat(b, p, bench.BenchBumpOnly, syn.Frame(), a)
			})
			b.Run("new-warm", func(b *testing.B) {
				benchRepeat(b, p, bench.BenchNewFlowWarm, syn.Frame(), a)
			})
			b.Run("new-warm-baseline", func(b *testing.B) {
				benchRepeat(b, p, bench.BenchExpireOnly, syn.Frame(), a)
			})
			// Through a Service: the same flows to B, sent to a frontend
			// B is the backend of, translated both ways.
			if err := p.d.PutService(ServiceFrontend{Addr: vip, Port: 80, Proto: pkttest.TCP}, Service{Backends: []ServiceBackend{{Addr: ipB, Port: 80}}}); err != nil {
				b.Fatal(err)
			}
			svcSyn, svcAck := syn, ack
			svcSyn.Dst, svcAck.Dst = vip, vip
			// The translation rewrites the packet, which the next
			// repetition would see: bench_service puts it back.
			b.Run("established-service", func(b *testing.B) {
				if r, err := p.run(svcSyn.Frame(), ScopeEgress, a, 0); err != nil || (r != ReasonAllowRule && r != ReasonAllowEstablished) {
					b.Fatalf("first packet: %s %v", r, err)
				}
				benchRepeat(b, p, bench.BenchService, svcAck.Frame(), a)
			})
			b.Run("established-service-baseline", func(b *testing.B) {
				benchRepeat(b, p, bench.BenchRestoreOnly, svcAck.Frame(), a)
			})
			// B becomes a local pod: from_pod checks B's ingress too and
			// hands the packet over, doing the work of both programs.
			p.local(bIf, ipB)
			b.Run("established-local", func(b *testing.B) {
				if r, err := p.run(syn.Frame(), ScopeEgress, a, 0); err != nil || r.Drop() {
					b.Fatalf("first packet: %s %v", r, err)
				}
				benchRepeat(b, p, p.d.objs.FromPod, ack.Frame(), a)
			})
			b.Run("new-warm-local", func(b *testing.B) {
				benchRepeat(b, p, bench.BenchNewFlowWarm, syn.Frame(), a)
			})
			b.Run("new-warm-local-baseline", func(b *testing.B) {
				benchRepeat(b, p, bench.BenchExpireOnly, syn.Frame(), a)
			})
		})
	}
}

// benchRules returns n rules over many identity pairs, plus the rule the
// benchmarked packets need (1001 -> 1002 tcp/1-65535). Each rule gets its own
// policy map entry.
func benchRules(n int) *policy.Set {
	s := &policy.Set{Rules: make([]policy.Rule, 0, n)}
	s.Rules = append(s.Rules, policy.ManualRule{Action: policy.Allow, Src: idA, Dst: idB, Proto: policy.ProtoTCP, Ports: policy.PortRange{Lo: 1, Hi: 65535}}.Expand()...)
	for i := 0; len(s.Rules) < n; i++ {
		s.Rules = append(s.Rules, policy.Rule{
			Subject: identity.MinLabel + identity.ID(i%1000), Direction: policy.Ingress,
			Peer: identity.MinLabel + 1000 + identity.ID(i/1000), Proto: policy.ProtoTCP,
			Ports: policy.PortRange{Lo: 80, Hi: 80}, Action: policy.Allow,
		})
	}
	return s
}

// benchRepeat runs one frame b.N times inside the kernel and reports the
// kernel's time per run.
func benchRepeat(b *testing.B, p *pair, prog *ebpf.Program, frame []byte, ifindex int) {
	var dur uint32
	var err error
	b.ResetTimer()
	p.net.do(func() { _, dur, err = testRun(prog, frame, ifindex, 0, uint32(b.N), nil) })
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(dur), "ns/pkt")
}

// loadBenchProgs loads the benchmark programs onto the datapath's own maps.
func loadBenchProgs(b testing.TB, d *Datapath) *benchObjects {
	spec, err := loadBench()
	if err != nil {
		b.Fatal(err)
	}
	repl := map[string]*ebpf.Map{}
	for name, m := range d.mapFields() {
		repl[name] = *m
		spec.Maps[name].MaxEntries = (*m).MaxEntries()
	}
	var objs benchObjects
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: repl}); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { objs.Close() })
	return &objs
}

// drainEvents reads and drops verdict events, as the agent would, so the
// ring buffer's cost with a consumer is part of the numbers.
func drainEvents(b *testing.B, d *Datapath) {
	rd, err := d.Events()
	if err != nil {
		b.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			if _, err := rd.Read(); err != nil {
				return
			}
		}
	}()
	b.Cleanup(func() { rd.Close(); <-done })
}
