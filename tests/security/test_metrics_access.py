"""Who may read /metrics (issue 12, part 8).

/metrics says how many users, sessions and agents there are and what they do, and was open to
anyone who could reach the port: `streamspace up --host 0.0.0.0` served it to the whole network.
With STREAMSPACE_METRICS_TOKEN only the token's holder reads it; without one, `streamspace up`
serves it to this machine only.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import assert_problem

from conftest import require
from product_support import Product

TOKEN = "metrics-token-" + "x" * 24


def test_the_metrics_token_is_required_when_set(make_control_plane: Any) -> None:
    cp = make_control_plane(metrics_token=TOKEN)
    with cp.client() as anon:
        assert_problem(anon.get("/metrics"), 401, "metrics token")
        wrong = anon.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}-not"})
        assert_problem(wrong, 401, "metrics token")
        ok = anon.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and "streamspace_http_requests_total" in ok.text
    with cp.login() as admin:  # an admin's access token is not the metrics token
        assert_problem(admin.get("/metrics"), 401)


def this_hosts_address() -> str | None:
    """An address of this machine other than loopback (None if it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # UDP: picks the outgoing address, sends nothing
        except OSError:
            return None
        address = str(s.getsockname()[0])
    return None if address.startswith("127.") else address


@pytest.fixture
def up_on_all_addresses(tmp_path: Path) -> Iterator[Product]:
    p = Product(tmp_path / "data", args=["--host", "0.0.0.0"])
    try:
        p.start()
        yield p
    finally:
        p.stop()


def test_streamspace_up_serves_metrics_to_this_machine_only(up_on_all_addresses: Product) -> None:
    p = up_on_all_addresses
    assert httpx.get(f"{p.url}/metrics", timeout=10).status_code == 200
    relayed = httpx.get(f"{p.url}/metrics", headers={"X-Forwarded-For": "203.0.113.9"}, timeout=10)
    assert_problem(relayed, 403, "this machine only", "STREAMSPACE_METRICS_TOKEN")
    address = this_hosts_address()
    require(None if address else "this machine has no address other than loopback")
    remote = httpx.get(f"http://{address}:{p.port}/metrics", timeout=10)
    assert_problem(remote, 403, "this machine only")
    # The rest of the product still answers on that address.
    assert httpx.get(f"http://{address}:{p.port}/healthz", timeout=10).status_code == 200
