"""Agent identity against a real control plane and real `streamspace agent` processes:
join tokens, enrolment, the stored credential, restarts, revoke, credential rotation, drain,
and the control-connection protocol (version negotiation, malformed frames)."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from test_agents_support import (
    Fleet,
    _no_xvnc_left_behind,  # noqa: F401 - fixture
    flat,
    fleet,  # noqa: F401 - fixture
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from conftest import XVNC_MISSING, require, wait_for, wait_state
from streamspace import protocol


def agent_rows(fl: Fleet) -> list[dict[str, Any]]:
    r = fl.admin.get("/api/v1/agents", params={"include_revoked": True})
    assert r.status_code == 200, r.text
    rows: list[dict[str, Any]] = r.json()
    return rows


# ---- join tokens and enrolment ------------------------------------------------------------


def test_join_tokens_are_admin_only(fleet: Callable[..., Fleet]) -> None:
    fl = fleet()
    with fl.cp.client() as anon:
        assert anon.post("/api/v1/agents/join-tokens", json={}).status_code == 401
    for role in ("user", "operator"):
        c = fl.user(f"{role}1", role=role)
        r = c.post("/api/v1/agents/join-tokens", json={})
        assert r.status_code == 403, (role, r.text)
    r = fl.admin.post("/api/v1/agents/join-tokens", json={})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["token"].startswith("ssj_")
    assert body["token"] in body["command"]
    expires = datetime.fromisoformat(body["expires_at"])
    assert expires > datetime.now(UTC) + timedelta(minutes=30)


def test_enrol_list_credential_file_and_restart_keeps_identity(
    fleet: Callable[..., Fleet],
) -> None:
    fl = fleet()
    agent = fl.agent("c1", name="edge-1", max_sessions=3)
    view = fl.wait_online(agent)
    agent_id = fl.agent_id(agent)

    rows = agent_rows(fl)
    assert [r["id"] for r in rows] == [agent_id]
    row = rows[0]
    assert row["status"] == "online"
    assert row["cluster_id"] == "c1"
    assert row["cluster_name"] == "Cluster c1"
    assert row["name"] == "edge-1"
    assert row["backend"] == "local"
    assert row["capacity"]["max_sessions"] == 3
    assert row["capacity"]["cpu_millis"] > 0 and row["capacity"]["memory_mb"] > 0
    assert row["revoked"] is False and row["draining"] is False
    assert view["last_seen"] is not None
    if XVNC_MISSING is None:
        assert "xterm" in row["templates"], row
    with fl.cp.client() as anon:
        assert anon.get("/api/v1/agents").status_code == 401

    cred = agent.state_dir / "agent.json"
    assert cred.exists()
    assert stat.S_IMODE(cred.stat().st_mode) == 0o600
    stored = json.loads(cred.read_text())
    assert stored["agent_id"] == agent_id
    assert stored["credential"].startswith(agent_id + ".")
    assert stored["credential"] not in agent.log(), "the credential must never be logged"

    # Restart with the same state dir and no join token: same identity, no second row.
    agent.terminate()
    assert agent.proc is not None and agent.proc.returncode == 0, agent.log()
    again = fl.restart(agent)
    fl.wait_online(again)
    assert fl.agent_id(again) == agent_id
    assert [r["id"] for r in agent_rows(fl)] == [agent_id]


def test_used_join_token_cannot_enrol_a_second_agent(fleet: Callable[..., Fleet]) -> None:
    fl = fleet()
    token = fl.join_token()
    first = fl.agent("c1", name="first", token=token)
    fl.wait_online(first)
    second = fl.agent("c1", name="second", token=token)
    code = fl.wait_exit(second)
    assert code != 0, second.log()
    log = flat(second.log())
    assert "enrolment refused" in log and "already used" in log, log
    assert not (second.state_dir / "agent.json").exists()
    assert [r["name"] for r in agent_rows(fl)] == ["first"]


def test_expired_join_token_is_refused(fleet: Callable[..., Fleet]) -> None:
    from sqlalchemy import update

    from streamspace.controlplane.security import sha256
    from streamspace.db.models import JoinToken

    fl = fleet()
    token = fl.join_token()

    async def expire() -> None:
        async with fl.cp.state.db() as db:
            await db.execute(
                update(JoinToken)
                .where(JoinToken.token_hash == sha256(token))
                .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
            )
            await db.commit()

    fl.cp.run(expire())
    agent = fl.agent("c1", token=token)
    # An agent without a token and without a state file says what to do.
    bare = fl.agent("c1", name="bare", token=None)
    assert fl.wait_exit(agent) != 0, agent.log()
    log = flat(agent.log())
    assert "enrolment refused" in log and "expired" in log, log
    assert agent_rows(fl) == []
    assert fl.wait_exit(bare) != 0
    assert "not enrolled" in flat(bare.log()) and "join token" in flat(bare.log())


# ---- revoke, rotate, drain ----------------------------------------------------------------


def test_revoke_disconnects_and_agent_gives_up(fleet: Callable[..., Fleet]) -> None:
    fl = fleet()
    agent = fl.agent("c1")
    operator = fl.user("op", role="operator")
    fl.wait_online(agent)
    agent_id = fl.agent_id(agent)
    assert operator.post(f"/api/v1/agents/{agent_id}/revoke").status_code == 403

    r = fl.admin.post(f"/api/v1/agents/{agent_id}/revoke")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "revoked"
    code = fl.wait_exit(agent, timeout=20)
    assert code != 0
    log = flat(agent.log())
    assert "revoked" in log, log
    assert "credential" in log and ("rejected" in log or "refused" in log), log
    assert not fl.cp.state.hub.is_connected(agent_id)

    assert fl.agent_view(agent_id)["status"] == "revoked"
    listed = fl.admin.get("/api/v1/agents").json()
    assert agent_id not in [a["id"] for a in listed], "revoked agents are hidden by default"
    assert [a["status"] for a in agent_rows(fl)] == ["revoked"]

    # Restarting it (same credential file) is refused at once and it does not retry forever.
    again = fl.restart(agent)
    assert fl.wait_exit(again, timeout=20) != 0
    assert "credential rejected" in flat(again.log()), again.log()
    assert not fl.cp.state.hub.is_connected(agent_id)
    assert fl.admin.post(f"/api/v1/agents/{agent_id}/rotate-credential").status_code == 409


def test_rotate_credential_invalidates_the_old_one(fleet: Callable[..., Fleet]) -> None:
    fl = fleet()
    agent = fl.agent("c1")
    fl.wait_online(agent)
    agent_id = fl.agent_id(agent)
    old_state = (agent.state_dir / "agent.json").read_text()

    r = fl.admin.post(f"/api/v1/agents/{agent_id}/rotate-credential")
    assert r.status_code == 200, r.text
    new_credential = r.json()["credential"]
    assert r.json()["agent_id"] == agent_id
    assert new_credential != json.loads(old_state)["credential"]

    # The running agent is disconnected; its reconnect with the old credential is refused.
    assert fl.wait_exit(agent, timeout=30) != 0, agent.log()
    assert "credential rejected" in flat(agent.log()), agent.log()
    assert fl.agent_view(agent_id)["status"] != "online"

    again = fl.restart(agent)
    assert fl.wait_exit(again, timeout=20) != 0
    assert "credential rejected" in flat(again.log())

    # With the new credential in its state file the same identity comes back.
    data = json.loads(old_state)
    data["credential"] = new_credential
    (agent.state_dir / "agent.json").write_text(json.dumps(data))
    third = fl.restart(agent)
    fl.wait_online(third)
    assert [a["id"] for a in agent_rows(fl)] == [agent_id]


def test_drain_keeps_new_sessions_off_the_agent(fleet: Callable[..., Fleet]) -> None:
    require(XVNC_MISSING)
    fl = fleet()
    agent = fl.agent("c1")
    # Full, not draining: xterm stays available (a create while the only agent that could run
    # it drains is refused at once: test_catalog_availability), so the session queues.
    full = fl.agent("c1", name="full", max_sessions=0)
    alice = fl.user()
    fl.wait_online(agent)
    fl.wait_online(full)
    agent_id = fl.agent_id(agent)

    r = fl.admin.post(f"/api/v1/agents/{agent_id}/drain")
    assert r.status_code == 200 and r.json()["draining"] is True, r.text
    s = fl.create(alice)

    def queued() -> dict[str, Any] | None:
        body = fl.get(s["id"])
        return body if "draining" in body["status_message"] else None

    body = wait_for(queued, 10, what="a 'draining' queue reason")
    assert body["state"] == "pending" and body["agent_id"] is None
    assert "no agent can run it: 1 draining" in body["status_message"], body
    assert any(e["kind"] == "queued" and "draining" in e["message"] for e in body["events"])
    assert fl.get(s["id"])["state"] == "pending"

    r = fl.admin.post(f"/api/v1/agents/{agent_id}/undrain")
    assert r.status_code == 200 and r.json()["draining"] is False, r.text
    running = wait_state(alice, s["id"], "running", timeout=30)
    assert running["agent_id"] == agent_id


# ---- protocol -----------------------------------------------------------------------------


def enroll(fl: Fleet, cluster_id: str = "raw") -> protocol.EnrollResponse:
    body = protocol.EnrollRequest(
        join_token=fl.join_token(),
        name="raw-client",
        cluster_id=cluster_id,
        cluster_name="Raw",
        backend="local",
    )
    with fl.cp.client() as anon:
        r = anon.post(
            protocol.AGENT_ENROLL_PATH,
            content=protocol.encode(body),
            headers={"Content-Type": "application/json"},
        )
    assert r.status_code == 201, r.text
    return protocol.EnrollResponse.model_validate_json(r.content)


def hello(agent_id: str, version: int = protocol.PROTOCOL_VERSION, **kw: Any) -> str:
    return protocol.encode(
        protocol.Hello(
            protocol_version=version,
            agent_id=agent_id,
            cluster_id=kw.pop("cluster_id", "raw"),
            cluster_name="Raw",
            backend="local",
            capacity=protocol.Capacity(max_sessions=1, cpu_millis=1000, memory_mb=1024),
            templates=[],
            isolation=kw.pop("isolation", protocol.Isolation(mode="uid-sandbox")),
            **kw,
        )
    )


async def recv_json(ws: Any, timeout: float = 5) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), timeout)
    data: dict[str, Any] = json.loads(raw)
    return data


def test_protocol_version_mismatch_is_refused(fleet: Callable[..., Fleet]) -> None:
    fl = fleet()
    enrolled = enroll(fl)
    url = f"ws://127.0.0.1:{fl.cp.port}{protocol.AGENT_CONNECT_PATH}"
    auth = {"Authorization": f"Bearer {enrolled.credential}"}

    async def run() -> tuple[dict[str, Any], int | None]:
        async with connect(url, additional_headers=auth) as ws:
            await ws.send(hello(enrolled.agent_id, version=99))
            msg = await recv_json(ws)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            return msg, ws.close_code

    msg, close_code = asyncio.run(run())
    assert msg["type"] == "error"
    assert msg["code"] == "unsupported_protocol_version"
    assert "99" in msg["message"] and "supported: 2" in msg["message"]
    assert close_code == 4400
    assert fl.agent_view(enrolled.agent_id)["status"] == "offline"

    async def refused(auth_header: dict[str, str], frame: str) -> dict[str, Any]:
        async with connect(url, additional_headers=auth_header) as ws:
            await ws.send(frame)
            return await recv_json(ws)

    wrong_cluster = asyncio.run(refused(auth, hello(enrolled.agent_id, cluster_id="other")))
    assert wrong_cluster["code"] == "cluster_mismatch"
    not_hello = asyncio.run(
        refused(
            auth,
            json.dumps(
                {"type": "heartbeat", "load": {"sessions": 0, "cpu_millis": 0, "memory_mb": 0}}
            ),
        )
    )
    assert not_hello["code"] == "expected_hello"

    # A wrong credential never gets a socket.
    async def bad_credential() -> None:
        bogus = {"Authorization": f"Bearer {enrolled.agent_id}.not-the-secret"}
        async with connect(url, additional_headers=bogus) as ws:
            await ws.recv()

    with pytest.raises(Exception) as info:
        asyncio.run(bad_credential())
    assert "403" in str(info.value) or "1008" in str(info.value), info.value


MALFORMED = [
    ("not json at all", "invalid_json"),
    ('{"type": "bogus"}', "invalid_message"),
    ('{"type": "heartbeat"}', "invalid_message"),
    ('{"type": "ack", "command_id": "x", "extra": 1}', "invalid_message"),
    ("[1, 2, 3]", "invalid_message"),
]


def test_malformed_frames_get_errors_and_the_connection_stays_up(
    fleet: Callable[..., Fleet],
) -> None:
    fl = fleet()
    enrolled = enroll(fl)
    url = f"ws://127.0.0.1:{fl.cp.port}{protocol.AGENT_CONNECT_PATH}"
    auth = {"Authorization": f"Bearer {enrolled.credential}"}
    heartbeat = protocol.encode(
        protocol.Heartbeat(load=protocol.Load(sessions=0, cpu_millis=0, memory_mb=0))
    )

    def last_seen() -> datetime:
        return datetime.fromisoformat(fl.agent_view(enrolled.agent_id)["last_seen"])

    async def run() -> list[dict[str, Any]]:
        async with connect(url, additional_headers=auth) as ws:
            await ws.send(hello(enrolled.agent_id))
            welcome = await recv_json(ws)
            assert welcome["type"] == "welcome" and welcome["agent_id"] == enrolled.agent_id
            errors = []
            for frame, _ in MALFORMED:
                await ws.send(frame)
                errors.append(await recv_json(ws))
            await ws.send(hello(enrolled.agent_id))  # a second hello is not valid any more
            errors.append(await recv_json(ws))
            before = await asyncio.to_thread(last_seen)
            await asyncio.sleep(0.1)
            await ws.send(heartbeat)
            await asyncio.to_thread(
                wait_for, lambda: last_seen() > before, 8, 0.2, "heartbeat after bad frames"
            )
            assert fl.cp.state.hub.is_connected(enrolled.agent_id)
            return errors

    errors = asyncio.run(run())
    for (frame, code), err in zip(MALFORMED, errors, strict=False):
        assert err["type"] == "error", (frame, err)
        assert err["code"] == code, (frame, err)
        assert err["message"], (frame, err)
    assert errors[-1]["type"] == "error" and errors[-1]["code"] == "unexpected_message"


def test_binary_frame_gets_an_error_and_the_connection_stays_up(
    fleet: Callable[..., Fleet],
) -> None:
    """A binary frame is as malformed as bad JSON: answer with `error`, keep the socket."""
    fl = fleet()
    enrolled = enroll(fl)
    url = f"ws://127.0.0.1:{fl.cp.port}{protocol.AGENT_CONNECT_PATH}"
    auth = {"Authorization": f"Bearer {enrolled.credential}"}

    async def run() -> tuple[dict[str, Any] | None, bool]:
        async with connect(url, additional_headers=auth) as ws:
            await ws.send(hello(enrolled.agent_id))
            assert (await recv_json(ws))["type"] == "welcome"
            await ws.send(b"\x00\x01binary")
            try:
                err: dict[str, Any] | None = await recv_json(ws)
            except ConnectionClosed:
                err = None
            await asyncio.sleep(0.3)
            return err, fl.cp.state.hub.is_connected(enrolled.agent_id)

    err, still_connected = asyncio.run(run())
    assert err is not None and err["type"] == "error", (
        "the control plane dropped the agent connection on a binary frame instead of "
        "answering with an error message"
    )
    assert still_connected


@pytest.mark.parametrize(
    ("templates", "code"),
    [
        ([f"template-{i:05d}" for i in range(15_000)], "invalid_message"),
        ([f"t{i}-" + "x" * 1000 for i in range(1_000)], "frame_too_large"),
    ],
    ids=["15000-templates", "15-MiB-hello"],
)
def test_an_oversized_hello_is_refused_and_nothing_is_stored(
    fleet: Callable[..., Fleet], templates: list[str], code: str
) -> None:
    """The probe got a 15 MiB hello with 15,000 template names stored on the agent row."""
    fl = fleet()
    enrolled = enroll(fl)
    url = f"ws://127.0.0.1:{fl.cp.port}{protocol.AGENT_CONNECT_PATH}"
    auth = {"Authorization": f"Bearer {enrolled.credential}"}
    frame = json.dumps(
        {
            **json.loads(hello(enrolled.agent_id)),
            "templates": templates,
            "cluster_name": "c" * (14 * 1024 * 1024 if code == "frame_too_large" else 10),
        }
    )

    async def run() -> dict[str, Any]:
        async with connect(url, additional_headers=auth, max_size=None) as ws:
            await ws.send(frame)
            msg = await recv_json(ws)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            return msg

    msg = asyncio.run(run())
    assert (msg["type"], msg["code"]) == ("error", code)
    view = fl.agent_view(enrolled.agent_id)
    assert view["templates"] == [] and view["status"] == "offline"


def test_progress_for_another_agents_session_is_not_recorded(
    fleet: Callable[..., Fleet],
) -> None:
    """An enrolled agent cannot write events into sessions it does not run: a SessionProgress
    naming another agent's session is dropped (and so is one for a session already running)."""
    require(XVNC_MISSING)
    fl = fleet()
    fl.wait_online(fl.agent("real"))
    alice = fl.user()
    session = fl.create(alice, cluster_id="real")
    wait_state(alice, session["id"], "running", timeout=60)
    enrolled = enroll(fl)
    url = f"ws://127.0.0.1:{fl.cp.port}{protocol.AGENT_CONNECT_PATH}"
    auth = {"Authorization": f"Bearer {enrolled.credential}"}
    forged = protocol.encode(
        protocol.SessionProgress(session_id=session["id"], message="forged: open this link")
    )
    heartbeat = protocol.encode(
        protocol.Heartbeat(load=protocol.Load(sessions=0, cpu_millis=0, memory_mb=0))
    )

    def last_seen() -> datetime:
        return datetime.fromisoformat(fl.agent_view(enrolled.agent_id)["last_seen"])

    async def run() -> None:
        async with connect(url, additional_headers=auth) as ws:
            await ws.send(hello(enrolled.agent_id))
            assert (await recv_json(ws))["type"] == "welcome"
            await ws.send(forged)
            before = await asyncio.to_thread(last_seen)
            await asyncio.sleep(0.1)
            await ws.send(heartbeat)  # frames are read in order: once this lands, that is queued
            await asyncio.to_thread(
                wait_for, lambda: last_seen() > before, 8, 0.2, "heartbeat after the progress"
            )

    asyncio.run(run())
    # Milestones are applied in arrival order with the agents' results: once the stop's result
    # (which came after the forged frame) has made the session stopped, that frame was handled.
    assert alice.delete(f"/api/v1/sessions/{session['id']}").status_code == 202
    wait_state(alice, session["id"], "stopped", timeout=30)
    events = alice.get(f"/api/v1/sessions/{session['id']}").json()["events"]
    assert [e for e in events if "stopped on agent" in e["message"]], events
    assert not [e for e in events if "forged" in e["message"]], events
