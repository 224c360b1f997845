"""Build StreamSpace's session images locally, without any registry.

The chain is: a Debian rootfs made with debootstrap and imported as
``localhost/streamspace/rootfs:latest`` -> ``images/base`` (Xvnc, window manager, user) ->
one image per app folder under ``images/`` (``xterm``, ``firefox``, ...), each tagged
``localhost/streamspace/<name>:latest``.

Every image carries the label ``org.streamspace.inputs-hash``: a hash of everything that went
into it (its folder's files, its parent's hash; for the rootfs the suite, mirror and recipe).
An image whose label matches is not built again, so a second ``build_images`` with no change
only inspects images and returns within a second or so.

Entry point for the CLI (``streamspace images build [--only NAME]``)::

    build_images(names, engine="podman", progress=print, force=False)
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from streamspace.images.catalog import (
    BASE,
    HASH_LABEL,
    IMAGE_PREFIX,
    ROOTFS,
    BuildResult,
    ImageBuildError,
    available_images,
    context_hash,
    default_cache_dir,
    default_images_dir,
    image_ref,
    plan,
)
from streamspace.images.engine import Engine, Progress, build_image, engine_env
from streamspace.images.rootfs import (
    DEFAULT_MIRROR,
    DEFAULT_SUITE,
    build_rootfs,
    detect_debian_mirror,
    rootfs_hash,
)

__all__ = [
    "BASE",
    "DEFAULT_MIRROR",
    "DEFAULT_SUITE",
    "HASH_LABEL",
    "IMAGE_PREFIX",
    "ROOTFS",
    "BuildResult",
    "ImageBuildError",
    "Progress",
    "available_images",
    "build_images",
    "default_cache_dir",
    "default_images_dir",
    "detect_debian_mirror",
    "image_ref",
]


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_images(
    names: Sequence[str] | None = None,
    engine: str = "podman",
    progress: Progress | None = None,
    force: bool = False,
    *,
    cache_dir: Path | None = None,
    images_dir: Path | None = None,
    suite: str = DEFAULT_SUITE,
    mirror: str | None = None,
    containers_conf: Path | None = None,
    verbose: bool = False,
) -> list[BuildResult]:
    """Build `names` (folders under images/; None or [] = all) and what they are built FROM.

    Blocking; meant for the CLI and test fixtures. Images whose inputs hash label matches are
    skipped unless force=True (which also re-runs debootstrap and bypasses layer caches).
    `progress` gets one human-readable line per step (and every build line with verbose).
    The rootfs tarball and build logs are kept under cache_dir
    (default ~/.cache/streamspace/images). `mirror` overrides the Debian mirror found in the
    host's apt sources; `containers_conf` the podman configuration (see engine_env).
    Raises ImageBuildError on any failure.
    """
    say: Progress = progress or (lambda _line: None)
    images_root = (images_dir or default_images_dir()).resolve()
    cache = (cache_dir or default_cache_dir()).resolve()
    wanted = list(names) if names else available_images(images_root)
    if not wanted:
        raise ImageBuildError(f"no images to build in {images_root}")
    steps = plan(wanted, images_root)
    detected_mirror, security = detect_debian_mirror(suite)
    deb_mirror = (mirror or detected_mirror).rstrip("/")
    eng = Engine(engine, engine_env(engine, containers_conf), cache / "logs", say)

    results: list[BuildResult] = []
    hashes: dict[str, str] = {}
    replaced: list[str] = []
    with _locked(cache):
        for step in steps:
            started = time.monotonic()
            if step.context is None:
                inputs_hash = rootfs_hash(suite, deb_mirror, security)
            else:
                parent_hash = hashes.get(step.parent or "", "")
                inputs_hash = context_hash(step.context, parent_hash)
            hashes[step.name] = inputs_hash
            ref = image_ref(step.name)
            existing = eng.image_info(ref)
            if existing is not None and existing[1] == inputs_hash and not force:
                say(f"[{step.name}] {ref} is up to date ({inputs_hash[:12]})")
                results.append(BuildResult(step.name, ref, inputs_hash, False, 0.0))
                continue
            reason = "forced" if force and existing else "inputs changed" if existing else "new"
            say(f"[{step.name}] building {ref} ({reason})")
            if step.context is None:
                build_rootfs(eng, cache, inputs_hash, suite, deb_mirror, security, force)
            else:
                build_image(eng, step, inputs_hash, force, verbose)
            built = eng.image_info(ref)
            if built is None or built[1] != inputs_hash:
                raise ImageBuildError(f"{ref} is missing its {HASH_LABEL} label after the build")
            if existing is not None and existing[0] != built[0]:
                replaced.append(existing[0])
            seconds = time.monotonic() - started
            say(f"[{step.name}] built {ref} in {seconds:.1f} s")
            results.append(BuildResult(step.name, ref, inputs_hash, True, seconds))
        # Children first, so a replaced parent is free once its replaced children are gone.
        for image_id in reversed(replaced):
            eng.remove_if_unused(image_id)
    return results
