"""Sound: a tone played inside a real sandboxed local session (its own PulseAudio, started by
session-init.sh as the session user) reaches a WebSocket client through the control plane as
Opus packets that decode to that tone; audio tickets are single use and owner bound.

Path under test: gst-launch audiotestsrc -> pulsesink (in the sandbox) -> the session's null
sink -> the agent's encoder (pulsesrc on the monitor, opusenc) -> agent WebSocket -> control
plane -> the client here, which decodes with libopus (PyAV).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator

import pytest
from test_streams_support import Desk, desk
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from streamspace_testing.opus import dominant_frequency, listen, rms, tone_template

pytestmark = pytest.mark.xvnc

AUDIO_PATH = "/api/v1/streams/audio"
TONE_HZ = 880
TONE_TEMPLATE = tone_template("tone", "Tone (audio tests)", TONE_HZ, 320, 240)


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Desk]:
    for tool in ("pulseaudio", "gst-launch-1.0"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/install-system.sh)")
    with desk(tmp_path_factory.mktemp("audio"), templates=[TONE_TEMPLATE]) as shared:
        yield shared


def test_tone_in_the_session_arrives_as_opus_of_that_frequency(d: Desk) -> None:
    session = d.start_session(template="tone")
    ticket = d.connect(session["id"])["ticket"]
    samples = asyncio.run(listen(d.ws_url(ticket, AUDIO_PATH), 1.5))
    tail = samples[-48_000:]
    assert rms(tail) > 0.05, f"the stream is silent (rms {rms(tail):.4f})"
    assert abs(dominant_frequency(tail) - TONE_HZ) < 10


async def status_of(url: str) -> int:
    try:
        ws = await connect(url, open_timeout=20)
    except InvalidStatus as exc:
        return exc.response.status_code
    await ws.close()
    return 101


def test_audio_ticket_is_single_use_and_bound_to_its_owner(d: Desk) -> None:
    mallory = d.user("mallory-audio")
    session = d.start_session(template="tone")
    # Another user cannot get a ticket for it at all (404, as for any other user's session)...
    r = mallory.post(f"/api/v1/sessions/{session['id']}/connect")
    assert r.status_code == 404, r.text
    # ...and a ticket opens once: replaying it is refused before the socket is accepted.
    ticket = d.connect(session["id"])["ticket"]
    url = d.ws_url(ticket, AUDIO_PATH)
    assert asyncio.run(status_of(url)) == 101
    assert asyncio.run(status_of(url)) == 403
