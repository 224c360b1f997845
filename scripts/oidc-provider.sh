#!/usr/bin/env bash
# Provides the OpenID Provider the OIDC tests run (tests/streamspace_testing/oidc.py): npm
# `oidc-provider` (OpenID-certified), pinned, installed once per version into a cache outside
# the tree. Prints the path of its lib/index.js as the last line of stdout; the rest goes to
# stderr. About 3 s cold (40 small packages).
#
# Environment: STREAMSPACE_OIDC_PROVIDER_CACHE (default ~/.cache/streamspace/oidc-provider).
set -euo pipefail

VERSION=9.13.3
INTEGRITY=sha512-WmNDX9dLeItBmIqGqspmX5u6Cc7VVMrKUw2InX2T16+bwUJ8m/N5rJ3Ed+YKxE5aZqLp4YqwEi6kMJx4Ui5ffw==
CACHE_ROOT=${STREAMSPACE_OIDC_PROVIDER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/streamspace/oidc-provider}
OUT=$CACHE_ROOT/$VERSION
ENTRY=$OUT/node_modules/oidc-provider/lib/index.js

log() { echo "oidc-provider: $*" >&2; }

if [[ -f $OUT/.done ]]; then
  echo "$ENTRY"
  exit 0
fi
command -v npm >/dev/null || { log "npm is needed (apt-get install -y npm)"; exit 1; }
mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.lock"
flock 9
if [[ -f $OUT/.done ]]; then
  echo "$ENTRY"
  exit 0
fi
WORK=$(mktemp -d "$CACHE_ROOT/.fetch.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
log "installing oidc-provider@$VERSION from npm"
(cd "$WORK" && npm install --silent --no-audit --no-fund --ignore-scripts "oidc-provider@$VERSION" >&2)
got=$(node -e 'const l=require(process.argv[1]);const p=l.packages["node_modules/oidc-provider"];console.log(p.version+" "+p.integrity)' "$WORK/package-lock.json")
[[ $got == "$VERSION $INTEGRITY" ]] || { log "unexpected package: $got"; exit 1; }
rm -rf "$OUT"
mv "$WORK" "$OUT"
trap - EXIT
touch "$OUT/.done"
echo "$ENTRY"
