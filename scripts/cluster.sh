#!/usr/bin/env bash
# A real multi-node Kubernetes with idcni installed from manifests/idcni.yaml,
# on this machine, for trying idcni with kubectl (make cluster / make
# cluster-down). The work is done by ./e2e/cluster/cmd/idcni-cluster; this
# wrapper only finds Go and the checkout.
#
#   scripts/cluster.sh up      start it, or do nothing if it runs; prints the
#                              exports for kubectl on stdout:
#                                eval "$(scripts/cluster.sh up)"
#   scripts/cluster.sh down    remove it, and any cluster a killed test left,
#                              then check that nothing of it is on the host
#   scripts/cluster.sh list    the clusters on this host
#   scripts/cluster.sh import TAR...  image tarballs into every node
#   scripts/cluster.sh bench   pod creation to Ready, idcni against the bridge
#                              plugin, on the running cluster (-pods N, -parallel N)
#
# IDCNI_CLUSTER names the cluster (default dev), so several can run side by
# side. NODES is how many kubelet nodes `up` starts (default 3; the first
# runs the control plane too), TOPOLOGY=routed puts the last one behind a
# router on a subnet of its own (default flat: one segment).
# KUBE_PROXY_MODE is every node's kube-proxy mode: iptables (default),
# nftables, or none; CoreDNS serves cluster.local behind kube-dns
# (10.96.0.10) either way. Everything of a
# cluster lives in its nodes' own mount and network namespaces, a switch
# namespace, its cgroup and $TMPDIR/idcni-cluster/<name>; on the host there
# are only one veth (idcc-*) to reach the apiserver and the kernel tunables
# the kubelet rewrites, which `down` puts back. Needs root.
set -euo pipefail

# Go lives in /usr/local/go on the project's machines, which not every PATH
# has (sudo's, say).
command -v go >/dev/null || PATH=/usr/local/go/bin:$PATH
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $(id -u) != 0 ]]; then
	echo "cluster.sh: needs root (namespaces, mounts, cgroups, a kubelet)" >&2
	exit 1
fi

cmd=${1:-}
[[ $# -gt 0 ]] && shift
name=${IDCNI_CLUSTER:-dev}
run() { go run ./e2e/cluster/cmd/idcni-cluster "$@"; }

case $cmd in
up)
	run up -name "$name" -nodes "${NODES:-3}" -topology "${TOPOLOGY:-flat}" -kube-proxy "${KUBE_PROXY_MODE:-iptables}" "$@"
	echo "cluster.sh: cluster $name is up; for kubectl: eval \"\$(scripts/cluster.sh up)\" (a no-op now that it runs)" >&2
	;;
down) run down -name "$name" "$@" ;;
list) run list "$@" ;;
bench) run bench -name "$name" "$@" ;;
import) run import -name "$name" "$@" ;;
*)
	echo "usage: scripts/cluster.sh up|down|list|bench|import [flags]   (IDCNI_CLUSTER=name, default dev; NODES=3; TOPOLOGY=flat|routed; KUBE_PROXY_MODE=iptables|nftables|none)" >&2
	exit 2
	;;
esac
