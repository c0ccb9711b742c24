package main

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/idcni/idcni/identity"
)

// shortLabels is a label set as one line of text shows it: the namespace
// first, as ns=NAME, then the pod's own labels sorted by key. The
// namespace's labels (io.idcni.namespace.labels.*) are left out: every
// namespace has at least one, and they would make each line several times
// longer while rarely telling two identities of one node apart. -o json and
// 'policyctl identity get' have the whole set. A set that is not a pod's
// (no namespace key) is shown whole.
func shortLabels(labels map[string]string) string {
	ns, isPod := labels[identity.NamespaceLabel]
	var parts []string
	if isPod {
		parts = append(parts, "ns="+ns)
	}
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		if isPod && (k == identity.NamespaceLabel || strings.HasPrefix(k, identity.NamespaceLabelPrefix)) {
			continue
		}
		parts = append(parts, k+"="+labels[k])
	}
	return strings.Join(parts, ",")
}

// describeID spells an identity for text output: the number with what it
// stands for on this node in parentheses when known (a label identity's
// labels, a CIDR identity's prefix), a reserved identity by its name, and
// a manual identity by its number, which people chose and which is the
// same wherever they chose it.
func describeID(id identity.ID, labels map[string]string, cidr string) string {
	switch {
	case labels != nil:
		return fmt.Sprintf("%s (%s)", id, shortLabels(labels))
	case cidr != "":
		return fmt.Sprintf("%s (cidr=%s)", id, cidr)
	}
	return id.String()
}

// fullLabels is a whole label set, one "key=value" a line, sorted by key.
func fullLabels(labels map[string]string) []string {
	out := make([]string, 0, len(labels))
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		out = append(out, k+"="+labels[k])
	}
	return out
}
