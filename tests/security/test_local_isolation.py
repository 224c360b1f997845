"""Replays of the isolation probe against the real product (`streamspace up` as root).

An ordinary user launches the Terminal and types into it through the real tunnel (ticket,
viewer WebSocket, embedded agent, the session's VNC socket), the way a browser does. What the
shell printed is read back from the user's home on the host. Before this issue the xterm was
a root shell on the host: every assertion below failed then.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import XVNC_MISSING, require, wait_state
from product_support import Product
from streamspace_testing.rfb import RFBClient, WebSocketTransport
from vnc_support import tcp_listeners, vnc_socket, xvnc_processes

pytestmark = pytest.mark.xvnc

PASSWORD = "correct-horse-battery-staple-9"

if os.geteuid() != 0:
    pytest.skip(
        "the probe was made against a root agent (`make run` as root)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Product]:
    require(XVNC_MISSING)
    product = Product(tmp_path_factory.mktemp("isolation") / "data")
    try:
        product.start()
        yield product
    finally:
        product.stop()


@pytest.fixture(scope="module")
def admin(up: Product) -> Iterator[httpx.Client]:
    c = up.login()
    yield c
    c.close()


def make_user(up: Product, admin: httpx.Client, name: str) -> tuple[httpx.Client, str]:
    r = admin.post("/api/v1/users", json={"username": name, "password": PASSWORD})
    assert r.status_code == 201, r.text
    c = up.login(name, PASSWORD)
    return c, c.get("/api/v1/auth/me").json()["id"]


def start_xterm(c: httpx.Client) -> str:
    r = c.post("/api/v1/sessions", json={"template": "xterm"})
    assert r.status_code == 201, r.text
    return str(wait_state(c, r.json()["id"], "running", 60)["id"])


def home_of(up: Product, user_id: str) -> Path:
    return up.data_dir / "agent" / "homes" / user_id / "xterm"


class Terminal:
    """Types shell commands into a session through the product's own viewer tunnel."""

    def __init__(self, up: Product, c: httpx.Client, session_id: str, user_id: str) -> None:
        self.up, self.c, self.session_id, self.home = up, c, session_id, home_of(up, user_id)

    async def _viewer(self) -> RFBClient:
        ticket = self.c.post(f"/api/v1/sessions/{self.session_id}/connect").json()
        url = self.up.url.replace("http://", "ws://") + ticket["ws_path"]
        transport = await WebSocketTransport.connect(f"{url}?ticket={ticket['ticket']}")
        client = await RFBClient.over(transport)
        await client.request_update(incremental=False)
        return client

    def run(self, command: str, attempts: int = 3) -> tuple[int, str]:
        """(exit code, output) of `command` in the session's shell.

        Typed again if no output came: keys typed before a fresh xterm has mapped its window
        are lost (the commands here may run twice)."""
        name = f".probe-{uuid.uuid4().hex[:8]}"
        out = self.home / name

        async def typed() -> None:
            client = await self._viewer()
            try:
                await client.pointer(20, 20)  # focus follows the pointer (no window manager)
                await client.type_text(f'({command}) > ~/{name} 2>&1; echo "rc=$?" >> ~/{name}\n')
                await asyncio.sleep(0.2)
            finally:
                await client.close()

        for _ in range(attempts):
            asyncio.run(typed())
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                if out.exists():
                    lines = out.read_text(errors="replace").rstrip("\n").splitlines()
                    if lines and lines[-1].startswith("rc="):
                        return int(lines[-1][3:]), "\n".join(lines[:-1])
                time.sleep(0.1)
        raise AssertionError(f"the session never ran {command!r}")


@pytest.fixture(scope="module")
def alice(up: Product, admin: httpx.Client) -> Iterator[Terminal]:
    c, user_id = make_user(up, admin, "alice")
    term = Terminal(up, c, start_xterm(c), user_id)
    yield term
    c.close()


@pytest.fixture(scope="module")
def bob(up: Product, admin: httpx.Client) -> Iterator[Terminal]:
    c, user_id = make_user(up, admin, "bob")
    term = Terminal(up, c, start_xterm(c), user_id)
    rc, _ = term.run("echo bob-private-notes > ~/notes.txt")
    assert rc == 0
    yield term
    c.close()


def test_the_terminal_is_not_root_and_not_the_agent(alice: Terminal) -> None:
    rc, out = alice.run(
        "id -u; id -g; id -G; grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status"
    )
    assert rc == 0
    uid, gid, groups, *status = out.splitlines()
    assert int(uid) not in (0, os.getuid())
    assert groups.split() == [gid]  # no supplementary groups
    fields = dict(line.split(":\t") for line in status)
    assert fields == {"CapEff": "0000000000000000", "CapBnd": "0000000000000000", "NoNewPrivs": "1"}


@pytest.mark.parametrize(
    "target",
    ["secret_key", "streamspace.db", "agent/agent.json", "agent/identities.json"],
)
def test_control_plane_and_agent_secrets_are_out_of_reach(
    up: Product, alice: Terminal, target: str
) -> None:
    path = up.data_dir / target
    assert path.exists()
    secret = path.read_bytes()[:64]
    rc, out = alice.run(f"cat {path}")
    assert rc != 0
    assert "No such file or directory" in out
    assert secret.decode(errors="replace") not in out
    # And no way round: the state directory is not even visible in the sandbox.
    rc, out = alice.run(f"ls {up.data_dir}")
    assert rc != 0


def test_another_users_home_is_out_of_reach(up: Product, alice: Terminal, bob: Terminal) -> None:
    notes = bob.home / "notes.txt"
    assert notes.read_text() == "bob-private-notes\n"
    rc, out = alice.run(f"cat {notes}; ls {bob.home.parent.parent}")
    assert rc != 0
    assert "bob-private-notes" not in out
    rc, out = alice.run("ls /home")
    assert out.split() == ["streamspace"]  # only its own home is mounted


def test_another_sessions_vnc_server_is_out_of_reach(
    up: Product, alice: Terminal, bob: Terminal
) -> None:
    sock = vnc_socket(up.data_dir / "agent", bob.session_id)
    assert sock.is_socket()
    rc, _ = alice.run(f"ls -la {sock.parent}")
    assert rc != 0  # not visible from inside alice's sandbox
    (xvnc,) = xvnc_processes(bob.session_id)
    assert tcp_listeners(xvnc.pid) == []  # and nothing listens on TCP

    # From the host, as any uid but the agent's (alice's, even bob's own), nothing connects.
    for uid in {xvnc.uids().real, os.stat(alice.home).st_uid, 65534}:
        assert connect_as(uid, sock) == "refused"
    assert connect_as(None, sock) == "RFB 003.008"  # the agent (root) can: the check is real


def connect_as(uid: int | None, path: Path) -> str:
    """Connect to a Unix socket from a child process running as `uid` (None: as we are).

    The child gets a descriptor of the socket's directory opened beforehand, so even the
    directories above it (the agent's private state dir) are no obstacle: only the session
    directory's and the socket's own permissions decide."""
    dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to the uid, try, report through the pipe, never return
        code = 0
        try:
            os.close(read_end)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(f"/proc/self/fd/{dir_fd}/{path.name}")
                    s.settimeout(5)
                    answer = s.recv(12).decode().strip()
                except PermissionError:
                    answer = "refused"
            os.write(write_end, answer.encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    os.close(dir_fd)
    with os.fdopen(read_end, "rb") as fh:
        answer = fh.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return answer


def test_system_directories_cannot_be_remounted(alice: Terminal) -> None:
    rc, _ = alice.run("mount -o remount,bind,rw /etc")
    assert rc != 0
    rc, _ = alice.run("touch /etc/streamspace-was-here")
    assert rc != 0
    assert not Path("/etc/streamspace-was-here").exists()


def test_kernel_settings_are_not_writable(alice: Terminal) -> None:
    before = Path("/proc/sys/kernel/core_pattern").read_text()
    rc, _ = alice.run("echo '|/tmp/pwn' > /proc/sys/kernel/core_pattern")
    assert rc != 0
    assert Path("/proc/sys/kernel/core_pattern").read_text() == before


def test_no_nested_user_namespaces(alice: Terminal) -> None:
    rc, _ = alice.run("unshare --user --map-root-user id -u")
    assert rc != 0


def test_a_recreated_user_does_not_inherit_the_old_ones_home(
    up: Product, admin: httpx.Client
) -> None:
    c, old_id = make_user(up, admin, "carol")
    old = Terminal(up, c, start_xterm(c), old_id)
    assert old.run("echo old-carol-diary > ~/diary.txt")[0] == 0
    assert c.delete(f"/api/v1/sessions/{old.session_id}").status_code == 202
    wait_state(c, old.session_id, "stopped", 30)
    c.close()
    assert admin.delete(f"/api/v1/users/{old_id}").status_code == 204

    c, new_id = make_user(up, admin, "carol")
    assert new_id != old_id
    new = Terminal(up, c, start_xterm(c), new_id)
    rc, out = new.run("cat ~/diary.txt")
    assert rc != 0 and "old-carol-diary" not in out
    assert (old.home / "diary.txt").read_text() == "old-carol-diary\n"  # kept, not handed on
    c.close()


def test_the_agent_reports_its_isolation(admin: httpx.Client) -> None:
    (agent,) = admin.get("/api/v1/agents").json()
    assert agent["isolation"] == "uid-sandbox"
    assert "bubblewrap" in agent["isolation_detail"]


@pytest.fixture(scope="module")
def insecure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Product]:
    require(XVNC_MISSING)
    product = Product(tmp_path_factory.mktemp("insecure") / "data", args=["--insecure-shared-user"])
    try:
        product.start()
        yield product
    finally:
        product.stop()


def test_the_insecure_opt_out_is_explicit_and_reported(insecure: Product) -> None:
    c = insecure.login()
    (agent,) = c.get("/api/v1/agents").json()
    c.close()
    assert agent["isolation"] == "insecure-shared-user"
    assert agent["isolation_detail"].startswith("INSECURE")
    log = insecure.log()
    assert "local_backend_insecure" in log and "agent_insecure" in log


def test_a_planted_socket_symlink_does_not_turn_the_agent_into_a_relay(
    up: Product, alice: Terminal, tmp_path: Path
) -> None:
    """The review's attack: replace the session's vnc.sock with a symlink to a root-only host
    socket (here a bait standing in for the D-Bus system bus) and open a viewer: the agent,
    as root, would have connected there and relayed the viewer's bytes."""
    bait = tmp_path / "system_bus_socket"
    hits: list[bytes] = []
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(bait))
    bait.chmod(0o600)  # root only, like the real bus
    listener.listen(4)
    listener.settimeout(0.2)
    try:
        rc, _ = alice.run(
            f"rm -f /run/streamspace/vnc.sock; ln -s {bait} /run/streamspace/vnc.sock; true"
        )
        assert rc == 0
        rc, out = alice.run("echo still-my-desktop")  # a fresh viewer, through the agent
        assert (rc, out) == (0, "still-my-desktop")
        with contextlib.suppress(TimeoutError):
            conn, _ = listener.accept()
            hits.append(conn.recv(64))
            conn.close()
        assert hits == []
    finally:
        listener.close()
