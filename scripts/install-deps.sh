#!/usr/bin/env bash
# Installs what building and testing idcni needs on a fresh Debian machine, and
# only what is missing, so repeated runs cost nothing. Go itself is expected at
# /usr/local/go (the machine provides it).
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have clang-19 || need+=(clang-19)
have llvm-strip-19 || need+=(llvm-19)
[ -f /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
have ip || need+=(iproute2)
have ping || need+=(iputils-ping)
have iptables || need+=(iptables)
have nc.openbsd || need+=(netcat-openbsd)
have etcd || need+=(etcd-server)
[ -x /bin/busybox ] || need+=(busybox-static)

if [ ${#need[@]} -gt 0 ]; then
	echo "install-deps: installing ${need[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq || true
	apt-get install -y -qq "${need[@]}" >/dev/null
fi

# bpffs and tracefs are not mounted on every machine of this kind; the
# datapath pins maps under /sys/fs/bpf and the trace lines appear in tracefs.
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
