"""The bottom of the chain: a Debian rootfs made with debootstrap, packed into a tarball kept
in the cache, and imported as ``localhost/streamspace/rootfs:latest``."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from streamspace.images.catalog import HASH_LABEL, ROOTFS, ImageBuildError, image_ref
from streamspace.images.engine import Engine

DEFAULT_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Bump when the rootfs recipe below changes in a way the inputs hash cannot see.
ROOTFS_RECIPE_VERSION = "1"

# dpkg inside image builds: no fsync per file (a crashed build is thrown away anyway), and no
# documentation, man pages or translations (smaller images, faster builds).
_DPKG_CONF = """\
force-unsafe-io
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/lintian/*
"""
_APT_CONF = """\
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Retries "3";
"""


def detect_debian_mirror(suite: str = DEFAULT_SUITE) -> tuple[str, str | None]:
    """The host's apt mirror for `suite` and its security mirror (or None), from sources."""
    mirror: str | None = None
    security: str | None = None
    for uri, suites in _apt_sources():
        if suite in suites and mirror is None and "security" not in uri:
            mirror = uri
        if f"{suite}-security" in suites and security is None:
            security = uri
    return mirror or DEFAULT_MIRROR, security


def _apt_sources() -> Iterator[tuple[str, set[str]]]:
    etc = Path("/etc/apt")
    files = [etc / "sources.list"]
    list_d = etc / "sources.list.d"
    if list_d.is_dir():
        files += sorted(list_d.glob("*.list")) + sorted(list_d.glob("*.sources"))
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                suites = set(fields.get("suites", "").split())
                for uri in fields.get("uris", "").split():
                    yield uri.rstrip("/"), suites
        else:
            for line in text.splitlines():
                parts = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
                if len(parts) >= 3 and parts[0] == "deb":
                    yield parts[1].rstrip("/"), {parts[2]}


def rootfs_hash(suite: str, mirror: str, security: str | None) -> str:
    recipe = "\n".join(
        [
            f"recipe={ROOTFS_RECIPE_VERSION}",
            f"suite={suite}",
            f"mirror={mirror}",
            f"security={security or ''}",
            "variant=minbase",
            _DPKG_CONF,
            _APT_CONF,
        ]
    )
    return hashlib.sha256(recipe.encode()).hexdigest()[:32]


def build_rootfs(
    eng: Engine,
    cache_dir: Path,
    inputs_hash: str,
    suite: str,
    mirror: str,
    security: str | None,
    force: bool,
) -> None:
    tarball = cache_dir / f"rootfs-{suite}-{inputs_hash}.tar"
    if force or not tarball.is_file():
        if os.geteuid() != 0:
            raise ImageBuildError(
                "building the base rootfs runs debootstrap, which needs root; "
                "run `streamspace images build` as root (e.g. with sudo)"
            )
        debootstrap = shutil.which("debootstrap")
        if debootstrap is None:
            raise ImageBuildError(
                "debootstrap not found; install it (apt-get install -y debootstrap)"
            )
        for old in cache_dir.glob(f"rootfs-{suite}-*.tar"):
            old.unlink()
        target = cache_dir / f"rootfs-{suite}-{inputs_hash}.tmp"
        for leftover in cache_dir.glob(f"rootfs-{suite}-*.tmp"):
            _remove_rootfs_dir(leftover)
        debs = cache_dir / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        eng.progress(f"[rootfs] debootstrap {suite} from {mirror} (about a minute)")
        eng.run_logged(
            "debootstrap",
            [
                debootstrap,
                "--variant=minbase",
                f"--cache-dir={debs.resolve()}",
                suite,
                str(target),
                mirror,
            ],
            "rootfs-debootstrap.log",
            echo=False,
        )
        _configure_rootfs(target, suite, mirror, security)
        partial = tarball.with_suffix(".partial")
        eng.progress(f"[rootfs] packing {tarball.name}")
        eng.run_logged(
            "tar rootfs",
            [
                "tar",
                "--numeric-owner",
                "--one-file-system",
                "-C",
                str(target),
                "-cf",
                str(partial),
                ".",
            ],
            "rootfs-tar.log",
            echo=False,
        )
        partial.replace(tarball)
        _remove_rootfs_dir(target)
    ref = image_ref(ROOTFS)
    eng.progress(f"[rootfs] importing {tarball.name} as {ref}")
    eng.run_logged(
        "import rootfs",
        [
            eng.exe,
            "import",
            "--change",
            f"LABEL {HASH_LABEL}={inputs_hash}",
            "--change",
            'CMD ["/bin/bash"]',
            str(tarball),
            ref,
        ],
        "rootfs-import.log",
        echo=False,
    )


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    points = []
    for line in lines:
        fields = line.split()
        if len(fields) > 4:
            point = fields[4].replace("\\040", " ")
            if point.startswith(prefix):
                points.append(point)
    return points


def _remove_rootfs_dir(path: Path) -> None:
    """Delete a (partial) debootstrap tree, first detaching anything mounted inside it.

    A failed debootstrap can leave /proc, /sys or a bind-mounted /dev inside the target;
    deleting through those would delete host files, so any mount that cannot be detached
    aborts the removal instead.
    """
    if not path.exists():
        return
    for point in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    left = _mounts_under(path)
    if left:
        raise ImageBuildError(
            f"cannot remove {path}: still mounted inside it: {', '.join(left)}; unmount them"
        )
    shutil.rmtree(path)


def _configure_rootfs(root: Path, suite: str, mirror: str, security: str | None) -> None:
    lines = [f"deb {mirror} {suite} main", f"deb {mirror} {suite}-updates main"]
    if security:
        lines.append(f"deb {security} {suite}-security main")
    (root / "etc/apt/sources.list").write_text("\n".join(lines) + "\n")
    (root / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/dpkg/dpkg.cfg.d/streamspace").write_text(_DPKG_CONF)
    (root / "etc/apt/apt.conf.d/90streamspace").write_text(_APT_CONF)
    for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*", "var/log/*.log"):
        for path in root.glob(pattern):
            if path.is_file():
                path.unlink()
    # Drop docs debootstrap already installed, as the excludes would have.
    for sub in ("usr/share/man", "usr/share/info", "usr/share/lintian"):
        target = root / sub
        if target.is_dir():
            shutil.rmtree(target)
            target.mkdir()
