package bpf

import (
	"os"
	"regexp"
	"strconv"
	"testing"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/policy"
)

// The #defines of idcni.h never reach the object's BTF, so bpf2go cannot
// carry them to Go: this test reads the header and holds every one the Go
// side repeats to its Go twin (policy/mapstate.go promises it).
func TestDefinesMatchGo(t *testing.T) {
	src, err := os.ReadFile("kernel/idcni.h")
	if err != nil {
		t.Fatal(err)
	}
	defines := map[string]uint64{}
	re := regexp.MustCompile(`(?m)^#define\s+(\w+)\s+\(?\s*(\d+)\s*(?:<<\s*(\d+))?\s*\)?\s*(?:/\*.*)?$`)
	for _, m := range re.FindAllStringSubmatch(string(src), -1) {
		v, _ := strconv.ParseUint(m[2], 10, 64)
		if m[3] != "" {
			shift, _ := strconv.ParseUint(m[3], 10, 64)
			v <<= shift
		}
		defines[m[1]] = v
	}
	for name, want := range map[string]uint64{
		"ID_ANY":               uint64(identity.Any),
		"ID_HOST":              uint64(identity.Host),
		"ID_WORLD":             uint64(identity.World),
		"ID_UNRESOLVED":        uint64(identity.Unresolved),
		"ID_REMOTE_NODE":       uint64(identity.RemoteNode),
		"ID_MIN_MANUAL":        uint64(identity.MinManual),
		"ID_MAX_MANUAL":        uint64(identity.MaxManual),
		"DIR_INGRESS":          uint64(policy.Ingress),
		"DIR_EGRESS":           uint64(policy.Egress),
		"IDF_ISO_INGRESS":      uint64(policy.FlagIsolatedIngress),
		"IDF_ISO_EGRESS":       uint64(policy.FlagIsolatedEgress),
		"IDF_RULES_INGRESS":    uint64(policy.FlagRulesIngress),
		"IDF_RULES_EGRESS":     uint64(policy.FlagRulesEgress),
		"IDF_ANYPEER_INGRESS":  uint64(policy.FlagAnyPeerIngress),
		"IDF_ANYPEER_EGRESS":   uint64(policy.FlagAnyPeerEgress),
		"IDF_ANYPROTO_INGRESS": uint64(policy.FlagAnyProtoIngress),
		"IDF_ANYPROTO_EGRESS":  uint64(policy.FlagAnyProtoEgress),
		"EP_HAS_V4":            epHasV4,
		"EP_HAS_V6":            epHasV6,
		"CT_F_CLOSING":         ctClosing,
		"POLICY_MAX_ALLOW":     policy.MaxAllowRanges,
		"POLICY_MAX_DENY":      policy.MaxDenyRanges,
	} {
		got, ok := defines[name]
		if !ok {
			t.Errorf("idcni.h has no #define %s (or not in a form this test reads)", name)
			continue
		}
		if got != want {
			t.Errorf("idcni.h: %s is %d, Go says %d", name, got, want)
		}
	}
}
