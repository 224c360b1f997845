"""LocalBackend end to end: real Xvnc + xterm sessions in real sandboxes, watched over RFB.

Process checks scan /proc independently of the backend's own bookkeeping (tests/vnc_support),
so a leak in that bookkeeping cannot hide itself. The agent here is root, so sessions run in
the uid sandbox: their own uid, bubblewrap, a PID namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from streamspace.agent.backends.base import BackendError
from streamspace.agent.backends.local import LocalBackend
from streamspace.protocol import CatalogEntry, ImageLaunch, LocalLaunch, SessionSpec
from streamspace_testing.rfb import RFBClient
from vnc_support import session_pids, session_processes, vnc_socket, xvnc_processes

if shutil.which("Xvnc") is None or shutil.which("xterm") is None:
    pytest.skip(
        "LocalBackend integration tests need TigerVNC `Xvnc` and `xterm` on PATH",
        allow_module_level=True,
    )
if os.geteuid() != 0:
    pytest.skip("these tests exercise the root agent's uid sandbox", allow_module_level=True)

pytestmark = pytest.mark.xvnc

XTERM = ["xterm", "-geometry", "120x40+0+0"]
DISPLAY_BASE = 240


# ---- helpers ------------------------------------------------------------------------------


def new_spec(
    command: list[str] | None = None,
    *,
    user: str = "alice",
    user_id: str | None = None,
    **fields: object,
) -> SessionSpec:
    return SessionSpec(
        session_id=f"t-{uuid.uuid4().hex[:10]}",
        user_id=user_id or uuid.uuid4().hex,
        user=user,
        template="xterm",
        local=LocalLaunch(command=command or XTERM),
        **fields,  # type: ignore[arg-type]
    )


async def app_processes(session_id: str, name: str = "xterm") -> list[psutil.Process]:
    """The session's app: it starts a moment after the display is ready (once the session's
    sound server listens), so after `start` returns it may still be on its way."""
    for _ in range(150):
        found = []
        for proc in session_processes(session_id):
            with contextlib.suppress(psutil.Error):  # the wait loop's `sleep`s come and go
                if proc.name() == name:
                    found.append(proc)
        if found:
            return found
        await asyncio.sleep(0.02)
    return []


def record(backend: LocalBackend, session_id: str) -> dict[str, object]:
    data = json.loads((backend.state_dir / "sessions" / f"{session_id}.json").read_text())
    assert isinstance(data, dict)
    return data


async def viewer(backend: LocalBackend, session_id: str, timeout: float = 15.0) -> RFBClient:
    """A client through the backend's own VNC connection, with the screen drawn."""
    reader, writer = await backend.open_vnc(session_id)
    async with asyncio.timeout(timeout):
        client = await RFBClient.from_streams(reader, writer)
    await client.request_update(incremental=False, timeout=timeout)
    assert await client.wait_for(RFBClient.framebuffer_nonblank, timeout=timeout)
    return client


async def type_and_see_change(client: RFBClient, text: str) -> None:
    before = client.framebuffer_digest()
    # Without a window manager focus follows the pointer: put it over the xterm window.
    await client.pointer(20, 20)
    await client.type_text(text)
    assert await client.wait_for_change(before, timeout=10), "typing did not change the screen"


async def wait_for_file(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().endswith("END\n"):
            return path.read_text()
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path} was not written within {timeout}s")


def assert_gone(backend: LocalBackend, session_id: str) -> None:
    assert session_pids(session_id) == []
    assert not backend.run_dir(session_id).exists()
    assert not list((Path("/sys/fs/cgroup/memory")).glob(f"**/streamspace-{session_id}"))


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    be = LocalBackend(tmp_path / "state", display_base=DISPLAY_BASE)
    yield be
    await be.remove_unknown(set())
    await be.close()


# ---- lifecycle ----------------------------------------------------------------------------


async def test_start_stream_type_and_stop(backend: LocalBackend) -> None:
    spec = new_spec()
    started = time.monotonic()
    endpoint = await backend.start(spec)
    client = await viewer(backend, spec.session_id)
    print(f"\nxterm start -> first non-blank framebuffer: {time.monotonic() - started:.3f}s")
    assert endpoint.unix_path == str(vnc_socket(backend.state_dir, spec.session_id))
    assert endpoint.port is None
    assert client.name == "xterm (alice)"
    assert (client.width, client.height) == (spec.display.width, spec.display.height)

    home = backend.home_for(spec)
    await type_and_see_change(client, "id -u > ~/out; echo END >> ~/out\n")
    uid = int((await wait_for_file(home / "out")).split()[0])
    assert uid == record(backend, spec.session_id)["uid"]
    assert uid not in (0, os.getuid())

    assert await backend.start(spec) == endpoint  # idempotent
    status = await backend.status(spec.session_id)
    assert (status.state, status.endpoint) == ("running", endpoint)
    assert (status.user, status.template) == ("alice", "xterm")

    assert home == backend.state_dir / "homes" / spec.user_id / "xterm"
    for path in (home, home.parent):
        st = path.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (uid, uid, 0o700)
    app = await app_processes(spec.session_id)
    assert len(app) == 1
    assert app[0].uids().real == uid
    assert app[0].environ()["HOME"] == "/home/streamspace"

    await client.close()
    await backend.stop(spec.session_id)
    assert_gone(backend, spec.session_id)
    assert (home / "out").exists()  # the persistent home outlives the session
    assert (await backend.status(spec.session_id)).state == "stopped"
    assert await backend.inventory() == []
    await backend.stop(spec.session_id)  # idempotent


async def test_hibernate_keeps_home_and_wake_restores(backend: LocalBackend) -> None:
    spec = new_spec()
    await backend.start(spec)
    note = backend.home_for(spec) / "note.txt"
    note.write_text("kept across hibernation")

    await backend.hibernate(spec.session_id)
    assert session_pids(spec.session_id) == []
    assert note.read_text() == "kept across hibernation"
    status = await backend.status(spec.session_id)
    assert (status.state, status.endpoint) == ("hibernated", None)
    assert record(backend, spec.session_id)["state"] == "hibernated"
    assert [i.state for i in await backend.inventory()] == ["hibernated"]
    await backend.hibernate(spec.session_id)  # idempotent

    woken = await backend.wake(spec)
    assert (await backend.status(spec.session_id)).endpoint == woken
    client = await viewer(backend, spec.session_id)
    await type_and_see_change(client, "cat note.txt\n")
    await client.close()

    assert await backend.remove_unknown({"some-other-session"}) == [spec.session_id]
    assert_gone(backend, spec.session_id)
    assert note.exists()


async def test_hibernate_unknown_session_is_an_error(backend: LocalBackend) -> None:
    with pytest.raises(BackendError, match="not known"):
        await backend.hibernate("never-started")
    assert (await backend.status("never-started")).state == "unknown"


async def test_same_user_same_uid_other_user_other_uid(backend: LocalBackend) -> None:
    alice = uuid.uuid4().hex
    specs = [new_spec(user_id=alice), new_spec(user_id=alice), new_spec(user="bob")]
    await asyncio.gather(*(backend.start(s) for s in specs))
    uids = [record(backend, s.session_id)["uid"] for s in specs]
    assert uids[0] == uids[1] != uids[2]
    clients = await asyncio.gather(*(viewer(backend, s.session_id) for s in specs))
    for client in clients:
        await client.close()
    # A new backend on the same state dir (an agent restart) keeps the allocation.
    again = LocalBackend(backend.state_dir)
    assert again.identities.known(alice) == uids[0]


async def test_killed_xvnc_is_reported_exited(tmp_path: Path) -> None:
    reports: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    async def on_exit(session_id: str, reason: str) -> None:
        await reports.put((session_id, reason))

    be = LocalBackend(tmp_path / "state", poll_interval=0.2)
    await be.watch_exits(on_exit)
    try:
        spec = new_spec()
        await be.start(spec)
        (xvnc,) = xvnc_processes(spec.session_id)
        os.kill(xvnc.pid, signal.SIGKILL)  # behind the backend's back
        session_id, reason = await asyncio.wait_for(reports.get(), 10)
        assert session_id == spec.session_id
        assert reason == "display server exited"
        status = await be.status(spec.session_id)
        assert (status.state, status.endpoint) == ("exited", None)
        assert record(be, spec.session_id)["state"] == "exited"
        assert session_pids(spec.session_id) == []  # the app went down with its display
        assert reports.empty()  # reported once
        await be.stop(spec.session_id)
        assert_gone(be, spec.session_id)
    finally:
        await be.remove_unknown(set())
        await be.close()


async def test_app_exit_reason_carries_stderr(tmp_path: Path) -> None:
    reports: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    async def on_exit(session_id: str, reason: str) -> None:
        await reports.put((session_id, reason))

    be = LocalBackend(tmp_path / "state", poll_interval=0.2)
    await be.watch_exits(on_exit)
    try:
        spec = new_spec(["sh", "-c", "sleep 0.3; echo 'cannot open profile' >&2; exit 3"])
        await be.start(spec)
        _, reason = await asyncio.wait_for(reports.get(), 10)
        assert reason == "app exited with code 3: cannot open profile"
        assert (await be.status(spec.session_id)).state == "exited"
        assert xvnc_processes(spec.session_id) == []
        await be.start(spec)  # starting an exited session runs it afresh
        assert (await be.status(spec.session_id)).state == "running"
        await be.stop(spec.session_id)
        assert_gone(be, spec.session_id)
    finally:
        await be.remove_unknown(set())
        await be.close()


async def test_planted_symlink_never_leaks_into_the_exit_reason(tmp_path: Path) -> None:
    """The app log lives where the session can write; the agent reads it as root."""
    reports: asyncio.Queue[str] = asyncio.Queue()

    async def on_exit(_: str, reason: str) -> None:
        await reports.put(reason)

    be = LocalBackend(tmp_path / "state", poll_interval=0.2)
    await be.watch_exits(on_exit)
    secret = tmp_path / "secret"
    secret.write_text("root-only-secret-line\n")
    secret.chmod(0o600)
    try:
        spec = new_spec(["sh", "-c", "sleep 0.3; exit 4"])
        await be.start(spec)
        app_log = be.run_dir(spec.session_id) / "session" / "app.log"
        app_log.unlink(missing_ok=True)
        app_log.symlink_to(secret)
        reason = await asyncio.wait_for(reports.get(), 10)
        assert reason == "app exited with code 4"
        assert "root-only" not in reason
    finally:
        await be.remove_unknown(set())
        await be.close()


_RESTART_SCRIPT = """
import asyncio, sys
from pathlib import Path
from streamspace.agent.backends.local import LocalBackend
from streamspace.protocol import LocalLaunch, SessionSpec

async def main() -> None:
    backend = LocalBackend(Path(sys.argv[1]))
    spec = SessionSpec(session_id=sys.argv[2], user_id=sys.argv[3], user="bob",
                       template="xterm", local=LocalLaunch(command=["xterm"]))
    print((await backend.start(spec)).model_dump_json(), flush=True)
    if len(sys.argv) > 4:
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_sessions_survive_agent_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    session_id, user_id = f"t-{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    # A separate "agent" process starts the session and exits, as an agent crash would.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _RESTART_SCRIPT,
        str(state),
        session_id,
        user_id,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()

    be = LocalBackend(state)
    try:
        items = await be.inventory()
        assert [(i.session_id, i.state) for i in items] == [(session_id, "running")]
        assert items[0].user == "bob"
        assert (
            items[0].endpoint is not None
            and items[0].endpoint.model_dump_json() == out.strip().decode()
        )
        spec = SessionSpec(
            session_id=session_id,
            user_id=user_id,
            user="bob",
            template="xterm",
            local=LocalLaunch(command=["xterm"]),
        )
        assert await be.start(spec) == items[0].endpoint  # adopted, not restarted
        assert len(xvnc_processes(session_id)) == 1
        client = await viewer(be, session_id)
        await client.close()
        await be.stop(session_id)
        assert_gone(be, session_id)
    finally:
        await be.remove_unknown(set())
        await be.close()


async def test_agent_killed_during_start_leaves_no_second_display_server(
    tmp_path: Path,
) -> None:
    """SIGKILL the agent while a start is under way; the next agent must clean up before it
    starts the session again, so exactly one Xvnc serves it."""
    state = tmp_path / "state"
    session_id, user_id = f"t-{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    record_path = state / "sessions" / f"{session_id}.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _RESTART_SCRIPT,
        str(state),
        session_id,
        user_id,
        "hang",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        # The moment the record names the spawned process and the session still starts.
        try:
            data = json.loads(record_path.read_text())
        except (OSError, ValueError):
            data = {}
        if data.get("state") == "starting" and data.get("init_pid"):
            break
        await asyncio.sleep(0.005)
    else:
        raise AssertionError("the start never got as far as spawning")
    proc.kill()
    await proc.wait()
    assert json.loads(record_path.read_text())["state"] == "starting"

    be = LocalBackend(state)
    try:
        assert session_pids(session_id) == []  # the leftovers are gone at once
        assert (await be.status(session_id)).state == "exited"
        spec = SessionSpec(
            session_id=session_id,
            user_id=user_id,
            user="bob",
            template="xterm",
            local=LocalLaunch(command=["xterm"]),
        )
        await be.start(spec)
        assert len(xvnc_processes(session_id)) == 1
        client = await viewer(be, session_id)
        await client.close()
    finally:
        await be.remove_unknown(set())
        await be.close()


async def test_escaped_and_stubborn_processes_are_cleaned_up(tmp_path: Path) -> None:
    be = LocalBackend(tmp_path / "state", stop_timeout=0.5)
    try:
        # A daemon that leaves the process group and session, plus a main process that
        # ignores SIGTERM: the PID namespace takes them all.
        script = "(setsid sleep 300 &); trap '' TERM; sleep 300; sleep 300"
        spec = new_spec(["sh", "-c", script])
        await be.start(spec)
        deadline = time.monotonic() + 5
        while len(session_pids(spec.session_id)) < 7 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # bwrap x2, tini, the init script, Xvnc, sh, its sleep and the setsid'd sleep.
        assert len(session_pids(spec.session_id)) >= 7
        started = time.monotonic()
        await be.stop(spec.session_id)
        assert time.monotonic() - started < 5
        assert_gone(be, spec.session_id)
    finally:
        await be.remove_unknown(set())
        await be.close()


async def test_start_fails_clearly_for_missing_command(backend: LocalBackend) -> None:
    spec = new_spec(["definitely-not-installed-streamspace"])
    with pytest.raises(BackendError, match="not installed on this host"):
        await backend.start(spec)
    assert (await backend.status(spec.session_id)).state == "unknown"
    assert session_pids(spec.session_id) == []


async def test_xvnc_failure_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unsandboxed, so the fake Xvnc on this test's PATH is the one that runs."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake = fake_bin / "Xvnc"
    fake.write_text("#!/bin/sh\necho 'Fatal: no screens' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    be = LocalBackend(tmp_path / "state", insecure_shared_user=True, display_base=DISPLAY_BASE)
    spec = new_spec()
    with pytest.raises(BackendError, match="display server exited during startup"):
        await be.start(spec)
    assert (await be.status(spec.session_id)).state == "unknown"
    assert not be.run_dir(spec.session_id).exists()
    assert session_pids(spec.session_id) == []
    await be.close()


async def test_insecure_shared_user_runs_as_the_agent_and_says_so(tmp_path: Path) -> None:
    be = LocalBackend(tmp_path / "state", insecure_shared_user=True, display_base=DISPLAY_BASE)
    try:
        isolation = be.isolation()
        assert isolation.mode == "insecure-shared-user"
        assert isolation.detail.startswith("INSECURE")
        spec = new_spec()
        await be.start(spec)
        app = await app_processes(spec.session_id)
        assert app and app[0].uids().real == os.getuid()
        client = await viewer(be, spec.session_id)
        await client.close()
        await be.stop(spec.session_id)
        assert session_pids(spec.session_id) == []
    finally:
        await be.remove_unknown(set())
        await be.close()


# ---- homes --------------------------------------------------------------------------------


async def test_home_over_its_limit_keeps_the_session_from_starting(
    backend: LocalBackend,
) -> None:
    spec = new_spec(home_limit_mb=1)
    await backend.start(spec)
    big = backend.home_for(spec) / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    await backend.hibernate(spec.session_id)  # measured here
    with pytest.raises(BackendError, match=r"uses 3 MiB, over your limit of 1 MiB"):
        await backend.wake(spec)
    big.unlink()  # space freed: it starts again
    await backend.wake(spec)
    assert (await backend.status(spec.session_id)).state == "running"


def test_legacy_name_keyed_homes_move_to_their_owners_ids(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for name, content in (("carol", "old carol's notes"), ("gone", "nobody's now")):
        home = state / "homes" / name / "xterm"
        home.mkdir(parents=True)
        (home / "notes.txt").write_text(content)
    be = LocalBackend(state)
    assert asyncio.run(be.legacy_home_names()) == ["carol", "gone"]
    carol = uuid.uuid4().hex
    moved = asyncio.run(be.migrate_homes({"carol": carol}))
    assert set(moved) == {"carol", "gone"}
    uid = be.identities.known(carol)
    assert uid is not None
    notes = state / "homes" / carol / "xterm" / "notes.txt"
    assert notes.read_text() == "old carol's notes"
    assert (notes.stat().st_uid, notes.parent.stat().st_uid) == (uid, uid)
    assert (state / "homes" / ".orphaned" / "gone" / "xterm" / "notes.txt").exists()
    assert asyncio.run(be.legacy_home_names()) == []  # done once
    assert LocalBackend(state).homes.layout() == 2


# ---- limits -------------------------------------------------------------------------------


async def test_cpu_and_memory_limits_are_applied(backend: LocalBackend) -> None:
    if backend.limits is None:
        pytest.skip(f"this host enforces no limits: {backend.isolation().detail}")
    assert backend.isolation().limits_enforced
    spec = new_spec(resources={"cpu_millis": 500, "memory_mb": 256})  # type: ignore[arg-type]
    await backend.start(spec)
    assert backend.limits.memory_limit_bytes(spec.session_id) == 256 * 1024 * 1024
    members = backend.limits.pids(spec.session_id)
    assert set(session_pids(spec.session_id)) <= members
    # Allocating past the limit gets the process killed, not the host's memory.
    client = await viewer(backend, spec.session_id)
    home = backend.home_for(spec)
    await type_and_see_change(
        client, "head -c 600M /dev/zero | tail > /dev/null; echo rc=$? > ~/oom; echo END >> ~/oom\n"
    )
    result = await wait_for_file(home / "oom", timeout=30)
    assert "rc=0" not in result
    await client.close()


# ---- catalog and names --------------------------------------------------------------------


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
    spec = new_spec().model_copy(update={"template": "../../etc"})
    with pytest.raises(BackendError, match="invalid template"):
        be.home_for(spec)


async def test_a_program_outside_what_the_sandbox_sees_is_a_clear_error(
    backend: LocalBackend, tmp_path: Path
) -> None:
    tool = tmp_path / "bin" / "my-app"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)
    spec = new_spec([str(tool)])
    with pytest.raises(BackendError, match="outside what a sandbox sees"):
        await backend.start(spec)
    assert session_pids(spec.session_id) == []


# ---- what the session controls, the agent must not trust ----------------------------------


async def test_a_symlink_planted_for_the_vnc_socket_is_never_followed(
    backend: LocalBackend, tmp_path: Path
) -> None:
    """The runtime dir is the session user's: a symlink at vnc.sock to the D-Bus system bus or
    a container engine would have had the agent, as root, relay a viewer's bytes there."""
    bait_hits: list[int] = []

    async def bait(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        bait_hits.append(1)
        writer.write(b"RFB 003.008\n")
        writer.close()

    bait_path = tmp_path / "bait.sock"
    server = await asyncio.start_unix_server(bait, path=str(bait_path))
    try:
        spec = new_spec()
        await backend.start(spec)
        session_dir = backend.run_dir(spec.session_id) / "session"
        (session_dir / "vnc.sock").unlink(missing_ok=True)
        (session_dir / "vnc.sock").symlink_to(bait_path)  # as the session user could
        client = await viewer(backend, spec.session_id)  # still its own Xvnc
        assert client.name == "xterm (alice)"
        await client.close()
        assert bait_hits == []
    finally:
        server.close()


def test_socket_handles_refuse_anything_but_the_sessions_own_socket(tmp_path: Path) -> None:
    import socket as socketlib

    from streamspace.agent import vnc

    real = tmp_path / "real.sock"
    with socketlib.socket(socketlib.AF_UNIX) as listener:
        listener.bind(str(real))
        with vnc.socket_handle(real, owner=os.getuid()) as name:
            assert name.startswith("/proc/self/fd/")
        link = tmp_path / "link.sock"
        link.symlink_to(real)
        plain = tmp_path / "plain"
        plain.write_text("")
        for bad, owner in ((link, None), (plain, None), (real, os.getuid() + 1)):
            with pytest.raises(OSError), vnc.socket_handle(bad, owner=owner):
                pass


async def test_nothing_of_the_template_env_reaches_a_process_running_as_root(
    backend: LocalBackend,
) -> None:
    template_env = {"STREAMSPACE_PROBE": "from-template", "LD_AUDIT": "/tmp/evil.so"}
    spec = new_spec().model_copy(update={"local": LocalLaunch(command=XTERM, env=template_env)})
    await backend.start(spec)
    procs = session_processes(spec.session_id)
    as_root = [p for p in procs if p.uids().real == 0]
    assert as_root  # the privileged bwrap stage, at least
    for proc in as_root:
        assert set(proc.environ()) <= {"PATH", "PWD", "STREAMSPACE_SESSION_ID"}, proc.cmdline()
    app = [p for p in procs if p.name() == "xterm"]
    assert app and app[0].environ()["STREAMSPACE_PROBE"] == "from-template"


def test_an_interrupted_home_migration_resumes_and_never_orphans_moved_homes(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    for name in ("dora", "erin"):
        (state / "homes" / name / "xterm").mkdir(parents=True)
        (state / "homes" / name / "xterm" / "notes.txt").write_text(f"{name}'s notes")
    be = LocalBackend(state)
    dora = uuid.uuid4().hex
    # erin's id is refused (not an id at all): that home stays, dora's moves.
    asyncio.run(be.migrate_homes({"dora": dora, "erin": "../../etc"}))
    assert (state / "homes" / dora / "xterm" / "notes.txt").read_text() == "dora's notes"
    assert asyncio.run(be.legacy_home_names()) == ["erin"]  # not dora's new id dir
    erin = uuid.uuid4().hex
    asyncio.run(be.migrate_homes({"erin": erin}))
    assert (state / "homes" / erin / "xterm" / "notes.txt").read_text() == "erin's notes"
    assert (state / "homes" / dora / "xterm" / "notes.txt").exists()
    assert not (state / "homes" / ".orphaned").exists()
    assert asyncio.run(be.legacy_home_names()) == []


async def test_fifty_viewers_connecting_at_once_all_get_in(backend: LocalBackend) -> None:
    """A Unix socket with a full listen backlog refuses at once (EAGAIN) where TCP would retry;
    the agent waits its turn instead of failing the viewer."""
    spec = new_spec()
    await backend.start(spec)
    opened = await asyncio.gather(*(backend.open_vnc(spec.session_id) for _ in range(50)))
    try:
        for reader, _ in opened:
            assert await asyncio.wait_for(reader.readexactly(12), 10) == b"RFB 003.008\n"
    finally:
        for _, writer in opened:
            writer.close()
