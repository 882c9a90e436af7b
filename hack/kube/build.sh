#!/usr/bin/env bash
# Builds the binaries of the real-Kubernetes e2e cluster (e2e/kube) from the
# Go module proxy into a cache OUTSIDE the repository, so every later run on
# this machine (and CI on it) reuses them:
#
#   ${AMBIT_E2E_CACHE:-/var/cache/ambit-e2e}/k8s-<K8S_VERSION>/bin/
#
# Each binary has a <name>.key beside it holding the versions it was built
# from (Kubernetes, containerd, Go); a binary whose key differs is rebuilt,
# one that matches is skipped, so the script is idempotent and a warm run
# takes a second. The scratch Go modules live in the cache dir too.
#
# It is slow cold (kube-apiserver alone is ~10 min on 2 cores) and shares the
# machine, so it runs at low priority with one package compiled at a time
# unless told otherwise (KUBE_BUILD_NICE, KUBE_BUILD_P).
#
# Usage: hack/kube/build.sh [name...]   (default: everything)
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.36.3}
CONTAINERD_VERSION=${CONTAINERD_VERSION:-v2.4.2}
KNP_VERSION=${KNP_VERSION:-v0.8.0}
CACHE=${AMBIT_E2E_CACHE:-/var/cache/ambit-e2e}
DIR="$CACHE/k8s-$K8S_VERSION"
BIN="$DIR/bin"
GOV=$(go env GOVERSION)
export CGO_ENABLED=0 GOFLAGS="-p=${KUBE_BUILD_P:-1} -buildvcs=false" GOTOOLCHAIN=local
# KUBE_BUILD_NICE=0 KUBE_BUILD_P=2 on a machine of its own (CI) halves it.
NICE=(nice -n "${KUBE_BUILD_NICE:-19}")

log() { printf '%s kube-build: %s\n' "$(date -u +%H:%M:%S)" "$*"; }

# Debian packages the cluster runs on (etcd, runc, ...). Quick when present.
deps() {
  local need=()
  for pair in etcd:etcd-server runc:runc socat:socat conntrack:conntrack \
              iptables:iptables openssl:openssl nsenter:util-linux ip:iproute2; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
  done
  [ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
  if [ ${#need[@]} -gt 0 ]; then
    log "apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # Debian starts etcd as a service where it can; the harness runs its own.
    if command -v service >/dev/null 2>&1; then service etcd stop >/dev/null 2>&1 || true; fi
  fi
}

key_k8s="k8s=$K8S_VERSION go=$GOV"
key_ctrd="containerd=$CONTAINERD_VERSION go=$GOV"
key_knp="kube-network-policies=$KNP_VERSION go=$GOV"

fresh() { [ -x "$BIN/$1" ] && [ "$(cat "$BIN/$1.key" 2>/dev/null)" = "$2" ]; }

# The scratch module that builds Kubernetes: it requires k8s.io/kubernetes
# and replaces each staging repo (./staging/src/k8s.io/X in kubernetes'
# go.mod, which a dependency cannot use) with the published k8s.io/X v0.Y.Z.
# sample-* are not on the proxy and no binary needs them: left out.
k8s_module() {
  local m="$DIR/src/kubernetes"
  [ -f "$m/.tidy-$K8S_VERSION" ] && return 0
  mkdir -p "$m"
  local gomod staging
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  staging="v0.${K8S_VERSION#v1.}"
  {
    echo "module ambit.local/kubebuild"
    echo
    echo "go $(sed -n 's/^go //p' "$gomod")"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\1#p' "$gomod" |
      grep -v '^k8s.io/sample-' | while read -r mod; do echo "	$mod => $mod $staging"; done
    echo ")"
  } >"$m/go.mod"
  cat >"$m/tools.go" <<'TOOLS'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
TOOLS
  log "go mod tidy (kubernetes $K8S_VERSION)"
  (cd "$m" && "${NICE[@]}" go mod tidy)
  touch "$m/.tidy-$K8S_VERSION"
}

build_k8s() {
  local name=$1
  fresh "$name" "$key_k8s" && { log "$name: cached"; return 0; }
  k8s_module
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local ld="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  log "$name: building"
  local t0=$SECONDS
  (cd "$DIR/src/kubernetes" && "${NICE[@]}" go build -trimpath -ldflags "$ld" -o "$BIN/$name.tmp" "k8s.io/kubernetes/cmd/$name")
  mv "$BIN/$name.tmp" "$BIN/$name"
  echo "$key_k8s" >"$BIN/$name.key"
  log "$name: built in $((SECONDS - t0)) s"
}

build_containerd() {
  local all=1 n
  for n in containerd containerd-shim-runc-v2 ctr; do fresh "$n" "$key_ctrd" || all=0; done
  [ $all = 1 ] && { log "containerd: cached"; return 0; }
  local m="$DIR/src/containerd"
  mkdir -p "$m"
  if [ ! -f "$m/.tidy-$CONTAINERD_VERSION" ]; then
    printf 'module ambit.local/containerdbuild\n\ngo 1.24\n\nrequire github.com/containerd/containerd/v2 %s\n' "$CONTAINERD_VERSION" >"$m/go.mod"
    cat >"$m/tools.go" <<'TOOLS'
//go:build tools

package tools

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
)
TOOLS
    log "go mod tidy (containerd $CONTAINERD_VERSION)"
    (cd "$m" && "${NICE[@]}" go mod tidy)
    touch "$m/.tidy-$CONTAINERD_VERSION"
  fi
  for n in containerd containerd-shim-runc-v2 ctr; do
    fresh "$n" "$key_ctrd" && continue
    log "$n: building"
    local t0=$SECONDS
    (cd "$m" && "${NICE[@]}" go build -trimpath -tags no_btrfs -ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" -o "$BIN/$n.tmp" "github.com/containerd/containerd/v2/cmd/$n")
    mv "$BIN/$n.tmp" "$BIN/$n"
    echo "$key_ctrd" >"$BIN/$n.key"
    log "$n: built in $((SECONDS - t0)) s"
  done
}

# nft_queue_ok: can this kernel load an nftables rule with the queue
# statement (CONFIG_NFT_QUEUE)? Probed in a throwaway network namespace.
nft_queue_ok() {
  local ns="kube-build-nfq-$$" ok=1
  ip netns add "$ns" || return 0 # cannot probe: assume a normal kernel
  printf 'add table inet t\nadd chain inet t c { type filter hook postrouting priority 0; }\nadd rule inet t c queue num 98 bypass\n' |
    ip netns exec "$ns" nft -f - >/dev/null 2>&1 || ok=0
  ip netns del "$ns"
  [ "$ok" = 1 ]
}

# kube-network-policies is an nfqueue enforcer: its nftables rules send a
# connection's first packet to user space with the nft `queue` statement.
# Kernels built without CONFIG_NFT_QUEUE (this project's CI VM) reject
# that statement but still have nfnetlink_queue and the xtables NFQUEUE
# target behind nft_compat (iptables-nft's -j NFQUEUE). There the
# upstream source is built with one change: each queue statement is
# emitted as that NFQUEUE target, same queue number and flags. Policy
# evaluation, sets, chains, priorities and verdicts stay upstream's. The
# variant is in the key, so e2e/kube can say which one ran.
knp_variant() { if nft_queue_ok; then echo upstream; else echo xt-queue; fi; }

knp_patch() {
  local pkg="$1/pkg/networkpolicy"
  cat >"$pkg/zz_ambit_xtqueue.go" <<'GO'
package networkpolicy

// Added by Ambit's e2e build (hack/kube/build.sh) on kernels without the
// nftables queue expression: the same queue through the xtables NFQUEUE
// target (nft_compat + xt_NFQUEUE), struct xt_NFQ_info_v3.

import (
	"encoding/binary"

	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
)

func xtQueue(q *expr.Queue) expr.Any {
	total := q.Total
	if total == 0 {
		total = 1
	}
	var flags uint16
	if q.Flag&expr.QueueFlagBypass != 0 {
		flags |= 0x1 // NFQ_FLAG_BYPASS
	}
	if q.Flag&expr.QueueFlagFanout != 0 {
		flags |= 0x2 // NFQ_FLAG_CPU_FANOUT
	}
	info := make(xt.Unknown, 6)
	binary.NativeEndian.PutUint16(info[0:], q.Num)
	binary.NativeEndian.PutUint16(info[2:], total)
	binary.NativeEndian.PutUint16(info[4:], flags)
	return &expr.Target{Name: "NFQUEUE", Rev: 3, Info: &info}
}
GO
  sed -i 's/^\(\t*\)queue,$/\1xtQueue(queue),/' "$pkg/controller.go"
  sed -i 's/^\(\t*\)\(&expr\.Queue{.*}\),$/\1xtQueue(\2),/' "$pkg/dnsagent.go"
  # Every queue statement must now go through xtQueue: fail, not build a
  # half-patched enforcer, if upstream's code moved.
  local left wrapped
  left=$(cat "$pkg"/*.go | grep -v '_test.go' | grep -cE '^\s*(queue,|&expr\.Queue\{.*\},)$' || true)
  wrapped=$(grep -ho 'xtQueue(' "$pkg/controller.go" "$pkg/dnsagent.go" | wc -l)
  if [ "$left" != 0 ] || [ "$wrapped" -lt 3 ]; then
    echo "kube-build: kube-network-policies $KNP_VERSION: xt-queue patch did not apply ($left queue statements left, $wrapped wrapped)" >&2
    return 1
  fi
}

build_knp() {
  local variant key
  variant=$(knp_variant)
  key="$key_knp variant=$variant"
  fresh kube-network-policies "$key" && { log "kube-network-policies ($variant): cached"; return 0; }
  log "kube-network-policies ($variant): building"
  local t0=$SECONDS tmp="$DIR/src/knp-bin"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  if [ "$variant" = upstream ]; then
    GOBIN="$tmp" "${NICE[@]}" go install "sigs.k8s.io/kube-network-policies/cmd@$KNP_VERSION"
  else
    local mod
    mod=$(go mod download -json "sigs.k8s.io/kube-network-policies@$KNP_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
    cp -r "$mod" "$tmp/src"
    chmod -R u+w "$tmp/src"
    knp_patch "$tmp/src"
    (cd "$tmp/src" && "${NICE[@]}" go build -trimpath -o "$tmp/cmd" ./cmd)
  fi
  mv "$tmp/cmd" "$BIN/kube-network-policies"
  echo "$key" >"$BIN/kube-network-policies.key"
  rm -rf "$tmp"
  log "kube-network-policies ($variant): built in $((SECONDS - t0)) s"
}

main() {
  mkdir -p "$BIN"
  exec 9>"$DIR/.build.lock"
  flock 9   # one build at a time (a test's TestMain and a person may race)
  deps
  local want=("$@")
  [ ${#want[@]} -gt 0 ] || want=(kube-apiserver kubelet kube-proxy kube-controller-manager kube-scheduler containerd kubectl kube-network-policies)
  local t0=$SECONDS
  for n in "${want[@]}"; do
    case $n in
      containerd) build_containerd ;;
      kube-network-policies) build_knp ;;
      kube-apiserver|kubelet|kube-proxy|kube-controller-manager|kube-scheduler|kubectl) build_k8s "$n" ;;
      *) echo "kube-build: unknown binary $n" >&2; exit 2 ;;
    esac
  done
  log "done in $((SECONDS - t0)) s: $BIN"
}

main "$@"
