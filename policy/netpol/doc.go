// Package netpol compiles Kubernetes NetworkPolicy objects
// (networking.k8s.io/v1), together with the Pods and Namespaces they select,
// into per-identity rules (policy.Set) and the CIDR identities the ipcache
// needs for ipBlock peers.
//
// # Semantics
//
// The compiler follows the NetworkPolicy API documentation:
//
//   - A policy selects pods of its own namespace with spec.podSelector (empty
//     selects all). A selected pod is isolated for ingress, and for egress when
//     policyTypes says so. An empty policyTypes defaults to Ingress, plus
//     Egress when the policy has egress rules.
//   - Policies are a union: traffic is allowed in a direction when any rule of
//     any policy selecting the pod for that direction allows it.
//   - A peer with only podSelector selects pods of the policy's namespace; with
//     namespaceSelector the pods of the selected namespaces; with both, the
//     pods matching podSelector in the selected namespaces. Peers of one rule
//     are ORed. Selectors are evaluated with metav1.LabelSelectorAsSelector, so
//     NotIn matches a missing key and matchLabels {k: ""} needs k present.
//   - A Namespace's labels always include kubernetes.io/metadata.name=<name>,
//     as the API server guarantees; a Namespace the compiler has not seen yet
//     has exactly that label, so pods that arrive before their Namespace
//     object still compile.
//   - ipBlock matches addresses. Addresses that are not pods get CIDR
//     identities (identity.MinCIDR and up), one per distinct prefix named by
//     any ipBlock cidr or except, so the ipcache's longest-prefix match
//     resolves an address inside an except to the except's identity, which
//     the block's rules do not allow. Pod addresses resolve to the pod's own
//     identity in the ipcache, so the block also yields rules for every pod
//     identity with a pod IP inside the cidr and outside every except, and
//     for identity.Host or identity.RemoteNode when a node address given to
//     SetNodeAddrs is.
//     CIDRs lists the prefixes the ipcache must hold for this to work.
//   - Nodes are addresses outside the cluster. The local node's addresses
//     resolve to identity.Host, every other node's to identity.RemoteNode
//     (SetNodeAddrs). An ipBlock can match them; pod and namespace
//     selectors never do, so a pod isolated for ingress admits another node
//     only through an ipBlock holding its address. (The datapath lets the
//     local node's own stack reach its pods whatever the policy, kubelet
//     probes being its traffic; that is the datapath's rule, not one the
//     compiler writes.)
//   - Ports: a number, a number..endPort range, a protocol alone (every port
//     of it), or a name. Protocol defaults to TCP. A rule without ports allows
//     every protocol, ICMP included. A named port is looked up in the
//     containerPorts (name and protocol both match) of the destination pod:
//     the selected pod for ingress rules, the peer pod for egress rules. A
//     name that no destination pod declares allows nothing.
//   - Pods with spec.hostNetwork are not endpoints: their traffic is the
//     node's. Pods in phase Succeeded or Failed are not endpoints either:
//     their addresses may already belong to new pods.
//
// # Identities, not pods
//
// Rules are per identity, and an identity stands for every pod with the same
// labels in the same namespace. Where the API decides per pod, the compiler
// takes the union over the pods of an identity:
//
//   - Named ports resolve on all pods of the destination identity. When two
//     of them map a port name to different numbers (typically a rolling
//     update that moves a port), the rules allow both numbers for the whole
//     identity. The alternative, intersecting, would cut the new pods off
//     during the rollout; the union only opens a port that the old pods do
//     not listen on.
//   - ipBlock over pod IPs: an identity is a peer when any of its pods has an
//     address inside the block, so its other pods (same labels, same
//     namespace, addresses elsewhere) are allowed too. Likewise every
//     address of the local node is identity.Host and every address of the
//     other nodes identity.RemoteNode, so a block holding one remote node's
//     address allows every remote node, excepts included (and one holding a
//     local address allows every local one).
//   - An identity allocator that drops labels (churn labels such as
//     pod-template-hash) merges pods a selector on such a label would tell
//     apart; the identity then gets the union of what its pods would get.
//
// # Incremental compilation
//
// A Compiler holds the current objects. Each Upsert/Delete recomputes only
// the policies the change can affect and returns a Delta naming the subject
// identities whose rules or isolation changed, so the agent rewrites only
// their map entries. A policy is recomputed when one of its facts changes:
// a group of pods (same namespace, labels and identity) that its selectors
// match appears or vanishes, an identity it names changes its declared
// ports, or an identity enters or leaves one of its ipBlocks. A pod that
// joins or leaves an existing group with the same ports and blocks
// recomputes nothing. Compile does the same from scratch; tests hold the
// two to identical results.
package netpol
