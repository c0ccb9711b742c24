package identity

import (
	"fmt"
	"testing"
)

func TestReservedNames(t *testing.T) {
	for id, want := range map[ID]string{Unknown: "any", Host: "host", World: "world", Unresolved: "unresolved", RemoteNode: "remote-node", 7: "7", 1001: "1001"} {
		if got := id.String(); got != want {
			t.Errorf("ID(%d).String() = %q, want %q", uint32(id), got, want)
		}
	}
}

func TestValidateRulePeer(t *testing.T) {
	for _, ok := range []uint64{1, 2, 6, 256, 1001, 65535} {
		if err := ValidateRulePeer(ok); err != nil {
			t.Errorf("ValidateRulePeer(%d): %v", ok, err)
		}
	}
	// Unknown would be a wildcard, unresolved is no address's identity
	// for long, label identities change with labels, and a value past
	// 32 bits must not wrap into an accepted one.
	for _, bad := range []uint64{0, 3, 5, 7, 255, 65536, 1 << 24, 1<<32 + 6} {
		if err := ValidateRulePeer(bad); err == nil {
			t.Errorf("ValidateRulePeer(%d) accepted", bad)
		}
	}
}

func TestParse(t *testing.T) {
	for s, want := range map[string]ID{"host": Host, "world": World, "remote-node": RemoteNode, "unresolved": Unresolved, "6": RemoteNode, "1001": 1001, "4294967295": 1<<32 - 1} {
		if got, err := Parse(s); err != nil || got != want {
			t.Errorf("Parse(%q) = %d, %v; want %d", s, uint32(got), err, uint32(want))
		}
	}
	for _, bad := range []string{"", "any", "Host", "remote_node", "-1", "4294967296", "0x10", " 6"} {
		if got, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) = %d, want an error", bad, uint32(got))
		}
	}
	// Every reserved name String gives (but "any", the wildcard) parses back.
	for id := MinReserved; id <= MaxReserved; id++ {
		if s := id.String(); s != fmt.Sprint(uint32(id)) {
			if got, err := Parse(s); err != nil || got != id {
				t.Errorf("Parse(%q) = %d, %v; want %d", s, uint32(got), err, uint32(id))
			}
		}
	}
}
