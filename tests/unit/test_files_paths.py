"""Home paths as both sides parse them, and which backends can reach homes for file transfer."""

from __future__ import annotations

import asyncio

import pytest

from streamspace.agent.backends.base import Backend, NotSupportedByBackend
from streamspace.protocol import HomePathError, OpenStream, home_path_parts


@pytest.mark.parametrize(
    ("path", "parts"),
    [("", []), (".", []), ("Uploads", ["Uploads"]), ("a//b/./c/", ["a", "b", "c"])],
)
def test_relative_paths_split_into_components(path: str, parts: list[str]) -> None:
    assert home_path_parts(path) == parts


@pytest.mark.parametrize(
    "path",
    ["/etc/passwd", "../x", "a/../b", "..", "~/x", "~root", "a\x00b", "x" * 256, "a/" * 3000],
)
def test_paths_out_of_the_home_are_refused(path: str) -> None:
    with pytest.raises(HomePathError):
        home_path_parts(path)


def test_open_stream_defaults_to_a_viewer_stream() -> None:
    msg = OpenStream(stream_id="s", session_id="x", path="/p")
    assert msg.purpose == "vnc" and msg.file_path == ""


def test_a_backend_without_homes_says_file_transfer_is_not_supported() -> None:
    class Probe:
        kind = "nowhere"

    with pytest.raises(NotSupportedByBackend, match="not supported by the nowhere backend"):
        asyncio.run(Backend.home_access(Probe(), "s"))  # type: ignore[arg-type]
