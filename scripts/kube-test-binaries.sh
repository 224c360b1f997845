#!/usr/bin/env bash
# Builds the kube-apiserver, kube-controller-manager and etcd that the Kubernetes tests run against,
# from the Go module proxy, once per version: the binaries are build outputs, cached outside the
# tree and never committed.
# Prints the directory holding them as the last line of stdout; everything else goes to stderr.
#
# Kubernetes 1.36 matches the kubernetes_asyncio 36.x client the product uses; etcd 3.6 is the line
# that release is qualified with (its go.mod pins etcd 3.6.8; 3.6.16 is the newest patch of it).
# Both declare `go 1.26.0`, so the machine's Go 1.26 builds them without a toolchain download.
# kube-controller-manager (ServiceAccounts, namespace deletion, garbage collection, PVC binding)
# shares most packages with kube-apiserver, so it adds about 100 s to a build; the API server
# fixture does not run it, tests that need controllers start it from the same directory.
#
# Environment: STREAMSPACE_KUBE_CACHE (default ~/.cache/streamspace/kube) is where builds are kept.
set -euo pipefail

KUBE_VERSION=v1.36.3
ETCD_VERSION=v3.6.16
CACHE_ROOT=${STREAMSPACE_KUBE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/streamspace/kube}
OUT=$CACHE_ROOT/$KUBE_VERSION-etcd-$ETCD_VERSION

log() { echo "kube-test-binaries: $*" >&2; }

have_binaries() { [[ -x $OUT/kube-apiserver && -x $OUT/kube-controller-manager && -x $OUT/etcd ]]; }

if have_binaries; then
  echo "$OUT"
  exit 0
fi

command -v go >/dev/null || { log "the Go toolchain is needed to build the Kubernetes test binaries"; exit 1; }
mkdir -p "$CACHE_ROOT"
# Two test runs starting at once must not build twice or see a half-written binary.
exec 9>"$CACHE_ROOT/.build.lock"
flock 9
if have_binaries; then
  echo "$OUT"
  exit 0
fi

WORK=$(mktemp -d "$CACHE_ROOT/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export GOTOOLCHAIN=local GOFLAGS=-trimpath CGO_ENABLED=0 GOWORK=off

# A release whose go.mod replaces sibling modules with relative paths (Kubernetes' staging modules,
# etcd's api/client/pkg) cannot be `go install`ed. A wrapper module requires it and points every
# such replacement at the published module of the matching version instead.
#   wrapper <dir> <module> <version> <version-of-replaced-modules>
wrapper() {
  local dir=$1 module=$2 version=$3 sibling_version=$4 gomod replaced
  mkdir -p "$dir"
  (
    cd "$dir"
    go mod init streamspace.test/kube-test-binaries >/dev/null 2>&1
    go mod edit -require="$module@$version"
    gomod=$(go mod download -json "$module@$version" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
    [[ -f $gomod ]] || { log "no go.mod for $module@$version"; exit 1; }
    replaced=$(sed -n 's#^[[:space:]]*\([^[:space:]]*\) => \.\{1,2\}/[^[:space:]]*$#\1#p' "$gomod" | grep -v FORBIDDEN || true)
    [[ -n $replaced ]] || { log "$module@$version replaces no sibling modules; the wrapper is not needed"; exit 1; }
    for m in $replaced; do
      go mod edit -replace="$m=$m@$sibling_version"
    done
  )
}

start=$SECONDS
log "downloading modules for kubernetes $KUBE_VERSION and etcd $ETCD_VERSION"
minor_patch=${KUBE_VERSION#v1.}
wrapper "$WORK/kube" k8s.io/kubernetes "$KUBE_VERSION" "v0.$minor_patch"
wrapper "$WORK/etcd" go.etcd.io/etcd/server/v3 "$ETCD_VERSION" "$ETCD_VERSION"
(cd "$WORK/kube" && go get k8s.io/kubernetes/cmd/kube-apiserver@"$KUBE_VERSION" k8s.io/kubernetes/cmd/kube-controller-manager@"$KUBE_VERSION" >&2)
(cd "$WORK/etcd" && go get go.etcd.io/etcd/server/v3@"$ETCD_VERSION" >&2)
log "modules ready in $((SECONDS - start)) s"

start=$SECONDS
IFS=. read -r _ kube_minor _ <<<"${KUBE_VERSION#v}"
version_pkg=k8s.io/component-base/version
kube_ldflags="-s -w -X $version_pkg.gitVersion=$KUBE_VERSION -X $version_pkg.gitMajor=1"
kube_ldflags+=" -X $version_pkg.gitMinor=$kube_minor -X $version_pkg.gitTreeState=clean"
log "building kube-apiserver, kube-controller-manager and etcd (nice 19)"
(cd "$WORK/kube" && nice -n 19 go build -mod=mod -ldflags="$kube_ldflags" -o "$WORK/bin/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver)
(cd "$WORK/kube" && nice -n 19 go build -mod=mod -ldflags="$kube_ldflags" -o "$WORK/bin/kube-controller-manager" k8s.io/kubernetes/cmd/kube-controller-manager)
(cd "$WORK/etcd" && nice -n 19 go build -mod=mod -ldflags="-s -w" -o "$WORK/bin/etcd" go.etcd.io/etcd/server/v3)
log "built in $((SECONDS - start)) s"

mkdir -p "$OUT"
mv "$WORK/bin/kube-controller-manager" "$WORK/bin/kube-apiserver" "$WORK/bin/etcd" "$OUT/"
log "$(du -h "$OUT"/* | tr '\t\n' ' ')"
echo "$OUT"
