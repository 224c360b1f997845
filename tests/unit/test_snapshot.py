"""The agent's one-frame RFB client (agent/snapshot.py) against a scripted in-test server, so
its byte-level behaviour is pinned down; the real-Xvnc path is tests/integration/
test_streams_thumbnails.py."""

from __future__ import annotations

import asyncio
import io
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest
from PIL import Image

from streamspace.agent.snapshot import Frame, SnapshotError, capture, encode_jpeg

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
W, H = 4, 2


def pixel(x: int, y: int) -> bytes:
    """BGRX of a distinct colour per pixel."""
    return bytes([x * 60, y * 120, 200 - x * 40, 0])


async def server_init(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"RFB 003.008\n")
    assert await reader.readexactly(12) == b"RFB 003.008\n"
    writer.write(bytes([2, 2, 1]))  # VNC auth and None offered: the client picks None
    assert await reader.readexactly(1) == b"\x01"
    writer.write(struct.pack(">I", 0))
    assert await reader.readexactly(1) == b"\x01"  # shared
    name = b"session"
    writer.write(struct.pack(">HH", W, H) + bytes(16) + struct.pack(">I", len(name)) + name)
    await writer.drain()


async def run(script: Script) -> Frame:
    client_sock, server_sock = socket.socketpair()
    s_reader, s_writer = await asyncio.open_connection(sock=server_sock)
    c_reader, c_writer = await asyncio.open_connection(sock=client_sock)
    task = asyncio.create_task(script(s_reader, s_writer))
    try:
        async with asyncio.timeout(5):
            return await capture(c_reader, c_writer)
    finally:
        c_writer.close()
        await asyncio.gather(task, return_exceptions=True)
        s_writer.close()


async def test_reads_a_frame_sent_in_two_rectangles_after_other_messages() -> None:
    requests: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server_init(reader, writer)
        requests.append(await reader.readexactly(20))  # SetPixelFormat
        requests.append(await reader.readexactly(8))  # SetEncodings (raw only)
        requests.append(await reader.readexactly(10))  # FramebufferUpdateRequest
        writer.write(b"\x02")  # Bell
        writer.write(b"\x03\0\0\0" + struct.pack(">I", 3) + b"abc")  # ServerCutText
        writer.write(b"\x00\x00" + struct.pack(">H", 2))
        for y in range(H):
            writer.write(struct.pack(">HHHHi", 0, y, W, 1, 0))
            writer.write(b"".join(pixel(x, y) for x in range(W)))
        await writer.drain()

    frame = await run(script)
    assert (frame.width, frame.height) == (W, H)
    assert bytes(frame.pixels) == b"".join(pixel(x, y) for y in range(H) for x in range(W))
    assert requests[0][4:8] == bytes([32, 24, 0, 1])  # 32 bpp, little-endian, true colour
    assert requests[1] == struct.pack(">BxHi", 2, 1, 0)
    assert requests[2] == struct.pack(">BBHHHH", 3, 0, 0, 0, W, H)  # whole screen, full


async def test_refuses_a_connection_without_security_none() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"RFB 003.008\n")
        await reader.readexactly(12)
        writer.write(bytes([1, 2]))
        await writer.drain()
        await reader.read(1)

    with pytest.raises(SnapshotError, match="security types"):
        await run(script)


async def test_refuses_a_rectangle_outside_the_screen() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server_init(reader, writer)
        await reader.readexactly(38)
        writer.write(b"\x00\x00" + struct.pack(">H", 1) + struct.pack(">HHHHi", 2, 0, W, H, 0))
        await writer.drain()
        await reader.read(1)

    with pytest.raises(SnapshotError, match="outside the screen"):
        await run(script)


async def test_a_server_that_closes_mid_frame_is_an_error() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server_init(reader, writer)
        await reader.readexactly(38)
        writer.write(b"\x00\x00" + struct.pack(">H", 1) + struct.pack(">HHHHi", 0, 0, W, H, 0))
        writer.write(b"\x01" * 5)
        writer.close()

    with pytest.raises(SnapshotError, match="closed"):
        await run(script)


def test_encode_scales_to_the_width_and_keeps_the_colours() -> None:
    width, height = 1280, 800
    left = bytes([0, 0, 255, 0]) * (width // 2)  # red (BGRX)
    right = bytes([255, 0, 0, 0]) * (width // 2)  # blue
    frame = Frame(width, height, bytearray((left + right) * height))
    image = Image.open(io.BytesIO(encode_jpeg(frame, 320)))
    assert image.format == "JPEG"
    assert image.size == (320, 200)
    r, _, b = image.convert("RGB").getpixel((40, 100))  # type: ignore[misc]
    assert r > 200 and b < 60
    r, _, b = image.convert("RGB").getpixel((280, 100))  # type: ignore[misc]
    assert b > 200 and r < 60


def test_encode_leaves_a_small_screen_unscaled() -> None:
    frame = Frame(200, 100, bytearray(bytes([10, 20, 30, 0]) * 200 * 100))
    assert Image.open(io.BytesIO(encode_jpeg(frame, 320))).size == (200, 100)
