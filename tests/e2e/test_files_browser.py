"""Browser end to end for the viewer's Files panel: a file uploaded with the upload button and one
dropped onto the remote screen land in ~/Uploads of a real session (`streamspace up`, Xvnc,
xterm), show a progress bar, and download back byte for byte (docs/files.md)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import require
from e2e.test_browser import (
    MISSING,
    Watched,
    artifacts_on_failure,
    browser,
    log_in,
    wait_state,
)
from product_support import Product

pytestmark = pytest.mark.browser

__all__ = ["browser"]  # the module-scoped fixture, shared from test_browser


@pytest.fixture(scope="module")
def product(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Product]:
    require(MISSING)
    p = Product(tmp_path_factory.mktemp("e2e-files") / "data")
    try:
        p.start()
        yield p
    finally:
        p.stop()


@pytest.fixture
def watched(browser: Any) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(20_000)
    try:
        yield Watched(page)
    finally:
        context.close()


def download_item(page: Any, name: str, dest: Path) -> bytes:
    item = page.locator(f'[data-testid="files-item"][data-name="{name}"]')
    with page.expect_download() as info:
        item.get_by_test_id("download").click()
    # The browser's download manager fetched it from a single-use link (streamed to disk),
    # not a blob the page had to hold whole.
    assert "/files/download?ticket=" in info.value.url, info.value.url
    assert info.value.suggested_filename == name
    info.value.save_as(dest)
    return dest.read_bytes()


def test_upload_then_download_returns_identical_bytes(
    product: Product, watched: Watched, tmp_path: Path
) -> None:
    page = watched.page
    with artifacts_on_failure(watched, product, "files_round_trip"):
        log_in(page, product.url)
        page.get_by_test_id("launch-xterm").click()
        page.wait_for_url("**/#/sessions?highlight=*")
        session_id = page.url.split("highlight=")[1].split("&")[0]
        row = page.get_by_test_id(f"session-{session_id}")
        wait_state(row, "running")
        row.get_by_test_id("action-open").click()
        page.locator('[data-testid="connection-status"][data-status="connected"]').wait_for(
            timeout=30_000
        )

        page.get_by_test_id("toggle-files").click()
        panel = page.get_by_test_id("files-panel")
        panel.wait_for()

        # The upload button.
        picked = os.urandom(5 * 1024 * 1024 + 3)
        page.get_by_test_id("upload-input").set_input_files(
            files=[{"name": "picked.bin", "mimeType": "application/octet-stream", "buffer": picked}]
        )
        status = page.get_by_test_id("upload-status")
        page.wait_for_function(
            "() => document.querySelector('[data-testid=upload-status]')"
            ".textContent.startsWith('Uploaded picked.bin')"
        )
        assert page.get_by_test_id("upload-progress").evaluate("p => p.value") == 1

        # Files dropped onto the remote screen.
        dropped = os.urandom(200_000)
        transfer = page.evaluate_handle(
            """(bytes) => {
              const dt = new DataTransfer();
              dt.items.add(new File([new Uint8Array(bytes)], "dropped.bin"));
              return dt;
            }""",
            list(dropped),
        )
        page.get_by_test_id("screen").dispatch_event("drop", {"dataTransfer": transfer})
        page.wait_for_function(
            "() => document.querySelector('[data-testid=upload-status]')"
            ".textContent.startsWith('Uploaded dropped.bin')"
        )
        assert "Uploaded dropped.bin" in status.inner_text()

        # Browse into ~/Uploads and download both back.
        page.locator('[data-testid="files-item"][data-name="Uploads"] button').first.click()
        page.locator('[data-testid="files-item"][data-name="picked.bin"]').wait_for()
        assert download_item(page, "picked.bin", tmp_path / "picked.bin") == picked
        assert download_item(page, "dropped.bin", tmp_path / "dropped.bin") == dropped
        assert not [e for e in watched.errors if "pageerror" in e], watched.errors
        assert watched.csp_violations() == [], watched.csp_violations()
