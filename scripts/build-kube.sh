#!/usr/bin/env bash
# Builds kube-apiserver, kubelet and kubectl for the end-to-end tests from the
# Go module proxy alone (module e2e/tools pins the Kubernetes release), and
# prints the directory that holds them on stdout; progress goes to stderr.
#
# A cold build takes minutes, so the binaries are cached outside the work tree
# and reused while a stamp (release, the tools module's go.mod and go.sum, the
# Go toolchain and this recipe) still matches. Default directory:
# ${XDG_CACHE_HOME:-$HOME/.cache}/idcni/kube/<release>; IDCNI_KUBE_BIN
# overrides it.
#
# Safe to run twice at once: builds are serialised by a lock next to the
# directory (the second run waits, then reuses), and binaries are built in a
# temporary directory and renamed into place, so a killed build never leaves
# a half-written binary where a test would run it.
set -euo pipefail

# Go lives in /usr/local/go on the project's machines, which not every
# caller's PATH has (a test run outside make).
command -v go >/dev/null || PATH=/usr/local/go/bin:$PATH
command -v go >/dev/null || {
	echo "build-kube: no go in PATH nor in /usr/local/go/bin" >&2
	exit 1
}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools=$root/e2e/tools
cmds=(kube-apiserver kubelet kubectl)
# Bump when the build command changes in a way the stamp cannot see.
recipe=1

# The release comes from the tools module, so changing it there is enough.
version=$(awk '{ for (i = 1; i < NF; i++) if ($i == "k8s.io/kubernetes" && $(i + 1) ~ /^v/) { print $(i + 1); exit } }' "$tools/go.mod")
[[ $version =~ ^v([0-9]+)\.([0-9]+)\.[0-9]+$ ]] || {
	echo "build-kube: cannot read the k8s.io/kubernetes release from $tools/go.mod" >&2
	exit 1
}
major=${BASH_REMATCH[1]}
minor=${BASH_REMATCH[2]}

dest=${IDCNI_KUBE_BIN:-${XDG_CACHE_HOME:-${HOME:?neither HOME nor IDCNI_KUBE_BIN is set}/.cache}/idcni/kube/$version}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)

goenv=$(go env GOVERSION GOOS GOARCH)
stamp_want=$(
	echo "recipe $recipe"
	echo "release $version"
	echo "$goenv"
	sha256sum "$tools/go.mod" "$tools/go.sum" | awk '{ print $1 }'
)

fresh() {
	[[ -f $dest/.stamp && "$(cat "$dest/.stamp")" == "$stamp_want" ]] || return 1
	local c
	for c in "${cmds[@]}"; do [[ -x $dest/$c ]] || return 1; done
}

if fresh; then
	echo "$dest"
	exit 0
fi

# Serialise builders of the same directory: a second build in parallel would
# only double a multi-minute job on a small machine.
exec 9>"$dest/.lock"
if ! flock -n 9; then
	echo "build-kube: another build of $dest is running, waiting for it" >&2
	flock 9
fi
if fresh; then
	echo "$dest"
	exit 0
fi

# Under the lock any build directory is a leftover of a killed build.
rm -rf "$dest"/.build.*
tmp=$(mktemp -d "$dest/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# Version strings make the components report the real release instead of
# v0.0.0-master (the apiserver derives its emulation version from it, and the
# node reports it). -s -w only drop symbol tables: a third of the size.
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
	ldflags+=" -X $pkg.gitTreeState=clean"
done

echo "build-kube: building ${cmds[*]} $version into $dest (a cold build takes minutes)" >&2
start=$(date +%s)
pkgs=()
for c in "${cmds[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
# CGO_ENABLED=0: static binaries, and no dependence on a C compiler being
# installed. -mod=readonly: a fresh machine downloads exactly what go.sum pins.
(cd "$tools" && CGO_ENABLED=0 go build -mod=readonly -trimpath -ldflags "$ldflags" -o "$tmp/" "${pkgs[@]}")
echo "build-kube: built in $(($(date +%s) - start)) s" >&2

# Binaries first, stamp last: a reader that trusts the stamp always finds
# the binaries it describes. rename(2) within one directory tree is atomic.
rm -f "$dest/.stamp"
for c in "${cmds[@]}"; do mv -f "$tmp/$c" "$dest/$c"; done
printf '%s\n' "$stamp_want" >"$tmp/stamp"
mv -f "$tmp/stamp" "$dest/.stamp"
echo "$dest"
