# idcni: see README.md. Every target runs as root on a Debian machine with Go
# at /usr/local/go; `make deps` installs the rest.
export PATH := /usr/local/go/bin:$(PATH)
GO ?= go
CLANG ?= clang-19
STRIP ?= llvm-strip-19
BIN := $(CURDIR)/bin
# --version of every binary: the tree it was built from.
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/idcni/idcni/internal/version.Build=$(VERSION)
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.7.0
CNI_PLUGINS := github.com/containernetworking/plugins/plugins
# Fuzzing the datapath for real (the seed corpus runs in `make test`).
FUZZTIME ?= 10m

.PHONY: all deps build generate check-generate test unit lint bench bench-agent-scale fuzz demo demo-netns clean kube cluster cluster-down conformance

all: build

deps:
	@./scripts/install-deps.sh

build:
	@mkdir -p $(BIN)
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/ ./cmd/...
	$(GO) build -o $(BIN)/host-local $(CNI_PLUGINS)/ipam/host-local
	$(GO) build -o $(BIN)/loopback $(CNI_PLUGINS)/main/loopback
	$(GO) build -o $(BIN)/cnitool github.com/containernetworking/cni/cnitool

# Regenerates the committed bpf2go output from bpf/kernel/*.c (the
# datapath in bpf/, netbench's floor programs in e2e/netbench/).
generate: deps
	BPF2GO_CC=$(CLANG) BPF2GO_STRIP=$(STRIP) $(GO) generate ./bpf/... ./e2e/netbench/

# Fails when the committed objects are not what the C sources compile to.
check-generate: deps
	@./scripts/check-generate.sh

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt: files above need formatting"; exit 1; }
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...

# Kubernetes binaries for the agent's tests against a real apiserver, cached in
# ~/.cache/idcni/kube/<release> (IDCNI_KUBE_BIN overrides); a no-op when built.
kube:
	@./scripts/build-kube.sh >/dev/null

# Then the upstream NetworkPolicy conformance specs on a two-node cluster of
# their own (make conformance): two nodes put every spec's pods on both.
test: deps check-generate lint build kube
	IDCNI_E2E_BIN=$(BIN) $(GO) test -count=1 -timeout 60m ./...
	NODES=2 ./scripts/conformance.sh

bench: deps build
	$(GO) test -run '^$$' -bench . -benchtime 2s -timeout 60m ./bpf/ ./identity/ ./policy/...
	$(GO) test -run '^$$' -bench Agent -benchtime 1x -timeout 30m ./e2e/
	$(GO) test -run '^$$' -bench 'PodStartup|Propagation' -timeout 30m ./e2e/cluster/

# Issue 11's scale benchmark: 10,000 pods, 1,000 policies against a real
# kube-apiserver, the agent of OLD_REF (built in a temporary worktree) and
# this tree's in one run; see docs/benchmarks.md.
OLD_REF ?= 45c6ced
bench-agent-scale: deps build kube
	./scripts/bench-agent-scale.sh $(OLD_REF)

fuzz: deps
	$(GO) test -run '^$$' -fuzz FuzzDatapath -fuzztime $(FUZZTIME) -timeout 0 ./bpf/

# The walkthrough on a real single-node Kubernetes, kubectl all the way.
demo: deps build kube
	./scripts/demo-cluster.sh

# The same walkthrough without Kubernetes: network namespaces as pods,
# plugged by cnitool, no agent (the seed's setting).
demo-netns: deps build
	./scripts/demo.sh

# A real Kubernetes (etcd, kube-apiserver, controller-manager, scheduler,
# and NODES kubelet nodes with containerd, kube-proxy and CoreDNS, default
# 3; KUBE_PROXY_MODE=nftables|none changes kube-proxy; TOPOLOGY=routed puts
# the last node behind a router) with idcni installed from
# manifests/idcni.yaml; eval "$$(make -s cluster)" to use kubectl on it.
# NODES, TOPOLOGY and KUBE_PROXY_MODE reach TestCluster (make test) too.
cluster: deps
	@./scripts/cluster.sh up

cluster-down:
	@./scripts/cluster.sh down

# The upstream NetworkPolicy conformance specs ([Feature:NetworkPolicy] of
# k8s.io/kubernetes test/e2e/network/netpol, the cluster's release) on a
# cluster of their own (or IDCNI_CLUSTER's), taken down after; NODES and
# KUBE_PROXY_MODE as for make cluster. Summary and JUnit in
# _output/conformance. make test runs it too, on two nodes.
conformance: deps
	@./scripts/conformance.sh

clean:
	rm -rf $(BIN)
