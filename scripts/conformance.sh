#!/usr/bin/env bash
# The upstream Kubernetes NetworkPolicy conformance specs against idcni
# (make conformance): every [Feature:NetworkPolicy] spec of
# k8s.io/kubernetes test/e2e/network/netpol at the cluster's release, TCP,
# UDP, and SCTP when this kernel has it, on a local cluster.
#
#  1. builds the specs (e2e/conformance/netpol, go test -c) and agnhost
#     from the Go module proxy, cached by the module's checksum, and
#     agnhost's image under the exact reference the suite names;
#  2. brings up a cluster of its own (idcni-cluster up, NODES and
#     KUBE_PROXY_MODE as for make cluster) with that image imported, or,
#     with IDCNI_CLUSTER set to a running cluster's name, imports the image
#     there and uses it;
#  3. runs the specs, printing ginkgo's output, then one line per spec and
#     the summary "conformance: N of M passed, K skipped (why)";
#  4. takes its own cluster down, on failure and on interrupt too (a given
#     one is left running).
#
# Output in $CONFORMANCE_OUT (default _output/conformance): junit.xml,
# netpol.log (ginkgo's whole output), summary.txt. Exits non-zero when a
# spec failed, the suite's setup failed, or nothing ran. Needs root.
set -euo pipefail

command -v go >/dev/null || PATH=/usr/local/go/bin:$PATH
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
mod=$root/e2e/conformance
out=${CONFORMANCE_OUT:-$root/_output/conformance}
mkdir -p "$out"
out=$(cd "$out" && pwd)

if [[ $(id -u) != 0 ]]; then
	echo "conformance: needs root (the cluster's namespaces, mounts, cgroups, kubelets)" >&2
	exit 1
fi

say() { echo "conformance: $*" >&2; }
now() { date +%s; }

version=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" { print $3; exit }' "$mod/go.mod")
[[ $version =~ ^v([0-9]+)\.([0-9]+)\.[0-9]+$ ]] || {
	say "cannot read the k8s.io/kubernetes release from $mod/go.mod"
	exit 1
}
major=${BASH_REMATCH[1]}
minor=${BASH_REMATCH[2]}
# The cluster runs the release of e2e/tools: the specs must be the same.
cluster_version=$(awk '{ for (i = 1; i < NF; i++) if ($i == "k8s.io/kubernetes" && $(i + 1) ~ /^v/) { print $(i + 1); exit } }' "$root/e2e/tools/go.mod")
if [[ $cluster_version != "$version" ]]; then
	say "e2e/conformance has k8s.io/kubernetes $version but the cluster (e2e/tools) runs $cluster_version: make them one release"
	exit 1
fi

# --- 1. build, cached while the module, the test source and Go are the same.
recipe=1
stamp=$( (
	echo "recipe $recipe"
	go env GOVERSION GOOS GOARCH
	cat "$mod/go.mod" "$mod/go.sum"
	find "$mod" -name '*.go' -print0 | sort -z | xargs -0 cat
) | sha256sum | cut -c1-16)
cache=${XDG_CACHE_HOME:-${HOME:?}/.cache}/idcni/conformance/$version-$stamp
mkdir -p "$cache"
build_start=$(now)
(
	# One build at a time per cache directory; a second run waits and reuses.
	flock 9
	if [[ -x $cache/netpol.test && -x $cache/agnhost && -x $cache/report && -x $cache/agnhost-image ]]; then
		exit 0
	fi
	say "building the netpol specs and agnhost $version into $cache (a cold build takes minutes)"
	tmp=$(mktemp -d "$cache/.build.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	# The version the framework reports and checks the server against.
	ldflags="-s -w"
	for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
	done
	cd "$mod"
	export CGO_ENABLED=0
	go test -c -mod=readonly -trimpath -ldflags "$ldflags" -o "$tmp/netpol.test" ./netpol
	go build -mod=readonly -trimpath -ldflags "-s -w" -o "$tmp/agnhost" k8s.io/kubernetes/test/images/agnhost
	go build -mod=readonly -trimpath -o "$tmp/" ./cmd/report ./cmd/agnhost-image
	for f in netpol.test agnhost report agnhost-image; do mv -f "$tmp/$f" "$cache/$f"; done
) 9>"$cache/.lock"
build_s=$(($(now) - build_start))
say "specs and agnhost ready in ${build_s}s"

agnhost_ref=$("$cache/agnhost-image")
image_start=$(now)
tarball=$(go run ./e2e/image -out "$out/images" -only agnhost -agnhost "$cache/agnhost" -agnhost-tag "$agnhost_ref")
say "image $agnhost_ref: $tarball ($(($(now) - image_start))s)"

# --- SCTP: the specs need the kernel's sctp, which the nodes share.
skip='\[Feature:SCTPConnectivity\]'
skip_reason=""
if modprobe sctp 2>/dev/null || [[ -e /proc/net/sctp ]]; then
	skip=""
	say "the kernel has SCTP: the SCTP specs run too"
else
	skip_reason="SCTP: no sctp in this kernel (modprobe sctp failed and there is no /proc/net/sctp), so [Feature:SCTPConnectivity] is skipped"
	say "$skip_reason"
fi

# --- 2. the cluster.
cluster() { go run ./e2e/cluster/cmd/idcni-cluster "$@"; }
own=""
if [[ -n ${IDCNI_CLUSTER:-} ]]; then
	name=$IDCNI_CLUSTER
	say "using the running cluster $name"
	cluster import -name "$name" "$tarball"
	exports=$(cluster up -name "$name")
else
	name=conformance-$$
	own=$name
	down() {
		local rc=$?
		trap - EXIT INT TERM
		say "taking cluster $own down"
		cluster down -name "$own" || rc=1
		exit "$rc"
	}
	trap down EXIT
	trap 'exit 130' INT TERM
	up_start=$(now)
	exports=$(cluster up -name "$name" -nodes "${NODES:-3}" -topology "${TOPOLOGY:-flat}" \
		-kube-proxy "${KUBE_PROXY_MODE:-iptables}" -images "$tarball")
	say "cluster $name up in $(($(now) - up_start))s"
fi
# KUBECONFIG, and PATH with the cluster's kubectl (the framework runs it to
# log a failure's context).
KUBECONFIG=""
eval "$exports"
kubeconfig=$KUBECONFIG
[[ -n $kubeconfig ]] || {
	say "no kubeconfig from idcni-cluster up: $exports"
	exit 1
}

# --- 3. the specs. Serial: the suite's own default, and two cores.
rm -f "$out/junit.xml"
run_start=$(now)
set +e
"$cache/netpol.test" -test.timeout=0 \
	--kubeconfig="$kubeconfig" --provider=local \
	--ginkgo.focus='\[Feature:NetworkPolicy\]' ${skip:+--ginkgo.skip="$skip"} \
	--ginkgo.junit-report="$out/junit.xml" --ginkgo.no-color --ginkgo.timeout=4h 2>&1 | tee "$out/netpol.log"
suite_rc=${PIPESTATUS[0]}
set -e
run_s=$(($(now) - run_start))
if [[ ! -s $out/junit.xml ]]; then
	say "the suite wrote no JUnit report (exit $suite_rc); see $out/netpol.log"
	exit 1
fi
set +e
"$cache/report" -junit "$out/junit.xml" -skip-reason "$skip_reason" | tee "$out/summary.txt"
report_rc=${PIPESTATUS[0]}
set -e
say "specs ran in ${run_s}s; build ${build_s}s; JUnit: $out/junit.xml"
if [[ $report_rc != 0 || $suite_rc != 0 ]]; then
	exit 1
fi
