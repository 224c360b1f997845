"""The images this source tree can build, their names, and the order to build them in.

Every image's inputs hash (`context_hash`) covers its folder's files and its parent's hash, so a
change anywhere up the FROM chain rebuilds everything below it.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

IMAGE_PREFIX = "localhost/streamspace"
ROOTFS = "rootfs"
BASE = "base"
HASH_LABEL = "org.streamspace.inputs-hash"


class ImageBuildError(RuntimeError):
    """A build step failed; the message says which and ends with the tail of its output."""


@dataclass(frozen=True)
class BuildResult:
    name: str
    """Folder name under images/ ("base", "xterm", ...) or "rootfs" for the imported rootfs."""
    image: str
    """Full reference, e.g. localhost/streamspace/xterm:latest."""
    inputs_hash: str
    built: bool
    """False when the existing image already had the same inputs hash (cache hit)."""
    seconds: float


def image_ref(name: str) -> str:
    """The local reference of a StreamSpace image: localhost/streamspace/<name>:latest."""
    return f"{IMAGE_PREFIX}/{name}:latest"


def default_images_dir() -> Path:
    """The images/ folder of the source tree this package runs from."""
    return Path(__file__).resolve().parents[3] / "images"


def default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg) if xdg else Path.home() / ".cache"
    return root / "streamspace" / "images"


def available_images(images_dir: Path | None = None) -> list[str]:
    """Names of the image folders (those holding a Containerfile), base first."""
    root = images_dir or default_images_dir()
    if not root.is_dir():
        return []
    names = sorted(p.name for p in root.iterdir() if (p / "Containerfile").is_file())
    return sorted(names, key=lambda n: n != BASE)


@dataclass(frozen=True)
class Step:
    name: str
    parent: str | None
    context: Path | None


def _parent_of(containerfile: Path) -> str | None:
    """The StreamSpace image a Containerfile builds FROM (resolving `ARG X=...; FROM ${X}`)."""
    args: dict[str, str] = {}
    for raw in containerfile.read_text().splitlines():
        line = raw.strip()
        match = re.match(r"(?i)^ARG\s+(\w+)=(\S+)", line)
        if match:
            args[match.group(1)] = match.group(2).strip("\"'")
            continue
        match = re.match(r"(?i)^FROM\s+(\S+)", line)
        if match:
            ref = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), ""), match.group(1))
            prefix = IMAGE_PREFIX + "/"
            if ref.startswith(prefix):
                return ref[len(prefix) :].split(":", 1)[0]
            return None
    return None


def plan(names: Sequence[str], images_dir: Path) -> list[Step]:
    """The steps to build `names` and everything they are built FROM, parents first."""
    known = set(available_images(images_dir))
    ordered: list[Step] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in chain:
            raise ImageBuildError(f"images: FROM cycle {' -> '.join((*chain, name))}")
        if name == ROOTFS:
            seen.add(name)
            ordered.append(Step(ROOTFS, None, None))
            return
        if name not in known:
            choices = ", ".join(sorted(known)) or "none"
            raise ImageBuildError(f"no image named {name!r} in {images_dir} (available: {choices})")
        context = images_dir / name
        parent = _parent_of(context / "Containerfile")
        if parent is not None:
            visit(parent, (*chain, name))
        seen.add(name)
        ordered.append(Step(name, parent, context))

    for name in names:
        visit(name, ())
    return ordered


def context_hash(context: Path, parent_hash: str) -> str:
    digest = hashlib.sha256()
    digest.update(f"parent={parent_hash}\n".encode())
    for path in sorted(p for p in context.rglob("*") if p.is_file()):
        rel = path.relative_to(context).as_posix()
        digest.update(f"file={rel} mode={path.stat().st_mode & 0o111:o}\n".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:32]
