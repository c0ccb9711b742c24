#!/usr/bin/env bash
# The seed walkthrough on a real single-node Kubernetes: the kubelet runs the
# idcni plugin for every pod, idcni-agent runs as the DaemonSet from
# manifests/idcni.yaml, and every step is a kubectl command an operator would
# type. Then the same story with NetworkPolicy objects only, and last a
# Service reached by its DNS name under an egress policy that allows only
# kube-dns and the Service's backends (it needs idcni's translation of
# ClusterIPs: kube-proxy's DNAT comes after idcni's egress decision). The cluster is
# this run's own (scripts/cluster.sh, IDCNI_CLUSTER=demo-*) and is removed on
# exit, failed or not.
set -euo pipefail
cd "$(dirname "$0")/.."
export IDCNI_CLUSTER=demo-$(head -c3 /dev/urandom | od -An -tx1 | tr -d ' \n')
# Two nodes unless told otherwise: the walkthrough's manual identities and
# rules are one agent's (the agent of the node frontend and backend share),
# and then a NetworkPolicy decides between pods on two nodes.
export NODES=${NODES:-2} TOPOLOGY=${TOPOLOGY:-flat}
failed=0
bold() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
say() { printf '    %s\n' "$*"; }
show() { printf '    $ %s\n' "$*"; "$@" 2>&1 | sed 's/^/      /'; }
expect() { # expect WHAT WANT GOT
	if [ "$2" = "$3" ]; then say "OK: $1 ($3)"; else say "UNEXPECTED: $1: got $3, want $2"; failed=1; fi
}
trap 'bold "Removing the cluster"; scripts/cluster.sh down >/dev/null 2>&1 || scripts/cluster.sh down' EXIT

bold "Starting a Kubernetes of $NODES node(s) with idcni installed from manifests/idcni.yaml"
eval "$(scripts/cluster.sh up)"
show kubectl get nodes -o wide
show kubectl -n idcni-system get daemonset,pods -o wide

# The walkthrough's commands run in the agent of the node its pods are on:
# manual identities and rules are node-local.
agent() { kubectl -n idcni-system exec "$agent_pod" -c agent -- "$@"; }
ping3() { # ping3 POD DST -> received count
	kubectl -n idcni-demo exec "$1" -- ping -c 3 -W 1 "$2" 2>/dev/null | sed -n 's/.* \([0-9]*\) packets received.*/\1/p'
}
tcp() { # tcp POD DST PORT -> ok | blocked
	if kubectl -n idcni-demo exec "$1" -- sh -c "echo hi | nc -w 2 $2 $3" 2>/dev/null | grep -q hi; then echo ok; else echo blocked; fi
}

bold "Step 1: the test pods (kubectl apply), addresses from the seed's subnet"
show kubectl apply -f manifests/examples/00-namespace.yaml -f manifests/examples/10-pods.yaml
kubectl -n idcni-demo wait --for=condition=Ready pod/frontend pod/backend --timeout=120s >/dev/null
show kubectl -n idcni-demo get pods -o wide
node=$(kubectl -n idcni-demo get pod frontend -o jsonpath='{.spec.nodeName}')
agent_pod=$(kubectl -n idcni-system get pods -l app.kubernetes.io/name=idcni-agent --field-selector spec.nodeName="$node" -o jsonpath='{.items[0].metadata.name}')
say "frontend and backend run on $node (backend's podAffinity); its agent is $agent_pod"
fe=$(kubectl -n idcni-demo get pod frontend -o jsonpath='{.status.podIP}')
be=$(kubectl -n idcni-demo get pod backend -o jsonpath='{.status.podIP}')
cidr=$(kubectl get node "$node" -o jsonpath='{.spec.podCIDR}')
case $fe$be in "${cidr%.0/24}".*"${cidr%.0/24}".*) say "OK: both pods are in $node's pod CIDR $cidr" ;; *) say "UNEXPECTED: $fe $be not in $cidr"; failed=1 ;; esac
say "with the agent running, pods start open: their label identities are not isolated by any policy"
expect "frontend -> backend ping replies" 3 "$(ping3 frontend "$be")"

bold "Step 2: name the pods by hand (endpointctl in the agent's pod): default deny"
show agent endpointctl add --ip "$fe" --identity 1001
show agent endpointctl add --ip "$be" --identity 1002
expect "frontend -> backend ping replies" 0 "$(ping3 frontend "$be")"

bold "Step 3: policyctl allow --src 1001 --dst 1002 --symmetric"
show agent policyctl allow --src 1001 --dst 1002 --symmetric
expect "frontend -> backend ping replies" 3 "$(ping3 frontend "$be")"

bold "Step 4: policyctl deny --src 1002 --dst 1001: the replies are dropped"
show agent policyctl deny --src 1002 --dst 1001
expect "frontend -> backend ping replies" 0 "$(ping3 frontend "$be")"
show agent policyctl status

bold "Step 5: the same story with NetworkPolicy objects only"
agent policyctl delete --src 1002 --dst 1001 >/dev/null
agent policyctl delete --src 1001 --dst 1002 --symmetric >/dev/null
agent endpointctl del --ip "$fe" >/dev/null
agent endpointctl del --ip "$be" >/dev/null
# An echo server on backend:80 (busybox nc; -ll keeps listening).
kubectl -n idcni-demo exec backend -- sh -c 'nc -ll -p 80 -e cat </dev/null >/dev/null 2>&1 &'
sleep 1
expect "frontend -> backend:80 before any policy" ok "$(tcp frontend "$be" 80)"
show kubectl apply -f manifests/examples/20-policies.yaml
sleep 3
show kubectl -n idcni-demo get networkpolicies
expect "frontend -> backend:80 (allow-frontend-to-backend)" ok "$(tcp frontend "$be" 80)"
expect "backend -> frontend ping (default-deny-ingress)" 0 "$(ping3 backend "$fe")"
show kubectl -n idcni-demo label pod frontend app=other --overwrite
sleep 3
expect "frontend relabelled app=other -> backend:80" blocked "$(tcp frontend "$be" 80)"
show kubectl -n idcni-demo label pod frontend app=frontend --overwrite

other=$(kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}' | grep -vx "$node" | head -1)
if [ -z "$other" ]; then
	say "one node only (NODES=1): no step across nodes"
else
	bold "Step 6: a NetworkPolicy between pods on two nodes ($node and $other)"
	say "db runs on $other, with its own pod CIDR; frontend and backend stay on $node"
	kubectl -n idcni-demo run db --image=idcni/test:dev --image-pull-policy=Never --labels=app=db \
		--overrides="{\"apiVersion\":\"v1\",\"spec\":{\"nodeName\":\"$other\",\"terminationGracePeriodSeconds\":1}}" \
		--command -- sh -c 'nc -ll -p 5432 -e cat' >/dev/null
	kubectl -n idcni-demo wait --for=condition=Ready pod/db --timeout=120s >/dev/null
	show kubectl -n idcni-demo get pods -o wide
	db=$(kubectl -n idcni-demo get pod db -o jsonpath='{.status.podIP}')
	say "default-deny-ingress covers db too: nothing reaches it yet"
	expect "frontend ($node) -> db ($other):5432" blocked "$(tcp frontend "$db" 5432)"
	show kubectl apply -f - <<-'EOF'
	apiVersion: networking.k8s.io/v1
	kind: NetworkPolicy
	metadata:
	  name: allow-frontend-to-db
	  namespace: idcni-demo
	spec:
	  podSelector:
	    matchLabels: {app: db}
	  ingress:
	    - from:
	        - podSelector:
	            matchLabels: {app: frontend}
	      ports:
	        - {protocol: TCP, port: 5432}
	EOF
	sleep 3
	expect "frontend ($node) -> db ($other):5432, decided on $other" ok "$(tcp frontend "$db" 5432)"
	expect "backend ($node) -> db ($other):5432" blocked "$(tcp backend "$db" 5432)"
	say "$other's agent knows frontend by its labels, under its own number:"
	db_agent=$(kubectl -n idcni-system get pods -l app.kubernetes.io/name=idcni-agent --field-selector spec.nodeName="$other" -o jsonpath='{.items[0].metadata.name}')
	show kubectl -n idcni-system exec "$db_agent" -c agent -- policyctl ipcache --ip "$fe"
	show kubectl -n idcni-demo label pod frontend app=other --overwrite
	sleep 3
	expect "frontend relabelled app=other on $node -> db on $other" blocked "$(tcp frontend "$db" 5432)"
fi

bold "Step 7: a Service by its DNS name, under an egress policy"
say "kube-proxy and CoreDNS run on the cluster: web is reached as web.idcni-svc.svc.cluster.local"
kubectl create namespace idcni-svc >/dev/null
svcpod() { # svcpod NAME LABEL COMMAND...
	local name=$1 label=$2
	shift 2
	kubectl -n idcni-svc run "$name" --image=idcni/test:dev --image-pull-policy=Never --labels="app=$label" \
		--overrides='{"apiVersion":"v1","spec":{"terminationGracePeriodSeconds":1}}' --command -- "$@" >/dev/null
}
svcpod web web nc -ll -p 8080 -e cat
svcpod admin admin nc -ll -p 8080 -e cat
svcpod shop shop sleep 3600
show kubectl -n idcni-svc expose pod web --port=80 --target-port=8080
show kubectl -n idcni-svc expose pod admin --port=80 --target-port=8080
kubectl -n idcni-svc wait --for=condition=Ready pod/web pod/admin pod/shop --timeout=120s >/dev/null
show kubectl -n idcni-svc get pods,services -o wide
resolve() { # resolve POD NAME -> the first address of NAME, or nothing
	kubectl -n idcni-svc exec "$1" -- nslookup "$2" 2>/dev/null | sed -n '/^Name:/,$ s/^Address: *\([0-9.]*\)$/\1/p' | head -1
}
svctcp() { # svctcp POD SERVICE -> ok | blocked | no-dns
	local ip
	ip=$(resolve "$1" "$2.idcni-svc.svc.cluster.local")
	[ -n "$ip" ] || { echo no-dns; return; }
	if kubectl -n idcni-svc exec "$1" -- sh -c "echo hi | nc -w 2 $ip 80" 2>/dev/null | grep -q hi; then echo ok; else echo blocked; fi
}
web_ip=$(kubectl -n idcni-svc get service web -o jsonpath='{.spec.clusterIP}')
expect "web.idcni-svc.svc.cluster.local resolves to web's ClusterIP" "$web_ip" "$(resolve shop web.idcni-svc.svc.cluster.local)"
expect "shop -> web by name, no policy" ok "$(svctcp shop web)"
expect "shop -> admin by name, no policy" ok "$(svctcp shop admin)"
say "egress for shop: DNS to kube-dns on 53, and web's pods on 8080; nothing else"
show kubectl apply -f - <<-'EOF'
	apiVersion: networking.k8s.io/v1
	kind: NetworkPolicy
	metadata:
	  name: shop-egress
	  namespace: idcni-svc
	spec:
	  podSelector:
	    matchLabels: {app: shop}
	  policyTypes: [Egress]
	  egress:
	    - to:
	        - namespaceSelector:
	            matchLabels: {kubernetes.io/metadata.name: kube-system}
	          podSelector:
	            matchLabels: {k8s-app: kube-dns}
	      ports:
	        - {protocol: UDP, port: 53}
	        - {protocol: TCP, port: 53}
	    - to:
	        - podSelector:
	            matchLabels: {app: web}
	      ports:
	        - {protocol: TCP, port: 8080}
	EOF
sleep 3
say "the policy names pods, the client dials Services: idcni judges the backend behind each ClusterIP"
expect "shop -> web by name (DNS allowed, web's pods allowed)" ok "$(svctcp shop web)"
expect "shop -> admin by name (admin's pods not allowed)" blocked "$(svctcp shop admin)"

if [ $failed -ne 0 ]; then
	echo "demo: some steps did not behave as the walkthrough says" >&2
	exit 1
fi
echo
echo "demo: every step behaved as the walkthrough says"
