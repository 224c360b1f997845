"""Run podman's Docker-compatible API service for the docker backend, its tests and CI.

Podman here needs a containers.conf that selects runc and lowers the default ulimits (the
defaults exceed the hard limits of sandboxed hosts, and crun does not work in them). This module
writes that file, starts `podman system service` on a unix socket in a directory of your choice
and stops it again.

From Python::

    service = start_podman_service(Path("/tmp/ss-podman"))
    client = docker.DockerClient(base_url=service.docker_host)
    ...
    service.stop()

From a shell (CI)::

    eval "$(python -m streamspace.podman start /tmp/ss-podman)"   # exports DOCKER_HOST, ...
    python -m streamspace.podman stop /tmp/ss-podman
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CONTAINERS_CONF = """\
# Written by streamspace.podman: runc plus ulimits below the host's hard limits.
[containers]
default_ulimits = ["nofile=1024:1024","nproc=4096:4096"]

[engine]
runtime = "runc"
"""

CONF_NAME = "containers.conf"
SOCKET_NAME = "podman.sock"
PID_NAME = "podman-service.pid"
LOG_NAME = "podman-service.log"

# Services started by this process, kept so they are waited for (no zombies, no warnings).
_children: dict[int, subprocess.Popen[bytes]] = {}


class PodmanError(RuntimeError):
    """podman is missing or its API service could not be started."""


def default_podman_dir() -> Path:
    """Where streamspace keeps its containers.conf (and socket) when not told otherwise."""
    from streamspace.config import get_settings

    return get_settings().data_dir / "podman"


def write_containers_conf(conf_dir: Path) -> Path:
    """Write the runc/ulimits containers.conf into conf_dir (idempotent) and return its path."""
    conf_dir.mkdir(parents=True, exist_ok=True)
    path = conf_dir / CONF_NAME
    if not path.exists() or path.read_text() != CONTAINERS_CONF:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(CONTAINERS_CONF)
        tmp.replace(path)
    return path


def podman_env(conf_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for podman CLI calls that uses the containers.conf in conf_dir."""
    env = dict(os.environ if base is None else base)
    env["CONTAINERS_CONF"] = str(write_containers_conf(conf_dir))
    return env


def socket_answers(path: Path) -> bool:
    """Whether a Docker-compatible API answers `GET /_ping` on the unix socket at path."""
    if not path.exists():
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            sock.connect(str(path))
            sock.sendall(b"GET /_ping HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n")
            data = sock.recv(64)
    except OSError:
        return False
    return data.startswith(b"HTTP/1.") and b" 200 " in data[:16]


@dataclass(frozen=True)
class PodmanService:
    """A running `podman system service`; stop() ends it (containers keep running)."""

    run_dir: Path
    conf_path: Path
    socket_path: Path
    pid: int

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket_path}"

    def env(self) -> dict[str, str]:
        return {"CONTAINERS_CONF": str(self.conf_path), "DOCKER_HOST": self.docker_host}

    def stop(self, timeout: float = 10.0) -> None:
        stop_podman_service(self.run_dir, timeout=timeout)


def _pid_alive(pid: int) -> bool:
    proc = _children.get(pid)
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(run_dir: Path) -> int | None:
    try:
        return int((run_dir / PID_NAME).read_text().strip())
    except (OSError, ValueError):
        return None


def _reap(pid: int) -> None:
    proc = _children.get(pid)
    if proc is not None:
        if proc.poll() is not None:
            del _children[pid]
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def start_podman_service(
    run_dir: Path,
    *,
    podman: str = "podman",
    timeout: float = 30.0,
    export: bool = True,
) -> PodmanService:
    """Start (or reuse) `podman system service --time=0` on run_dir/podman.sock.

    Writes run_dir/containers.conf, starts the service in its own session with that conf, waits
    until the socket answers /_ping and returns where it is. With export=True, CONTAINERS_CONF
    and DOCKER_HOST are also set in os.environ so podman CLI calls (image builds) and docker
    clients in this process use the same engine settings.
    """
    exe = shutil.which(podman)
    if exe is None:
        raise PodmanError(f"{podman} is not installed (apt-get install -y podman runc)")
    run_dir = run_dir.resolve()
    conf_path = write_containers_conf(run_dir)
    sock = run_dir / SOCKET_NAME
    old_pid = _read_pid(run_dir)
    if old_pid is not None and _pid_alive(old_pid) and socket_answers(sock):
        service = PodmanService(run_dir, conf_path, sock, old_pid)
    else:
        if old_pid is not None and _pid_alive(old_pid):
            stop_podman_service(run_dir)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        env = podman_env(run_dir)
        with (run_dir / LOG_NAME).open("ab") as log:
            proc = subprocess.Popen(
                [exe, "system", "service", "--time=0", f"unix://{sock}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        _children[proc.pid] = proc
        (run_dir / PID_NAME).write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + timeout
        while not socket_answers(sock):
            if proc.poll() is not None:
                raise PodmanError(
                    f"podman system service exited with {proc.returncode}: {_log_tail(run_dir)}"
                )
            if time.monotonic() > deadline:
                stop_podman_service(run_dir)
                raise PodmanError(
                    f"podman system service did not answer on {sock} within {timeout:.0f} s: "
                    f"{_log_tail(run_dir)}"
                )
            time.sleep(0.05)
        service = PodmanService(run_dir, conf_path, sock, proc.pid)
    if export:
        os.environ.update(service.env())
    return service


def stop_podman_service(run_dir: Path, *, timeout: float = 10.0) -> bool:
    """Stop the service started in run_dir (by its pid file); True if one was running."""
    run_dir = run_dir.resolve()
    pid = _read_pid(run_dir)
    stopped = False
    if pid is not None and _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.05)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _reap(pid)
        stopped = True
    if pid is not None:
        _children.pop(pid, None)
    for name in (PID_NAME, SOCKET_NAME):
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()
    return stopped


def _log_tail(run_dir: Path, lines: int = 15) -> str:
    try:
        text = (run_dir / LOG_NAME).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m streamspace.podman",
        description="Start/stop podman's Docker-compatible API service for StreamSpace.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    start = sub.add_parser("start", help="start the service; prints shell exports to eval")
    start.add_argument("run_dir", type=Path)
    start.add_argument("--timeout", type=float, default=30.0)
    stop = sub.add_parser("stop", help="stop the service started in run_dir")
    stop.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    if args.action == "start":
        try:
            service = start_podman_service(args.run_dir, timeout=args.timeout, export=False)
        except PodmanError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for key, value in service.env().items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    stop_podman_service(args.run_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
