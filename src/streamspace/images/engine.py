"""The container engine (podman, or docker) as the builds call it: inspect, build with the
output logged, remove."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import deque
from collections.abc import Callable
from pathlib import Path

from streamspace.images.catalog import HASH_LABEL, ImageBuildError, Step, image_ref

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


class Engine:
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


def engine_env(engine: str, containers_conf: Path | None) -> dict[str, str]:
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


def build_image(eng: Engine, step: Step, inputs_hash: str, force: bool, verbose: bool) -> None:
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
