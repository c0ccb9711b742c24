#!/usr/bin/env bash
# Runs the datapath benchmark of an older commit and of the working tree
# side by side, interleaved on the same machine in one run, and compares
# them with benchstat: a datapath change states its cost against the code
# it replaces, not against numbers from another day.
#
#   scripts/bench-compare.sh [OLD_REF] [ROUNDS] [BENCH_REGEXP]
#   (defaults: 45c6ced, 5, Datapath/rules=(10|10000)/)
#
# BENCH_OUT names the report (default docs/bench-compare.txt; the raw runs
# go next to it, .raw); BENCH_CPU pins both binaries to one CPU, which on
# a shared VM takes out much of the scheduler's noise.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH
old=${1:-45c6ced}
rounds=${2:-5}
bench=${3:-'Datapath/rules=(10|10000)/'}
tmp=$(mktemp -d /tmp/idcni-benchcmp.XXXXXX)
cleanup() {
	git worktree remove --force "$tmp/old" >/dev/null 2>&1 || true
	rm -rf "$tmp"
}
trap cleanup EXIT
git worktree add --detach "$tmp/old" "$old" >/dev/null
(cd "$tmp/old" && go test -c -o "$tmp/old.test" ./bpf/)
go test -c -o "$tmp/new.test" ./bpf/
out=${BENCH_OUT:-docs/bench-compare.txt}
{
	echo "# $(date -u +%FT%TZ) $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
	echo "# old: $(git rev-parse --short "$old"), new: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- bpf || echo '+changes')"
} >"$tmp/header"
for i in $(seq "$rounds"); do
	for v in old new; do
		echo "round $i/$rounds: $v" >&2
		(cd bpf && ${BENCH_CPU:+taskset -c "$BENCH_CPU"} "$tmp/$v.test" -test.run '^$' -test.bench "$bench" -test.benchtime 2000000x) |
			grep '^Benchmark' >>"$tmp/$v.txt"
	done
done
# benchstat compares one metric; the kernel's own time per packet is ns/pkt.
for v in old new; do
	awk '{for (i = 3; i <= NF; i++) if ($(i+1) == "ns/pkt") print $1, $2, $i, "ns/op"}' "$tmp/$v.txt" >"$tmp/$v.pkt"
done
{
	cat "$tmp/header"
	go run golang.org/x/perf/cmd/benchstat@v0.0.0-20260908200009-22c9c6c9d4da old="$tmp/old.pkt" new="$tmp/new.pkt" | sed 's|sec/op|ns/pkt (as sec/op)|'
	# The least of the rounds: what a packet costs when nothing else
	# interferes, the figure noise cannot inflate.
	echo
	echo "minimum over $rounds rounds, ns/pkt:"
	awk 'FNR == 1 { v++ }
		{ k = $1; if (!((k, v) in m) || $3 < m[k, v]) m[k, v] = $3; names[k] = 1 }
		END { for (k in names) if ((k, 1) in m && (k, 2) in m)
			printf "%-52s old %7.1f  new %7.1f  %+6.1f%%\n", k, m[k, 1], m[k, 2], (m[k, 2] - m[k, 1]) / m[k, 1] * 100 }' \
		"$tmp/old.pkt" "$tmp/new.pkt" | sort
} | tee "$out"
for v in old new; do
	sed "s/^/$v /" "$tmp/$v.txt"
done >"$out.raw"
