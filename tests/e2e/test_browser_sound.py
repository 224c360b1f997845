"""Browser end to end for sound: a tone played inside a real sandboxed session reaches the
viewer page's Web Audio graph (its AnalyserNode peaks at the tone's frequency) after the user
turns sound on in the viewer's toolbar."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

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
from streamspace_testing.opus import tone_template

pytestmark = pytest.mark.browser

TONE_HZ = 660
TONE = tone_template("tone-e2e", "Tone", TONE_HZ, 640, 480)

PEAK_HZ = """() => {
  const btn = document.querySelector('[data-testid="toggle-sound"]');
  const g = btn && btn.audioGraph;
  if (!g) return null;
  const bins = new Float32Array(g.analyser.frequencyBinCount);
  g.analyser.getFloatFrequencyData(bins);
  let best = 0;
  for (let i = 1; i < bins.length; i++) if (bins[i] > bins[best]) best = i;
  if (bins[best] < -70) return null;
  return best * g.context.sampleRate / g.analyser.fftSize;
}"""


@pytest.fixture(scope="module")
def product(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Product]:
    require(MISSING)
    for tool in ("pulseaudio", "gst-launch-1.0"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/install-system.sh)")
    # Heartbeats every second: the agent rereads the catalog (and takes the tone template) in 6 s.
    p = Product(
        tmp_path_factory.mktemp("e2e-sound") / "data",
        env={"STREAMSPACE_AGENT_HEARTBEAT_SECONDS": "1"},
    )
    try:
        p.start()
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[*CHROMIUM_ARGS, "--autoplay-policy=no-user-gesture-required"],
        )
        try:
            yield b
        finally:
            b.close()


def test_a_tone_in_the_session_reaches_the_pages_audio_graph(
    product: Product, watched: Watched
) -> None:
    page = watched.page
    admin = product.login()
    try:
        r = admin.post("/api/v1/templates", json=TONE)
        assert r.status_code == 201, r.text
        # The embedded agent learns of the new template with its next catalog refresh.
        created = poll(
            lambda: (
                (r := admin.post("/api/v1/sessions", json={"template": TONE["name"]})).status_code
                == 201
                and r
            ),
            30,
            "an agent to take the tone template",
        )
        session_id = created.json()["id"]
        poll(
            lambda: admin.get(f"/api/v1/sessions/{session_id}").json()["state"] == "running",
            60,
            "the tone session to run",
        )
    finally:
        admin.close()
    with artifacts_on_failure(watched, product, "sound"):
        log_in(page, product.url)
        page.goto(f"{product.url}/#/view/{session_id}")
        page.locator('[data-testid="connection-status"][data-status="connected"]').wait_for(
            timeout=30_000
        )
        sound = page.get_by_test_id("toggle-sound")
        assert sound.get_attribute("aria-pressed") == "false"
        assert page.evaluate(PEAK_HZ) is None
        sound.click()
        assert sound.get_attribute("aria-pressed") == "true"
        peak = poll(lambda: page.evaluate(PEAK_HZ), 20, "sound in the page's analyser")
        assert abs(peak - TONE_HZ) < 2 * 48000 / 4096, peak
        # Sound off: the page stops listening (no stream socket, graph falls silent).
        sound.click()
        poll(lambda: page.evaluate(PEAK_HZ) is None, 10, "silence after sound off")
