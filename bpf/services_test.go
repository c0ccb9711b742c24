package bpf

import (
	"errors"
	"net/netip"
	"reflect"
	"testing"

	"golang.org/x/sys/unix"
)

// TestServicesRoundTrip writes frontends through PutService and reads them
// back from the maps, raw and through Services: ids stay with their
// frontend, a shrink removes the slots above the new count, a delete
// removes every slot.
func TestServicesRoundTrip(t *testing.T) {
	d := loadTest(t, Options{})
	web := ServiceFrontend{Addr: netip.MustParseAddr("10.96.0.10"), Port: 80, Proto: unix.IPPROTO_TCP}
	dns := ServiceFrontend{Addr: netip.MustParseAddr("fd00:96::a"), Port: 53, Proto: unix.IPPROTO_UDP}
	webSvc := Service{Backends: []ServiceBackend{
		{Addr: netip.MustParseAddr("10.0.0.1"), Port: 8080},
		{Addr: netip.MustParseAddr("10.0.0.2"), Port: 8080},
		{Addr: netip.MustParseAddr("10.0.0.3"), Port: 8081},
	}, AffinityTimeout: 10800}
	dnsSvc := Service{Backends: []ServiceBackend{{Addr: netip.MustParseAddr("fd00::53"), Port: 5353}}}
	for fe, s := range map[ServiceFrontend]Service{web: webSvc, dns: dnsSvc} {
		if err := d.PutService(fe, s); err != nil {
			t.Fatal(err)
		}
	}
	got, err := d.Services()
	if err != nil {
		t.Fatal(err)
	}
	want := map[ServiceFrontend]Service{web: webSvc, dns: dnsSvc}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Services() = %v, want %v", got, want)
	}
	webID := serviceID(t, d, web)
	if dnsID := serviceID(t, d, dns); webID == 0 || dnsID == 0 || webID == dnsID {
		t.Fatalf("ids %d and %d: want two distinct non-zero ids", webID, dnsID)
	}

	// Shrink: one backend, no affinity. The id stays, slots 1 and 2 go.
	webSvc = Service{Backends: webSvc.Backends[2:]}
	if err := d.PutService(web, webSvc); err != nil {
		t.Fatal(err)
	}
	if id := serviceID(t, d, web); id != webID {
		t.Fatalf("rewriting %s moved its id from %d to %d", web, webID, id)
	}
	if n := backendSlots(t, d, webID); n != 1 {
		t.Fatalf("after shrinking to one backend, %d slots of id %d remain", n, webID)
	}
	got, err = d.Services()
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got[web], webSvc) {
		t.Fatalf("after shrink: %v, want %v", got[web], webSvc)
	}

	// No backends is a frontend the datapath rejects: it stays, empty.
	if err := d.PutService(web, Service{}); err != nil {
		t.Fatal(err)
	}
	if got, err = d.Services(); err != nil || len(got[web].Backends) != 0 {
		t.Fatalf("empty service: %v, %v", got[web], err)
	}
	if _, ok := got[web]; !ok {
		t.Fatalf("empty service %s vanished", web)
	}

	if err := d.DeleteService(web); err != nil {
		t.Fatal(err)
	}
	if err := d.DeleteService(web); err != nil {
		t.Fatalf("deleting an absent service: %v", err)
	}
	if n := backendSlots(t, d, webID); n != 0 {
		t.Fatalf("after delete, %d slots of id %d remain", n, webID)
	}
	// The freed id is the lowest free one again.
	if err := d.PutService(web, webSvc); err != nil {
		t.Fatal(err)
	}
	if id := serviceID(t, d, web); id != webID {
		t.Fatalf("re-added %s got id %d, want the freed %d", web, id, webID)
	}
}

func TestPutServiceRefusesBadInput(t *testing.T) {
	d := loadTest(t, Options{})
	v4 := netip.MustParseAddr("10.96.0.1")
	good := ServiceFrontend{Addr: v4, Port: 443, Proto: unix.IPPROTO_TCP}
	if err := d.PutService(good, Service{Backends: []ServiceBackend{{Addr: netip.MustParseAddr("10.0.0.9"), Port: 6443}}}); err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]struct {
		fe ServiceFrontend
		s  Service
	}{
		"icmp":          {ServiceFrontend{Addr: v4, Port: 1, Proto: unix.IPPROTO_ICMP}, Service{}},
		"port 0":        {ServiceFrontend{Addr: v4, Port: 0, Proto: unix.IPPROTO_TCP}, Service{}},
		"mapped":        {ServiceFrontend{Addr: netip.AddrFrom16(v4.As16()), Port: 1, Proto: unix.IPPROTO_TCP}, Service{}},
		"no address":    {ServiceFrontend{Port: 1, Proto: unix.IPPROTO_TCP}, Service{}},
		"mixed family":  {good, Service{Backends: []ServiceBackend{{Addr: netip.MustParseAddr("fd00::1"), Port: 1}}}},
		"backend port0": {good, Service{Backends: []ServiceBackend{{Addr: netip.MustParseAddr("10.0.0.1")}}}},
	} {
		if err := d.PutService(c.fe, c.s); err == nil {
			t.Errorf("%s: PutService(%v, %v) took it", name, c.fe, c.s)
		}
	}
	// Refused input lost nothing.
	got, err := d.Services()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || len(got[good].Backends) != 1 {
		t.Fatalf("after refused writes: %v", got)
	}
}

// TestPutServiceFullMap fills a small backends map: the write that does
// not fit is an ErrMapFull error, and the frontend keeps what it had.
func TestPutServiceFullMap(t *testing.T) {
	d := loadTest(t, Options{})
	capacity := int(d.objs.Backends.MaxEntries())
	fe := ServiceFrontend{Addr: netip.MustParseAddr("10.96.0.2"), Port: 80, Proto: unix.IPPROTO_TCP}
	old := Service{Backends: []ServiceBackend{{Addr: netip.MustParseAddr("10.0.0.1"), Port: 80}}}
	if err := d.PutService(fe, old); err != nil {
		t.Fatal(err)
	}
	big := Service{Backends: make([]ServiceBackend, capacity+1)}
	for i := range big.Backends {
		big.Backends[i] = ServiceBackend{Addr: netip.AddrFrom4([4]byte{10, 1, byte(i >> 16), byte(i >> 8)}), Port: uint16(i%60000 + 1)}
	}
	err := d.PutService(fe, big)
	if !errors.Is(err, ErrMapFull) {
		t.Fatalf("PutService with %d backends into a map of %d: %v, want ErrMapFull", len(big.Backends), capacity, err)
	}
	got, err := d.Services()
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got[fe], old) {
		t.Fatalf("after the refused write the frontend has %v, want %v", got[fe], old)
	}
	if n := backendSlots(t, d, serviceID(t, d, fe)); n != 1 {
		t.Fatalf("after the refused write %d slots remain, want 1", n)
	}
}

func serviceID(t *testing.T, d *Datapath, fe ServiceFrontend) uint32 {
	t.Helper()
	k := svcKey(fe)
	var v datapathSvcValue
	if err := d.objs.Services.Lookup(&k, &v); err != nil {
		t.Fatalf("look up %s: %v", fe, err)
	}
	return v.Id
}

func backendSlots(t *testing.T, d *Datapath, id uint32) int {
	t.Helper()
	n := 0
	var k datapathBackendKey
	var v datapathBackend
	it := d.objs.Backends.Iterate()
	for it.Next(&k, &v) {
		if k.Id == id {
			n++
		}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestServiceIDsStayUnique writes frontends, deletes some and writes
// others, through two handles in turn (an agent restarting): every
// frontend in the map must hold an id of its own, and a freed id is
// taken again first.
func TestServiceIDsStayUnique(t *testing.T) {
	d := loadTest(t, Options{})
	fe := func(i int) ServiceFrontend {
		return ServiceFrontend{Addr: netip.AddrFrom4([4]byte{10, 96, byte(i >> 8), byte(i)}), Port: 80, Proto: unix.IPPROTO_TCP}
	}
	svc := Service{Backends: []ServiceBackend{{Addr: netip.MustParseAddr("10.0.0.1"), Port: 8080}}}
	put := func(d *Datapath, i int) {
		t.Helper()
		if err := d.PutService(fe(i), svc); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 300 {
		put(d, i)
	}
	for _, i := range []int{7, 100, 299} {
		if err := d.DeleteService(fe(i)); err != nil {
			t.Fatal(err)
		}
	}
	put(d, 1000)
	if id := serviceID(t, d, fe(1000)); id != 8 {
		t.Errorf("the first new frontend after freeing ids 8, 101 and 300 got id %d, want 8", id)
	}
	// A second handle on the same pins reads the ids from the map.
	d2, err := Load(Options{Root: d.Root()})
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Close()
	put(d2, 1001)
	put(d2, 1002)
	put(d2, 1003)
	if id := serviceID(t, d2, fe(1003)); id != 301 {
		t.Errorf("the third new frontend of a second handle got id %d, want 301 (101 and 300 free first)", id)
	}
	seen := map[uint32]ServiceFrontend{}
	var k datapathSvcKey
	var v datapathSvcValue
	it := d2.objs.Services.Iterate()
	for it.Next(&k, &v) {
		if other, dup := seen[v.Id]; dup {
			t.Errorf("id %d is held by two frontends (%v and key %+v)", v.Id, other, k)
		}
		seen[v.Id] = ServiceFrontend{}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	if len(seen) != 301 {
		t.Errorf("%d frontends in the map, want 301", len(seen))
	}
}

// BenchmarkPutServiceNew writes b.N new frontends, up to 50,000 in the map:
// the cost of one new frontend, whatever the map holds.
func BenchmarkPutServiceNew(b *testing.B) {
	d := loadTest(b, Options{})
	svc := Service{Backends: []ServiceBackend{{Addr: netip.MustParseAddr("10.0.0.1"), Port: 8080}}}
	const wrap = 50_000 // under the map's 65,536
	fe := func(i int) ServiceFrontend {
		return ServiceFrontend{Addr: netip.AddrFrom4([4]byte{10, 96, byte(i >> 8), byte(i)}), Port: uint16(80 + i>>16), Proto: unix.IPPROTO_TCP}
	}
	b.ResetTimer()
	for i := range b.N {
		if i > 0 && i%wrap == 0 {
			b.StopTimer()
			for j := range wrap {
				if err := d.DeleteService(fe(j)); err != nil {
					b.Fatal(err)
				}
			}
			b.StartTimer()
		}
		if err := d.PutService(fe(i%wrap), svc); err != nil {
			b.Fatal(err)
		}
	}
}
