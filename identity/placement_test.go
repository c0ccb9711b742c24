package identity

import (
	"slices"
	"testing"
)

// placementLabels are the node topology labels the cluster copies onto pods
// (Kubernetes' PodTopologyLabels admission, KEP-4742, and the deprecated keys
// older node-to-pod controllers copy). They say where a pod runs, not what it
// is, so they must not split identities (issue 11, defect 8).
var placementLabels = []string{
	"topology.kubernetes.io/zone",
	"topology.kubernetes.io/region",
	"failure-domain.beta.kubernetes.io/zone",
	"failure-domain.beta.kubernetes.io/region",
}

// zonedPod returns the labels of one replica of app=web as the cluster leaves
// them after binding it to a node in zone (of region), with extra added.
func zonedPod(region, zone string, extra map[string]string) map[string]string {
	m := map[string]string{
		"app":                                    "web",
		"tier":                                   "front",
		"pod-template-hash":                      "5d8f7c9b4",
		"topology.kubernetes.io/zone":            zone,
		"topology.kubernetes.io/region":          region,
		"failure-domain.beta.kubernetes.io/zone": zone,
		"failure-domain.beta.kubernetes.io/region": region,
	}
	for k, v := range extra {
		m[k] = v
	}
	return m
}

func TestPlacementLabelsDoNotSplitIdentities(t *testing.T) {
	ns := map[string]string{"kubernetes.io/metadata.name": "shop"}
	for _, k := range placementLabels {
		if !slices.Contains(DefaultChurnLabels(), k) {
			t.Errorf("DefaultChurnLabels() lacks placement label %s", k)
		}
		if !(Options{}).Strips(k) {
			t.Errorf("Options{}.Strips(%q) = false", k)
		}
	}

	// The operator's controller also copies the node name; the operator
	// extends the defaults with it, as --churn-labels does.
	hostname := "kubernetes.io/hostname"
	extended := Options{ChurnLabels: append(DefaultChurnLabels(), hostname)}

	tests := []struct {
		name string
		opts Options
		pods []map[string]string // all must get one identity
	}{
		{"default list", Options{}, []map[string]string{
			zonedPod("eu-west-1", "eu-west-1a", nil),
			zonedPod("eu-west-1", "eu-west-1b", nil),
			zonedPod("us-east-1", "us-east-1c", nil),
			// Before binding: no placement labels yet.
			{"app": "web", "tier": "front", "pod-template-hash": "5d8f7c9b4"},
		}},
		{"operator-extended list", extended, []map[string]string{
			zonedPod("eu-west-1", "eu-west-1a", map[string]string{hostname: "node-a1"}),
			zonedPod("eu-west-1", "eu-west-1b", map[string]string{hostname: "node-b7"}),
			zonedPod("us-east-1", "us-east-1c", map[string]string{hostname: "node-c3"}),
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := open(t, statePath(t), Config{})
			var want LabelSet
			var wantID ID
			for i, pod := range tt.pods {
				set, err := FromPod(pod, "shop", ns, tt.opts)
				if err != nil {
					t.Fatal(err)
				}
				for _, k := range append(slices.Clone(placementLabels), hostname) {
					if v, ok := set.Get(k); ok {
						t.Errorf("pod %d: %s=%s is in its label set %s", i, k, v, set)
					}
				}
				id, err := a.Allocate(set)
				if err != nil {
					t.Fatal(err)
				}
				if i == 0 {
					want, wantID = set, id
					continue
				}
				if !set.Equal(want) {
					t.Errorf("pod %d: label set %s, pod 0 has %s", i, set, want)
				}
				if id != wantID {
					t.Errorf("pod %d: identity %d, pod 0 has %d", i, id, wantID)
				}
			}
			if n := a.Len(); n != 1 {
				t.Errorf("allocator holds %d identities for one workload in three zones, want 1", n)
			}
			// A different workload still gets its own identity.
			other, err := FromPod(zonedPod("eu-west-1", "eu-west-1a", map[string]string{"app": "api"}), "shop", ns, tt.opts)
			if err != nil {
				t.Fatal(err)
			}
			if id, err := a.Allocate(other); err != nil || id == wantID {
				t.Errorf("app=api got identity %d (err %v), app=web has %d", id, err, wantID)
			}
		})
	}
}
