"""One picture of a session's screen, for the Sessions list's live thumbnails.

The agent already holds the way into each session's VNC server (the backend's `open_vnc`, the
connection viewers are tunnelled through, which presents security type None whatever the
server requires). A thumbnail is a shared, view-only RFB client on that connection for one
frame: version and security None, ClientInit with the shared flag (viewers stay connected),
a 32-bit true-colour pixel format, raw encoding only, one non-incremental
FramebufferUpdateRequest of the whole screen, read until every pixel has arrived, close.
Nothing is ever sent to the session besides those requests: no keys, no pointer.

Scaling and JPEG encoding are CPU work of tens of milliseconds, so they run in a worker
thread (`encode_jpeg` via `asyncio.to_thread`), never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import struct

from PIL import Image

from streamspace.agent.vnc import ByteStreamReader, ByteStreamWriter

__all__ = ["Frame", "SnapshotError", "capture", "encode_jpeg", "thumbnail"]

MAX_PIXELS = 7680 * 4320
"""Largest framebuffer accepted (the protocol's Display bound): a server announcing more is
refused instead of having the agent allocate whatever it claims."""
JPEG_QUALITY = 70

_SECURITY_NONE = 1
_RAW = 0
_FB_UPDATE = 0
_COLOUR_MAP = 1
_BELL = 2
_CUT_TEXT = 3
_BGRX32 = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
"""bpp 32, depth 24, little-endian, true colour, 8 bits per channel, red at bit 16: in memory
each pixel is B, G, R, X - Pillow's "BGRX" raw mode, no per-pixel conversion in Python."""


class SnapshotError(ConnectionError):
    """The session's VNC server did not give a frame (closed, refused, spoke nonsense)."""


class Frame:
    """A whole framebuffer as BGRX bytes."""

    def __init__(self, width: int, height: int, pixels: bytearray) -> None:
        self.width = width
        self.height = height
        self.pixels = pixels


async def _read(reader: ByteStreamReader, n: int) -> bytes:
    """Exactly n bytes from a reader that only promises `read(n)` (the security front)."""
    chunks = bytearray()
    while len(chunks) < n:
        data = await reader.read(n - len(chunks))
        if not data:
            raise SnapshotError("the session's VNC server closed the connection")
        chunks += data
    return bytes(chunks)


async def _handshake(reader: ByteStreamReader, writer: ByteStreamWriter) -> tuple[int, int]:
    banner = await _read(reader, 12)
    if not banner.startswith(b"RFB 003."):
        raise SnapshotError(f"not an RFB server (banner {banner!r})")
    minor = int(banner[8:11]) if banner[8:11].isdigit() else 3
    chosen = 8 if minor >= 8 else 7 if minor == 7 else 3
    writer.write(b"RFB 003.%03d\n" % chosen)
    await writer.drain()
    if chosen == 3:
        (sec_type,) = struct.unpack(">I", await _read(reader, 4))
        if sec_type != _SECURITY_NONE:
            raise SnapshotError(f"the VNC connection asks for security type {sec_type}")
    else:
        (count,) = await _read(reader, 1)
        offered = await _read(reader, count) if count else b""
        if _SECURITY_NONE not in offered:
            raise SnapshotError(f"the VNC connection offers security types {list(offered)}")
        writer.write(bytes([_SECURITY_NONE]))
        await writer.drain()
        if chosen >= 8:
            (result,) = struct.unpack(">I", await _read(reader, 4))
            if result != 0:
                raise SnapshotError("the VNC connection refused security type None")
    writer.write(b"\x01")  # ClientInit: shared, so the session's viewers stay connected
    await writer.drain()
    width, height = struct.unpack(">HH", await _read(reader, 4))
    await _read(reader, 16)  # the server's pixel format: replaced by ours below
    (name_len,) = struct.unpack(">I", await _read(reader, 4))
    await _read(reader, min(name_len, 4096))
    if width == 0 or height == 0 or width * height > MAX_PIXELS:
        raise SnapshotError(f"the session's screen is {width}x{height}")
    return width, height


async def _skip_message(reader: ByteStreamReader, kind: int) -> None:
    """Server messages other than an update that may arrive before it."""
    if kind == _BELL:
        return
    if kind == _COLOUR_MAP:
        _pad, _first, count = struct.unpack(">BHH", await _read(reader, 5))
        await _read(reader, count * 6)
        return
    if kind == _CUT_TEXT:
        await _read(reader, 3)
        (length,) = struct.unpack(">I", await _read(reader, 4))
        remaining = length
        while remaining:
            remaining -= len(await _read(reader, min(remaining, 65536)))
        return
    raise SnapshotError(f"unexpected RFB server message type {kind}")


async def capture(reader: ByteStreamReader, writer: ByteStreamWriter) -> Frame:
    """The whole screen of the session behind this (unauthenticated-looking) RFB connection."""
    width, height = await _handshake(reader, writer)
    writer.write(b"\x00\x00\x00\x00" + _BGRX32)  # SetPixelFormat
    writer.write(struct.pack(">BxHi", 2, 1, _RAW))  # SetEncodings: raw only
    writer.write(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))  # full, non-incremental
    await writer.drain()
    pixels = bytearray(width * height * 4)
    stride = width * 4
    covered = 0
    while covered < width * height:
        (kind,) = await _read(reader, 1)
        if kind != _FB_UPDATE:
            await _skip_message(reader, kind)
            continue
        _pad, rects = struct.unpack(">BH", await _read(reader, 3))
        for _ in range(rects):
            x, y, w, h, encoding = struct.unpack(">HHHHi", await _read(reader, 12))
            if encoding != _RAW:
                raise SnapshotError(f"the VNC server sent encoding {encoding}, not raw")
            if x + w > width or y + h > height:
                raise SnapshotError("the VNC server sent a rectangle outside the screen")
            row = w * 4
            for line in range(y, y + h):
                start = line * stride + x * 4
                pixels[start : start + row] = await _read(reader, row)
            covered += w * h
    return Frame(width, height, pixels)


def encode_jpeg(frame: Frame, max_width: int) -> bytes:
    """The frame scaled to at most `max_width` wide (aspect kept), as JPEG. Blocking: CPU."""
    image = Image.frombuffer("RGB", (frame.width, frame.height), frame.pixels, "raw", "BGRX", 0, 1)
    if frame.width > max_width:
        height = max(1, round(frame.height * max_width / frame.width))
        image = image.resize((max_width, height), Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=JPEG_QUALITY, optimize=False)
    return out.getvalue()


async def thumbnail(
    reader: ByteStreamReader, writer: ByteStreamWriter, max_width: int, within: float
) -> bytes:
    """capture + encode; the connection is closed here whatever happens."""
    try:
        async with asyncio.timeout(within):
            frame = await capture(reader, writer)
    except TimeoutError as exc:
        raise SnapshotError("the session's VNC server sent no frame in time") from exc
    finally:
        writer.close()
        with contextlib.suppress(OSError, RuntimeError):
            await writer.wait_closed()
    return await asyncio.to_thread(encode_jpeg, frame, max_width)
