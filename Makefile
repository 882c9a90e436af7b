# Ambit — sidecarless mTLS for Kubernetes.
# Every target that needs root says so; CI runs as root.

GO        ?= go
BIN       := bin
GOFLAGS_BUILD := -trimpath -ldflags "-s -w"
export CGO_ENABLED := 0

.PHONY: all build deps test unit bench demo e2e fuzz clean lint image

all: build

build: $(BIN)/ambit-cni $(BIN)/ambit-agent

$(BIN)/ambit-cni: FORCE
	$(GO) build $(GOFLAGS_BUILD) -o $@ ./plugin

$(BIN)/ambit-agent: FORCE
	$(GO) build $(GOFLAGS_BUILD) -o $@ ./node-agent

FORCE:

# Debian packages and the reference CNI plugins the tests run against.
deps:
	@bash hack/deps.sh

# The whole suite: unit, privileged integration in real network
# namespaces, and the end-to-end suites. This is what CI runs.
#
# The real two-node Kubernetes suite (e2e/kube) runs last, on its own: it
# brings up etcd, an API server, two kubelets with containerd, and installs
# Ambit from manifests/ — sharing the two cores with the other suites would
# only slow both. Its binaries are built from the Go module proxy on the
# first run and cached in /var/cache/ambit-e2e (kube-build).
test: deps build kube-build lint
	$(GO) test -count=1 -timeout 45m $$($(GO) list ./... | grep -v '/e2e/kube$$')
	cd tunnel/interop/istio && $(GO) vet ./... && $(GO) test -count=1 -timeout 15m ./...
	@rm -f $(BIN)/e2e-kube-report.txt
	$(GO) test -count=1 -timeout 40m ./e2e/kube/
	@cat $(BIN)/e2e-kube-report.txt 2>/dev/null || true

# gofmt over every Go file, go vet over the main module (part of make test;
# the Istio interop module is vetted in its own step).
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './.cache/*')); \
	  if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	@scripts=$$(git ls-files '*.sh' .ci/run 2>/dev/null || find . -name '*.sh' -not -path './.cache/*'); \
	  if ! command -v shellcheck >/dev/null; then echo "lint: shellcheck not installed (make deps installs it): shell scripts not linted"; \
	  elif [ -n "$$scripts" ]; then shellcheck -x -S warning $$scripts; fi

# Unit tests only (no root needed; privileged tests skip and say so).
unit:
	$(GO) test -count=1 -short ./...

# Benchmarks and reports (never pass/fail on timing).
bench: deps build
	$(GO) test -run '^$$' -bench . -benchmem -count=1 -timeout 60m $$($(GO) list ./... | grep -v '/e2e/kube$$')
	cd tunnel/interop/istio && $(GO) test -run '^$$' -bench . -benchmem -count=1 -timeout 30m ./...

# Short fuzzing of every parser (FUZZTIME per target).
FUZZTIME ?= 10s
fuzz:
	@bash hack/fuzz.sh $(FUZZTIME)

# The local demo: a node, pods through the real CNI chain, the agent, and
# encrypted requests shown in plain words. Needs root; cleans up after itself.
demo: deps build
	$(GO) build $(GOFLAGS_BUILD) -o $(BIN)/ambit-demo ./e2e/demo
	$(BIN)/ambit-demo

e2e: deps build
	$(GO) test -count=1 -timeout 60m -v ./e2e/...

clean:
	rm -rf $(BIN)

# Real two-node Kubernetes e2e (root; see docs/e2e.md). The first run builds
# Kubernetes v1.36.3 and containerd v2.4.2 from the module proxy into
# /var/cache/ambit-e2e (AMBIT_E2E_CACHE); later runs reuse them.
# AMBIT_K8S_KEEP=1 keeps the cluster up after the tests.
.PHONY: e2e-kube kube-build kube-up kube-down
kube-build:
	@bash hack/kube/build.sh
e2e-kube: deps build kube-build
	$(GO) test -count=1 -timeout 40m -v ./e2e/kube/
kube-up: deps kube-build
	@bash e2e/kube/cluster.sh up
kube-down:
	@bash e2e/kube/cluster.sh down

# The same cases on a kind cluster (one control plane, two workers, Calico
# as the primary CNI; see docs/e2e.md), for machines with kind, kubectl
# and Docker (KIND_EXPERIMENTAL_PROVIDER=podman: untested). No registry:
# the image from `make image` is loaded into the nodes. Checks the tools
# first and says which one is missing. AMBIT_KIND_KEEP=1 keeps the cluster.
.PHONY: e2e-kind
e2e-kind:
	@bash e2e/kind/kind.sh preflight
	$(MAKE) image
	@bash e2e/kind/kind.sh all

# Container image without Docker or a registry: a docker-archive tarball of
# the static binaries, assembled by hack/image (go-containerregistry).
# Load it with `ctr -n k8s.io images import bin/ambit-image.tar`,
# `podman load -i bin/ambit-image.tar` or `kind load image-archive ...`.
IMAGE ?= docker.io/ambit-mesh/ambit:dev
image: build
	$(GO) run ./hack/image -agent $(BIN)/ambit-agent -cni $(BIN)/ambit-cni -tag $(IMAGE) -o $(BIN)/ambit-image.tar

# The same image for several CPU architectures (mixed amd64 + arm64
# clusters): the binaries cross-compiled into $(BIN)/<os>_<arch>/, then one
# OCI image index with a manifest per platform, written as an OCI layout
# archive. PUSH=registry.example.com/ambit:TAG also pushes the index there
# (credentials from the Docker config). See docs/install.md.
PLATFORMS ?= linux/amd64 linux/arm64
PUSH ?=
.PHONY: image-multiarch
image-multiarch:
	@set -e; for p in $(PLATFORMS); do \
	  os=$${p%%/*}; rest=$${p#*/}; arch=$${rest%%/*}; variant=; \
	  case $$rest in */*) variant=$${rest#*/};; esac; \
	  dir=$(BIN)/$$(echo $$p | tr / _); \
	  echo "build $$p -> $$dir"; \
	  goarm=; if [ "$$arch" = arm ]; then goarm=$${variant#v}; fi; \
	  for pkg in agent:./node-agent cni:./plugin; do \
	    env $${goarm:+GOARM=$$goarm} GOOS=$$os GOARCH=$$arch $(GO) build $(GOFLAGS_BUILD) -o $$dir/ambit-$${pkg%%:*} $${pkg#*:}; \
	  done; \
	done
	env -u GOOS -u GOARCH -u GOARM $(GO) run ./hack/image -platforms "$(PLATFORMS)" -agent '$(BIN)/{platform}/ambit-agent' -cni '$(BIN)/{platform}/ambit-cni' \
	  -tag $(IMAGE) -o $(BIN)/ambit-image-multiarch.tar $(if $(PUSH),-push $(PUSH))
