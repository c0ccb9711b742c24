package bpf

import (
	"bufio"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/internal/pkttest"
	"github.com/idcni/idcni/policy"
)

func progID(t *testing.T, p *ebpf.Program) ebpf.ProgramID {
	t.Helper()
	info, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	return id
}

func TestAttachTCXIdempotentUpgradeDetach(t *testing.T) {
	root := testRoot(t)
	d := loadTest(t, Options{Root: root, Attach: AttachTCX})
	n := newTestNet(t, 1)
	var err error
	n.do(func() { err = d.Attach("ep0") })
	if err != nil {
		t.Fatal(err)
	}
	n.do(func() { err = d.Attach("ep0") }) // again: no second program
	if err != nil {
		t.Fatalf("second attach: %v", err)
	}
	pin := filepath.Join(root, "links", "ep0_ingress")
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		t.Fatalf("tcx link pin: %v", err)
	}
	linkInfo, _ := l.Info()
	l.Close()
	var ok bool
	n.do(func() { ok, err = d.Attached("ep0") })
	if err != nil || !ok {
		t.Fatalf("Attached = %v, %v", ok, err)
	}

	// Upgrade: a new load with Replace moves the same link to new programs.
	d2, err := Load(Options{Root: root, Replace: true, Attach: AttachTCX})
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Close()
	if progID(t, d2.objs.FromPod) == progID(t, d.objs.FromPod) {
		t.Fatal("Replace did not load new programs")
	}
	l, err = link.LoadPinnedLink(pin, nil)
	if err != nil {
		t.Fatal(err)
	}
	after, _ := l.Info()
	l.Close()
	if after.ID != linkInfo.ID || after.Program != progID(t, d2.objs.FromPod) {
		t.Fatalf("after upgrade link %d runs prog %d; want link %d running %d", after.ID, after.Program, linkInfo.ID, progID(t, d2.objs.FromPod))
	}
	n.do(func() { ok, err = d2.Attached("ep0") })
	if err != nil || !ok {
		t.Fatalf("Attached after upgrade = %v, %v", ok, err)
	}
	// The pinned programs are the new ones, so later plugin runs use them.
	d3, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	defer d3.Close()
	if progID(t, d3.objs.ToPod) != progID(t, d2.objs.ToPod) {
		t.Fatal("pinned to_pod is not the upgraded program")
	}

	n.do(func() { err = d2.Detach("ep0") })
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(pin); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("pin left after detach: %v", err)
	}
	n.do(func() { ok, err = d2.Attached("ep0") })
	if err != nil || ok {
		t.Fatalf("Attached after detach = %v, %v", ok, err)
	}
	n.do(func() { err = d2.Detach("ep0") })
	if err != nil {
		t.Fatalf("second detach: %v", err)
	}
	if err := d2.Detach("no-such-veth"); err != nil {
		t.Fatalf("detach of a missing veth: %v", err)
	}
}

func TestAttachLegacyFallback(t *testing.T) {
	root := testRoot(t)
	d := loadTest(t, Options{Root: root, Attach: AttachLegacy})
	n := newTestNet(t, 1)
	var err error
	var ok bool
	n.do(func() { err = d.Attach("ep0") })
	if err != nil {
		t.Fatal(err)
	}
	n.do(func() { ok, err = d.Attached("ep0") })
	if err != nil || !ok {
		t.Fatalf("legacy Attached = %v, %v", ok, err)
	}
	if _, err := os.Stat(filepath.Join(root, "links", "ep0_ingress")); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("legacy attach left a tcx pin")
	}
	var d2 *Datapath
	n.do(func() { d2, err = Load(Options{Root: root, Replace: true, Attach: AttachLegacy}) })
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Close()
	n.do(func() { ok, err = d2.Attached("ep0") })
	if err != nil || !ok {
		t.Fatalf("legacy filter not moved to the upgraded program: %v, %v", ok, err)
	}
	n.do(func() { err = d2.Detach("ep0") })
	if err != nil {
		t.Fatal(err)
	}
	n.do(func() { ok, err = d2.Attached("ep0") })
	if err != nil || ok {
		t.Fatalf("Attached after legacy detach = %v, %v", ok, err)
	}
}

func TestIncompatiblePinIsRefused(t *testing.T) {
	root := testRoot(t)
	if err := ensureBPFFS(root); err != nil {
		t.Fatal(err)
	}
	foreign, err := ebpf.NewMap(&ebpf.MapSpec{Name: "policy", Type: ebpf.Hash, KeySize: 4, ValueSize: 4, MaxEntries: 8})
	if err != nil {
		t.Fatal(err)
	}
	defer foreign.Close()
	if err := foreign.Pin(filepath.Join(root, "policy")); err != nil {
		t.Fatal(err)
	}
	_, err = Load(Options{Root: root})
	if !errors.Is(err, ebpf.ErrMapIncompatible) || !errors.Is(err, ErrLayoutMismatch) || !strings.Contains(err.Error(), filepath.Join(root, "policy")) {
		t.Fatalf("Load over a foreign pin: %v", err)
	}
	// Refused means untouched: the foreign map is still what is pinned.
	m, err := ebpf.LoadPinnedMap(filepath.Join(root, "policy"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if m.ValueSize() != 4 {
		t.Fatal("foreign pin was replaced")
	}
}

func TestFullPolicyMapRefusedWhole(t *testing.T) {
	d := loadTest(t, Options{PolicyEntries: 8})
	small := manual(policy.ManualRule{Action: policy.Allow, Src: idA, Dst: idB})
	ms, _ := small.Compile()
	if err := d.ApplyPolicy(ms); err != nil {
		t.Fatal(err)
	}
	rev, _ := d.Revision()
	big := &policy.Set{}
	for i := 0; i < 20; i++ {
		big.Rules = append(big.Rules, policy.Rule{Subject: idA, Direction: policy.Egress, Peer: identity.MinLabel + identity.ID(i), Action: policy.Allow})
	}
	ms, _ = big.Compile()
	err := d.ApplyPolicy(ms)
	if err == nil || !strings.Contains(err.Error(), "policy map holds at most 8") {
		t.Fatalf("oversized policy: %v", err)
	}
	have, _ := d.Policy()
	if len(have.Entries) != 2 {
		t.Fatalf("refused policy changed the map: %d entries", len(have.Entries))
	}
	if r, _ := d.Revision(); r != rev {
		t.Fatal("refused policy moved the revision")
	}
}

func TestEventsAndTraceLines(t *testing.T) {
	s := newSeed(t)
	rd, err := s.d.Events()
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	// A deny, which must be reported.
	r1, _ := s.cross(ping(ipB, ipA, 9), s.b, s.a)
	if r1 != ReasonDropNoRule {
		t.Fatal(r1)
	}
	rd.SetDeadline(time.Now().Add(3 * time.Second))
	ev, err := rd.Read()
	if err != nil {
		t.Fatalf("no event for a drop: %v", err)
	}
	if ev.Allowed || ev.Reason != ReasonDropNoRule || ev.Src != idB || ev.Dst != idA || ev.SrcAddr != ipB || ev.DstAddr != ipA || ev.Proto != policy.ProtoICMP {
		t.Fatalf("event %+v", ev)
	}

	trace, err := os.Open("/sys/kernel/tracing/trace_pipe")
	if err != nil {
		t.Skipf("tracefs not mounted: %v", err)
	}
	defer trace.Close()
	lines := make(chan string, 64)
	go func() {
		sc := bufio.NewScanner(trace)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	if err := s.d.SetDebug(true); err != nil {
		t.Fatal(err)
	}
	defer s.d.SetDebug(false)
	s.policy(manual(policy.ManualRule{Action: policy.Allow, Src: idA, Dst: idB}))
	s.cross(pkttest.Packet{Src: ipA, Dst: ipB, Proto: pkttest.UDP, SrcPort: 7, DstPort: 7}, s.a, s.b)
	want := map[string]bool{
		"TC: HIT from a0d0002 (id=1001) to a0d0003 (id=1002)": false,
		"TC: ALLOW id 1001 -> id 1002":                        false,
	}
	deadline := time.After(3 * time.Second)
	for missing := len(want); missing > 0; {
		select {
		case l := <-lines:
			for w, seen := range want {
				if !seen && strings.Contains(l, w) {
					want[w] = true
					missing--
				}
			}
		case <-deadline:
			t.Fatalf("trace lines not seen: %v", want)
		}
	}
}
