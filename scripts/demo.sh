#!/usr/bin/env bash
# The seed walkthrough on this machine: two network namespaces stand in for
# the frontend and backend pods, plugged through the real idcni plugin by a
# real CNI runtime (cnitool), then named and steered with endpointctl and
# policyctl word for word. Each step says what it expects and checks it.
#
# Everything lives under a private BPF root, state file and CNI data
# directory, and is removed on exit, failed or not. It needs the seed's
# subnet 10.13.0.0/24 and the netns names frontend/backend to be free.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/bin
export PATH=$BIN:$PATH

run=$(head -c4 /dev/urandom | od -An -tx1 | tr -d ' \n')
tmp=$(mktemp -d /tmp/idcni-demo.XXXXXX)
export IDCNI_BPF_ROOT=/sys/fs/bpf/idcni-demo-$run
export IDCNI_STATE=$tmp/state.db
export IDCNI_AGENT_SOCKET=$tmp/no-agent.sock # the seed runs without an agent
export CNI_PATH=$BIN NETCONFPATH=$tmp/net.d
failed=0
bold() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
say() { printf '    %s\n' "$*"; }
show() { printf '    $ %s\n' "$*"; "$@" 2>&1 | sed 's/^/      /'; }
expect() { # expect WHAT WANT GOT
	if [ "$2" = "$3" ]; then say "OK: $1 ($3)"; else say "UNEXPECTED: $1: got $3, want $2"; failed=1; fi
}

for n in frontend backend; do
	if ip netns list | grep -qw "^$n"; then
		echo "demo: a network namespace named $n already exists; remove it (ip netns del $n) and run again" >&2
		exit 1
	fi
done
if ip route show | grep -q '^10\.13\.0\.'; then
	echo "demo: this machine already routes 10.13.0.0/24 (the seed's pod subnet); is idcni running here already?" >&2
	exit 1
fi

monitor_pid=
trace_pid=
cleanup() {
	set +e
	[ -n "$monitor_pid" ] && kill "$monitor_pid" 2>/dev/null
	[ -n "$trace_pid" ] && kill "$trace_pid" 2>/dev/null
	policyctl debug off >/dev/null 2>&1
	for n in frontend backend; do
		[ -e /run/netns/$n ] && cnitool del idcni /run/netns/$n >/dev/null 2>&1
		ip netns del $n 2>/dev/null
	done
	rm -rf "$IDCNI_BPF_ROOT" "$tmp"
}
trap cleanup EXIT

mkdir -p "$NETCONFPATH"
# The shipped conflist, with this run's private paths.
python3 - "$tmp" "$IDCNI_BPF_ROOT" >"$NETCONFPATH/10-idcni.conflist" <<'PY'
import json, sys
tmp, root = sys.argv[1], sys.argv[2]
conf = json.load(open("manifests/cni/10-idcni.conflist"))
p = conf["plugins"][0]
p["bpfRoot"], p["dataDir"], p["agentSocket"] = root, tmp + "/cni", tmp + "/no-agent.sock"
p["ipam"]["dataDir"] = tmp + "/ipam"
json.dump(conf, sys.stdout, indent=2)
PY

ping3() { # ping3 NETNS DST -> received count
	ip netns exec "$1" ping -n -c 3 -i 0.3 -W 1 "$2" 2>/dev/null | sed -n 's/.* \([0-9]*\) received.*/\1/p'
}

bold "Step 1: create the frontend and backend pods through the CNI plugin"
for n in frontend backend; do
	ip netns add $n
	printf '    $ cnitool add idcni /run/netns/%s\n' $n
	cnitool add idcni /run/netns/$n >"$tmp/$n.result"
done
fe=$(ip netns exec frontend ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1)
be=$(ip netns exec backend ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1)
say "frontend has $fe, backend has $be (host-local on 10.13.0.0/24)"
expect "frontend address" 10.13.0.2 "$fe"
expect "backend address" 10.13.0.3 "$be"
say "new pods have the reserved identity 5 (unresolved): they can send nothing yet"

policyctl monitor -o json >"$tmp/events.jsonl" 2>/dev/null &
monitor_pid=$!

bold "Step 2: name the pods; manual identities start isolated (default deny)"
show endpointctl add --ip 10.13.0.2 --identity 1001
show endpointctl add --ip 10.13.0.3 --identity 1002
show endpointctl list
expect "frontend -> backend ping replies" 0 "$(ping3 frontend 10.13.0.3)"

bold "Step 3: allow 1001 <-> 1002"
show policyctl allow --src 1001 --dst 1002 --symmetric
expect "frontend -> backend ping replies" 3 "$(ping3 frontend 10.13.0.3)"
expect "backend -> frontend ping replies" 3 "$(ping3 backend 10.13.0.2)"

bold "Step 4: watch the datapath decide (policyctl monitor, and trace lines)"
show policyctl debug on
if [ -r /sys/kernel/tracing/trace_pipe ]; then
	timeout 4 cat /sys/kernel/tracing/trace_pipe >"$tmp/trace.txt" 2>/dev/null &
	trace_pid=$!
fi
ping3 frontend 10.13.0.3 >/dev/null
sleep 0.5
# The trace pipe is the whole machine's: keep this run's lines (10.13.0.x is
# a0d00xx in the seed's hex notation).
grep -A1 'TC: HIT from a0d000' "$tmp/trace.txt" 2>/dev/null | grep -o 'TC: .*' | head -4 | sed 's/^/      /' || true
show policyctl debug off

bold "Step 5: deny 1002 -> 1001; it wins over the allow, replies included"
show policyctl deny --src 1002 --dst 1001
show policyctl list
expect "frontend -> backend ping replies" 0 "$(ping3 frontend 10.13.0.3)"
sleep 0.3
say "verdict events seen by policyctl monitor (the last few):"
tail -n 4 "$tmp/events.jsonl" | sed 's/^/      /'
grep -q '"reason":"deny-rule"' "$tmp/events.jsonl" && say "OK: the deny-rule drops were reported" ||
	{ say "UNEXPECTED: no deny-rule event"; failed=1; }

bold "Cleaning up (pods deleted through the plugin, pins and state removed)"
for n in frontend backend; do show cnitool del idcni /run/netns/$n; done
if [ $failed -ne 0 ]; then
	echo "demo: some steps did not behave as the walkthrough says" >&2
	exit 1
fi
echo
echo "demo: every step behaved as the walkthrough says"
