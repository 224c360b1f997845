"""LocalBackend end to end: real Xvnc + xterm sessions, watched through the RFB client.

Orphan checks scan /proc independently of the backend's own bookkeeping, so a leak in that
bookkeeping cannot hide itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from streamspace.agent.backends.base import BackendError
from streamspace.agent.backends.local import SESSION_ENV_MARKER, LocalBackend
from streamspace.protocol import CatalogEntry, Endpoint, ImageLaunch, LocalLaunch, SessionSpec
from streamspace.rfb import RFBClient

if shutil.which("Xvnc") is None or shutil.which("xterm") is None:
    pytest.skip(
        "LocalBackend integration tests need TigerVNC `Xvnc` and `xterm` on PATH",
        allow_module_level=True,
    )

pytestmark = pytest.mark.xvnc

# Away from the defaults so a developer's own agent on this host is not disturbed.
DISPLAY_BASE = 240
PORT_BASE = 17240


# ---- helpers ------------------------------------------------------------------------------


def new_spec(command: list[str] | None = None, *, user: str = "alice") -> SessionSpec:
    return SessionSpec(
        session_id=f"t-{uuid.uuid4().hex[:10]}",
        user=user,
        template="xterm",
        local=LocalLaunch(command=command or ["xterm"]),
    )


def _stat(pid: str) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def session_pids(session_id: str) -> list[int]:
    """Live (non-zombie) processes carrying the session marker in their environment."""
    needle = f"{SESSION_ENV_MARKER}={session_id}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes()
        except OSError:
            continue
        stat = _stat(name)
        if needle in environ.split(b"\0") and stat is not None and stat[0] != "Z":
            found.append(int(name))
    return found


def xvnc_pids(display: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        stat = _stat(name)
        if (
            argv
            and argv[0].endswith(b"Xvnc")
            and f":{display}".encode() in argv
            and stat is not None
            and stat[0] != "Z"
        ):
            found.append(int(name))
    return found


def port_listening(port: int) -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def record(backend: LocalBackend, session_id: str) -> dict[str, object]:
    data = json.loads((backend.state_dir / "sessions" / f"{session_id}.json").read_text())
    assert isinstance(data, dict)
    return data


def assert_gone(session_id: str, display: int, port: int) -> None:
    """No process, display or port of the session is left."""
    assert session_pids(session_id) == []
    assert xvnc_pids(display) == []
    assert not port_listening(port)
    assert not Path(f"/tmp/.X{display}-lock").exists()
    assert not Path(f"/tmp/.X11-unix/X{display}").exists()


async def nonblank_client(endpoint: Endpoint, timeout: float = 15.0) -> RFBClient:
    async with asyncio.timeout(timeout):
        client = await RFBClient.open(endpoint.host, endpoint.port)
    await client.request_update(incremental=False, timeout=timeout)
    assert await client.wait_for(RFBClient.framebuffer_nonblank, timeout=timeout)
    return client


async def type_and_see_change(client: RFBClient, text: str) -> None:
    before = client.framebuffer_digest()
    # Without a window manager focus follows the pointer: put it over the xterm window.
    await client.pointer(20, 20)
    await client.type_text(text)
    assert await client.wait_for_change(before, timeout=10), "typing did not change the screen"


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    be = LocalBackend(tmp_path / "state", display_base=DISPLAY_BASE, port_base=PORT_BASE)
    yield be
    await be.remove_unknown(set())
    await be.close()


# ---- tests --------------------------------------------------------------------------------


async def test_start_stream_type_and_stop(backend: LocalBackend) -> None:
    spec = new_spec()
    started = time.monotonic()
    endpoint = await backend.start(spec)
    client = await nonblank_client(endpoint)
    first_frame = time.monotonic() - started
    print(f"\nxterm start -> first non-blank framebuffer: {first_frame:.3f}s")
    assert endpoint.host == "127.0.0.1"
    assert client.name == "xterm (alice)"
    assert (client.width, client.height) == (spec.display.width, spec.display.height)

    await type_and_see_change(client, "echo hello\n")

    assert await backend.start(spec) == endpoint  # idempotent
    status = await backend.status(spec.session_id)
    assert status.state == "running"
    assert status.endpoint == endpoint
    assert (status.user, status.template) == ("alice", "xterm")

    rec = record(backend, spec.session_id)
    display, port = rec["display"], rec["port"]
    assert isinstance(display, int) and isinstance(port, int)
    assert port == endpoint.port
    home = backend.home_for(spec)
    assert home == backend.state_dir / "homes" / "alice" / "xterm"
    assert home.stat().st_mode & 0o777 == 0o700
    app_pid = rec["app_pid"]
    assert isinstance(app_pid, int)
    environ = Path(f"/proc/{app_pid}/environ").read_bytes().split(b"\0")
    assert f"HOME={home}".encode() in environ
    assert f"DISPLAY=:{display}".encode() in environ

    await client.close()
    await backend.stop(spec.session_id)
    assert_gone(spec.session_id, display, port)
    assert not backend.run_dir(spec.session_id).exists()
    assert home.is_dir()  # the persistent home outlives the session
    assert (await backend.status(spec.session_id)).state == "stopped"
    assert await backend.inventory() == []
    await backend.stop(spec.session_id)  # idempotent


async def test_hibernate_keeps_home_and_wake_restores(backend: LocalBackend) -> None:
    spec = new_spec()
    await backend.start(spec)
    rec = record(backend, spec.session_id)
    display, port = rec["display"], rec["port"]
    assert isinstance(display, int) and isinstance(port, int)
    note = backend.home_for(spec) / "note.txt"
    note.write_text("kept across hibernation")

    await backend.hibernate(spec.session_id)
    assert_gone(spec.session_id, display, port)
    assert note.read_text() == "kept across hibernation"
    status = await backend.status(spec.session_id)
    assert (status.state, status.endpoint) == ("hibernated", None)
    assert record(backend, spec.session_id)["state"] == "hibernated"
    assert [i.state for i in await backend.inventory()] == ["hibernated"]
    await backend.hibernate(spec.session_id)  # idempotent

    woken = await backend.wake(spec)
    assert (await backend.status(spec.session_id)).endpoint == woken
    woken_display = record(backend, spec.session_id)["display"]
    assert isinstance(woken_display, int)
    client = await nonblank_client(woken)
    await type_and_see_change(client, "cat note.txt\n")
    await client.close()
    assert note.read_text() == "kept across hibernation"

    assert await backend.remove_unknown({"some-other-session"}) == [spec.session_id]
    assert_gone(spec.session_id, woken_display, woken.port)
    assert note.exists()


async def test_hibernate_unknown_session_is_an_error(backend: LocalBackend) -> None:
    with pytest.raises(BackendError, match="not known"):
        await backend.hibernate("never-started")
    assert (await backend.status("never-started")).state == "unknown"


async def test_killed_xvnc_is_reported_exited(tmp_path: Path) -> None:
    reports: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    async def on_exit(session_id: str, reason: str) -> None:
        await reports.put((session_id, reason))

    be = LocalBackend(
        tmp_path / "state",
        display_base=DISPLAY_BASE,
        port_base=PORT_BASE,
        on_exit=on_exit,
        poll_interval=0.2,
    )
    await be.start_monitor()
    try:
        spec = new_spec()
        endpoint = await be.start(spec)
        rec = record(be, spec.session_id)
        display, xvnc_pid = rec["display"], rec["xvnc_pid"]
        assert isinstance(display, int) and isinstance(xvnc_pid, int)

        os.kill(xvnc_pid, signal.SIGKILL)  # behind the backend's back
        session_id, reason = await asyncio.wait_for(reports.get(), 10)
        assert session_id == spec.session_id
        assert reason == "display server was killed by signal 9"

        status = await be.status(spec.session_id)
        assert (status.state, status.endpoint) == ("exited", None)
        assert record(be, spec.session_id)["state"] == "exited"
        # The app lost its display and was cleaned up with it.
        assert session_pids(spec.session_id) == []
        assert reports.empty()  # reported once

        await be.stop(spec.session_id)
        assert_gone(spec.session_id, display, endpoint.port)
        assert await be.inventory() == []
    finally:
        await be.remove_unknown(set())
        await be.close()


async def test_app_exit_reason_carries_stderr(tmp_path: Path) -> None:
    reports: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    async def on_exit(session_id: str, reason: str) -> None:
        await reports.put((session_id, reason))

    be = LocalBackend(
        tmp_path / "state", display_base=DISPLAY_BASE, port_base=PORT_BASE, poll_interval=0.2
    )
    await be.start_monitor(on_exit)  # the agent runtime's way of passing the callback
    try:
        spec = new_spec(["sh", "-c", "sleep 0.3; echo 'cannot open profile' >&2; exit 3"])
        endpoint = await be.start(spec)
        _, reason = await asyncio.wait_for(reports.get(), 10)
        assert reason == "app exited with code 3: cannot open profile"
        assert (await be.status(spec.session_id)).state == "exited"
        assert not port_listening(endpoint.port)  # Xvnc went down with the app
        # Starting an exited session runs it afresh.
        again = await be.start(spec)
        assert (await be.status(spec.session_id)).state == "running"
        await be.stop(spec.session_id)
        assert not port_listening(again.port)
    finally:
        await be.remove_unknown(set())
        await be.close()


_RESTART_SCRIPT = """
import asyncio, sys
from pathlib import Path
from streamspace.agent.backends.local import LocalBackend
from streamspace.protocol import LocalLaunch, SessionSpec

async def main() -> None:
    backend = LocalBackend(Path(sys.argv[1]), display_base=int(sys.argv[3]),
                           port_base=int(sys.argv[4]))
    spec = SessionSpec(session_id=sys.argv[2], user="bob", template="xterm",
                       local=LocalLaunch(command=["xterm"]))
    print((await backend.start(spec)).model_dump_json())

asyncio.run(main())
"""


async def test_sessions_survive_agent_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    session_id = f"t-{uuid.uuid4().hex[:10]}"
    # A separate "agent" process starts the session and exits, as an agent crash would.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _RESTART_SCRIPT,
        str(state),
        session_id,
        str(DISPLAY_BASE),
        str(PORT_BASE),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    endpoint = Endpoint.model_validate_json(out)

    be = LocalBackend(state, display_base=DISPLAY_BASE, port_base=PORT_BASE)
    try:
        items = await be.inventory()
        assert [(i.session_id, i.state, i.endpoint) for i in items] == [
            (session_id, "running", endpoint)
        ]
        assert items[0].user == "bob"
        spec = SessionSpec(
            session_id=session_id,
            user="bob",
            template="xterm",
            local=LocalLaunch(command=["xterm"]),
        )
        assert await be.start(spec) == endpoint  # adopted, not restarted
        client = await nonblank_client(endpoint)
        await client.close()

        display = record(be, session_id)["display"]
        assert isinstance(display, int)
        await be.stop(session_id)
        assert_gone(session_id, display, endpoint.port)
    finally:
        await be.remove_unknown(set())
        await be.close()


async def test_concurrent_starts_get_distinct_displays(backend: LocalBackend) -> None:
    specs = [new_spec(user="carol"), new_spec(user="dave")]
    endpoints = await asyncio.gather(*(backend.start(s) for s in specs))
    assert len({e.port for e in endpoints}) == 2
    displays = {record(backend, s.session_id)["display"] for s in specs}
    assert len(displays) == 2
    clients = await asyncio.gather(*(nonblank_client(e) for e in endpoints))
    for client in clients:
        await client.close()
    for spec in specs:
        await backend.stop(spec.session_id)
    assert await backend.inventory() == []


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap (bwrap)")
async def test_sandboxed_xterm(tmp_path: Path) -> None:
    be = LocalBackend(
        tmp_path / "state", sandbox=True, display_base=DISPLAY_BASE, port_base=PORT_BASE
    )
    try:
        spec = new_spec()
        endpoint = await be.start(spec)
        client = await nonblank_client(endpoint)
        await type_and_see_change(client, "echo sandboxed\n")
        await client.close()

        xterms = [
            pid
            for pid in session_pids(spec.session_id)
            if Path(f"/proc/{pid}/exe").resolve().name == "xterm"
        ]
        assert len(xterms) == 1
        # It runs in its own pid and network namespaces.
        for ns in ("pid", "net"):
            assert os.readlink(f"/proc/{xterms[0]}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")

        display = record(be, spec.session_id)["display"]
        assert isinstance(display, int)
        await be.stop(spec.session_id)
        assert_gone(spec.session_id, display, endpoint.port)
    finally:
        await be.remove_unknown(set())
        await be.close()


async def test_start_fails_clearly_for_missing_command(backend: LocalBackend) -> None:
    spec = new_spec(["definitely-not-installed-streamspace"])
    with pytest.raises(BackendError, match="not installed on this host"):
        await backend.start(spec)
    assert (await backend.status(spec.session_id)).state == "unknown"
    assert session_pids(spec.session_id) == []


async def test_escaped_and_stubborn_processes_are_cleaned_up(tmp_path: Path) -> None:
    be = LocalBackend(
        tmp_path / "state", display_base=DISPLAY_BASE, port_base=PORT_BASE, stop_timeout=0.5
    )
    try:
        # A daemon that leaves the process group and session, plus a main process that
        # ignores SIGTERM (and passes that on to its child): only SIGKILL ends this one.
        script = "(setsid sleep 300 &); trap '' TERM; sleep 300; sleep 300"
        spec = new_spec(["sh", "-c", script])
        endpoint = await be.start(spec)
        display = record(be, spec.session_id)["display"]
        assert isinstance(display, int)
        deadline = time.monotonic() + 5
        while len(session_pids(spec.session_id)) < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # Xvnc, reaper, sh, its sleep and the setsid'd sleep.
        assert len(session_pids(spec.session_id)) >= 5

        started = time.monotonic()
        await be.stop(spec.session_id)
        assert time.monotonic() - started < 5
        assert_gone(spec.session_id, display, endpoint.port)
    finally:
        await be.remove_unknown(set())
        await be.close()


async def test_xvnc_failure_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    attempts = tmp_path / "attempts"
    fake = fake_bin / "Xvnc"
    fake.write_text(
        f"#!/bin/sh\necho attempt >> {attempts}\necho 'Fatal: no screens' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    be = LocalBackend(tmp_path / "state", display_base=DISPLAY_BASE, port_base=PORT_BASE)
    spec = new_spec()
    with pytest.raises(BackendError, match="Fatal: no screens"):
        await be.start(spec)
    assert len(attempts.read_text().splitlines()) == 3  # retried on other displays first
    assert (await be.status(spec.session_id)).state == "unknown"
    assert not be.run_dir(spec.session_id).exists()
    assert session_pids(spec.session_id) == []
    await be.close()


def test_runnable_templates(tmp_path: Path) -> None:
    be = LocalBackend(tmp_path / "state")
    catalog = [
        CatalogEntry(name="xterm", local=LocalLaunch(command=["xterm"])),
        CatalogEntry(name="ghost", local=LocalLaunch(command=["definitely-not-installed-x"])),
        CatalogEntry(name="container-only", image=ImageLaunch(image="example/app")),
    ]
    assert be.runnable_templates(catalog) == ["xterm"]


def test_path_traversal_in_names_is_refused(tmp_path: Path) -> None:
    be = LocalBackend(tmp_path / "state")
    spec = new_spec().model_copy(update={"user": "../../etc"})
    with pytest.raises(BackendError, match="invalid user"):
        be.home_for(spec)
