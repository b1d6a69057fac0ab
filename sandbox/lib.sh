# Shared by the sandbox scripts: versions, cache and state locations, small helpers.
# shellcheck shell=bash

SANDBOX_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SANDBOX_SRC/.." && pwd)"
# shellcheck source=versions.env
source "$SANDBOX_SRC/versions.env"

# Builds live outside the repo so a fresh clone (CI) reuses them; every path is keyed by version.
NODEDRAIN_CACHE="${NODEDRAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nodedrain}"
# A running sandbox belongs to one checkout: two clones on one machine do not share a cluster.
SANDBOX_STATE="${NODEDRAIN_SANDBOX_STATE:-$REPO_ROOT/.sandbox}"
CLUSTER_NAME="${NODEDRAIN_CLUSTER_NAME:-nodedrain}"

key_of() { # a short hash of files, so an edited wrapper module rebuilds
  cat "$@" | sha256sum | cut -c1-12
}

K8S_BIN="$NODEDRAIN_CACHE/kubernetes-$K8S_VERSION-$(key_of "$SANDBOX_SRC/go/kubernetes/go.mod" "$SANDBOX_SRC/go/kubernetes/go.sum")"
ETCD_BIN="$NODEDRAIN_CACHE/etcd-$ETCD_VERSION-$(key_of "$SANDBOX_SRC/go/etcd/go.mod" "$SANDBOX_SRC/go/etcd/go.sum")"
KWOK_BIN="$NODEDRAIN_CACHE/kwok-$KWOK_VERSION"
HELM_BIN="$NODEDRAIN_CACHE/helm-$HELM_VERSION"
# In CI the repository is a fresh clone with a copy of shared/ beside it.
NTH_PEERS="${NODEDRAIN_PEERS:-$REPO_ROOT/../shared/peers}"
nth_bin() { echo "$NODEDRAIN_CACHE/nth-$1"; } # the folder of one NTH version's binary
MOTO_VENV="$NODEDRAIN_CACHE/moto-$MOTO_VERSION-py$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo none)"

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod

log() { printf '\033[36m[sandbox]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[31m[sandbox] error:\033[0m %s\n' "$*" >&2; exit 1; }
