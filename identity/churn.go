package identity

import (
	"slices"
	"strings"
)

// defaultChurnLabels are pod labels that the cluster sets and that say nothing
// about what the pod is: labels that change without the workload changing,
// labels unique per pod, and labels naming where the pod was placed. Keeping
// any of them would give every rollout (or every pod, or every zone) a fresh
// identity: identities would stop being shared, the allocator and the
// policy maps would grow with pod churn (or zones) instead of with the number
// of workloads, and each rollout would briefly run new pods under an
// identity the datapath has no rules for yet.
// No sensible NetworkPolicy selects on them; one that does can no longer
// match by them (its selector names a key no identity has).
//
// Kept on purpose: job-name and batch.kubernetes.io/job-name. They name the
// Job, are the same for all of its pods, and are the natural way to write a
// policy for a Job. The price: each run of a CronJob is a new Job with a new
// name, so each run gets its own identity (freed after the grace period). A
// cluster that prefers fewer identities adds them via Options.ChurnLabels.
var defaultChurnLabels = []string{
	// Deployment -> ReplicaSet template hash: new on every rollout.
	"pod-template-hash",
	// DaemonSet/StatefulSet ControllerRevision hash: new on every rollout.
	"controller-revision-hash",
	// DaemonSet template generation (deprecated, still set): increments on
	// every template change.
	"pod-template-generation",
	// StatefulSet: the pod's own name, and its ordinal. Unique per pod.
	"statefulset.kubernetes.io/pod-name",
	"apps.kubernetes.io/pod-index",
	// Job: the Job object's UID (legacy and current key). New for every Job,
	// including every run of a CronJob and every re-created Job of the same
	// name; it says nothing job-name does not already say.
	"controller-uid",
	"batch.kubernetes.io/controller-uid",
	// Indexed Job: the pod's completion index. Unique per pod.
	"batch.kubernetes.io/job-completion-index",

	// Placement labels: where the scheduler put the pod, not what the pod
	// is. The cluster writes them, not the workload's author: Kubernetes'
	// PodTopologyLabels admission (KEP-4742: alpha in 1.33, beta in 1.35)
	// copies the node's topology.kubernetes.io/zone and /region onto
	// every pod it binds, and older node-to-pod label controllers copy the
	// deprecated failure-domain.beta.kubernetes.io twins. Kept, they would
	// multiply every workload's identity by the number of zones the
	// workload spans, and a pod would carry the zone of whichever node it
	// landed on, so replicas of one Deployment would differ in identity.
	// kubernetes.io/hostname is not here: Kubernetes does not copy it onto
	// pods; a cluster whose own controller does adds it via ChurnLabels.
	"topology.kubernetes.io/zone",
	"topology.kubernetes.io/region",
	"failure-domain.beta.kubernetes.io/zone",
	"failure-domain.beta.kubernetes.io/region",
}

// DefaultChurnLabels returns the pod label keys FromPod strips unless
// Options.ChurnLabels says otherwise.
func DefaultChurnLabels() []string { return slices.Clone(defaultChurnLabels) }

// Options tune how FromPod builds a label set.
type Options struct {
	// ChurnLabels are the pod label keys left out of identities: churn and
	// placement labels alike, since both are stripped the same way. nil
	// means DefaultChurnLabels(); an empty, non-nil slice strips none. To
	// extend the defaults, append to DefaultChurnLabels().
	ChurnLabels []string
}

func (o Options) churn() []string {
	if o.ChurnLabels == nil {
		return defaultChurnLabels
	}
	return o.ChurnLabels
}

// Strips reports whether FromPod leaves a pod label with this key out of the
// label set: a churn label, or one that squats on a key idcni reserves for
// namespace information. The policy compiler can use it to warn about a
// podSelector that can never match.
func (o Options) Strips(key string) bool {
	if key == NamespaceLabel || strings.HasPrefix(key, NamespaceLabelPrefix) {
		return true
	}
	return slices.Contains(o.churn(), key)
}
