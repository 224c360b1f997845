"""Sound on the docker backend (podman): the image's entrypoint starts the session's own
PulseAudio beside Xvnc, serving on a socket in the directory the agent reaches the VNC socket
through; the agent's encoder reads it, and a tone played in the container reaches a WebSocket
client through the control plane as Opus of that frequency."""

from __future__ import annotations

import asyncio
import shutil
from typing import Any

import pytest
from test_docker_e2e import setup

from conftest import wait_for, wait_state
from streamspace_testing.opus import (
    dominant_frequency,
    listen,
    mic_loopback_command,
    pacat_tone_template,
    rms,
    round_trip,
)

pytestmark = pytest.mark.podman

__all__ = ["setup"]

TONE_HZ = 750
TONE_TEMPLATE = pacat_tone_template("tone-docker", "docker", TONE_HZ)


def test_a_tone_in_the_container_arrives_as_opus_of_that_frequency(setup: Any) -> None:
    if shutil.which("gst-launch-1.0") is None:
        pytest.skip("gst-launch-1.0 is not installed (scripts/install-system.sh)")
    cp, _agent, _engine, admin, _ = setup
    r = admin.post("/api/v1/templates", json=TONE_TEMPLATE)
    assert r.status_code == 201, r.text
    wait_for(
        lambda: any("tone-docker" in a["templates"] for a in admin.get("/api/v1/agents").json()),
        60,
        what="the docker agent offering the tone template",
    )
    r = admin.post("/api/v1/sessions", json={"template": "tone-docker"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert wait_state(admin, sid, {"running", "failed"}, 90)["state"] == "running"

    ticket = admin.post(f"/api/v1/sessions/{sid}/connect").json()["ticket"]
    url = f"ws://127.0.0.1:{cp.port}/api/v1/streams/audio?ticket={ticket}"
    samples = asyncio.run(listen(url, 1.5))
    tail = samples[-48_000:]
    assert rms(tail) > 0.05, f"the stream is silent (rms {rms(tail):.4f})"
    assert abs(dominant_frequency(tail) - TONE_HZ) < 10


MIC_HZ = 660
LOOPBACK_TEMPLATE: dict[str, Any] = {
    "name": "mic-loopback-docker",
    "display_name": "Microphone loopback (docker test)",
    "category": "Test",
    "resources": {"cpu_millis": 250, "memory_mb": 256},
    "display": {"width": 320, "height": 240, "depth": 24},
    "launch": {
        "docker": {
            "image": "localhost/streamspace/xterm:latest",
            "command": mic_loopback_command(),
        }
    },
}


def test_a_tone_sent_to_the_containers_microphone_is_what_it_records(setup: Any) -> None:
    """The image's entrypoint gives the container a default source `microphone`: an app that
    plays back what it records from it (parec | pacat) returns the tone sent to
    /streams/microphone on /streams/audio."""
    if shutil.which("gst-launch-1.0") is None:
        pytest.skip("gst-launch-1.0 is not installed (scripts/install-system.sh)")
    cp, _agent, _engine, admin, _ = setup
    r = admin.post("/api/v1/groups", json={"name": "mic-docker", "allow_microphone": True})
    assert r.status_code == 201, r.text
    assert admin.put(f"/api/v1/groups/{r.json()['id']}/members/admin").status_code == 200
    r = admin.post("/api/v1/templates", json=LOOPBACK_TEMPLATE)
    assert r.status_code == 201, r.text
    wait_for(
        lambda: any(
            LOOPBACK_TEMPLATE["name"] in a["templates"] for a in admin.get("/api/v1/agents").json()
        ),
        60,
        what="the docker agent offering the loopback template",
    )
    r = admin.post("/api/v1/sessions", json={"template": LOOPBACK_TEMPLATE["name"]})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert wait_state(admin, sid, {"running", "failed"}, 90)["state"] == "running"

    def url(path: str) -> str:
        ticket = admin.post(f"/api/v1/sessions/{sid}/connect").json()["ticket"]
        return f"ws://127.0.0.1:{cp.port}/api/v1/streams/{path}?ticket={ticket}"

    tail = asyncio.run(round_trip(url("microphone"), url("audio"), MIC_HZ))[-48_000:]
    assert rms(tail) > 0.05, f"the loopback is silent (rms {rms(tail):.4f})"
    assert abs(dominant_frequency(tail) - MIC_HZ) < 10
