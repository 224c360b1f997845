"""Container sessions (docker backend on real podman): the attacks of issue 12, replayed.

* VNC: no TCP port at all (another session's container on the bridge finds nothing); the Unix
  socket sits in the agent's private state directory, and even a client holding it gets no
  desktop without the per-session password only the agent can derive; the agent's own
  password does open it.
* Network only for templates that ask: the others get none, not even to the host.
* The image refuses to serve VNC at all when started without a password.
* Homes: volumes are named by user id, so alice+"dev-chromium" and "alice-dev"+"chromium" no
  longer share one; a volume whose labels name someone else is refused; a user re-created under
  an old name starts empty; v1 name-keyed volumes go to their owner's id only, and those of
  names no user has are kept, unmounted, and not handed to a later user of that name.
* The session runs as uid 1000 with no capabilities and no_new_privs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import stat
import struct
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

if shutil.which("podman") is None or os.geteuid() != 0:
    pytest.skip(
        "container isolation tests need podman and root (apt-get install -y podman runc "
        "debootstrap)",
        allow_module_level=True,
    )

import docker
import docker.errors

from docker_support import (
    HOME,
    XTERM,
    Leftovers,
    assert_streams,
    exec_in,
    home_mount,
    inspect,
    new_spec,
    read_from_volume,
    run_once,
    write_into_volume,
)
from streamspace.agent import vnc
from streamspace.agent.backends.base import BackendError
from streamspace.agent.backends.docker import (
    OWNER_ID_LABEL,
    OWNER_LABEL,
    TEMPLATE_LABEL,
    VNC_PASSWORD_ENV,
    DockerBackend,
    container_name,
    home_volume_name,
    legacy_home_volume_name,
    vnc_password,
)
from streamspace.agent.vnc import socket_handle
from streamspace.podman import PodmanService
from streamspace_testing.rfb import RFBClient, RFBError, TCPTransport

pytestmark = pytest.mark.podman

_VNC_AUTH = 2


# ---- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def engine(podman_service: PodmanService) -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url=podman_service.docker_host)
    yield client
    client.close()


@pytest.fixture
def leftovers(engine: docker.DockerClient) -> Iterator[Leftovers]:
    found = Leftovers()
    yield found
    found.sweep(engine)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "agent-state"


@pytest.fixture
async def backend(
    podman_service: PodmanService, leftovers: Leftovers, state_dir: Path
) -> AsyncIterator[DockerBackend]:
    agent_id = f"sec-agent-{uuid.uuid4().hex[:8]}"
    leftovers.agent_ids.add(agent_id)
    be = DockerBackend(podman_service.docker_host, agent_id, state_dir)
    try:
        yield be
    finally:
        await be.close()


def _remove_volumes(engine: docker.DockerClient, names: list[str]) -> None:
    for name in names:
        with contextlib.suppress(docker.errors.NotFound):
            engine.volumes.get(name).remove(force=True)


async def _files(engine: docker.DockerClient, session_id: str) -> set[str]:
    code, out = await asyncio.to_thread(exec_in, engine, session_id, ["ls", "-A", HOME])
    assert code == 0, out
    return set(out.split())


async def _cat(engine: docker.DockerClient, session_id: str, name: str) -> str:
    code, out = await asyncio.to_thread(exec_in, engine, session_id, ["cat", f"{HOME}/{name}"])
    assert code == 0, out
    return out


# ---- VNC needs the per-session password ---------------------------------------------------


async def _security_types(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[int]:
    banner = await asyncio.wait_for(reader.readexactly(12), 10)
    assert banner == b"RFB 003.008\n", banner
    writer.write(b"RFB 003.008\n")
    (count,) = await asyncio.wait_for(reader.readexactly(1), 10)
    return list(await reader.readexactly(count))


async def _open_socket(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    with socket_handle(path) as short:
        return await asyncio.open_unix_connection(short)


async def test_the_vnc_socket_gives_nothing_without_the_session_password(
    backend: DockerBackend, leftovers: Leftovers, state_dir: Path
) -> None:
    spec = new_spec("victim", leftovers.user_id(), persistent_home=False)
    endpoint = await backend.start(spec)
    assert endpoint.port is None and endpoint.unix_path is not None
    sock = Path(endpoint.unix_path)
    # Only the agent reaches the socket: it sits in the agent's private state directory.
    for directory in (state_dir, state_dir / "docker-run"):
        st = directory.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700

    # Even with the socket in hand, a viewer that speaks only security None is turned away.
    with (
        socket_handle(sock) as short,
        pytest.raises(RFBError, match=r"offers security types \[2 \(VNC Authentication\)\]"),
    ):
        async with asyncio.timeout(10):
            await RFBClient.over(await TCPTransport.connect_unix(short))

    # Choosing None anyway does not get a ServerInit: the server fails the handshake.
    reader, writer = await _open_socket(sock)
    assert await _security_types(reader, writer) == [_VNC_AUTH]
    writer.write(bytes([1]) + bytes([1]))  # security None, then ClientInit (shared)
    await writer.drain()
    answer = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(4096), 10):
            answer += chunk
    writer.close()
    # TigerVNC closes without a SecurityResult; a failed one would do as well. Never "OK".
    assert answer == b"" or struct.unpack(">I", answer[:4])[0] != 0, answer

    # Wrong passwords fail: a guess, and the password another session would have.
    key = bytes.fromhex((state_dir / "vnc-key").read_text())
    for wrong in (b"12345678", vnc_password(key, f"{spec.session_id}x")):
        assert wrong != vnc_password(key, spec.session_id)
        reader, writer = await _open_socket(sock)
        with pytest.raises(vnc.VNCAuthError, match="refused the agent"):
            await asyncio.wait_for(vnc.authenticate(reader, writer, wrong), 10)
        writer.close()

    # The check is real: the agent's password (from its 0600 key) opens the desktop.
    assert stat.S_IMODE((state_dir / "vnc-key").stat().st_mode) == 0o600
    reader, writer = await _open_socket(sock)
    await asyncio.wait_for(vnc.authenticate(reader, writer, vnc_password(key, spec.session_id)), 10)
    front = vnc.NoneSecurityFront(reader, writer)
    client = await asyncio.wait_for(RFBClient.from_streams(front, front), 10)
    try:
        await client.request_update(incremental=False)
        assert (client.width, client.height) == (1024, 640)
        assert client.framebuffer_nonblank()
    finally:
        await client.close()


async def test_another_session_finds_no_vnc_server_on_the_network(
    backend: DockerBackend, engine: docker.DockerClient, leftovers: Leftovers
) -> None:
    victim = new_spec("victim", leftovers.user_id(), persistent_home=False, network=True)
    attacker = new_spec("mallory", leftovers.user_id(), persistent_home=False, network=True)
    await backend.start(victim)
    await backend.start(attacker)
    networks = (await asyncio.to_thread(inspect, engine, victim.session_id))["NetworkSettings"][
        "Networks"
    ]
    address = next(n["IPAddress"] for n in networks.values() if n.get("IPAddress"))
    # The attacker's desktop can reach the victim's address (same bridge) but no VNC port.
    probe = f"timeout 5 bash -c 'exec 3<>/dev/tcp/{address}/5901' && echo OPEN; echo done"
    code, out = await asyncio.to_thread(exec_in, engine, attacker.session_id, ["bash", "-c", probe])
    assert code == 0 and "done" in out, out
    assert "OPEN" not in out, out
    listening = await asyncio.to_thread(
        exec_in, engine, victim.session_id, ["sh", "-c", "cat /proc/net/tcp /proc/net/tcp6"]
    )
    assert not [line for line in listening[1].splitlines() if line.split()[3:4] == ["0A"]]

    # The app's environment does not carry the password (the entrypoint drops it before
    # starting the app; /proc/1/environ, same uid, still has it: see docs/security.md).
    code, out = await asyncio.to_thread(
        exec_in,
        engine,
        attacker.session_id,
        [
            "sh",
            "-c",
            'for p in /proc/[0-9]*; do [ "$(cat $p/comm)" = xterm ] || continue; '
            "tr '\\0' '\\n' < $p/environ; done",
        ],
    )
    assert code == 0 and "DISPLAY=:1" in out, out
    assert VNC_PASSWORD_ENV not in out


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_entrypoint_refuses_to_start_without_a_vnc_password(
    engine: docker.DockerClient, value: str | None
) -> None:
    environment = {} if value is None else {VNC_PASSWORD_ENV: value}
    container = engine.containers.run(
        XTERM,
        environment=environment,
        user="1000:1000",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        detach=True,
    )
    try:
        result = container.wait(timeout=30)
        logs = container.logs().decode(errors="replace")
    finally:
        container.remove(force=True)
    assert result["StatusCode"] == 2, logs
    assert f"{VNC_PASSWORD_ENV} is not set; refusing to serve VNC" in logs


# ---- homes keyed by ids -------------------------------------------------------------------


async def test_alice_dev_chromium_and_alice_dev_plus_chromium_get_separate_homes(
    backend: DockerBackend, engine: docker.DockerClient, leftovers: Leftovers
) -> None:
    # The v1 names of these two homes were the same volume.
    assert legacy_home_volume_name("alice", "dev-chromium") == legacy_home_volume_name(
        "alice-dev", "chromium"
    )
    alice_id, alice_dev_id = leftovers.user_id(), leftovers.user_id()
    alice = new_spec("alice", alice_id, template="dev-chromium")
    alice_dev = new_spec("alice-dev", alice_dev_id, template="chromium")
    await backend.start(alice)
    await backend.start(alice_dev)

    assert await asyncio.to_thread(home_mount, engine, alice.session_id) == home_volume_name(
        alice_id, "dev-chromium"
    )
    assert await asyncio.to_thread(home_mount, engine, alice_dev.session_id) == home_volume_name(
        alice_dev_id, "chromium"
    )
    for spec in (alice, alice_dev):
        code, out = await asyncio.to_thread(
            exec_in, engine, spec.session_id, ["sh", "-c", f"echo {spec.user} > {HOME}/mine.txt"]
        )
        assert code == 0, out
    assert await _files(engine, alice.session_id) >= {"mine.txt"}
    assert (await _cat(engine, alice.session_id, "mine.txt")).strip() == "alice"
    assert (await _cat(engine, alice_dev.session_id, "mine.txt")).strip() == "alice-dev"


@pytest.mark.parametrize(
    "labels",
    [
        pytest.param("foreign-id", id="labelled-for-another-user-id"),
        pytest.param("other-template", id="labelled-for-another-template"),
        pytest.param("none", id="unlabelled"),
    ],
)
async def test_volume_labelled_for_someone_else_is_refused_not_mounted(
    backend: DockerBackend, engine: docker.DockerClient, leftovers: Leftovers, labels: str
) -> None:
    victim_id, attacker_id = leftovers.user_id(), leftovers.user_id()
    name = leftovers.home_of(victim_id)
    planted = {
        "foreign-id": {OWNER_LABEL: "victim", OWNER_ID_LABEL: attacker_id, TEMPLATE_LABEL: "xterm"},
        "other-template": {
            OWNER_LABEL: "victim",
            OWNER_ID_LABEL: victim_id,
            TEMPLATE_LABEL: "firefox",
        },
        "none": {},
    }[labels]
    await asyncio.to_thread(engine.volumes.create, name, labels=planted)
    await asyncio.to_thread(write_into_volume, engine, name, "planted.txt", "from mallory")

    spec = new_spec("victim", victim_id)
    with pytest.raises(BackendError, match=f"home volume {name} exists but is not labelled"):
        await backend.start(spec)
    with pytest.raises(docker.errors.NotFound):
        await asyncio.to_thread(engine.containers.get, container_name(spec.session_id))
    assert await backend.inventory() == []
    # Refused, not repaired: the volume and its content are as they were.
    volume = await asyncio.to_thread(engine.volumes.get, name)
    assert (volume.attrs.get("Labels") or {}) == planted
    assert await asyncio.to_thread(read_from_volume, engine, name, "planted.txt") == "from mallory"


async def test_user_recreated_under_the_same_name_gets_a_new_empty_home(
    backend: DockerBackend, engine: docker.DockerClient, leftovers: Leftovers
) -> None:
    old_id, new_id = leftovers.user_id(), leftovers.user_id()
    old = new_spec("carol", old_id)
    await backend.start(old)
    code, _ = await asyncio.to_thread(
        exec_in, engine, old.session_id, ["sh", "-c", f"echo private > {HOME}/diary.txt"]
    )
    assert code == 0
    await backend.stop(old.session_id)

    new = new_spec("carol", new_id)
    await backend.start(new)
    assert await asyncio.to_thread(home_mount, engine, new.session_id) == home_volume_name(
        new_id, "xterm"
    )
    assert "diary.txt" not in await _files(engine, new.session_id)
    await backend.stop(new.session_id)

    # Nothing is lost: the old id's home still holds the old carol's file.
    again = new_spec("carol", old_id)
    await backend.start(again)
    assert (await _cat(engine, again.session_id, "diary.txt")).strip() == "private"


# ---- v1 (name-keyed) volumes --------------------------------------------------------------


@pytest.fixture
def v1_volumes(engine: docker.DockerClient, leftovers: Leftovers) -> dict[str, str]:
    """v1 homes of carol and dave (a name no user has any more), each holding a file."""
    made = {"carol": "ss-home-carol-xterm", "dave": "ss-home-dave-xterm"}
    _remove_volumes(engine, list(made.values()))
    leftovers.volumes.update(made.values())
    for owner, name in made.items():
        assert name == legacy_home_volume_name(owner, "xterm")
        engine.volumes.create(name, labels={OWNER_LABEL: owner, TEMPLATE_LABEL: "xterm"})
        write_into_volume(engine, name, "v1.txt", f"{owner} before the upgrade")
    return made


async def test_v1_volume_is_mounted_for_its_owner_id_only(
    backend: DockerBackend,
    engine: docker.DockerClient,
    leftovers: Leftovers,
    podman_service: PodmanService,
    state_dir: Path,
    v1_volumes: dict[str, str],
) -> None:
    carol_id, other_id = leftovers.user_id(), leftovers.user_id()
    assert {"carol", "dave"} <= set(await backend.legacy_home_names())

    moved = await backend.migrate_homes({"carol": carol_id})
    assert moved == {"ss-home-carol-xterm": carol_id}
    assert "carol" not in await backend.legacy_home_names()
    mapping = state_dir / "legacy-volumes.json"
    assert stat.S_IMODE(mapping.stat().st_mode) == 0o600
    assert json.loads(mapping.read_text()) == {f"{carol_id}_xterm": "ss-home-carol-xterm"}

    carol = new_spec("carol", carol_id)
    await backend.start(carol)
    assert await asyncio.to_thread(home_mount, engine, carol.session_id) == "ss-home-carol-xterm"
    assert await _cat(engine, carol.session_id, "v1.txt") == "carol before the upgrade"
    code, out = await asyncio.to_thread(
        exec_in, engine, carol.session_id, ["sh", "-c", f"echo after > {HOME}/v2.txt"]
    )
    assert code == 0, out
    await backend.stop(carol.session_id)

    # Another id - even under the same name - gets its own, empty home.
    other = new_spec("carol", other_id)
    await backend.start(other)
    assert await asyncio.to_thread(home_mount, engine, other.session_id) == home_volume_name(
        other_id, "xterm"
    )
    assert not {"v1.txt", "v2.txt"} & await _files(engine, other.session_id)

    # The mapping survives an agent restart.
    restarted = DockerBackend(podman_service.docker_host, backend.agent_id, state_dir)
    try:
        again = new_spec("carol", carol_id)
        await restarted.start(again)
        assert (
            await asyncio.to_thread(home_mount, engine, again.session_id) == "ss-home-carol-xterm"
        )
        assert (await _cat(engine, again.session_id, "v2.txt")).strip() == "after"
    finally:
        await restarted.close()


async def test_v1_volume_of_a_vanished_name_is_kept_and_never_handed_out(
    backend: DockerBackend,
    engine: docker.DockerClient,
    leftovers: Leftovers,
    v1_volumes: dict[str, str],
) -> None:
    assert await backend.migrate_homes({"carol": leftovers.user_id()}) == {
        "ss-home-carol-xterm": next(iter(leftovers.user_ids))
    }
    # dave has no user: the volume stays, with its content, and is not offered again.
    assert "dave" not in await backend.legacy_home_names()
    assert await asyncio.to_thread(read_from_volume, engine, "ss-home-dave-xterm", "v1.txt") == (
        "dave before the upgrade"
    )

    # A "dave" created after the upgrade is a different person: no migration, no old files.
    new_dave_id = leftovers.user_id()
    assert await backend.migrate_homes({"dave": new_dave_id}) == {}
    dave = new_spec("dave", new_dave_id)
    await backend.start(dave)
    assert await asyncio.to_thread(home_mount, engine, dave.session_id) == home_volume_name(
        new_dave_id, "xterm"
    )
    assert "v1.txt" not in await _files(engine, dave.session_id)
    assert (await asyncio.to_thread(engine.volumes.get, "ss-home-dave-xterm")).name


# ---- least privilege inside the container -------------------------------------------------


async def test_session_runs_as_uid_1000_without_capabilities_or_new_privileges(
    backend: DockerBackend, engine: docker.DockerClient, leftovers: Leftovers
) -> None:
    spec = new_spec("alice", leftovers.user_id(), persistent_home=False)
    await backend.start(spec)
    await assert_streams(backend, spec.session_id)

    code, out = await asyncio.to_thread(
        exec_in,
        engine,
        spec.session_id,
        ["sh", "-c", "for f in /proc/[0-9]*/status; do echo; cat $f; done"],
    )
    assert code == 0, out
    processes = []
    for block in out.strip().split("\n\n"):
        fields = dict(line.split(":\t", 1) for line in block.splitlines() if ":\t" in line)
        if fields:
            processes.append(fields)
    by_pid = {p["Pid"]: p for p in processes}
    init = by_pid["1"]
    assert init["Name"] == "tini", init
    names = {p["Name"] for p in processes}
    assert {"Xvnc", "xterm"} <= names, names  # the whole session, not only the exec'd shell
    for proc in processes:
        what = f"{proc['Name']} (pid {proc['Pid']})"
        assert proc["Uid"].split() == ["1000"] * 4, what
        assert proc["Gid"].split() == ["1000"] * 4, what
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(proc[cap], 16) == 0, f"{what}: {cap} {proc[cap]}"
        assert proc["NoNewPrivs"].strip() == "1", what


# ---- network only for templates that ask ---------------------------------------------------


def _host_address() -> str:
    """This host's first non-loopback IPv4 address (what a container could dial out to)."""
    import psutil

    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family.name == "AF_INET" and not addr.address.startswith("127."):
                return str(addr.address)
    pytest.skip("the host has no non-loopback IPv4 address to dial")
    raise AssertionError


async def test_a_template_without_network_reaches_nothing_but_still_streams(
    backend: DockerBackend, engine: docker.DockerClient, leftovers: Leftovers
) -> None:
    accepted: list[str] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(str(writer.get_extra_info("peername")))
        writer.close()

    server = await asyncio.start_server(accept, "0.0.0.0", 0)
    port = server.sockets[0].getsockname()[1]
    address = _host_address()
    probe = f"timeout 5 bash -c 'exec 3<>/dev/tcp/{address}/{port}' && echo REACHED"
    try:
        offline = new_spec("olga", leftovers.user_id(), persistent_home=False)
        online = new_spec("otto", leftovers.user_id(), persistent_home=False, network=True)
        await backend.start(offline)
        await backend.start(online)

        code, out = await asyncio.to_thread(
            exec_in, engine, offline.session_id, ["bash", "-c", probe]
        )
        assert code != 0 and "REACHED" not in out, out
        assert not accepted
        host_config = (await asyncio.to_thread(inspect, engine, offline.session_id))["HostConfig"]
        assert host_config["NetworkMode"] == "none"
        await assert_streams(backend, offline.session_id)  # the agent still reaches its desktop

        # The check is real: a template that asks for network gets it.
        code, out = await asyncio.to_thread(
            exec_in, engine, online.session_id, ["bash", "-c", probe]
        )
        assert code == 0 and "REACHED" in out, out
        assert len(accepted) == 1
    finally:
        server.close()
        await server.wait_closed()


# ---- home size -----------------------------------------------------------------------------


async def test_a_home_volume_over_its_limit_keeps_the_session_from_starting(
    backend: DockerBackend, engine: docker.DockerClient, leftovers: Leftovers
) -> None:
    spec = new_spec("hilda", leftovers.user_id(), home_limit_mb=1)
    await backend.start(spec)
    code, out = await asyncio.to_thread(
        exec_in, engine, spec.session_id, ["sh", "-c", f"head -c 3145728 /dev/urandom > {HOME}/big"]
    )
    assert code == 0, out
    await backend.hibernate(spec.session_id)  # measured here
    volume = home_volume_name(spec.user_id, spec.template)
    assert (backend.usage.last(volume) or 0) > 3 * 1024 * 1024
    await backend.stop(spec.session_id)
    with pytest.raises(BackendError, match=r"uses 3 MiB, over your limit of 1 MiB"):
        await backend.start(spec)
    await asyncio.to_thread(run_once, engine, ["rm", f"{HOME}/big"], volume, "rw")
    await backend.start(spec)  # space freed: it starts again
    assert (await backend.status(spec.session_id)).state == "running"


async def test_a_planted_socket_symlink_is_not_followed_by_the_agent(
    backend: DockerBackend, engine: docker.DockerClient, leftovers: Leftovers, tmp_path: Path
) -> None:
    """The socket's directory is the container user's: a symlink planted there to a root-only
    host socket (the container engine's, say) must not get the agent to connect to it."""
    bait = tmp_path / "engine.sock"
    hits: list[int] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(1)
        writer.write(b"RFB 003.008\n")
        writer.close()

    server = await asyncio.start_unix_server(accept, path=str(bait))
    try:
        spec = new_spec("mallory", leftovers.user_id(), persistent_home=False)
        await backend.start(spec)
        sock = "/run/streamspace/vnc.sock"
        code, out = await asyncio.to_thread(
            exec_in,
            engine,
            spec.session_id,
            [
                "sh",
                "-c",
                f"rm -f {sock} && ln -s {bait} {sock}",
            ],
        )
        assert code == 0, out
        with pytest.raises(ConnectionError, match="not the session's VNC socket"):
            await backend.open_vnc(spec.session_id)
        assert hits == []
    finally:
        server.close()
