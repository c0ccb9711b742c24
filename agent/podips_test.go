package agent

import (
	"net/netip"
	"testing"
)

func TestPodIPsPatchListsIPv4FirstAndCarriesTheUID(t *testing.T) {
	p := newPodIPPublisher(&Agent{})
	defer p.queue.ShutDown()
	p.publish("shop", "web", "u-1", []netip.Addr{netip.MustParseAddr("fd00:13::5"), netip.MustParseAddr("10.13.0.5")})
	p.publish("shop", "old", "", []netip.Addr{netip.MustParseAddr("10.13.0.6")})
	if n := p.queue.Len(); n != 1 {
		t.Fatalf("queued %d publications, want 1 (none without a UID)", n)
	}
	item, _ := p.queue.Get()
	body, err := podIPsPatch(item)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"metadata":{"uid":"u-1"},"status":{"podIP":"10.13.0.5","podIPs":[{"ip":"10.13.0.5"},{"ip":"fd00:13::5"}]}}`
	if string(body) != want {
		t.Errorf("patch = %s\nwant %s", body, want)
	}
}
