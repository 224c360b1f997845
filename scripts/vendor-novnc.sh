#!/usr/bin/env bash
# Copies noVNC (from Debian's `novnc` package) into the web UI so nothing loads from the internet.
set -euo pipefail
dest="src/streamspace/controlplane/web/vendor/novnc"
src="/usr/share/novnc"
[ -f "$dest/core/rfb.js" ] && exit 0
if [ ! -f "$src/core/rfb.js" ]; then
  echo "noVNC not found at $src (apt-get install novnc)" >&2
  exit 1
fi
mkdir -p "$dest"
cp -rL "$src/core" "$dest/"
[ -d "$src/vendor" ] && cp -rL "$src/vendor" "$dest/"
echo "vendored noVNC from $src into $dest"
