package bpf

import (
	"bytes"
	"encoding/binary"
	"testing"
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
