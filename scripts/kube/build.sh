#!/usr/bin/env bash
# Build a real Kubernetes control plane from Kubernetes' own Go modules: kube-apiserver,
# kube-controller-manager and kube-scheduler from k8s.io/kubernetes (the release pinned in go.mod
# here, its staging modules replaced by their published v0.X releases), and etcd from
# go.etcd.io/etcd/server/v3 at the version that release requires. Everything comes from the Go module
# proxy. The binaries are cached outside the repo (CAFFE_SERVING_CACHE, default ~/.cache/caffe-serving)
# under a key made of go.mod, go.sum, the sources here and the Go version, so only the first build on
# a machine pays (about 20 minutes on 2 cores). Prints the folder holding the four binaries, last.
#
# usage: scripts/kube/build.sh
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
log() { echo "[kube-build] $*" >&2; }
command -v go >/dev/null || { log "go not found: the control plane builds with Go >= $(awk '/^go /{print $2}' "$HERE/go.mod")"; exit 1; }

KUBE_VERSION=$(awk '$1=="k8s.io/kubernetes"{print $2; exit}' "$HERE/go.mod")
KEY=$( (cat "$HERE/go.mod" "$HERE/go.sum" "$HERE/build.sh" "$HERE/tools.go" "$HERE"/cmd/*/*.go; go version) | sha256sum | cut -c1-12)
CACHE_ROOT=${CAFFE_SERVING_CACHE:-$HOME/.cache/caffe-serving}
OUT="$CACHE_ROOT/kube/$KUBE_VERSION-$KEY"
PROGRAMS="kube-apiserver kube-controller-manager kube-scheduler etcd"

have_all() { for p in $PROGRAMS; do [ -x "$OUT/bin/$p" ] || return 1; done; }
if have_all; then log "cached: $OUT/bin"; echo "$OUT/bin"; exit 0; fi

MINOR=$(echo "$KUBE_VERSION" | cut -d. -f2)
# The version the binaries report (kubectl version, Helm's kubeVersion check): set as Kubernetes' own
# release build sets it (hack/lib/version.sh), else it reads v0.0.0-master.
LDFLAGS="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$MINOR -X k8s.io/component-base/version.gitTreeState=clean -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$MINOR"
TMP="$OUT.tmp.$$"
rm -rf "$TMP"; mkdir -p "$TMP/bin"
trap 'rm -rf "$TMP"' EXIT
START=$(date +%s)
( while sleep 30; do log "compiling ($(( $(date +%s) - START )) s so far; go build of $PROGRAMS)"; done ) &
TICKER=$!
trap 'kill $TICKER 2>/dev/null; rm -rf "$TMP"' EXIT
cd "$HERE"
export GOFLAGS="${GOFLAGS:-} -buildvcs=false -mod=readonly" CGO_ENABLED=0
log "downloading modules for Kubernetes $KUBE_VERSION"
go mod download
for p in kube-apiserver kube-controller-manager kube-scheduler; do
  log "building $p"
  go build -trimpath -ldflags "$LDFLAGS" -o "$TMP/bin/$p" "k8s.io/kubernetes/cmd/$p"
done
log "building etcd"
go build -trimpath -ldflags "-s -w" -o "$TMP/bin/etcd" ./cmd/etcd
"$TMP/bin/kube-apiserver" --version >&2
"$TMP/bin/etcd" --version | head -1 >&2
rm -rf "$OUT"; mv "$TMP" "$OUT"
log "built in $(( $(date +%s) - START )) s: $(du -sh "$OUT/bin" | cut -f1) in $OUT/bin"
echo "$OUT/bin"
