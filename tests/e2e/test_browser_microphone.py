"""Browser end to end for the microphone: Chromium's fake capture device plays a WAV of a
660 Hz sine; after the user turns the viewer's Microphone toggle on, an app recording inside the
real sandboxed session (parec on its default source) hears 660 Hz. A user whose groups forbid
the microphone finds the toggle disabled, saying why."""

from __future__ import annotations

import shutil
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_browser import (  # noqa: F401 - `watched` is a fixture (on this module's browser)
    CHROMIUM,
    CHROMIUM_ARGS,
    MISSING,
    Watched,
    artifacts_on_failure,
    log_in,
    poll,
    watched,
)

from conftest import require
from product_support import Product
from sound_support import Recorder
from streamspace_testing.opus import SAMPLE_RATE, dominant_frequency, rms

pytestmark = pytest.mark.browser

TONE_HZ = 660


def write_tone(path: Path, hz: int, seconds: float) -> Path:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pcm = (0.5 * np.sin(2 * np.pi * hz * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(pcm.tobytes())
    return path


@pytest.fixture(scope="module")
def product(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Product]:
    require(MISSING)
    for tool in ("pulseaudio", "gst-launch-1.0", "parec"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/install-system.sh)")
    p = Product(
        tmp_path_factory.mktemp("e2e-microphone") / "data",
        env={"STREAMSPACE_MICROPHONE_ALLOW": "true"},
    )
    try:
        p.start()
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    wav = write_tone(tmp_path_factory.mktemp("fake-mic") / "tone.wav", TONE_HZ, 10)
    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                *CHROMIUM_ARGS,
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}",
            ],
        )
        try:
            yield b
        finally:
            b.close()


def running_xterm(product: Product) -> str:
    admin = product.login()
    try:
        r = admin.post("/api/v1/sessions", json={"template": "xterm"})
        assert r.status_code == 201, r.text
        session_id = str(r.json()["id"])
        poll(
            lambda: admin.get(f"/api/v1/sessions/{session_id}").json()["state"] == "running",
            60,
            "the session to run",
        )
        return session_id
    finally:
        admin.close()


def test_the_browsers_microphone_is_what_the_session_records(
    product: Product, watched: Watched
) -> None:
    hears_the_tone(product, watched, "microphone", processor="function")


def test_without_a_track_processor_an_audio_worklet_captures_it(
    product: Product, watched: Watched
) -> None:
    """Firefox and Safari have no MediaStreamTrackProcessor: the page takes the AudioWorklet
    path instead (here Chromium with the processor removed before the page loads)."""
    watched.page.add_init_script("delete window.MediaStreamTrackProcessor")
    hears_the_tone(product, watched, "microphone-worklet", processor="undefined")


def hears_the_tone(product: Product, watched: Watched, name: str, processor: str) -> None:
    page = watched.page
    session_id = running_xterm(product)
    with artifacts_on_failure(watched, product, name):
        log_in(page, product.url)
        page.goto(f"{product.url}/#/view/{session_id}")
        page.locator('[data-testid="connection-status"][data-status="connected"]').wait_for(
            timeout=30_000
        )
        assert page.evaluate("typeof MediaStreamTrackProcessor") == processor
        mic = page.get_by_test_id("toggle-microphone")
        poll(lambda: mic.is_enabled(), 10, "the Microphone toggle to be offered")
        assert mic.get_attribute("aria-pressed") == "false"  # off until the user asks
        recorder = Recorder(session_id)
        mic.click()
        assert mic.get_attribute("aria-pressed") == "true"
        page.wait_for_timeout(4000)
        samples = recorder.stop()
        loud = np.flatnonzero(np.abs(samples) > 0.02)
        assert len(loud) > SAMPLE_RATE, f"the session heard nothing (rms {rms(samples):.4f})"
        heard = samples[loud[0] + 4_800 : loud[0] + 4_800 + SAMPLE_RATE]
        assert abs(dominant_frequency(heard) - TONE_HZ) < 10
        # Off again: the page stops capturing (its track ends) and the session falls silent.
        mic.click()
        assert mic.get_attribute("aria-pressed") == "false"
        page.wait_for_timeout(500)
        quiet = Recorder(session_id)
        page.wait_for_timeout(1500)
        assert rms(quiet.stop()) < 0.005


def test_a_group_that_forbids_the_microphone_disables_the_toggle(
    product: Product, watched: Watched
) -> None:
    admin = product.login()
    try:
        r = admin.post("/api/v1/groups", json={"name": "no-mic", "allow_microphone": False})
        assert r.status_code == 201, r.text
        gid = r.json()["id"]
        assert admin.put(f"/api/v1/groups/{gid}/members/admin").status_code == 200
    finally:
        admin.close()
    page = watched.page
    session_id = running_xterm(product)
    with artifacts_on_failure(watched, product, "microphone-denied"):
        log_in(page, product.url)
        page.goto(f"{product.url}/#/view/{session_id}")
        page.locator('[data-testid="connection-status"][data-status="connected"]').wait_for(
            timeout=30_000
        )
        mic = page.get_by_test_id("toggle-microphone")
        assert mic.is_disabled()
        assert "do not allow the microphone" in (mic.get_attribute("title") or "")
