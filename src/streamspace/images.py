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
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

IMAGE_PREFIX = "localhost/streamspace"
ROOTFS = "rootfs"
BASE = "base"
HASH_LABEL = "org.streamspace.inputs-hash"
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

Progress = Callable[[str], None]

# Build output lines worth showing without verbose: build steps and debootstrap's phases.
_PROGRESS_PREFIXES = (
    "STEP ",
    "Step ",
    "I: Retrieving InRelease",
    "I: Resolving dependencies of base",
    "I: Installing core packages",
    "I: Unpacking the base system",
    "I: Configuring the base system",
    "I: Base system installed",
)


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
    return Path(__file__).resolve().parents[2] / "images"


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


# ---- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
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


def _plan(names: Sequence[str], images_dir: Path) -> list[_Step]:
    """The steps to build `names` and everything they are built FROM, parents first."""
    known = set(available_images(images_dir))
    ordered: list[_Step] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in chain:
            raise ImageBuildError(f"images: FROM cycle {' -> '.join((*chain, name))}")
        if name == ROOTFS:
            seen.add(name)
            ordered.append(_Step(ROOTFS, None, None))
            return
        if name not in known:
            choices = ", ".join(sorted(known)) or "none"
            raise ImageBuildError(f"no image named {name!r} in {images_dir} (available: {choices})")
        context = images_dir / name
        parent = _parent_of(context / "Containerfile")
        if parent is not None:
            visit(parent, (*chain, name))
        seen.add(name)
        ordered.append(_Step(name, parent, context))

    for name in names:
        visit(name, ())
    return ordered


def _context_hash(context: Path, parent_hash: str) -> str:
    digest = hashlib.sha256()
    digest.update(f"parent={parent_hash}\n".encode())
    for path in sorted(p for p in context.rglob("*") if p.is_file()):
        rel = path.relative_to(context).as_posix()
        digest.update(f"file={rel} mode={path.stat().st_mode & 0o111:o}\n".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:32]


def _rootfs_hash(suite: str, mirror: str, security: str | None) -> str:
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


# ---- engine calls --------------------------------------------------------------------------


class _Engine:
    def __init__(self, engine: str, env: dict[str, str], log_dir: Path, progress: Progress):
        exe = shutil.which(engine)
        if exe is None:
            raise ImageBuildError(
                f"container engine {engine!r} not found; "
                "install it (apt-get install -y podman runc)"
            )
        self.exe = exe
        self.is_podman = Path(exe).name.startswith("podman")
        self.env = env
        self.log_dir = log_dir
        self.progress = progress

    def image_info(self, ref: str) -> tuple[str, str] | None:
        """(image id, inputs-hash label) of a local image, or None if it does not exist."""
        proc = subprocess.run(
            [self.exe, "image", "inspect", ref],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            return None
        try:
            data = json.loads(proc.stdout)[0]
        except (ValueError, IndexError, KeyError):
            return None
        labels = data.get("Labels") or (data.get("Config") or {}).get("Labels") or {}
        return str(data.get("Id", "")), str(labels.get(HASH_LABEL, ""))

    def run_logged(self, what: str, argv: list[str], log_name: str, echo: bool) -> None:
        """Run argv, teeing its output into log_dir/log_name; forward STEP lines to progress."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / log_name
        tail: deque[str] = deque(maxlen=30)
        with log_path.open("w") as log:
            log.write("$ " + " ".join(argv) + "\n")
            log.flush()
            proc = subprocess.Popen(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                text = line.rstrip()
                tail.append(text)
                if echo or text.startswith(_PROGRESS_PREFIXES):
                    self.progress(f"  {text}")
            code = proc.wait()
        if code != 0:
            detail = "\n".join(tail)
            raise ImageBuildError(f"{what} failed (exit {code}); full log {log_path}:\n{detail}")

    def remove_if_unused(self, image_id: str) -> None:
        """Drop an image a rebuild replaced; fails quietly if a container or child uses it."""
        subprocess.run(
            [self.exe, "image", "rm", image_id],
            env=self.env,
            capture_output=True,
            check=False,
        )


def _engine_env(engine: str, containers_conf: Path | None) -> dict[str, str]:
    """The engine's environment: for podman, a containers.conf that works on this host.

    An explicit `containers_conf` wins, then $CONTAINERS_CONF; otherwise, when runc is
    installed, streamspace's own runc/ulimits conf (see streamspace.podman) is written and used.
    """
    env = dict(os.environ)
    if not Path(engine).name.startswith("podman"):
        return env
    if containers_conf is not None:
        env["CONTAINERS_CONF"] = str(containers_conf)
    elif "CONTAINERS_CONF" not in env and shutil.which("runc") is not None:
        from streamspace.podman import default_podman_dir, podman_env

        env = podman_env(default_podman_dir(), env)
    return env


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---- the builds ----------------------------------------------------------------------------


def _build_rootfs(
    eng: _Engine,
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


def _build_image(eng: _Engine, step: _Step, inputs_hash: str, force: bool, verbose: bool) -> None:
    assert step.context is not None
    argv = [eng.exe, "build"]
    if eng.is_podman:
        argv += ["--pull=never", "--layers"]
    if force:
        argv.append("--no-cache")
    argv += [
        "--label",
        f"{HASH_LABEL}={inputs_hash}",
        "--label",
        f"org.streamspace.image={step.name}",
        "-t",
        image_ref(step.name),
        "-f",
        str(step.context / "Containerfile"),
        str(step.context),
    ]
    eng.run_logged(f"build of {image_ref(step.name)}", argv, f"{step.name}-build.log", verbose)


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
    host's apt sources; `containers_conf` the podman configuration (see _engine_env).
    Raises ImageBuildError on any failure.
    """
    say: Progress = progress or (lambda _line: None)
    images_root = (images_dir or default_images_dir()).resolve()
    cache = (cache_dir or default_cache_dir()).resolve()
    wanted = list(names) if names else available_images(images_root)
    if not wanted:
        raise ImageBuildError(f"no images to build in {images_root}")
    steps = _plan(wanted, images_root)
    detected_mirror, security = detect_debian_mirror(suite)
    deb_mirror = (mirror or detected_mirror).rstrip("/")
    eng = _Engine(engine, _engine_env(engine, containers_conf), cache / "logs", say)

    results: list[BuildResult] = []
    hashes: dict[str, str] = {}
    replaced: list[str] = []
    with _locked(cache):
        for step in steps:
            started = time.monotonic()
            if step.context is None:
                inputs_hash = _rootfs_hash(suite, deb_mirror, security)
            else:
                parent_hash = hashes.get(step.parent or "", "")
                inputs_hash = _context_hash(step.context, parent_hash)
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
                _build_rootfs(eng, cache, inputs_hash, suite, deb_mirror, security, force)
            else:
                _build_image(eng, step, inputs_hash, force, verbose)
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
