"""The RFB client against a scripted in-test server, so byte-level behaviour is pinned down."""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from streamspace_testing.rfb import (
    ENCODING_DESKTOP_SIZE,
    ENCODING_RAW,
    KEYSYM_RETURN,
    PixelFormat,
    RFBClient,
    RFBError,
    char_to_keysym,
    encode_png,
)

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

WIDTH, HEIGHT = 4, 3
# The server's own format deliberately differs (16 bpp): the client must override it.
SERVER_FORMAT = PixelFormat(16, 16, True, True, 31, 63, 31, 11, 5, 0)


def bgrx(r: int, g: int, b: int) -> bytes:
    """One pixel in the format the client requests (little-endian 0x00RRGGBB)."""
    return bytes((b, g, r, 0xAA))  # the padding byte must never matter


@asynccontextmanager
async def fake_server(script: Script) -> AsyncIterator[tuple[int, asyncio.Future[None]]]:
    """Serve one connection with script; the future carries its result or assertion error."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        except BaseException as exc:
            if not done.done():
                done.set_exception(exc)
        else:
            if not done.done():
                done.set_result(None)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, done
    finally:
        server.close()
        await server.wait_closed()


async def server_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    version: bytes = b"003.008",
    name: bytes = b"fake desktop",
) -> dict[str, bytes]:
    """Play the server side up to and including the client's SetEncodings."""
    seen: dict[str, bytes] = {}
    writer.write(b"RFB " + version + b"\n")
    seen["version"] = await reader.readexactly(12)
    if version == b"003.003":
        writer.write(struct.pack(">I", 1))
    else:
        writer.write(bytes([2, 2, 1]))  # offers VNC auth and None; the client must pick None
        seen["security"] = await reader.readexactly(1)
        if version >= b"003.008":
            writer.write(struct.pack(">I", 0))
    seen["shared"] = await reader.readexactly(1)
    writer.write(struct.pack(">HH", WIDTH, HEIGHT) + SERVER_FORMAT.pack())
    writer.write(struct.pack(">I", len(name)) + name)
    seen["set_pixel_format"] = await reader.readexactly(20)
    header = await reader.readexactly(4)
    (count,) = struct.unpack(">xxH", header[:4])
    seen["set_encodings"] = header + await reader.readexactly(4 * count)
    return seen


def raw_rect(x: int, y: int, w: int, h: int, pixels: bytes) -> bytes:
    assert len(pixels) == w * h * 4
    return struct.pack(">HHHHi", x, y, w, h, ENCODING_RAW) + pixels


RECT_PIXELS = bgrx(255, 0, 0) + bgrx(0, 255, 0) + bgrx(0, 0, 255) + bgrx(10, 20, 30)


@pytest.mark.parametrize("version", [b"003.008", b"003.007", b"003.003", b"003.889"])
async def test_handshake_and_raw_update(version: bytes) -> None:
    seen: dict[str, bytes] = {}

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.update(await server_handshake(reader, writer, version=version))
        seen["request"] = await reader.readexactly(10)
        # Messages the client must skip before the update it asked for.
        writer.write(bytes([2]))  # Bell
        writer.write(struct.pack(">BxHH", 1, 0, 2) + bytes(12))  # SetColourMapEntries
        writer.write(struct.pack(">B3xI", 3, 5) + b"hello")  # ServerCutText
        writer.write(struct.pack(">BxH", 0, 1) + raw_rect(1, 1, 2, 2, RECT_PIXELS))
        await writer.drain()
        await reader.read()  # until the client closes

    async with fake_server(script) as (port, done):
        async with asyncio.timeout(5):
            client = await RFBClient.open("127.0.0.1", port)
            assert (client.width, client.height, client.name) == (WIDTH, HEIGHT, "fake desktop")
            assert client.server_init is not None
            assert client.server_init.pixel_format == SERVER_FORMAT
            assert not client.framebuffer_nonblank()
            blank = client.framebuffer_digest()
            stats = await client.request_update(incremental=False)
            await client.close()
            await done

    expected_version = {b"003.889": b"003.008"}.get(version, version)
    assert seen["version"] == b"RFB " + expected_version + b"\n"
    assert client.version == (3, int(expected_version[4:]))
    if version != b"003.003":
        assert seen["security"] == b"\x01"
    assert seen["shared"] == b"\x01"
    assert seen["set_pixel_format"] == b"\x00\x00\x00\x00" + PixelFormat.bgrx32().pack()
    assert seen["set_encodings"] == struct.pack(">BxHii", 2, 2, ENCODING_RAW, ENCODING_DESKTOP_SIZE)
    assert seen["request"] == struct.pack(">BBHHHH", 3, 0, 0, 0, WIDTH, HEIGHT)

    assert stats.rects == 1
    assert stats.pixels == 4
    assert stats.bytes_received == 4 + 12 + 16  # header, rect header, 4 pixels
    assert client.bell_count == 1
    assert client.server_cut_text == "hello"
    assert client.pixel(0, 0) == (0, 0, 0)
    assert client.pixel(1, 1) == (255, 0, 0)
    assert client.pixel(2, 1) == (0, 255, 0)
    assert client.pixel(1, 2) == (0, 0, 255)
    assert client.pixel(2, 2) == (10, 20, 30)
    assert client.pixel(3, 2) == (0, 0, 0)
    assert client.framebuffer_nonblank()
    assert client.framebuffer_digest() != blank


async def test_uniform_framebuffer_is_blank_whatever_the_padding() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server_handshake(reader, writer)
        await reader.readexactly(10)
        pixels = b"".join(bytes((7, 7, 7, pad)) for pad in range(WIDTH * HEIGHT))
        writer.write(struct.pack(">BxH", 0, 1) + raw_rect(0, 0, WIDTH, HEIGHT, pixels))
        await reader.read()

    async with fake_server(script) as (port, done), asyncio.timeout(5):
        client = await RFBClient.open("127.0.0.1", port)
        await client.request_update()
        assert not client.framebuffer_nonblank()
        await client.close()
        await done


async def test_desktop_size_pseudo_rect_resizes() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server_handshake(reader, writer)
        await reader.readexactly(10)
        resize = struct.pack(">HHHHi", 0, 0, 2, 1, ENCODING_DESKTOP_SIZE)
        pixels = bgrx(1, 2, 3) + bgrx(4, 5, 6)
        writer.write(struct.pack(">BxH", 0, 2) + resize + raw_rect(0, 0, 2, 1, pixels))
        await reader.read()

    async with fake_server(script) as (port, done), asyncio.timeout(5):
        client = await RFBClient.open("127.0.0.1", port)
        stats = await client.request_update()
        await client.close()
        await done
    assert stats.resized
    assert (client.width, client.height) == (2, 1)
    assert len(client.framebuffer) == 2 * 1 * 4
    assert client.pixel(1, 0) == (4, 5, 6)


async def test_timeout_keeps_the_stream_in_sync() -> None:
    release = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server_handshake(reader, writer)
        await reader.readexactly(10)
        await release.wait()  # answer the first request only after the client gave up
        writer.write(struct.pack(">BxH", 0, 1) + raw_rect(0, 0, 1, 1, bgrx(9, 9, 9)))
        await reader.readexactly(10)
        writer.write(struct.pack(">BxH", 0, 1) + raw_rect(1, 0, 1, 1, bgrx(8, 8, 8)))
        await reader.read()

    async with fake_server(script) as (port, done), asyncio.timeout(5):
        client = await RFBClient.open("127.0.0.1", port)
        with pytest.raises(TimeoutError):
            await client.request_update(incremental=True, timeout=0.1)
        release.set()
        await client.request_update(incremental=True)  # receives the late first update
        assert client.pixel(0, 0) == (9, 9, 9)
        await client.request_update(incremental=True)
        assert client.pixel(1, 0) == (8, 8, 8)
        await client.close()
        await done


async def test_input_messages_bytes() -> None:
    received = bytearray()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server_handshake(reader, writer)
        received.extend(await reader.read())

    async with fake_server(script) as (port, done), asyncio.timeout(5):
        client = await RFBClient.open("127.0.0.1", port)
        await client.type_text("aB\n")
        await client.key(0xFFE1, True)
        await client.pointer(10, 20, buttons=1)
        await client.click(3, 4, button=3)
        await client.cut_text("héllo")
        await client.close()
        await done

    def key(sym: int, down: bool) -> bytes:
        return struct.pack(">BBxxI", 4, int(down), sym)

    expected = b"".join(
        key(sym, down) for sym in (0x61, 0x42, KEYSYM_RETURN) for down in (True, False)
    )
    expected += key(0xFFE1, True)
    expected += struct.pack(">BBHH", 5, 1, 10, 20)
    expected += struct.pack(">BBHH", 5, 1 | 4, 3, 4) + struct.pack(">BBHH", 5, 1, 3, 4)
    expected += struct.pack(">BxxxI", 6, 5) + "héllo".encode("latin-1")
    assert bytes(received) == expected


@pytest.mark.parametrize(
    ("char", "keysym"),
    [("a", 0x61), ("~", 0x7E), (" ", 0x20), ("\n", 0xFF0D), ("\t", 0xFF09), ("é", 0xE9)],
)
def test_char_to_keysym(char: str, keysym: int) -> None:
    assert char_to_keysym(char) == keysym


def test_char_to_keysym_unicode_and_control() -> None:
    assert char_to_keysym("€") == 0x010020AC
    with pytest.raises(ValueError):
        char_to_keysym("\x01")


async def test_security_none_required() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"RFB 003.008\n")
        await reader.readexactly(12)
        writer.write(bytes([1, 2]))  # VNC authentication only
        await reader.read()

    async with fake_server(script) as (port, done), asyncio.timeout(5):
        with pytest.raises(RFBError, match=r"only supports None"):
            await RFBClient.open("127.0.0.1", port)
        await done


async def test_server_refusal_reason_is_reported() -> None:
    reason = b"too many security failures"

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"RFB 003.008\n")
        await reader.readexactly(12)
        writer.write(bytes([0]) + struct.pack(">I", len(reason)) + reason)
        await reader.read()

    async with fake_server(script) as (port, done), asyncio.timeout(5):
        with pytest.raises(RFBError, match="too many security failures"):
            await RFBClient.open("127.0.0.1", port)
        await done


async def test_not_an_rfb_server() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400\r\n")
        await reader.read()

    async with fake_server(script) as (port, done), asyncio.timeout(5):
        with pytest.raises(RFBError, match="not an RFB server"):
            await RFBClient.open("127.0.0.1", port)
        await done


class MemoryTransport:
    """A non-TCP transport, standing in for the future WebSocket tunnel."""

    def __init__(self, incoming: bytes) -> None:
        self.incoming = bytearray(incoming)
        self.outgoing = bytearray()
        self.closed = False

    async def read_exactly(self, n: int) -> bytes:
        if len(self.incoming) < n:
            raise RFBError("eof")
        data = bytes(self.incoming[:n])
        del self.incoming[:n]
        return data

    async def write(self, data: bytes) -> None:
        self.outgoing.extend(data)

    async def close(self) -> None:
        self.closed = True


async def test_runs_over_any_transport() -> None:
    name = b"mem"
    incoming = (
        b"RFB 003.008\n"
        + bytes([1, 1])
        + struct.pack(">I", 0)
        + struct.pack(">HH", 1, 1)
        + SERVER_FORMAT.pack()
        + struct.pack(">I", len(name))
        + name
        + struct.pack(">BxH", 0, 1)
        + raw_rect(0, 0, 1, 1, bgrx(1, 2, 3))
    )
    transport = MemoryTransport(incoming)
    async with await RFBClient.over(transport) as client:
        await client.request_update()
        assert client.pixel(0, 0) == (1, 2, 3)
    assert transport.closed
    assert transport.outgoing.startswith(b"RFB 003.008\n\x01\x01")


async def test_failed_handshake_closes_transport() -> None:
    transport = MemoryTransport(b"RFB 004.000\n")
    with pytest.raises(RFBError, match="unsupported RFB version"):
        await RFBClient.over(transport)
    assert transport.closed


def _png_chunks(data: bytes) -> dict[bytes, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks: dict[bytes, bytes] = {}
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    return chunks


async def test_save_png(tmp_path: Path) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server_handshake(reader, writer)
        await reader.readexactly(10)
        writer.write(struct.pack(">BxH", 0, 1) + raw_rect(1, 1, 2, 2, RECT_PIXELS))
        await reader.read()

    async with fake_server(script) as (port, done), asyncio.timeout(5):
        client = await RFBClient.open("127.0.0.1", port)
        await client.request_update()
        await client.close()
        await done

    path = client.save_png(tmp_path / "frame.png")
    chunks = _png_chunks(path.read_bytes())
    width, height, bit_depth, colour_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (width, height, bit_depth, colour_type) == (WIDTH, HEIGHT, 8, 2)
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = 1 + WIDTH * 3
    rows = [raw[i * stride : (i + 1) * stride] for i in range(HEIGHT)]
    assert all(row[0] == 0 for row in rows)  # filter type None
    assert rows[1][1 + 3 : 1 + 9] == bytes((255, 0, 0, 0, 255, 0))
    assert rows[2][1 + 3 : 1 + 9] == bytes((0, 0, 255, 10, 20, 30))
    assert b"IEND" in chunks


def test_encode_png_rejects_wrong_size() -> None:
    with pytest.raises(ValueError):
        encode_png(2, 2, b"\x00" * 5)
