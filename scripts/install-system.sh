#!/usr/bin/env bash
# Installs the Debian packages StreamSpace needs, only those missing (idempotent, fast when done).
#   product: what `make run` needs (VNC server, apps, noVNC files, sandbox)
#   test:    additionally what `make test` needs (browser for UI tests, podman, databases, slapd, xmlsec1 for the test SAML IdP, xclip/xdotool to look inside a session)
set -euo pipefail
what="${1:-product}"
product=(tigervnc-standalone-server xterm firefox-esr fonts-dejavu-core bubblewrap tini novnc x11-utils
    pulseaudio pulseaudio-utils gstreamer1.0-tools gstreamer1.0-plugins-base
    gstreamer1.0-plugins-good gstreamer1.0-pulseaudio)
test_pkgs=(chromium podman runc debootstrap uidmap slirp4netns fuse-overlayfs
           postgresql redis-server iproute2 procps nginx slapd ldap-utils xmlsec1 nodejs xclip xdotool)
pkgs=("${product[@]}")
[ "$what" = test ] && pkgs+=("${test_pkgs[@]}")
# The OIDC tests' provider is an npm package: Debian's nodejs comes without npm (a NodeSource
# nodejs has it built in, and Debian's npm package would conflict with it).
[ "$what" = test ] && ! command -v npm >/dev/null && pkgs+=(npm)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The LDAP tests run their own slapd on a free port; Debian's package starts a system one.
if [[ " ${missing[*]} " == *" slapd "* ]]; then
  $SUDO systemctl disable --now slapd >/dev/null 2>&1 || $SUDO service slapd stop >/dev/null 2>&1 || true
fi
