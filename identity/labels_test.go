package identity

import (
	"maps"
	"strings"
	"testing"
)

func TestFromPodStripsChurnLabels(t *testing.T) {
	ns := map[string]string{"kubernetes.io/metadata.name": "shop", "team": "payments"}
	nsPart := "io.idcni.namespace.labels.kubernetes.io/metadata.name=shop,io.idcni.namespace.labels.team=payments,io.kubernetes.pod.namespace=shop"
	tests := []struct {
		name string
		pod  map[string]string
		opts Options
		want string // canonical encoding
	}{
		{"no labels", nil, Options{}, nsPart},
		{"deployment", map[string]string{"app": "web", "pod-template-hash": "5d8f7c9b4"}, Options{}, "app=web," + nsPart},
		{"daemonset", map[string]string{"app": "agent", "controller-revision-hash": "7f9c", "pod-template-generation": "3"}, Options{}, "app=agent," + nsPart},
		{"statefulset", map[string]string{
			"app":                                "db",
			"controller-revision-hash":           "db-6b7f",
			"statefulset.kubernetes.io/pod-name": "db-2",
			"apps.kubernetes.io/pod-index":       "2",
		}, Options{}, "app=db," + nsPart},
		{"indexed job keeps the job name", map[string]string{
			"job-name":                                 "migrate",
			"batch.kubernetes.io/job-name":             "migrate",
			"controller-uid":                           "0b7e2f1c-1111-2222-3333-444455556666",
			"batch.kubernetes.io/controller-uid":       "0b7e2f1c-1111-2222-3333-444455556666",
			"batch.kubernetes.io/job-completion-index": "4",
		}, Options{}, "batch.kubernetes.io/job-name=migrate," + nsPart + ",job-name=migrate"},
		{"custom list replaces the defaults", map[string]string{"app": "web", "pod-template-hash": "x", "build": "42"},
			Options{ChurnLabels: []string{"build"}}, "app=web," + nsPart + ",pod-template-hash=x"},
		{"empty list strips no churn label", map[string]string{"pod-template-hash": "x"},
			Options{ChurnLabels: []string{}}, nsPart + ",pod-template-hash=x"},
		{"extended defaults", map[string]string{"app": "web", "pod-template-hash": "x", "job-name": "cron-2901"},
			Options{ChurnLabels: append(DefaultChurnLabels(), "job-name")}, "app=web," + nsPart},
		{"pod cannot claim namespace labels", map[string]string{
			"app":                               "web",
			"io.kubernetes.pod.namespace":       "kube-system",
			"io.idcni.namespace.labels.team":    "platform",
			"io.idcni.namespace.labels.trusted": "yes",
		}, Options{ChurnLabels: []string{}}, "app=web," + nsPart},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			set, err := FromPod(tt.pod, "shop", ns, tt.opts)
			if err != nil {
				t.Fatal(err)
			}
			if got := set.String(); got != tt.want {
				t.Errorf("got  %s\nwant %s", got, tt.want)
			}
		})
	}
}

func TestFromPodNeedsNamespace(t *testing.T) {
	if _, err := FromPod(map[string]string{"app": "web"}, "", nil, Options{}); err == nil {
		t.Fatal("want an error for a pod without namespace")
	}
}

func TestFromPodRecoversPodAndNamespaceLabels(t *testing.T) {
	pod := map[string]string{"app": "web", "tier": "front", "pod-template-hash": "abc"}
	ns := map[string]string{"team": "payments", "io.idcni.namespace.labels.odd": "still a namespace label"}
	set, err := FromPod(pod, "shop", ns, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := set.PodLabels(), map[string]string{"app": "web", "tier": "front"}; !maps.Equal(got, want) {
		t.Errorf("PodLabels = %v, want %v", got, want)
	}
	if got := set.NamespaceLabels(); !maps.Equal(got, ns) {
		t.Errorf("NamespaceLabels = %v, want %v", got, ns)
	}
	if got := set.Namespace(); got != "shop" {
		t.Errorf("Namespace = %q", got)
	}
	if v, ok := set.Get("tier"); !ok || v != "front" {
		t.Errorf("Get(tier) = %q, %v", v, ok)
	}
	if _, ok := set.Get("pod-template-hash"); ok {
		t.Error("churn label is in the set")
	}
	// Accessors hand out copies.
	set.Labels()[0].Value = "changed"
	set.PodLabels()["app"] = "changed"
	if v, _ := set.Get(set.Labels()[0].Key); v == "changed" {
		t.Error("Labels() shares memory with the set")
	}
}

func TestSameLabelsSameSet(t *testing.T) {
	// Map iteration order differs between runs; the encoding must not.
	pod := map[string]string{}
	for _, k := range strings.Fields("a b c d e f g h i j k l m n o p") {
		pod[k] = k + "v"
	}
	first, _ := FromPod(pod, "ns", map[string]string{"x": "1", "y": "2"}, Options{})
	for range 50 {
		again, _ := FromPod(maps.Clone(pod), "ns", map[string]string{"y": "2", "x": "1"}, Options{})
		if !again.Equal(first) || again.String() != first.String() {
			t.Fatalf("same labels, different sets: %s vs %s", again, first)
		}
	}
	pod["a"] = "changed"
	changed, _ := FromPod(pod, "ns", map[string]string{"x": "1", "y": "2"}, Options{})
	if changed.Equal(first) {
		t.Fatal("changed labels, same set")
	}
	other, _ := FromPod(pod, "other", map[string]string{"x": "1", "y": "2"}, Options{})
	if other.Equal(changed) {
		t.Fatal("other namespace, same set")
	}
}

func TestCanonicalEncoding(t *testing.T) {
	tests := []struct {
		name   string
		labels map[string]string
		want   string
	}{
		{"empty", nil, ""},
		{"one", map[string]string{"app": "web"}, "app=web"},
		{"sorted by key", map[string]string{"b": "1", "a": "2", "a.b/c": "3"}, "a=2,a.b/c=3,b=1"},
		{"empty value", map[string]string{"flag": ""}, "flag="},
		{"empty key", map[string]string{"": "v"}, "=v"},
		{"equals in value", map[string]string{"a": "b=c"}, `a=b\=c`},
		{"equals in key", map[string]string{"a=b": "c"}, `a\=b=c`},
		{"comma in value", map[string]string{"a": "1,b=2"}, `a=1\,b\=2`},
		{"backslash", map[string]string{`a\`: `\`}, `a\\=\\`},
		{"utf-8", map[string]string{"région": "zürich"}, "région=zürich"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			set := NewLabelSet(tt.labels)
			if got := set.String(); got != tt.want {
				t.Fatalf("String() = %q, want %q", got, tt.want)
			}
			back, err := ParseLabelSet(set.String())
			if err != nil {
				t.Fatal(err)
			}
			if !back.Equal(set) || !maps.Equal(back.PodLabels(), set.PodLabels()) || back.Len() != len(tt.labels) {
				t.Fatalf("round trip: %v, want %v", back.Labels(), set.Labels())
			}
		})
	}
}

// Sets that a naive "k=v,k=v" join would encode alike must stay apart.
func TestEncodingIsUnambiguous(t *testing.T) {
	sets := []map[string]string{
		{"a": "b,c=d"},
		{"a": "b", "c": "d"},
		{"a=b": "c"},
		{"a": "b=c"},
		{"a": `b\`, "c": "d"},
		{"a": `b\,c=d`},
		{"": ""},
		{},
	}
	seen := map[string]int{}
	for i, s := range sets {
		enc := NewLabelSet(s).String()
		if j, dup := seen[enc]; dup {
			t.Errorf("sets %v and %v both encode as %q", sets[j], s, enc)
		}
		seen[enc] = i
	}
}

func TestParseLabelSetRefusesNonCanonical(t *testing.T) {
	for _, s := range []string{
		"a",        // no '='
		"a=1,b",    // last label has no '='
		"a=1,,b=2", // empty label
		"a=1=2",    // unescaped '=' in value
		"b=1,a=2",  // unsorted
		"a=1,a=2",  // repeated key
		`a=\x`,     // needless escape
		`a=1\`,     // dangling escape
		",a=1",     // leading separator
		"a=1,",     // trailing separator
	} {
		if set, err := ParseLabelSet(s); err == nil {
			t.Errorf("ParseLabelSet(%q) = %v, want error", s, set.Labels())
		}
	}
}

// Anything ParseLabelSet accepts must encode back to the same string, and any
// set must parse back from its encoding: a stored set has exactly one
// spelling.
func FuzzParseLabelSet(f *testing.F) {
	for _, s := range []string{"", "a=b", `a\==\,`, "a=1,b=2", "b=1,a=2", `a=\\`, "=", "=,=", "a=1,a=1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		set, err := ParseLabelSet(s)
		if err != nil {
			return
		}
		if got := encode(set.labels); got != s {
			t.Fatalf("ParseLabelSet(%q) re-encodes as %q", s, got)
		}
		m := map[string]string{}
		for _, l := range set.Labels() {
			m[l.Key] = l.Value
		}
		if again := NewLabelSet(m); again.String() != s {
			t.Fatalf("NewLabelSet of the parsed labels of %q is %q", s, again)
		}
	})
}
