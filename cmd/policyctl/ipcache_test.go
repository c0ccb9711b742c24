package main

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/idcni/idcni/identity"
	"github.com/idcni/idcni/internal/clitest"
)

func TestIPCache(t *testing.T) {
	t.Parallel()
	e, _ := clitest.New(t)
	if r := e.MustRun("policyctl", "ipcache"); !strings.Contains(r.Stdout, "every address is world") {
		t.Errorf("empty ipcache:\n%s", r)
	}
	e.MustRun("endpointctl", "add", "--ip", "10.13.0.2", "--identity", "1001")
	r := e.MustRun("policyctl", "ipcache", "-o", "json")
	var all struct{ Entries []ipcacheRow }
	if err := json.Unmarshal([]byte(r.Stdout), &all); err != nil || len(all.Entries) != 1 ||
		all.Entries[0].Prefix.String() != "10.13.0.2/32" || all.Entries[0].Identity != 1001 {
		t.Fatalf("ipcache -o json = %+v, %v\n%s", all, err, r)
	}
	r = e.MustRun("policyctl", "ipcache", "--ip", "10.13.0.9", "-o", "json")
	var one ipcacheRow
	if err := json.Unmarshal([]byte(r.Stdout), &one); err != nil || one.Identity != identity.World || one.Name != "world" {
		t.Errorf("ipcache --ip of an unknown address = %+v, %v, want world", one, err)
	}
	if r := e.Run("policyctl", "ipcache", "--ip", "10.13.0.300"); r.Code == 0 || !strings.Contains(r.Stderr, "bad --ip") {
		t.Errorf("a bad --ip is not refused clearly:\n%s", r)
	}
}
