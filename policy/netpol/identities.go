package netpol

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"

	"github.com/idcni/idcni/identity"
)

// Identities names the identity of a pod. The agent passes a PodIdentities
// over its persistent allocator, policyctl simulate one over an
// identity.MemoryAllocator; compiler tests pass a MemoryIdentities. The compiler
// calls it for every endpoint pod it is given, again whenever the pod's
// labels or its namespace's labels change, and assumes pods with the same
// labels in the same namespace get the same identity.
type Identities interface {
	IdentityOf(pod *corev1.Pod, ns *corev1.Namespace) (identity.ID, error)
}

// LabelSetAllocator numbers canonical label sets, one user (a pod) holding
// each: identity.Allocator, or identity.MemoryAllocator offline.
type LabelSetAllocator interface {
	Acquire(user string, set identity.LabelSet) (identity.ID, error)
}

// PodIdentities is how the agent names a pod's identity: the canonical label
// set of identity.FromPod (churn labels stripped per Opts, the namespace and
// its labels added), allocated with the pod as the user, so an identity is
// released when its last pod goes. policyctl simulate uses the same type so
// its identities, and so its verdicts, are the agent's.
type PodIdentities struct {
	Alloc LabelSetAllocator
	Opts  identity.Options
}

// IdentityOf implements Identities.
func (p *PodIdentities) IdentityOf(pod *corev1.Pod, ns *corev1.Namespace) (identity.ID, error) {
	var nsLabels map[string]string
	if ns != nil {
		nsLabels = ns.Labels
	}
	set, err := identity.FromPod(pod.Labels, pod.Namespace, nsLabels, p.Opts)
	if err != nil {
		return 0, fmt.Errorf("label set of pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	return p.Alloc.Acquire(PodUser(pod.Namespace, pod.Name), set)
}

// PodUser is the allocator user key of a pod.
func PodUser(ns, name string) string { return "pod/" + ns + "/" + name }

// MemoryIdentities is an in-memory Identities keyed on raw labels (no churn
// label stripping, unlike PodIdentities), for compiler tests: the same pod
// labels, namespace name and namespace labels always give the same identity,
// allocated from
// identity.MinLabel upward in order of first use. Numbers are never reused or
// persisted. It is safe for concurrent use.
type MemoryIdentities struct {
	mu   sync.Mutex
	next identity.ID
	ids  map[string]identity.ID
}

// NewMemoryIdentities returns an empty allocator.
func NewMemoryIdentities() *MemoryIdentities {
	return &MemoryIdentities{next: identity.MinLabel, ids: map[string]identity.ID{}}
}

// IdentityOf implements Identities.
func (m *MemoryIdentities) IdentityOf(pod *corev1.Pod, ns *corev1.Namespace) (identity.ID, error) {
	if pod.Namespace == "" {
		return 0, fmt.Errorf("pod %q has no namespace", pod.Name)
	}
	var nsLabels map[string]string
	if ns != nil {
		nsLabels = ns.Labels
	}
	key := pod.Namespace + "\x00" + canonicalLabels(pod.Labels) + "\x00" + canonicalLabels(nsLabels)
	m.mu.Lock()
	defer m.mu.Unlock()
	if id, ok := m.ids[key]; ok {
		return id, nil
	}
	if m.next > identity.MaxLabel {
		return 0, fmt.Errorf("label identity range exhausted (%d identities)", len(m.ids))
	}
	id := m.next
	m.next++
	m.ids[key] = id
	return id, nil
}

// canonicalLabels encodes a label map so that equal maps, and only equal
// maps, give equal strings: keys sorted, each key and value quoted so no
// separator can be forged by a label's content.
func canonicalLabels(l map[string]string) string {
	keys := make([]string, 0, len(l))
	for k := range l {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b strings.Builder
	for _, k := range keys {
		b.WriteString(strconv.Quote(k))
		b.WriteByte('=')
		b.WriteString(strconv.Quote(l[k]))
		b.WriteByte(',')
	}
	return b.String()
}
