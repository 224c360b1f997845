"""Live thumbnails: `GET /api/v1/sessions/{id}/thumbnail` (docs/streaming.md).

Real control plane, real agent subprocess (the dial-back path: OpenStream with purpose
`thumbnail`), real Xvnc + xterm; and `streamspace up`, whose embedded agent is asked in-process.
The image must be a JPEG of the session's real screen scaled to the protocol's width.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from api_support import assert_problem, login
from PIL import Image
from test_streams_support import Desk, desk

from conftest import XVNC_MISSING, require, wait_for
from product_support import Product
from streamspace.protocol import THUMBNAIL_WIDTH
from vnc_support import vnc_clients

pytestmark = pytest.mark.xvnc


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Desk]:
    with desk(tmp_path_factory.mktemp("thumbnails"), thumbnail_cache_seconds=0.5) as shared:
        yield shared


def decoded(r: httpx.Response) -> Image.Image:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg"
    assert "no-store" in r.headers["cache-control"]
    image = Image.open(io.BytesIO(r.content))
    image.load()
    assert image.format == "JPEG"
    return image


def drawn_thumbnail(c: httpx.Client, sid: str, timeout: float = 20) -> Image.Image:
    """The first thumbnail showing more than one colour (xterm draws its prompt after start)."""
    deadline = time.monotonic() + timeout
    while True:
        image = decoded(c.get(f"/api/v1/sessions/{sid}/thumbnail"))
        low, high = image.convert("L").getextrema()
        if high - low > 64:
            return image
        assert time.monotonic() < deadline, f"thumbnail stayed one colour ({low}..{high})"
        time.sleep(0.6)


def test_thumbnail_of_a_running_session(d: Desk) -> None:
    sid = d.start_session()["id"]
    image = drawn_thumbnail(d.admin, sid)
    # 1280x800 scaled to the protocol's width, aspect kept.
    assert image.size == (THUMBNAIL_WIDTH, THUMBNAIL_WIDTH * 800 // 1280)
    assert d.agent_log_count("thumbnail_sent") >= 1
    # The agent's snapshot client leaves no connection behind on the session's VNC server.
    wait_for(lambda: vnc_clients(sid) == 0, 10, what="the snapshot connection to close")


def test_concurrent_requests_share_one_capture(d: Desk) -> None:
    sid = d.start_session()["id"]
    drawn_thumbnail(d.admin, sid)
    time.sleep(0.6)  # past the cache lifetime: the next request captures anew
    before = d.cp.state.thumbnails.captures
    url = f"/api/v1/sessions/{sid}/thumbnail"
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: d.admin.get(url), range(8)))
    bodies = {decoded(r).tobytes() for r in responses}
    assert len(bodies) == 1
    assert d.cp.state.thumbnails.captures - before == 1


def test_another_users_session_is_not_found(d: Desk) -> None:
    owner = d.user("thumb-owner")
    other = d.user("thumb-other")
    sid = d.start_session(owner)["id"]
    decoded(owner.get(f"/api/v1/sessions/{sid}/thumbnail"))
    assert_problem(other.get(f"/api/v1/sessions/{sid}/thumbnail"), 404, "does not exist")
    # An admin may look at anyone's, like the stream.
    decoded(d.admin.get(f"/api/v1/sessions/{sid}/thumbnail"))


def test_a_session_not_running_has_no_thumbnail(d: Desk) -> None:
    sid = d.start_session()["id"]
    d.stop_session(sid)
    body = assert_problem(d.admin.get(f"/api/v1/sessions/{sid}/thumbnail"), 409, "stopped")
    assert body["current_state"] == "stopped"
    assert_problem(d.admin.get("/api/v1/sessions/nope/thumbnail"), 404)


def test_embedded_agent_thumbnail(tmp_path_factory: pytest.TempPathFactory) -> None:
    """`streamspace up`: the control plane asks its in-process agent, no dial-back."""
    require(XVNC_MISSING)
    p = Product(tmp_path_factory.mktemp("thumbnails-up") / "data")
    try:
        p.start()
        c = login(p)
        r = c.post("/api/v1/sessions", json={"template": "xterm"})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        deadline = time.monotonic() + 30
        while c.get(f"/api/v1/sessions/{sid}").json()["state"] != "running":
            assert time.monotonic() < deadline, "xterm never ran"
            time.sleep(0.2)
        image = drawn_thumbnail(c, sid)
        assert image.width == THUMBNAIL_WIDTH
        c.delete(f"/api/v1/sessions/{sid}")
        c.close()
    finally:
        p.stop()
