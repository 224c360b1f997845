"""The sandbox of a non-root agent (`userns-sandbox`), run for real as an unprivileged user.

The agent here is uid 65534: it cannot switch users, so its sessions share its uid, and the
user namespace, mount namespace and dropped capabilities are what keep them from the agent's
files and from the host. The exact argv the backend would run is built by the same pure
builder (`userns_sandbox_argv`) and executed with bubblewrap as that user.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamspace.agent.backends.local.sandbox import (
    SandboxFds,
    group_text,
    passwd_text,
    userns_sandbox_argv,
)
from streamspace.agent.backends.local.spawn import host_system_dirs

NOBODY = 65534

if os.geteuid() != 0 or shutil.which("bwrap") is None or shutil.which("setpriv") is None:
    pytest.skip(
        "needs root (to become the unprivileged agent), bwrap and setpriv", allow_module_level=True
    )


@pytest.fixture
def agent_dirs() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="ss-userns-", dir="/tmp"))
    base.chmod(0o755)
    for name in ("home", "run"):
        (base / name).mkdir(mode=0o700)
        os.chown(base / name, NOBODY, NOBODY)
    secret = base / "agent.json"
    secret.write_text('{"credential": "agent-secret-credential"}')
    os.chown(secret, NOBODY, NOBODY)
    secret.chmod(0o600)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_sandboxed(base: Path, script: str, *, network: bool = False) -> tuple[int, str]:
    def memfd(data: str) -> int:
        fd = os.memfd_create("data", 0)
        os.write(fd, data.encode())
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    home = os.open(base / "home", os.O_PATH | os.O_DIRECTORY)
    run = os.open(base / "run", os.O_PATH | os.O_DIRECTORY)
    init = memfd('#!/bin/sh\nexec "$@"\n')
    passwd = memfd(passwd_text("streamspace", NOBODY, NOBODY, "/bin/sh"))
    group = memfd(group_text("streamspace", NOBODY))
    info_r, info_w = os.pipe()
    fds = SandboxFds(home, run, init, passwd, group, info_w)
    env = {"HOME": "/home/streamspace", "PATH": "/usr/bin:/bin", "STREAMSPACE_SESSION_ID": "s-1"}
    argv = userns_sandbox_argv("bwrap", fds, host_system_dirs(), env, network=network)
    as_agent = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    opened = (home, run, init, passwd, group, info_w)
    try:
        done = subprocess.run(
            [*as_agent, *argv, "/bin/sh", "-c", script],
            pass_fds=opened,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        for fd in opened:
            os.close(fd)
    info = json.loads(os.read(info_r, 4096) or b"{}")
    os.close(info_r)
    assert "child-pid" in info  # the agent learns the sandbox's PID 1
    return done.returncode, done.stdout


def test_session_runs_without_capabilities_and_cannot_gain_any(agent_dirs: Path) -> None:
    rc, out = run_sandboxed(
        agent_dirs,
        "id -u; grep -E '^(CapEff|CapPrm|CapBnd)' /proc/self/status; "
        "unshare --user --map-root-user true && echo NESTED-USERNS; "
        "mount -o remount,bind,rw /etc && echo REMOUNTED; true",
    )
    assert rc == 0, out
    lines = out.splitlines()
    assert lines[0] == str(NOBODY)  # the agent's own uid, which is all it has
    assert "CapEff:\t0000000000000000" in lines and "CapPrm:\t0000000000000000" in lines
    assert "NESTED-USERNS" not in out and "REMOUNTED" not in out


def test_agent_files_and_host_are_out_of_reach(agent_dirs: Path) -> None:
    secret = agent_dirs / "agent.json"
    _, out = run_sandboxed(
        agent_dirs,
        f"cat {secret}; ls /home; touch /usr/pwned; echo hi > /home/streamspace/mine && cat "
        "/home/streamspace/mine; ls /proc | grep -c '^[0-9]'",
    )
    assert "agent-secret-credential" not in out  # same uid, but not in this mount namespace
    assert "No such file or directory" in out
    assert "Read-only file system" in out
    lines = out.splitlines()
    assert "streamspace" in lines and "hi" in lines
    assert int(lines[-1]) <= 3  # its own PID namespace: only its own few processes
    assert (agent_dirs / "home" / "mine").read_text() == "hi\n"


def test_no_network_unless_the_template_asks(agent_dirs: Path) -> None:
    _, isolated = run_sandboxed(agent_dirs, "cat /proc/net/dev | tail -n +3 | cut -d: -f1")
    assert [line.strip() for line in isolated.splitlines()] == ["lo"]
    _, shared = run_sandboxed(
        agent_dirs, "cat /proc/net/dev | tail -n +3 | cut -d: -f1", network=True
    )
    assert len(shared.splitlines()) > 1
