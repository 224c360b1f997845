"""The browser's microphone: Opus frames sent to /api/v1/streams/microphone reach a real
sandboxed local session's default source, where an app recording inside hears that tone; the
per-group policy (off by default) is enforced by the control plane before any agent stream.

Path under test: this client (libopus via PyAV, agent/audio.py framing) -> control plane ->
agent WebSocket -> the agent's decoder (RTP, opusdec, pulsesink as nobody) -> the session's
`streamspace_mic` sink -> its monitor remapped as `microphone`, the default source -> `parec`
run inside the session as its user.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from test_streams_support import Desk, desk
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from sound_support import Recorder
from streamspace_testing.opus import dominant_frequency, rms, speak, tone_frames

pytestmark = pytest.mark.xvnc

MIC_PATH = "/api/v1/streams/microphone"
TONE_HZ = 660


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Desk]:
    for tool in ("pulseaudio", "gst-launch-1.0", "parec"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/install-system.sh)")
    with desk(tmp_path_factory.mktemp("microphone")) as shared:
        yield shared


def group(d: Desk, name: str, member: str, **policy: Any) -> str:
    r = d.admin.post("/api/v1/groups", json={"name": name, **policy})
    assert r.status_code == 201, r.text
    gid = str(r.json()["id"])
    assert d.admin.put(f"/api/v1/groups/{gid}/members/{member}").status_code == 200
    return gid


async def refusal(url: str) -> tuple[int, str]:
    """(close code, reason) of a socket the control plane closes; 403 before the handshake."""
    try:
        ws = await connect(url, open_timeout=20)
    except InvalidStatus as exc:
        return exc.response.status_code, ""
    async with ws:
        try:
            await asyncio.wait_for(ws.recv(), 20)
        except ConnectionClosed as exc:
            assert exc.rcvd is not None
            return exc.rcvd.code, exc.rcvd.reason
    raise AssertionError("the microphone socket stayed open")


def test_a_tone_from_the_browser_is_what_apps_in_the_session_record(d: Desk) -> None:
    c = d.user("speaker")
    group(d, "speakers", "speaker", allow_microphone=True)
    sid = d.start_session(c)["id"]
    recorder = Recorder(sid)
    connected = d.connect(sid, c)
    assert connected["microphone"] is True  # the viewer offers its toggle
    ticket = connected["ticket"]
    asyncio.run(speak(d.ws_url(ticket, MIC_PATH), tone_frames(TONE_HZ, 3.0)))
    samples = recorder.stop()
    assert len(samples) > 48_000, f"the recorder got {len(samples)} samples"
    loud = samples[np.abs(samples) > 0.05]
    assert len(loud) > 24_000, f"the session's microphone stayed silent (rms {rms(samples):.4f})"
    start = int(np.argmax(np.abs(samples) > 0.05))
    heard = samples[start + 4_800 : start + 4_800 + 48_000]
    assert rms(heard) > 0.1
    assert abs(dominant_frequency(heard) - TONE_HZ) < 10
    d.stop_session(sid)


def test_the_microphone_is_off_by_default_and_any_group_can_deny_it(d: Desk) -> None:
    quiet = d.user("unheard")
    sid = d.start_session(quiet)["id"]
    connected = d.connect(sid, quiet)
    assert connected["microphone"] is False
    ticket = connected["ticket"]
    code, reason = asyncio.run(refusal(d.ws_url(ticket, MIC_PATH)))
    assert (code, reason) == (4403, "your groups do not allow the microphone")

    group(d, "mic-open", "unheard", allow_microphone=True)
    closed = group(d, "mic-closed", "unheard", allow_microphone=False)  # False wins over True
    assert d.admin.get(f"/api/v1/groups/{closed}").json()["allow_microphone"] is False
    ticket = d.connect(sid, quiet)["ticket"]
    assert asyncio.run(refusal(d.ws_url(ticket, MIC_PATH)))[0] == 4403

    r = d.admin.patch(f"/api/v1/groups/{closed}", json={"allow_microphone": None})
    assert r.status_code == 200 and r.json()["allow_microphone"] is None  # no say any more
    assert d.connect(sid, quiet)["microphone"] is True  # the other group's True now decides
    assert d.agent_log_count("stream_open") == d.agent_log_count("stream_closed")
    d.stop_session(sid)


def test_microphone_tickets_are_single_use_and_bound_to_the_owner(d: Desk) -> None:
    owner = d.user("talker")
    group(d, "talkers", "talker", allow_microphone=True)
    mallory = d.user("mallory-mic")
    group(d, "mallories", "mallory-mic", allow_microphone=True)
    sid = d.start_session(owner)["id"]
    r = mallory.post(f"/api/v1/sessions/{sid}/connect")
    assert r.status_code == 404, r.text  # another user's session, as anywhere else

    ticket = d.connect(sid, owner)["ticket"]
    url = d.ws_url(ticket, MIC_PATH)
    asyncio.run(speak(url, tone_frames(TONE_HZ, 0.2)))
    assert asyncio.run(refusal(url)) == (403, "")  # replayed: refused before the handshake
    d.stop_session(sid)


def test_a_frame_that_is_not_opus_framing_ends_the_stream_with_the_reason(d: Desk) -> None:
    c = d.user("garbler")
    group(d, "garblers", "garbler", allow_microphone=True)
    sid = d.start_session(c)["id"]
    ticket = d.connect(sid, c)["ticket"]

    async def garble() -> tuple[int, str]:
        async with connect(d.ws_url(ticket, MIC_PATH), open_timeout=20) as ws:
            await ws.send(b"\x07" + bytes(20))
            try:
                await asyncio.wait_for(ws.recv(), 20)
            except ConnectionClosed as exc:
                assert exc.rcvd is not None
                return exc.rcvd.code, exc.rcvd.reason
        raise AssertionError("the stream stayed open")

    code, reason = asyncio.run(garble())
    assert "unknown audio frame version 7" in reason, (code, reason)
    d.stop_session(sid)


def test_a_bad_microphone_policy_value_is_422(d: Desk) -> None:
    r = d.admin.post("/api/v1/groups", json={"name": "bad-mic", "allow_microphone": "sometimes"})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem")
    assert "allow_microphone" in r.text


def test_another_sites_page_cannot_open_the_microphone_socket(d: Desk) -> None:
    c = d.user("cross-site")
    group(d, "cross-site-mic", "cross-site", allow_microphone=True)
    sid = d.start_session(c)["id"]
    url = d.ws_url(d.connect(sid, c)["ticket"], MIC_PATH)

    async def from_origin(origin: str) -> int:
        try:
            ws = await connect(url, origin=Origin(origin), open_timeout=20)
        except InvalidStatus as exc:
            return exc.response.status_code
        await ws.close()
        return 101

    assert asyncio.run(from_origin("https://evil.example")) == 403
    # Refused before the ticket was looked at: the viewer's own origin still opens with it.
    assert asyncio.run(from_origin(f"http://127.0.0.1:{d.cp.port}")) == 101
    d.stop_session(sid)
