#!/usr/bin/env bash
# Rebuilds the bpf2go objects in a scratch copy and compares them with the
# committed ones, so a C change without `make generate` fails the build.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r bpf "$tmp/bpf"
mkdir -p "$tmp/e2e"
cp -r e2e/netbench "$tmp/e2e/netbench"
cp go.mod go.sum "$tmp/"
(cd "$tmp" && BPF2GO_CC=${CLANG:-clang-19} BPF2GO_STRIP=${STRIP:-llvm-strip-19} go generate ./bpf/... ./e2e/netbench/ >/dev/null)
if ! diff -r -q bpf "$tmp/bpf" >/dev/null || ! diff -r -q e2e/netbench "$tmp/e2e/netbench" >/dev/null; then
	diff -r -q bpf "$tmp/bpf" || true
	diff -r -q e2e/netbench "$tmp/e2e/netbench" || true
	echo "check-generate: committed bpf2go output is stale; run 'make generate' and commit it" >&2
	exit 1
fi
echo "check-generate: bpf objects match bpf/kernel sources"
