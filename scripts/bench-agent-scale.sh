#!/usr/bin/env bash
# Issue 11's scale benchmark (e2e BenchmarkAgentScale): the same scenario,
# in one run, against the agent of an older commit and the working tree's,
# each with its own plugin, datapath, etcd and kube-apiserver.
#
#   scripts/bench-agent-scale.sh [OLD_REF]    (default: 45c6ced)
#
# The older commit is built in a temporary worktree, removed at the end,
# unless IDCNI_BENCH_OLD_BIN already names its bin/. The tree's bin/ must be
# built (make bench-agent-scale does it). IDCNI_BENCH_* size the scenario
# (see e2e/agent_scale_bench_test.go); BENCH_OUT, when set, receives a copy
# of the output.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH
old=${1:-45c6ced}
tmp=$(mktemp -d /tmp/idcni-benchscale.XXXXXX)
cleanup() {
	git worktree remove --force "$tmp/old" >/dev/null 2>&1 || true
	git worktree prune
	rm -rf "$tmp"
}
trap cleanup EXIT
if [ -z "${IDCNI_BENCH_OLD_BIN:-}" ]; then
	echo "building $old in $tmp/old" >&2
	git worktree add --detach "$tmp/old" "$old" >/dev/null
	make -C "$tmp/old" build >/dev/null
	export IDCNI_BENCH_OLD_BIN=$tmp/old/bin
fi
{
	echo "# $(date -u +%FT%TZ) $(uname -r), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
	echo "# old: $(git rev-parse --short "$old^{commit}") ($IDCNI_BENCH_OLD_BIN), new: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- cmd agent bpf cni identity policy store internal manifests go.mod go.sum || echo '+changes') ($PWD/bin)"
} >"$tmp/header"
cat "$tmp/header" >&2
start=$(date +%s)
IDCNI_E2E_BIN=$PWD/bin go test -run '^$' -bench '^BenchmarkAgentScale$' -benchtime 1x -timeout 90m ./e2e/ 2>&1 |
	tee "$tmp/out"
rc=${PIPESTATUS[0]}
echo "# took $(($(date +%s) - start)) s" | tee -a "$tmp/out"
if [ -n "${BENCH_OUT:-}" ]; then
	cat "$tmp/header" "$tmp/out" >"$BENCH_OUT"
fi
exit "$rc"
