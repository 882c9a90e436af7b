#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build, demo and test
# Ambit. Idempotent and quick when everything is present.
set -euo pipefail
need=()
for pair in iptables:iptables nft:nftables ip:iproute2 tcpdump:tcpdump ipset:ipset \
            conntrack:conntrack iperf3:iperf3 nsenter:util-linux curl:curl ping:iputils-ping podman:podman shellcheck:shellcheck; do
  cmd=${pair%%:*} pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
if [ ${#need[@]} -gt 0 ]; then
  echo "deps: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v go >/dev/null || { echo "deps: Go is required (https://go.dev/doc/install); /usr/local/go/bin must be on PATH" >&2; exit 1; }
# Current reference CNI plugins (spec 1.1: GC, STATUS), built from the Go
# module proxy; Debian's 1.1.1 in /usr/lib/cni stay the "old node" set.
dir=${CNI_PLUGINS_DIR:-$(cd "$(dirname "$0")/.." && pwd)/.cache/cni-plugins/v1.10.0}
if [ ! -x "$dir/bridge" ] || [ ! -x "$dir/host-local" ] || [ ! -x "$dir/portmap" ] || [ ! -x "$dir/loopback" ]; then
  echo "deps: building reference CNI plugins v1.10.0 into $dir"
  mkdir -p "$dir"
  for p in main/bridge ipam/host-local meta/portmap main/loopback; do
    GOBIN="$dir" CGO_ENABLED=0 go install "github.com/containernetworking/plugins/plugins/$p@v1.10.0"
  done
fi
