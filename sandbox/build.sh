#!/usr/bin/env bash
# Builds the sandbox's programs from their Go modules and PyPI, once; later runs find them cached.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

command -v go >/dev/null || die "Go is needed to build the sandbox (https://go.dev/doc/install)"
command -v python3 >/dev/null || die "python3 is needed for moto, the AWS endpoint"

build_kubernetes() {
  [ -x "$K8S_BIN/kube-apiserver" ] && [ -x "$K8S_BIN/kubectl" ] && return
  log "building kube-apiserver, kube-controller-manager, kube-scheduler, kubectl $K8S_VERSION (a cold build takes a while)"
  local minor ld="-s -w" tmp="$K8S_BIN.tmp"
  minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  # Without these the binaries report v0.0.0 and version-gated clients (kubectl, kwokctl) misbehave.
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  rm -rf "$tmp"; mkdir -p "$tmp"
  (cd "$SANDBOX_SRC/go/kubernetes" && go build -trimpath -ldflags "$ld" -o "$tmp/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
  rm -rf "$K8S_BIN"; mv "$tmp" "$K8S_BIN"
}

build_etcd() {
  [ -x "$ETCD_BIN/etcd" ] && return
  log "building etcd $ETCD_VERSION"
  local tmp="$ETCD_BIN.tmp"
  rm -rf "$tmp"; mkdir -p "$tmp"
  (cd "$SANDBOX_SRC/go/etcd" && go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3)
  rm -rf "$ETCD_BIN"; mv "$tmp" "$ETCD_BIN"
}

build_kwok() {
  [ -x "$KWOK_BIN/kwokctl" ] && [ -x "$KWOK_BIN/kwok" ] && [ -d "$KWOK_BIN/stages" ] && return
  log "building kwok and kwokctl $KWOK_VERSION"
  local tmp="$KWOK_BIN.tmp" src
  rm -rf "$tmp"; mkdir -p "$tmp/stages"
  GOBIN="$tmp" go install -trimpath -ldflags "-s -w" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@$KWOK_VERSION"
  # KWOK's own node stages (initialise, heartbeat with lease) are kept as shipped; only the pod
  # stages are ours (sandbox/kwok/pod-stages.yaml). Supplying any stage replaces all defaults.
  src="$(go env GOMODCACHE)/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage/node"
  cp "$src/fast/node-initialize.yaml" "$src/heartbeat-with-lease/node-heartbeat-with-lease.yaml" "$tmp/stages/"
  rm -rf "$KWOK_BIN"; mv "$tmp" "$KWOK_BIN"
}

build_helm() {
  [ -x "$HELM_BIN/helm" ] && return
  log "building helm $HELM_VERSION"
  local tmp="$HELM_BIN.tmp"
  rm -rf "$tmp"; mkdir -p "$tmp"
  GOBIN="$tmp" go install -trimpath -ldflags "-s -w" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  rm -rf "$HELM_BIN"; mv "$tmp" "$HELM_BIN"
}

build_nth() {
  local version bin tarball tmp src
  for version in "$NTH_RELEASE" "$NTH_MAIN"; do
    bin="$(nth_bin "$version")"
    [ -x "$bin/node-termination-handler" ] && [ -f "$bin/chart/Chart.yaml" ] && continue
    tarball="$NTH_PEERS/aws-node-termination-handler-$version.tar.gz"
    [ -f "$tarball" ] || die "NTH $version's source is missing: $tarball (shared/peers is expected beside the repository; NODEDRAIN_PEERS names another folder)"
    log "building aws-node-termination-handler $version from $tarball"
    tmp="$bin.tmp"
    src="$tmp/aws-node-termination-handler-$version"
    rm -rf "$tmp"; mkdir -p "$tmp"
    tar -xzf "$tarball" -C "$tmp"
    # The command its README gives; lib.sh's -mod=mod would let go rewrite its go.sum.
    (cd "$src" && GOFLAGS= go build -trimpath -o "$tmp/node-termination-handler" ./cmd)
    # The benchmark renders NTH's RBAC from its own chart, so the chart is kept beside the binary.
    mv "$src/config/helm/aws-node-termination-handler" "$tmp/chart"
    rm -rf "$src"
    rm -rf "$bin"; mv "$tmp" "$bin"
  done
}

install_moto() {
  [ -f "$MOTO_VENV/.complete" ] && return
  log "installing moto $MOTO_VERSION into $MOTO_VENV"
  # A venv's scripts hard-code its path, so it is built in place; the stamp marks it whole.
  rm -rf "$MOTO_VENV"
  python3 -m venv "$MOTO_VENV"
  "$MOTO_VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
  touch "$MOTO_VENV/.complete"
}

what="${1:-all}"
mkdir -p "$NODEDRAIN_CACHE"
start=$(date +%s)
case "$what" in
  all) install_moto; build_kwok; build_etcd; build_kubernetes; build_helm ;;
  # NTH is not part of `all`: only the benchmarks run it (docs/sandbox.md says why).
  kubernetes|etcd|kwok|helm|nth) "build_$what" ;;
  moto) install_moto ;;
  *) die "unknown component $what (all, kubernetes, etcd, kwok, helm, nth, moto)" ;;
esac
log "build ready in $(( $(date +%s) - start ))s (cache: $NODEDRAIN_CACHE)"
