package identity

import (
	"errors"
	"slices"
	"sort"
	"strings"
)

// Keys that idcni itself puts into a label set. A pod label that claims one of
// them is dropped by FromPod: otherwise a pod could label itself into another
// namespace, or give itself namespace labels its namespace does not have, and
// be matched by a namespaceSelector meant for someone else.
const (
	// NamespaceLabel carries the pod's namespace name, the key Kubernetes
	// tooling and Cilium users already know.
	NamespaceLabel = "io.kubernetes.pod.namespace"
	// NamespaceLabelPrefix is put in front of every label of the pod's
	// namespace, so namespace labels and pod labels never collide.
	NamespaceLabelPrefix = "io.idcni.namespace.labels."
)

// Label is one key=value pair of a label set.
type Label struct {
	Key, Value string
}

// LabelSet is a sorted set of labels with unique keys: the canonical input an
// identity is derived from. Two sets with the same labels have the same
// String(), so the allocator can key on it. The zero value is the empty set.
//
// A LabelSet is immutable; accessors hand out copies.
type LabelSet struct {
	s      string  // canonical encoding, see encoding.go
	labels []Label // sorted by Key, keys unique
}

// NewLabelSet returns the set holding exactly labels, with no filtering. Use
// FromPod for pods.
func NewLabelSet(labels map[string]string) LabelSet {
	l := make([]Label, 0, len(labels))
	for k, v := range labels {
		l = append(l, Label{k, v})
	}
	return fromUnsorted(l)
}

// FromPod returns the canonical label set of a pod: its labels minus the ones
// opts strips (churn labels, and labels squatting on idcni's own keys), plus
// NamespaceLabel=namespace, plus each namespace label under
// NamespaceLabelPrefix.
//
// The namespace's labels are part of the set because a namespaceSelector must
// be decidable from the identity alone: the datapath only knows numbers.
func FromPod(podLabels map[string]string, namespace string, namespaceLabels map[string]string, opts Options) (LabelSet, error) {
	if namespace == "" {
		// Every pod has a namespace; an empty one means the caller lost it,
		// and guessing would put the pod under another namespace's policy.
		return LabelSet{}, errors.New("identity: label set of a pod without a namespace")
	}
	l := make([]Label, 0, len(podLabels)+1+len(namespaceLabels))
	for k, v := range podLabels {
		if opts.Strips(k) {
			continue
		}
		l = append(l, Label{k, v})
	}
	l = append(l, Label{NamespaceLabel, namespace})
	for k, v := range namespaceLabels {
		l = append(l, Label{NamespaceLabelPrefix + k, v})
	}
	// No duplicate keys are possible: pod keys under our keys were dropped,
	// and NamespaceLabel does not start with NamespaceLabelPrefix.
	return fromUnsorted(l), nil
}

func fromUnsorted(l []Label) LabelSet {
	if len(l) == 0 {
		return LabelSet{}
	}
	slices.SortFunc(l, func(a, b Label) int { return strings.Compare(a.Key, b.Key) })
	return LabelSet{s: encode(l), labels: l}
}

// String returns the canonical encoding: "k=v" pairs sorted by key, joined by
// ',', with '\', '=' and ',' inside keys and values escaped by '\'. It is
// unambiguous, and ParseLabelSet turns it back into the set.
func (s LabelSet) String() string { return s.s }

// Len returns the number of labels.
func (s LabelSet) Len() int { return len(s.labels) }

// Labels returns a copy of the labels, sorted by key.
func (s LabelSet) Labels() []Label { return slices.Clone(s.labels) }

// Equal reports whether both sets hold the same labels.
func (s LabelSet) Equal(o LabelSet) bool { return s.s == o.s }

// Get returns the value of key.
func (s LabelSet) Get(key string) (string, bool) {
	i := sort.Search(len(s.labels), func(i int) bool { return s.labels[i].Key >= key })
	if i < len(s.labels) && s.labels[i].Key == key {
		return s.labels[i].Value, true
	}
	return "", false
}

// Namespace returns the pod namespace the set was made for, or "" for a set
// not made by FromPod.
func (s LabelSet) Namespace() string {
	ns, _ := s.Get(NamespaceLabel)
	return ns
}

// PodLabels returns the pod's own labels in the set (what a podSelector is
// matched against): everything but NamespaceLabel and the namespace labels.
// Churn labels are not among them: they were never part of the set.
func (s LabelSet) PodLabels() map[string]string {
	m := make(map[string]string, len(s.labels))
	for _, l := range s.labels {
		if l.Key == NamespaceLabel || strings.HasPrefix(l.Key, NamespaceLabelPrefix) {
			continue
		}
		m[l.Key] = l.Value
	}
	return m
}

// NamespaceLabels returns the labels of the pod's namespace (what a
// namespaceSelector is matched against), with NamespaceLabelPrefix removed.
func (s LabelSet) NamespaceLabels() map[string]string {
	m := make(map[string]string)
	for _, l := range s.labels {
		if k, ok := strings.CutPrefix(l.Key, NamespaceLabelPrefix); ok {
			m[k] = l.Value
		}
	}
	return m
}
