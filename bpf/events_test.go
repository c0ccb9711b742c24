package bpf

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
	"time"

	"github.com/cilium/ebpf/ringbuf"
)

// decodeEvent must read what binary.Read reads, field for field.
func TestDecodeEventMatchesLayout(t *testing.T) {
	want := datapathEvent{Ts: 1 << 40, Ifindex: 7, SrcIdentity: 1001, DstIdentity: 70000, Len: 98,
		Sport: 4242, Dport: 80, Proto: 6, Family: 4, Verdict: 2, Reason: 8, Scope: 1}
	want.Saddr[15], want.Daddr[15] = 2, 3
	var buf bytes.Buffer
	if err := binary.Write(&buf, binary.LittleEndian, &want); err != nil {
		t.Fatal(err)
	}
	got, err := decodeEvent(buf.Bytes())
	if err != nil || got != want {
		t.Fatalf("decodeEvent = %+v, %v; want %+v", got, err, want)
	}
	if _, err := decodeEvent(buf.Bytes()[:10]); err == nil {
		t.Fatal("short event accepted")
	}
}

// Close from another goroutine ends a Read that waits, whether the ring is
// empty or holds a partial batch, without a race with the reader.
func TestEventReaderCloseWhileReading(t *testing.T) {
	s := newSeed(t)
	for _, waiting := range []int{0, 3} {
		rd, err := s.d.Events()
		if err != nil {
			t.Fatal(err)
		}
		// Drops make events: a few, far from a batch.
		for i := range waiting {
			s.send(ping(ipB, ipA, uint16(100+i)).Frame(), ScopeEgress, s.b, 0)
		}
		done := make(chan error)
		go func() {
			for {
				if _, err := rd.Read(); err != nil {
					done <- err
					return
				}
			}
		}()
		time.Sleep(30 * time.Millisecond)
		if err := rd.Close(); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-done:
			if !errors.Is(err, ringbuf.ErrClosed) {
				t.Errorf("%d events waiting: Read after Close = %v, want ErrClosed", waiting, err)
			}
		case <-time.After(2 * time.Second):
			t.Fatalf("%d events waiting: Read still blocked 2 s after Close", waiting)
		}
		if err := rd.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
	}
}
