#!/usr/bin/env bash
# The e2e/kube cases on a kind cluster: one control plane + two workers,
# Calico as the primary CNI, Ambit from manifests/overlays/kind with the
# image `make image` built, loaded into the nodes (no registry).
#
#   e2e/kind/kind.sh all        what `make e2e-kind` runs: preflight, up,
#                               test, report, down (AMBIT_KIND_KEEP=1 keeps
#                               the cluster)
#   e2e/kind/kind.sh preflight  are kind, kubectl, the container engine, go
#                               and curl there (clear message when not)
#   e2e/kind/kind.sh up         create the cluster, install Calico and wait,
#                               load the images, install Ambit and wait
#   e2e/kind/kind.sh test       run e2e/kube against the cluster
#   e2e/kind/kind.sh down       delete the cluster and its state
#   e2e/kind/kind.sh env        `eval $(e2e/kind/kind.sh env)`, then kubectl
#   e2e/kind/kind.sh vars       the derived settings (kind_test.go reads them)
#   e2e/kind/kind.sh calico-patch CIDR < calico.yaml   (used by up; tested)
#
# Knobs: AMBIT_KIND_NAME (ambit-e2e), AMBIT_KIND_KEEP, AMBIT_KIND_STATE,
# KIND_NODE_IMAGE (kindest/node image; kind's default otherwise),
# CALICO_VERSION, CALICO_SHA256 (checked when set), AMBIT_IMAGE_TAR
# (bin/ambit-image.tar), KIND_EXPERIMENTAL_PROVIDER=podman (untested).
# See docs/e2e.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
NAME=${AMBIT_KIND_NAME:-ambit-e2e}
CONFIG=$HERE/kind-config.yaml
STATE=${AMBIT_KIND_STATE:-$REPO/.cache/kind/$NAME}
KCFG=$STATE/kubeconfig
PROVIDER=${KIND_EXPERIMENTAL_PROVIDER:-docker}
# Pinned: Calico's plain manifest (calico-node + calico-kube-controllers in
# kube-system, which the kind overlay's agents exclude). Downloaded at run
# time into $STATE, never vendored (it is ~300 KB of CRDs).
CALICO_VERSION=${CALICO_VERSION:-v3.30.3}
CALICO_URL=https://raw.githubusercontent.com/projectcalico/calico/$CALICO_VERSION/manifests/calico.yaml
IMAGE_TAR=${AMBIT_IMAGE_TAR:-$REPO/bin/ambit-image.tar}
# The test app the e2e/kube cases run (harness_test.go kechoImage).
KECHO_IMAGE=localhost/ambit-e2e/kecho:1
OVERLAY=$REPO/manifests/overlays/kind
NODES="$NAME-worker,$NAME-worker2"

log() { printf 'e2e/kind: %s\n' "$*" >&2; }
die() { printf 'e2e/kind: ERROR: %s\n' "$*" >&2; exit 1; }

# podSubnet of the kind config: Calico's IP pool must be the same range.
pod_cidr() {
  local c
  c=$(awk '$1 == "podSubnet:" { gsub(/["'\'']/, "", $2); print $2; exit }' "$CONFIG")
  [ -n "$c" ] || die "$CONFIG has no networking.podSubnet"
  printf '%s\n' "$c"
}

k() { kubectl --kubeconfig "$KCFG" "$@"; }

preflight() {
  local missing=() t
  for t in kind kubectl "$PROVIDER" go curl; do
    command -v "$t" >/dev/null 2>&1 || missing+=("$t")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    die "missing: ${missing[*]}. make e2e-kind needs kind (https://kind.sigs.k8s.io), kubectl, a container engine (docker; KIND_EXPERIMENTAL_PROVIDER=podman is untested), go and curl"
  fi
  if ! "$PROVIDER" info >/dev/null 2>&1; then
    die "$PROVIDER is installed but its engine does not answer ('$PROVIDER info' fails): kind needs a running container engine"
  fi
  if [ "$PROVIDER" = podman ]; then
    log "KIND_EXPERIMENTAL_PROVIDER=podman: untested with Ambit (kind's podman provider is experimental)"
  fi
  log "tools: $(kind version 2>/dev/null | head -n1); kubectl $(kubectl version --client -o yaml 2>/dev/null | awk '$1 == "gitVersion:" { print $2; exit }'); $PROVIDER ok"
}

vars() {
  cat <<EOF
NAME=$NAME
STATE=$STATE
KUBECONFIG=$KCFG
PROVIDER=$PROVIDER
POD_CIDR=$(pod_cidr)
NODES=$NODES
CALICO_VERSION=$CALICO_VERSION
CALICO_URL=$CALICO_URL
IMAGE_TAR=$IMAGE_TAR
KECHO_IMAGE=$KECHO_IMAGE
OVERLAY=$OVERLAY
EOF
}

# calico_patch CIDR: Calico's manifest on stdin, with the IPv4 pool set to
# CIDR (the commented-out CALICO_IPV4POOL_CIDR uncommented) and Felix told
# to accept kind's loose reverse-path filter (kind nodes set rp_filter=2;
# without this calico-node may refuse to start). Fails when the manifest's
# layout changed rather than install a pool that misses the pod subnet.
calico_patch() {
  local cidr=${1:?calico-patch CIDR}
  awk -v cidr="$cidr" '
    /^[ ]*# - name: CALICO_IPV4POOL_CIDR[ ]*$/ { sub(/# /, ""); print; pool = 1; next }
    pool && /^[ ]*#   value: / {
      ind = $0; sub(/#.*/, "", ind)
      print ind "  value: \"" cidr "\""
      print ind "- name: FELIX_IGNORELOOSERPF"
      print ind "  value: \"true\""
      pool = 0; done++; next
    }
    { print }
    END { if (done != 1) exit 3 }' || die "Calico manifest: no commented CALICO_IPV4POOL_CIDR entry to set (layout changed in $CALICO_VERSION?)"
}

install_calico() {
  local raw=$STATE/calico-$CALICO_VERSION.yaml cidr
  cidr=$(pod_cidr)
  if [ ! -s "$raw" ]; then
    log "calico: downloading $CALICO_URL"
    curl -fsSL --retry 3 -o "$raw.tmp" "$CALICO_URL" || die "downloading $CALICO_URL failed"
    mv "$raw.tmp" "$raw"
  fi
  if [ -n "${CALICO_SHA256:-}" ]; then
    echo "$CALICO_SHA256  $raw" | sha256sum -c --quiet - || die "$raw does not match CALICO_SHA256"
  fi
  calico_patch "$cidr" <"$raw" >"$STATE/calico.yaml"
  log "calico: $CALICO_VERSION, IPv4 pool $cidr"
  # Server-side: some Calico CRDs are too big for the last-applied annotation.
  k apply --server-side --force-conflicts -f "$STATE/calico.yaml" >/dev/null
  k -n kube-system rollout status ds/calico-node --timeout=600s
  k -n kube-system rollout status deploy/calico-kube-controllers --timeout=300s
  k wait --for=condition=Ready nodes --all --timeout=300s
  k -n kube-system rollout status deploy/coredns --timeout=300s
}

load_images() {
  [ -s "$IMAGE_TAR" ] || die "$IMAGE_TAR missing: run 'make image' first (make e2e-kind does)"
  local d=$STATE/images
  mkdir -p "$d"
  log "images: kecho ($KECHO_IMAGE), static Go, packed without Docker"
  (cd "$REPO" \
    && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$d/kecho" ./e2e/kube/images/kecho \
    && go run ./e2e/kube/images/ociimage -name "$KECHO_IMAGE" -out "$d/kecho.tar" \
         -file "$d/kecho:/kecho" -entrypoint "/kecho serve") || die "building the kecho image failed"
  kind load image-archive --name "$NAME" "$IMAGE_TAR"
  kind load image-archive --name "$NAME" "$d/kecho.tar"
}

install_ambit() {
  log "ambit: kubectl apply -k manifests/overlays/kind"
  k apply --server-side -k "$OVERLAY" >/dev/null
  k -n ambit-system rollout status ds/ambit-agent --timeout=300s
  k -n ambit-system rollout status deploy/ambit-ca --timeout=300s
}

up() {
  mkdir -p "$STATE"
  if kind get clusters 2>/dev/null | grep -qx "$NAME"; then
    log "cluster $NAME exists; reusing it"
    kind get kubeconfig --name "$NAME" >"$KCFG"
  else
    local img=()
    [ -z "${KIND_NODE_IMAGE:-}" ] || img=(--image "$KIND_NODE_IMAGE")
    # No --wait: without a CNI the nodes stay NotReady until Calico runs.
    kind create cluster --name "$NAME" --config "$CONFIG" --kubeconfig "$KCFG" "${img[@]}"
  fi
  install_calico
  load_images
  # The e2e/kube CA case re-signs a real token with the cluster's
  # service-account key (its control for the forgery refusals).
  "$PROVIDER" cp "$NAME-control-plane:/etc/kubernetes/pki/sa.key" "$STATE/sa.key" \
    || log "could not copy sa.key from the control plane; the CA case skips its re-signing control"
  install_ambit
  k get nodes -o wide
}

run_tests() {
  [ -s "$KCFG" ] || die "no kubeconfig at $KCFG: run '$0 up' first"
  local sa=""
  [ ! -s "$STATE/sa.key" ] || sa=$STATE/sa.key
  cd "$REPO"
  AMBIT_E2E_KUBECONFIG=$KCFG \
  AMBIT_E2E_NODES=$NODES \
  AMBIT_E2E_NODE_EXEC="$PROVIDER exec {node}" \
  AMBIT_E2E_POD_CIDR=$(pod_cidr) \
  AMBIT_E2E_SA_KEY=$sa \
  AMBIT_E2E_INSTALL_DIR=$OVERLAY \
  AMBIT_E2E_CLUSTER_NAME="kind $NAME (Calico $CALICO_VERSION)" \
    go test -count=1 -timeout 40m -v ./e2e/kube/ 2>&1 | tee "$STATE/e2e.log"
  return "${PIPESTATUS[0]}"
}

down() {
  if command -v kind >/dev/null 2>&1 && kind get clusters 2>/dev/null | grep -qx "$NAME"; then
    kind delete cluster --name "$NAME"
  fi
  # Keep the last run's log next to the state, drop the rest.
  if [ -d "$STATE" ]; then
    [ ! -f "$STATE/e2e.log" ] || cp "$STATE/e2e.log" "$STATE.last-e2e.log"
    rm -rf "$STATE"
  fi
}

all() {
  preflight
  local t0 t1 t2 rc=0
  t0=$(date +%s)
  if [ -z "${AMBIT_KIND_KEEP:-}" ]; then
    trap 'down' EXIT
  fi
  up
  t1=$(date +%s)
  run_tests || rc=$?
  t2=$(date +%s)
  printf '\n==== e2e/kind: cluster %s up (Calico + Ambit) %ss, cases %ss, rc %s ====\n' "$NAME" $((t1 - t0)) $((t2 - t1)) "$rc"
  if [ -n "${AMBIT_KIND_KEEP:-}" ]; then
    log "cluster kept (AMBIT_KIND_KEEP): eval \$($0 env); $0 down"
  fi
  return "$rc"
}

case ${1:-} in
  all) all ;;
  preflight) preflight ;;
  up) preflight; up ;;
  test) run_tests ;;
  down) down ;;
  env) printf 'export KUBECONFIG=%s\n' "$KCFG" ;;
  vars) vars ;;
  calico-patch) calico_patch "${2:-}" ;;
  *) die "usage: $0 all|preflight|up|test|down|env|vars|calico-patch CIDR" ;;
esac
