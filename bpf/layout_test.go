package bpf

import (
	"encoding/binary"
	"strings"
	"testing"
)

// layoutGolden is the pinned layout of each LayoutVersion this source has
// had, as layoutOf describes it. A change to a pinned map's type, key or
// value size, flags or default size, or to the pinned maps a program uses,
// fails TestLayoutVersion until LayoutVersion moves and its row is added
// here: binaries that disagree on the layout must not share pins.
var layoutGolden = map[int]string{
	1: `
map config: Array key 4 value 8 max 1 flags 0x0
map conntrack: LRUHash key 40 value 32 max 262144 flags 0x0
map counters: PerCPUArray key 4 value 16 max 32 flags 0x0
map ct_tables: ArrayOfMaps key 4 value 4 max 32768 flags 0x0 inner(LRUHash key 40 value 32 max 262144 flags 0x0)
map endpoints: Hash key 4 value 40 max 16384 flags 0x0
map ep_states: Array key 4 value 72 max 16384 flags 0x0
map event_loss: PerCPUArray key 4 value 8 max 32 flags 0x0
map events: RingBuf key 0 value 0 max 1048576 flags 0x0
map fragments: LRUHash key 40 value 4 max 8192 flags 0x0
map identities: Hash key 4 value 4 max 65536 flags 0x0
map ipcache: LPMTrie key 20 value 8 max 65536 flags 0x1
map local_pods: Hash key 16 value 16 max 16384 flags 0x0
map policy: Hash key 12 value 100 max 65536 flags 0x0
map stats: PerCPUArray key 4 value 8 max 4 flags 0x0
prog from_pod: SchedCLS maps config,counters,ct_tables,endpoints,ep_states,event_loss,events,fragments,identities,ipcache,local_pods,policy,stats
prog to_pod: SchedCLS maps config,counters,ct_tables,endpoints,ep_states,event_loss,events,fragments,identities,ipcache,local_pods,policy,stats
`,
	2: `
map affinity: LRUHash key 20 value 32 max 65536 flags 0x0
map backends: Hash key 8 value 20 max 262144 flags 0x0
map config: Array key 4 value 8 max 1 flags 0x0
map conntrack: LRUHash key 40 value 56 max 262144 flags 0x0
map counters: PerCPUArray key 4 value 16 max 34 flags 0x0
map ct_tables: ArrayOfMaps key 4 value 4 max 32768 flags 0x0 inner(LRUHash key 40 value 56 max 262144 flags 0x0)
map endpoints: Hash key 4 value 40 max 16384 flags 0x0
map ep_states: Array key 4 value 72 max 16384 flags 0x0
map event_loss: PerCPUArray key 4 value 8 max 34 flags 0x0
map events: RingBuf key 0 value 0 max 1048576 flags 0x0
map fragments: LRUHash key 40 value 4 max 8192 flags 0x0
map identities: Hash key 4 value 4 max 65536 flags 0x0
map ipcache: LPMTrie key 20 value 8 max 65536 flags 0x1
map local_pods: Hash key 16 value 16 max 16384 flags 0x0
map policy: Hash key 12 value 100 max 65536 flags 0x0
map remote_cidrs: LPMTrie key 20 value 4 max 16384 flags 0x1
map services: Hash key 20 value 16 max 65536 flags 0x0
map stats: PerCPUArray key 4 value 8 max 4 flags 0x0
prog from_net: SchedCLS maps affinity,config,counters,ct_tables,endpoints,ep_states,event_loss,events,fragments,identities,ipcache,local_pods,policy,remote_cidrs,stats
prog from_pod: SchedCLS maps affinity,backends,config,counters,ct_tables,endpoints,ep_states,event_loss,events,fragments,identities,ipcache,local_pods,policy,remote_cidrs,services,stats
prog to_pod: SchedCLS maps affinity,config,counters,ct_tables,endpoints,ep_states,event_loss,events,fragments,identities,ipcache,local_pods,policy,stats
`,
	3: `
map affinity: LRUHash key 20 value 32 max 65536 flags 0x0
map backends: Hash key 8 value 20 max 262144 flags 0x0
map config: Array key 4 value 8 max 1 flags 0x0
map conntrack: LRUHash key 40 value 56 max 262144 flags 0x0
map counters: PerCPUArray key 4 value 16 max 34 flags 0x0
map ct_tables: ArrayOfMaps key 4 value 4 max 32768 flags 0x0 inner(LRUHash key 40 value 56 max 262144 flags 0x0)
map endpoints: Hash key 4 value 40 max 16384 flags 0x0
map ep_states: Array key 4 value 72 max 16384 flags 0x0
map event_loss: PerCPUArray key 4 value 8 max 34 flags 0x0
map events: RingBuf key 0 value 0 max 1048576 flags 0x0
map fragments: LRUHash key 40 value 4 max 8192 flags 0x0
map identities: Hash key 4 value 4 max 65536 flags 0x0
map ipcache: LPMTrie key 20 value 8 max 65536 flags 0x1
map local_pods: Hash key 16 value 16 max 16384 flags 0x0
map policy: Hash key 12 value 100 max 65536 flags 0x0
map remote_cidrs: LPMTrie key 20 value 28 max 16384 flags 0x1
map services: Hash key 20 value 16 max 65536 flags 0x0
map stats: PerCPUArray key 4 value 8 max 4 flags 0x0
prog from_net: SchedCLS maps affinity,config,counters,ct_tables,endpoints,ep_states,event_loss,events,fragments,identities,ipcache,local_pods,policy,remote_cidrs,stats
prog from_pod: SchedCLS maps affinity,backends,config,counters,ct_tables,endpoints,ep_states,event_loss,events,fragments,identities,ipcache,local_pods,policy,remote_cidrs,services,stats
prog to_pod: SchedCLS maps affinity,config,counters,ct_tables,endpoints,ep_states,event_loss,events,fragments,identities,ipcache,local_pods,policy,stats
`,
	4: `
map affinity: LRUHash key 20 value 32 max 65536 flags 0x0
map backends: Hash key 8 value 20 max 262144 flags 0x0
map config: Array key 4 value 8 max 1 flags 0x0
map conntrack: LRUHash key 40 value 56 max 262144 flags 0x0
map counters: PerCPUArray key 4 value 16 max 34 flags 0x0
map ct_tables: ArrayOfMaps key 4 value 4 max 32768 flags 0x0 inner(LRUHash key 40 value 56 max 262144 flags 0x0)
map endpoints: Hash key 4 value 40 max 16384 flags 0x0
map ep_states: Array key 4 value 72 max 16384 flags 0x0
map event_loss: PerCPUArray key 4 value 8 max 34 flags 0x0
map events: RingBuf key 0 value 0 max 1048576 flags 0x0
map fragments: LRUHash key 40 value 4 max 8192 flags 0x0
map identities: Hash key 4 value 4 max 65536 flags 0x0
map ipcache: LPMTrie key 20 value 8 max 65536 flags 0x1
map local_pods: Hash key 16 value 20 max 16384 flags 0x0
map policy: Hash key 12 value 100 max 65536 flags 0x0
map remote_cidrs: LPMTrie key 20 value 28 max 16384 flags 0x1
map services: Hash key 20 value 16 max 65536 flags 0x0
map stats: PerCPUArray key 4 value 8 max 4 flags 0x0
prog from_net: SchedCLS maps affinity,config,counters,ct_tables,endpoints,ep_states,event_loss,events,fragments,identities,ipcache,local_pods,policy,remote_cidrs,stats
prog from_pod: SchedCLS maps affinity,backends,config,counters,ct_tables,endpoints,ep_states,event_loss,events,fragments,identities,ipcache,local_pods,policy,remote_cidrs,services,stats
prog to_pod: SchedCLS maps affinity,config,counters,ct_tables,endpoints,ep_states,event_loss,events,fragments,identities,ipcache,local_pods,policy,stats
`,
}

func TestLayoutVersion(t *testing.T) {
	spec, err := loadDatapath()
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Join(layoutOf(spec), "\n")
	want, ok := layoutGolden[LayoutVersion]
	if !ok {
		t.Fatalf("no golden layout for LayoutVersion %d; add this row to layoutGolden:\n%d: `\n%s\n`,", LayoutVersion, LayoutVersion, got)
	}
	if strings.TrimSpace(want) != got {
		t.Fatalf("the pinned layout changed but LayoutVersion is still %d: bump LayoutVersion and add its row to layoutGolden.\nwant:\n%s\ngot:\n%s", LayoutVersion, strings.TrimSpace(want), got)
	}
}

// TestGeneratedTypesMatchLayout ties the bpf2go types the Go side reads and
// writes to the object's maps: a value type whose size moved with no map
// moving (or the reverse) would make every lookup fail at run time.
func TestGeneratedTypesMatchLayout(t *testing.T) {
	spec, err := loadDatapath()
	if err != nil {
		t.Fatal(err)
	}
	for name, size := range generatedSizes() {
		m, ok := spec.Maps[name]
		if !ok {
			t.Errorf("map %s: not in the object", name)
			continue
		}
		if m.KeySize != size[0] || m.ValueSize != size[1] {
			t.Errorf("map %s: object has key %d value %d, the Go types %d and %d", name, m.KeySize, m.ValueSize, size[0], size[1])
		}
	}
}

// generatedSizes is each map's key and value size as the bpf2go types the
// Go side uses for it have them.
func generatedSizes() map[string][2]uint32 {
	size := func(v any) uint32 { return uint32(binary.Size(v)) }
	return map[string][2]uint32{
		"ipcache":      {size(datapathIpcacheKey{}), size(datapathIpcacheValue{})},
		"endpoints":    {4, size(datapathEndpoint{})},
		"local_pods":   {16, size(datapathLocalPod{})},
		"policy":       {size(datapathPolicyKey{}), size(datapathPolicyValue{})},
		"conntrack":    {size(datapathCtKey{}), size(datapathCtValue{})},
		"ep_states":    {4, size(datapathEpState{})},
		"fragments":    {size(datapathFragKey{}), size(datapathFragValue{})},
		"config":       {4, size(datapathConfig{})},
		"counters":     {4, size(datapathCounter{})},
		"services":     {size(datapathSvcKey{}), size(datapathSvcValue{})},
		"backends":     {size(datapathBackendKey{}), size(datapathBackend{})},
		"affinity":     {size(datapathAffinityKey{}), size(datapathAffinityValue{})},
		"remote_cidrs": {size(datapathIpcacheKey{}), size(datapathRemoteRange{})},
	}
}
