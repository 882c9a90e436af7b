#!/usr/bin/env bash
# A real two-node Kubernetes cluster on one machine, without Docker: "kind
# without Docker". One control plane in the host network namespace (etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler); each node is a
# network namespace *and* a mount namespace with its own containerd, kubelet
# and kube-proxy, so each node has its own /etc/cni/net.d, /opt/cni/bin,
# /var/lib/kubelet, /run ... exactly where a DaemonSet's hostPath expects
# them. Binaries come from hack/kube/build.sh (cached outside the repo).
#
#   e2e/kube/cluster.sh up       bring it up (idempotent: a healthy cluster is kept)
#   e2e/kube/cluster.sh down     tear it down, leaving nothing behind
#   e2e/kube/cluster.sh status   what runs
#   e2e/kube/cluster.sh env      export KUBECONFIG=... PATH=... (eval it)
#   e2e/kube/cluster.sh node N CMD...   run CMD inside node N (its net + mount namespaces)
#   e2e/kube/cluster.sh import N|all TARBALL...   import image tarballs into node containerd
#   e2e/kube/cluster.sh hosts IP NAME...   add a line to every node's /etc/hosts (no cluster DNS)
#
# Topology (see docs/e2e.md): bridge k8s2br0 198.51.100.1/24 on the host;
# node-N is netns amb-k8s-nodeN with eth0 198.51.100.1N, pods 10.244.N.0/24,
# routes to the other node's pods via its node IP. The apiserver listens on
# 198.51.100.1:6443. Services 10.96.0.0/16 through kube-proxy (iptables).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
K8S_VERSION=${K8S_VERSION:-v1.36.3}
CACHE=${AMBIT_E2E_CACHE:-/var/cache/ambit-e2e}
KBIN=${KUBE_BIN:-$CACHE/k8s-$K8S_VERSION/bin}
S=${AMBIT_K8S_STATE:-/var/lib/amb-k8s}
BR=k8s2br0
HOSTIP=198.51.100.1
NODES=(1 2)
SVC_CIDR=10.96.0.0/16
POD_CIDR=10.244.0.0/16
ETCD_PORT=23790
PAUSE_IMAGE=localhost/ambit-e2e/pause:1
KECHO_IMAGE=localhost/ambit-e2e/kecho:1
# Node 2 runs the current CNI plugins (spec 1.1.0) when hack/deps.sh built
# them, node 1 Debian's 1.1.1 (spec 1.0.0): real clusters mix old and new.
CNI_NEW=${CNI_PLUGINS_DIR:-$REPO/.cache/cni-plugins/v1.10.0}
# Per-node directories that a real node has and a DaemonSet may mount.
NODE_DIRS=(/var/lib/kubelet /var/lib/containerd /var/lib/cni /etc/cni/net.d /opt/cni/bin /var/log/pods /var/log/containers /var/lib/ambit /etc/ambit)

export PATH="$KBIN:$PATH"
log() { printf '%s cluster: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

netns() { echo "amb-k8s-node$1"; }
nodename() { echo "node-$1"; }
nodeip() { echo "198.51.100.1$1"; }
podcidr() { echo "10.244.$1.0/24"; }
cgroot() { echo "amb-k8s-node$1"; }
# Our own kubectl (same version as the cluster); any kubectl on PATH while
# the cached one is still being built.
KUBECTL=$KBIN/kubectl
[ -x "$KUBECTL" ] || KUBECTL=$(command -v kubectl || echo "$KBIN/kubectl")
kubectl() { "$KUBECTL" --kubeconfig "$S/admin.kubeconfig" "$@"; }
pidof_() { local f="$S/run/$1.pid"; [ -f "$f" ] && cat "$f"; }
alive() { local p; p=$(pidof_ "$1") && [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }

# start NAME CMD... : a long-lived part in its own session (so a `timeout`
# or a test's process group cannot take the cluster down), its PID recorded.
start() {
  local name=$1; shift
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$S/run/$name.pid" "$@" \
    >"$S/logs/$name.log" 2>&1 </dev/null &
  for _ in $(seq 50); do [ -s "$S/run/$name.pid" ] && return 0; sleep 0.1; done
  die "$name did not start (see $S/logs/$name.log)"
}

# in_node N CMD... : run in node N's network and mount namespaces.
in_node() {
  local n=$1; shift
  local h; h=$(pidof_ "node$n-holder") || die "node $n is not up"
  nsenter -t "$h" -m -n -- "$@"
}

wait_for() { # wait_for SECONDS DESCRIPTION CMD...
  local secs=$1 what=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || die "timed out after ${secs}s waiting for $what"
    sleep 0.3
  done
}

# ---------------------------------------------------------------- PKI
pki() {
  local p="$S/pki"
  mkdir -p "$p"
  [ -f "$p/ca.crt" ] && return 0
  log "certificates (openssl)"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj "/CN=amb-k8s-ca" -keyout "$p/ca.key" -out "$p/ca.crt" 2>/dev/null
  openssl genrsa -out "$p/sa.key" 2048 2>/dev/null
  openssl rsa -in "$p/sa.key" -pubout -out "$p/sa.pub" 2>/dev/null
  cert apiserver "/CN=kube-apiserver" "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:127.0.0.1,IP:$HOSTIP,IP:10.96.0.1" server
  cert admin "/O=system:masters/CN=amb-k8s-admin"
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  cert controller-manager "/CN=system:kube-controller-manager"
  cert scheduler "/CN=system:kube-scheduler"
  cert kube-proxy "/O=system:node-proxier/CN=system:kube-proxy"
  local n
  for n in "${NODES[@]}"; do
    cert "kubelet-$n" "/O=system:nodes/CN=system:node:$(nodename "$n")"
  done
}

cert() { # cert NAME SUBJECT [SANS] [server]
  local p="$S/pki" name=$1 subj=$2 sans=${3:-} usage=clientAuth
  [ "${4:-}" = server ] && usage=serverAuth
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "$subj" \
    -keyout "$p/$name.key" -out "$p/$name.csr" 2>/dev/null
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$usage"
    [ -n "$sans" ] && echo "subjectAltName=$sans"
  } >"$p/$name.ext"
  openssl x509 -req -in "$p/$name.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial \
    -days 30 -extfile "$p/$name.ext" -out "$p/$name.crt" 2>/dev/null
  rm -f "$p/$name.csr" "$p/$name.ext"
}

kubeconfig() { # kubeconfig NAME CERTNAME
  cat >"$S/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: amb-k8s
  cluster:
    server: https://$HOSTIP:6443
    certificate-authority: $S/pki/ca.crt
users:
- name: $2
  user:
    client-certificate: $S/pki/$2.crt
    client-key: $S/pki/$2.key
contexts:
- name: amb-k8s
  context: {cluster: amb-k8s, user: $2}
current-context: amb-k8s
EOF
}

# ------------------------------------------------------------ network
network() {
  log "network: bridge $BR, node namespaces"
  if ! ip link show "$BR" >/dev/null 2>&1; then
    ip link add "$BR" type bridge
    ip addr add "$HOSTIP/24" dev "$BR"
  fi
  ip link set "$BR" up
  local n ns
  for n in "${NODES[@]}"; do
    ns=$(netns "$n")
    ip netns add "$ns" 2>/dev/null || true
    if ! ip link show "amb-k8s-n$n" >/dev/null 2>&1; then
      ip link add "amb-k8s-n$n" type veth peer name eth0 netns "$ns"
    fi
    ip link set "amb-k8s-n$n" master "$BR" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr replace "$(nodeip "$n")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route replace default via "$HOSTIP"
    ip route replace "$(podcidr "$n")" via "$(nodeip "$n")" dev "$BR"
    local m
    for m in "${NODES[@]}"; do
      [ "$m" = "$n" ] || ip -n "$ns" route replace "$(podcidr "$m")" via "$(nodeip "$m")" dev eth0
    done
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 \
      net.ipv4.conf.default.rp_filter=0
    # Bridged pod traffic must traverse the node's iptables (kube-proxy,
    # NetworkPolicy enforcers). The sysctl is per netns on this kernel.
    ip netns exec "$ns" sysctl -qw net.bridge.bridge-nf-call-iptables=1 net.bridge.bridge-nf-call-ip6tables=1 2>/dev/null ||
      log "warning: bridge-nf-call-iptables not settable in $ns"
  done
  # Node-to-node traffic is bridged on the host; a host FORWARD policy of
  # DROP (Docker sets one) would cut it. Accept our bridge, and only then.
  if [ "$(iptables -S FORWARD 2>/dev/null | head -1)" != "-P FORWARD ACCEPT" ] &&
     ! iptables -C FORWARD -i "$BR" -j ACCEPT 2>/dev/null; then
    iptables -I FORWARD -i "$BR" -j ACCEPT -m comment --comment amb-k8s
    touch "$S/run/forward-rule"
  fi
}

# ------------------------------------------------------- control plane
control_plane() {
  if ! alive etcd; then
    log "etcd"
    start etcd etcd --name amb-k8s --data-dir "$S/etcd" \
      --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
      --listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
      --initial-cluster amb-k8s=http://127.0.0.1:23800 --quota-backend-bytes 1073741824
  fi
  if ! alive kube-apiserver; then
    log "kube-apiserver"
    start kube-apiserver "$KBIN/kube-apiserver" \
      --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
      --bind-address "$HOSTIP" --advertise-address "$HOSTIP" --secure-port 6443 \
      --client-ca-file "$S/pki/ca.crt" \
      --tls-cert-file "$S/pki/apiserver.crt" --tls-private-key-file "$S/pki/apiserver.key" \
      --kubelet-client-certificate "$S/pki/apiserver-kubelet-client.crt" \
      --kubelet-client-key "$S/pki/apiserver-kubelet-client.key" \
      --kubelet-preferred-address-types InternalIP,Hostname \
      --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
      --allow-privileged=true \
      --service-account-issuer https://kubernetes.default.svc.cluster.local \
      --service-account-key-file "$S/pki/sa.pub" \
      --service-account-signing-key-file "$S/pki/sa.key" \
      --service-cluster-ip-range "$SVC_CIDR" \
      --profiling=false --v=1
  fi
  wait_for 120 "kube-apiserver /readyz" kubectl get --raw /readyz
  # Both need RBAC bootstrapped, i.e. a ready apiserver.
  if ! alive kube-controller-manager; then
    log "kube-controller-manager, kube-scheduler"
    start kube-controller-manager "$KBIN/kube-controller-manager" \
      --kubeconfig "$S/controller-manager.kubeconfig" \
      --authentication-kubeconfig "$S/controller-manager.kubeconfig" \
      --authorization-kubeconfig "$S/controller-manager.kubeconfig" \
      --bind-address 127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
      --service-account-private-key-file "$S/pki/sa.key" --root-ca-file "$S/pki/ca.crt" \
      --cluster-signing-cert-file "$S/pki/ca.crt" --cluster-signing-key-file "$S/pki/ca.key" \
      --service-cluster-ip-range "$SVC_CIDR" --cluster-cidr "$POD_CIDR" --allocate-node-cidrs=false \
      --profiling=false --v=1
  fi
  if ! alive kube-scheduler; then
    start kube-scheduler "$KBIN/kube-scheduler" --kubeconfig "$S/scheduler.kubeconfig" \
      --authentication-kubeconfig "$S/scheduler.kubeconfig" \
      --authorization-kubeconfig "$S/scheduler.kubeconfig" \
      --bind-address 127.0.0.1 --leader-elect=false --profiling=false --v=1
  fi
}

# ------------------------------------------------------------- images
images() {
  local d="$S/images"
  mkdir -p "$d"
  [ -f "$d/kecho.tar" ] && [ -f "$d/pause.tar" ] && return 0
  log "images: pause, kecho (static Go, go-containerregistry)"
  (cd "$REPO" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$d/pause" ./e2e/kube/images/pause \
    && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$d/kecho" ./e2e/kube/images/kecho \
    && go run ./e2e/kube/images/ociimage -name "$PAUSE_IMAGE" -out "$d/pause.tar" -file "$d/pause:/pause" -entrypoint /pause \
    && go run ./e2e/kube/images/ociimage -name "$KECHO_IMAGE" -out "$d/kecho.tar" -file "$d/kecho:/kecho" -entrypoint "/kecho serve")
}

import_images() { # import_images N TAR...
  local n=$1; shift
  local t
  for t in "$@"; do
    in_node "$n" "$KBIN/ctr" -n k8s.io images import --local "$t" >/dev/null 2>&1 ||
      in_node "$n" "$KBIN/ctr" -n k8s.io images import "$t" >/dev/null
  done
}

# --------------------------------------------------------------- nodes
cgroups() { # cgroups N: a cgroupRoot per node in every v1 controller
  local n=$1 c root seen=""
  root=$(cgroot "$n")
  for c in /sys/fs/cgroup/*/; do
    c=$(realpath "$c")
    case " $seen " in *" $c "*) continue ;; esac
    seen="$seen $c"
    mkdir -p "$c/$root"
    if [ -f "$c/cpuset.cpus" ]; then
      cat "$c/cpuset.cpus" >"$c/$root/cpuset.cpus"
      cat "$c/cpuset.mems" >"$c/$root/cpuset.mems"
    fi
  done
}

# The holder: PID of a node's mount namespace. Runs inside
# `nsenter --net=<node netns> unshare --mount --propagation slave`: host
# mounts still show, the node's own mounts (pod volumes, overlay rootfs,
# pod netns) stay inside it and vanish with it.
holder() {
  local n=$1 d
  mount --make-rshared /
  mount -t tmpfs -o mode=0755,size=256m "amb-k8s-node$n-run" /run
  for d in "${NODE_DIRS[@]}"; do
    mkdir -p "$S/node$n/fs$d" "$d"
    mount --bind "$S/node$n/fs$d" "$d"
  done
  # The cluster runs no DNS: each node has its own /etc/hosts, which the
  # kubelet copies into host-network pods, and `cluster.sh hosts` fills.
  cp /etc/hosts "$S/node$n/hosts"
  mount --bind "$S/node$n/hosts" /etc/hosts
  touch "$S/run/node$n.ready"
  exec sleep infinity
}

node_files() { # node_files N: containerd, kubelet, kube-proxy config, CNI
  local n=$1
  local nd="$S/node$n" plugins=/usr/lib/cni cniver=1.0.0
  if [ "$n" = 2 ] && [ -x "$CNI_NEW/bridge" ] && [ -x "$CNI_NEW/host-local" ] && [ -x "$CNI_NEW/portmap" ] && [ -x "$CNI_NEW/loopback" ]; then
    plugins=$CNI_NEW cniver=1.1.0
  fi
  mkdir -p "$nd/fs/opt/cni/bin" "$nd/fs/etc/cni/net.d" "$nd/manifests"
  cp "$plugins"/{bridge,host-local,portmap,loopback} "$nd/fs/opt/cni/bin/"
  echo "$plugins" >"$nd/cni-plugins"
  cat >"$nd/fs/etc/cni/net.d/10-amb-k8s.conflist" <<EOF
{
  "cniVersion": "$cniver",
  "name": "amb-k8s",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$(podcidr "$n")"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  cat >"$nd/containerd.toml" <<EOF
# containerd $n: default paths (/var/lib/containerd, /run/containerd, the
# CNI dirs) which the node's mount namespace makes its own.
version = 3
[plugins.'io.containerd.nri.v1.nri']
  disable = true
[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "$PAUSE_IMAGE"
[plugins.'io.containerd.cri.v1.runtime']
  # Root here cannot lower oom_score_adj (no CAP_SYS_RESOURCE).
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      BinaryName = "$(command -v runc)"
      SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/opt/cni/bin"]
    conf_dir = "/etc/cni/net.d"
EOF
  cat >"$nd/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $S/pki/ca.crt}
authorization: {mode: Webhook}
address: $(nodeip "$n")
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
cgroupDriver: cgroupfs
cgroupRoot: /$(cgroot "$n")
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
podLogsDir: /var/log/pods
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
serializeImagePulls: false
registerNode: true
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
evictionPressureTransitionPeriod: 10s
nodeStatusReportFrequency: 10s
# Static pods (TestStaticPod): the kubelet runs what a file here says and
# mirrors it in the API under a UID of the API server's own.
staticPodPath: $nd/manifests
EOF
  cat >"$nd/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $S/kube-proxy.kubeconfig}
hostnameOverride: $(nodename "$n")
mode: iptables
clusterCIDR: $POD_CIDR
healthzBindAddress: 0.0.0.0:10256
metricsBindAddress: 127.0.0.1:10249
# nf_conntrack_max is writable only from the host netns: leave it alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
}

node_up() {
  local n=$1
  local nd="$S/node$n"
  mkdir -p "$nd"
  if ! alive "node$n-holder"; then
    log "node-$n: namespaces, cgroups, containerd, kubelet, kube-proxy"
    rm -f "$S/run/node$n.ready"
    cgroups "$n"
    node_files "$n"
    local d
    for d in "${NODE_DIRS[@]}"; do
      [ -d "$d" ] || { mkdir -p "$d" && echo "$d" >>"$S/created-dirs"; }
    done
    start "node$n-holder" nsenter --net="/run/netns/$(netns "$n")" -- \
      unshare --mount --propagation slave -- bash "$HERE/cluster.sh" _holder "$n"
    wait_for 10 "node-$n mount namespace" test -f "$S/run/node$n.ready"
  fi
  local h; h=$(pidof_ "node$n-holder")
  if ! alive "node$n-containerd"; then
    start "node$n-containerd" nsenter -t "$h" -m -n -- "$KBIN/containerd" --config "$nd/containerd.toml"
    wait_for 30 "node-$n containerd" in_node "$n" "$KBIN/ctr" version
    import_images "$n" "$S/images/pause.tar" "$S/images/kecho.tar"
  fi
  if ! alive "node$n-kubelet"; then
    start "node$n-kubelet" nsenter -t "$h" -m -n -- "$KBIN/kubelet" \
      --config "$nd/kubelet.yaml" --kubeconfig "$S/kubelet-$n.kubeconfig" \
      --hostname-override "$(nodename "$n")" --node-ip "$(nodeip "$n")" --v=1
  fi
  if ! alive "node$n-kube-proxy"; then
    start "node$n-kube-proxy" nsenter -t "$h" -m -n -- "$KBIN/kube-proxy" --config "$nd/kube-proxy.yaml" --v=1
  fi
}

nodes_ready() {
  local n
  for n in "${NODES[@]}"; do
    [ "$(kubectl get node "$(nodename "$n")" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ] || return 1
  done
}

up() {
  local t0=$SECONDS b
  [ "$(id -u)" = 0 ] || die "needs root"
  for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy containerd containerd-shim-runc-v2 ctr; do
    [ -x "$KBIN/$b" ] || die "$KBIN/$b missing: run hack/kube/build.sh"
  done
  command -v etcd >/dev/null && command -v runc >/dev/null || die "etcd/runc missing: run hack/kube/build.sh (installs them)"
  mkdir -p "$S/run" "$S/logs"
  # Debian's etcd package starts a service on 2379; ours uses its own port.
  export PATH="$KBIN:$PATH" # kubelet finds the shim, containerd finds ctr etc.
  pki
  kubeconfig admin admin
  kubeconfig controller-manager controller-manager
  kubeconfig scheduler scheduler
  kubeconfig kube-proxy kube-proxy
  local n
  for n in "${NODES[@]}"; do kubeconfig "kubelet-$n" "kubelet-$n"; done
  network
  control_plane
  images
  for n in "${NODES[@]}"; do node_up "$n"; done
  wait_for 120 "both nodes Ready" nodes_ready
  # Pods wait for the default ServiceAccount; the controller-manager makes it.
  wait_for 60 "default ServiceAccount" kubectl -n default get sa default
  log "up in $((SECONDS - t0)) s: export KUBECONFIG=$S/admin.kubeconfig"
}

# ---------------------------------------------------------------- down
# Every process of node N: the cgroups under its cgroupRoot (pods) and
# everything in its mount namespace (containerd, shims, kubelet, proxy).
node_pids() {
  local n=$1 h mnt p root
  root=$(cgroot "$n")
  find /sys/fs/cgroup/*/"$root" -name cgroup.procs -exec cat {} + 2>/dev/null || true
  h=$(pidof_ "node$n-holder") || return 0
  mnt=$(readlink "/proc/$h/ns/mnt" 2>/dev/null) || return 0
  # One stat for all processes: a readlink per process is slow on a busy host.
  stat -c '%N' /proc/[0-9]*/ns/mnt 2>/dev/null | grep -F "'$mnt'" | sed -n "s#^'/proc/\([0-9]*\)/.*#\1#p" || true
  return 0
}

node_down() {
  local n=$1 name p pids
  for name in kubelet kube-proxy containerd; do
    p=$(pidof_ "node$n-$name") && kill "$p" 2>/dev/null || true
  done
  for _ in $(seq 50); do
    pids=$(node_pids "$n" | sort -u)
    [ -z "$pids" ] && break
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    sleep 0.2
  done
  local root c
  root=$(cgroot "$n")
  for c in /sys/fs/cgroup/*/"$root"; do
    [ -d "$c" ] && find "$c" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  ip netns del "$(netns "$n")" 2>/dev/null || true
  ip link del "amb-k8s-n$n" 2>/dev/null || true
}

down() {
  local t0=$SECONDS n name p
  [ -d "$S" ] || { log "nothing to tear down"; return 0; }
  for n in "${NODES[@]}"; do node_down "$n"; done
  for name in kube-scheduler kube-controller-manager kube-apiserver etcd; do
    if p=$(pidof_ "$name"); then
      kill "$p" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$p" 2>/dev/null || true
    fi
  done
  ip link del "$BR" 2>/dev/null || true # its routes go with it
  if [ -f "$S/run/forward-rule" ]; then
    iptables -D FORWARD -i "$BR" -j ACCEPT -m comment --comment amb-k8s 2>/dev/null || true
  fi
  if [ -f "$S/created-dirs" ]; then
    while read -r d; do rmdir -p --ignore-fail-on-non-empty "$d" 2>/dev/null || true; done <"$S/created-dirs"
  fi
  # Keep the last logs for a post-mortem, outside the state dir.
  mkdir -p "$CACHE"
  rm -rf "$CACHE/last-logs" && cp -r "$S/logs" "$CACHE/last-logs" 2>/dev/null || true
  rm -rf --one-file-system "$S"
  log "down in $((SECONDS - t0)) s"
}

status() {
  local name rc=0
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler \
              node1-holder node1-containerd node1-kubelet node1-kube-proxy \
              node2-holder node2-containerd node2-kubelet node2-kube-proxy; do
    if alive "$name"; then printf '%-26s running pid %s\n' "$name" "$(pidof_ "$name")"
    else printf '%-26s DOWN\n' "$name"; rc=1; fi
  done
  [ $rc = 0 ] && kubectl get nodes -o wide 2>&1 || true
  return $rc
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) echo "export KUBECONFIG=$S/admin.kubeconfig PATH=$KBIN:\$PATH" ;;
  node) shift; n=$1; shift; in_node "$n" "$@" ;;
  import)
    shift; which=$1; shift
    if [ "$which" = all ]; then for n in "${NODES[@]}"; do import_images "$n" "$@"; done
    else import_images "$which" "$@"; fi ;;
  hosts) # hosts IP NAME...: publish a name in every node's /etc/hosts
    shift; for n in "${NODES[@]}"; do
      grep -qF "$*" "$S/node$n/hosts" || echo "$*" >>"$S/node$n/hosts"
    done ;;
  _holder) holder "$2" ;;
  _step) shift; mkdir -p "$S/run" "$S/logs"; "$@" ;; # debugging: run one internal function
  *) echo "usage: $0 up|down|status|env|node N CMD...|import N|all TAR..." >&2; exit 2 ;;
esac
