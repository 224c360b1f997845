"""A deliberately small asyncio RFB (VNC) client.

It exists so tests and benchmarks can prove that a session really streams pixels, without a
browser and without third-party VNC libraries. It speaks only what is needed for that: security
type None, Raw encoding (plus the DesktopSize pseudo-encoding) and a fixed 32 bpp true-colour
pixel format, so the framebuffer layout is always known (B, G, R, padding per pixel).

The byte stream is abstracted behind `Transport` so the same client can run over a plain TCP
socket today and over the control plane's WebSocket tunnel later: a transport only has to read
an exact number of bytes, write bytes and close.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self, runtime_checkable

__all__ = [
    "ENCODING_DESKTOP_SIZE",
    "ENCODING_RAW",
    "KEYSYM_BACKSPACE",
    "KEYSYM_ESCAPE",
    "KEYSYM_RETURN",
    "KEYSYM_TAB",
    "SECURITY_NONE",
    "PixelFormat",
    "RFBClient",
    "RFBError",
    "ServerInit",
    "TCPTransport",
    "Transport",
    "UpdateStats",
    "char_to_keysym",
    "encode_png",
]

SECURITY_NONE = 1
ENCODING_RAW = 0
ENCODING_DESKTOP_SIZE = -223

KEYSYM_BACKSPACE = 0xFF08
KEYSYM_TAB = 0xFF09
KEYSYM_RETURN = 0xFF0D
KEYSYM_ESCAPE = 0xFF1B

# Server -> client message types (RFC 6143 section 7.6).
_MSG_FRAMEBUFFER_UPDATE = 0
_MSG_SET_COLOUR_MAP_ENTRIES = 1
_MSG_BELL = 2
_MSG_SERVER_CUT_TEXT = 3

# Client -> server message types (RFC 6143 section 7.5).
_MSG_SET_PIXEL_FORMAT = 0
_MSG_SET_ENCODINGS = 2
_MSG_FRAMEBUFFER_UPDATE_REQUEST = 3
_MSG_KEY_EVENT = 4
_MSG_POINTER_EVENT = 5
_MSG_CLIENT_CUT_TEXT = 6

_PIXEL_FORMAT = struct.Struct(">BBBBHHHBBB3x")
_SECURITY_NAMES = {0: "Invalid", 1: "None", 2: "VNC Authentication", 16: "Tight", 19: "VeNCrypt"}

_CONTROL_KEYSYMS = {
    "\n": KEYSYM_RETURN,
    "\r": KEYSYM_RETURN,
    "\t": KEYSYM_TAB,
    "\b": KEYSYM_BACKSPACE,
    "\x1b": KEYSYM_ESCAPE,
}


class RFBError(Exception):
    """The server said or did something this client cannot work with."""


@runtime_checkable
class Transport(Protocol):
    """The byte stream an RFB conversation runs over (TCP today, a WebSocket tunnel later)."""

    async def read_exactly(self, n: int) -> bytes:
        """Return exactly n bytes or raise (EOF included); cancelling must not lose bytes."""
        ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class TCPTransport:
    """`Transport` over an asyncio stream pair: a TCP or Unix socket, or anything with the same
    read/write/drain/close methods (the agent's authenticated VNC connections)."""

    def __init__(self, reader: Any, writer: Any) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, host: str, port: int) -> Self:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    @classmethod
    async def connect_unix(cls, path: str) -> Self:
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    async def read_exactly(self, n: int) -> bytes:
        if isinstance(self._reader, asyncio.StreamReader):
            try:
                return await self._reader.readexactly(n)
            except asyncio.IncompleteReadError as exc:
                raise RFBError(
                    f"connection closed by the server ({len(exc.partial)} of {n} bytes read)"
                ) from exc
        data = bytearray()
        while len(data) < n:
            chunk = await self._reader.read(n - len(data))
            if not chunk:
                raise RFBError(f"connection closed by the server ({len(data)} of {n} bytes read)")
            data += chunk
        return bytes(data)

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        closing = getattr(self._writer, "is_closing", None)
        if closing is not None and closing():
            return
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()


class WebSocketTransport:
    """`Transport` over a binary WebSocket (the StreamSpace stream endpoint, or websockify)."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self._buf = bytearray()

    @classmethod
    async def connect(cls, url: str, subprotocols: list[str] | None = None) -> Self:
        from websockets.asyncio.client import connect

        ws = await connect(
            url,
            subprotocols=subprotocols or ["binary"],  # type: ignore[arg-type]
            max_size=None,
            compression=None,
        )
        return cls(ws)

    async def read_exactly(self, n: int) -> bytes:
        from websockets.exceptions import ConnectionClosed

        while len(self._buf) < n:
            try:
                frame = await self._ws.recv()
            except ConnectionClosed as exc:
                raise RFBError(
                    f"stream closed ({exc.rcvd.code if exc.rcvd else 'no code'}: "
                    f"{exc.rcvd.reason if exc.rcvd else ''})"
                ) from exc
            self._buf += frame if isinstance(frame, bytes) else frame.encode()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def write(self, data: bytes) -> None:
        await self._ws.send(data)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._ws.close()


@dataclass(frozen=True, slots=True)
class PixelFormat:
    bits_per_pixel: int
    depth: int
    big_endian: bool
    true_colour: bool
    red_max: int
    green_max: int
    blue_max: int
    red_shift: int
    green_shift: int
    blue_shift: int

    @classmethod
    def bgrx32(cls) -> PixelFormat:
        """The format this client always asks for: little-endian 0x00RRGGBB, i.e. B,G,R,X bytes."""
        return cls(32, 24, False, True, 255, 255, 255, 16, 8, 0)

    @classmethod
    def unpack(cls, data: bytes) -> PixelFormat:
        bpp, depth, be, tc, rmax, gmax, bmax, rs, gs, bs = _PIXEL_FORMAT.unpack(data)
        return cls(bpp, depth, bool(be), bool(tc), rmax, gmax, bmax, rs, gs, bs)

    def pack(self) -> bytes:
        return _PIXEL_FORMAT.pack(
            self.bits_per_pixel,
            self.depth,
            int(self.big_endian),
            int(self.true_colour),
            self.red_max,
            self.green_max,
            self.blue_max,
            self.red_shift,
            self.green_shift,
            self.blue_shift,
        )


@dataclass(frozen=True, slots=True)
class ServerInit:
    width: int
    height: int
    pixel_format: PixelFormat
    name: str


@dataclass(frozen=True, slots=True)
class UpdateStats:
    """What one FramebufferUpdate cost, for tests and benchmarks."""

    rects: int
    pixels: int
    bytes_received: int
    seconds: float
    resized: bool = False


def char_to_keysym(char: str) -> int:
    """X keysym for one character: Latin-1 maps 1:1, other Unicode uses the 0x01000000 plane."""
    if len(char) != 1:
        raise ValueError(f"expected one character, got {char!r}")
    if char in _CONTROL_KEYSYMS:
        return _CONTROL_KEYSYMS[char]
    code = ord(char)
    if 0x20 <= code <= 0x7E or 0xA0 <= code <= 0xFF:
        return code
    if code < 0x20 or code == 0x7F:
        raise ValueError(f"no keysym for control character {char!r}")
    return 0x01000000 | code


def encode_png(width: int, height: int, rgb: bytes) -> bytes:
    """8-bit RGB PNG from packed RGB rows; stdlib only so tests need no imaging library."""
    if len(rgb) != width * height * 3:
        raise ValueError("rgb buffer does not match the dimensions")

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    stride = width * 3
    raw = b"".join(b"\x00" + rgb[y * stride : (y + 1) * stride] for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


class RFBClient:
    """One RFB conversation; call `handshake()` (or use `open`/`over`) before anything else."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.server_version: tuple[int, int] = (0, 0)
        self.version: tuple[int, int] = (0, 0)
        self.server_init: ServerInit | None = None
        self.name = ""
        self.width = 0
        self.height = 0
        self.pixel_format = PixelFormat.bgrx32()
        self.framebuffer = bytearray()
        self.bytes_received = 0
        self.bell_count = 0
        self.server_cut_text = ""
        self._buttons = 0

    # ---- construction -----------------------------------------------------------------------

    # Construction has no timeout parameter: wrap it in `asyncio.timeout()`; a cancelled
    # handshake closes the transport, so nothing is left half-open.

    @classmethod
    async def open(cls, host: str, port: int, *, shared: bool = True) -> RFBClient:
        """Connect over TCP and complete the handshake."""
        transport = await TCPTransport.connect(host, port)
        return await cls.over(transport, shared=shared)

    @classmethod
    async def from_streams(cls, reader: Any, writer: Any, *, shared: bool = True) -> RFBClient:
        return await cls.over(TCPTransport(reader, writer), shared=shared)

    @classmethod
    async def over(cls, transport: Transport, *, shared: bool = True) -> RFBClient:
        """Handshake over any transport; the transport is closed if the handshake fails."""
        client = cls(transport)
        try:
            await client.handshake(shared=shared)
        except BaseException:
            await transport.close()
            raise
        return client

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.transport.close()

    # ---- handshake --------------------------------------------------------------------------

    async def handshake(self, *, shared: bool = True) -> ServerInit:
        banner = await self._read(12)
        if not (banner.startswith(b"RFB ") and banner[7:8] == b"." and banner.endswith(b"\n")):
            raise RFBError(f"not an RFB server (banner {banner!r})")
        try:
            major, minor = int(banner[4:7]), int(banner[8:11])
        except ValueError as exc:
            raise RFBError(f"malformed RFB banner {banner!r}") from exc
        if major != 3:
            raise RFBError(f"unsupported RFB version {major}.{minor}")
        self.server_version = (major, minor)
        # RFC 6143: anything between the three published versions is treated as the lower one.
        chosen = 8 if minor >= 8 else 7 if minor == 7 else 3
        self.version = (3, chosen)
        await self.transport.write(b"RFB 003.%03d\n" % chosen)

        if chosen == 3:
            (sec_type,) = struct.unpack(">I", await self._read(4))
            if sec_type == 0:
                raise RFBError(f"server refused the connection: {await self._read_reason()}")
            if sec_type != SECURITY_NONE:
                raise RFBError(
                    f"server requires security type {_security_name(sec_type)}; "
                    "this client only supports None (run the server with -SecurityTypes None)"
                )
        else:
            (count,) = await self._read(1)
            if count == 0:
                raise RFBError(f"server refused the connection: {await self._read_reason()}")
            offered = list(await self._read(count))
            if SECURITY_NONE not in offered:
                names = ", ".join(_security_name(t) for t in offered)
                raise RFBError(
                    f"server offers security types [{names}] but this client only supports "
                    "None (run the server with -SecurityTypes None)"
                )
            await self.transport.write(bytes([SECURITY_NONE]))
            # Security type None gets a SecurityResult only from 3.8 on.
            if chosen >= 8:
                (result,) = struct.unpack(">I", await self._read(4))
                if result != 0:
                    raise RFBError(f"security handshake failed: {await self._read_reason()}")

        await self.transport.write(bytes([1 if shared else 0]))
        width, height = struct.unpack(">HH", await self._read(4))
        server_format = PixelFormat.unpack(await self._read(16))
        (name_len,) = struct.unpack(">I", await self._read(4))
        name = (await self._read(name_len)).decode("utf-8", errors="replace")
        self.server_init = ServerInit(width, height, server_format, name)
        self.name = name
        self._resize(width, height)

        await self.transport.write(
            struct.pack(">B3x", _MSG_SET_PIXEL_FORMAT) + self.pixel_format.pack()
        )
        encodings = [ENCODING_RAW, ENCODING_DESKTOP_SIZE]
        await self.transport.write(
            struct.pack(f">BxH{len(encodings)}i", _MSG_SET_ENCODINGS, len(encodings), *encodings)
        )
        return self.server_init

    # ---- framebuffer ------------------------------------------------------------------------
    # These take a `timeout` instead of relying on `asyncio.timeout()` because cancelling in
    # the middle of a server message would desynchronise the stream: only the wait *between*
    # messages may be abandoned.

    async def request_update(
        self,
        incremental: bool = False,
        x: int = 0,
        y: int = 0,
        width: int | None = None,
        height: int | None = None,
        *,
        timeout: float | None = 10.0,
    ) -> UpdateStats:
        """Ask for an update and apply the next FramebufferUpdate the server sends.

        On timeout a TimeoutError is raised and the server still owes the update; the next call
        receives it, so the stream never gets out of sync.
        """
        w = self.width - x if width is None else width
        h = self.height - y if height is None else height
        await self.transport.write(
            struct.pack(
                ">BBHHHH", _MSG_FRAMEBUFFER_UPDATE_REQUEST, int(incremental), x, y, max(w, 0), h
            )
        )
        return await self.read_update(timeout=timeout)

    async def read_update(self, *, timeout: float | None = 10.0) -> UpdateStats:
        """Process server messages until one FramebufferUpdate has been applied."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            # Only the wait for the type byte is bounded: cancelling between messages is safe,
            # cancelling inside one would desynchronise the stream.
            (msg_type,) = await asyncio.wait_for(self._read(1), remaining)
            if msg_type == _MSG_FRAMEBUFFER_UPDATE:
                return await self._read_framebuffer_update()
            await self._skip_message(msg_type)

    async def wait_for(
        self,
        predicate: Callable[[RFBClient], bool],
        *,
        timeout: float = 10.0,
    ) -> bool:
        """Pull incremental updates until predicate(self) holds; False if it never did in time."""
        deadline = time.monotonic() + timeout
        if predicate(self):
            return True
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                await self.request_update(incremental=True, timeout=remaining)
            except TimeoutError:
                return predicate(self)
            if predicate(self):
                return True
        return predicate(self)

    async def wait_for_change(self, digest: str, *, timeout: float = 10.0) -> bool:
        return await self.wait_for(lambda c: c.framebuffer_digest() != digest, timeout=timeout)

    def framebuffer_nonblank(self) -> bool:
        """True if any pixel's colour differs from the first one (padding bytes ignored)."""
        if not self.framebuffer:
            return False
        for plane in (self.framebuffer[0::4], self.framebuffer[1::4], self.framebuffer[2::4]):
            if plane.count(plane[0]) != len(plane):
                return True
        return False

    def framebuffer_digest(self) -> str:
        """SHA-256 of the visible colours, so padding bytes never make two frames differ."""
        digest = hashlib.sha256(struct.pack(">HH", self.width, self.height))
        digest.update(self.rgb_bytes())
        return digest.hexdigest()

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        """(red, green, blue) at (x, y)."""
        if not (0 <= x < self.width and 0 <= y < self.height):
            raise IndexError(f"pixel ({x}, {y}) outside {self.width}x{self.height}")
        offset = (y * self.width + x) * 4
        b, g, r = self.framebuffer[offset : offset + 3]
        return r, g, b

    def rgb_bytes(self) -> bytes:
        rgb = bytearray(self.width * self.height * 3)
        rgb[0::3] = self.framebuffer[2::4]
        rgb[1::3] = self.framebuffer[1::4]
        rgb[2::3] = self.framebuffer[0::4]
        return bytes(rgb)

    def png_bytes(self) -> bytes:
        return encode_png(self.width, self.height, self.rgb_bytes())

    def save_png(self, path: str | Path) -> Path:
        """Write the framebuffer as PNG (synchronous: it is a debugging aid for tests)."""
        target = Path(path)
        target.write_bytes(self.png_bytes())
        return target

    # ---- input ------------------------------------------------------------------------------

    async def key(self, keysym: int, down: bool) -> None:
        await self.transport.write(struct.pack(">BBxxI", _MSG_KEY_EVENT, int(down), keysym))

    async def press(self, keysym: int) -> None:
        await self.key(keysym, True)
        await self.key(keysym, False)

    async def type_text(self, text: str) -> None:
        """Type text as press/release pairs; the server adds Shift for upper-case keysyms."""
        for char in text:
            await self.press(char_to_keysym(char))

    async def pointer(self, x: int, y: int, buttons: int = 0) -> None:
        """Move the pointer with the given button mask (bit 0 = left, 1 = middle, 2 = right)."""
        self._buttons = buttons & 0xFF
        await self.transport.write(
            struct.pack(">BBHH", _MSG_POINTER_EVENT, self._buttons, max(x, 0), max(y, 0))
        )

    async def click(self, x: int, y: int, button: int = 1) -> None:
        mask = 1 << (button - 1)
        await self.pointer(x, y, self._buttons | mask)
        await self.pointer(x, y, self._buttons & ~mask)

    async def cut_text(self, text: str) -> None:
        """Send ClientCutText; RFB clipboard text is Latin-1, other characters become '?'."""
        data = text.encode("latin-1", errors="replace")
        await self.transport.write(struct.pack(">BxxxI", _MSG_CLIENT_CUT_TEXT, len(data)) + data)

    # ---- internals --------------------------------------------------------------------------

    async def _read(self, n: int) -> bytes:
        if n == 0:
            return b""
        data = await self.transport.read_exactly(n)
        self.bytes_received += len(data)
        return data

    async def _read_reason(self) -> str:
        (length,) = struct.unpack(">I", await self._read(4))
        return (await self._read(length)).decode("utf-8", errors="replace")

    def _resize(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.framebuffer = bytearray(width * height * 4)

    async def _read_framebuffer_update(self) -> UpdateStats:
        started = time.monotonic()
        before = self.bytes_received - 1
        (count,) = struct.unpack(">xH", await self._read(3))
        pixels = 0
        resized = False
        for _ in range(count):
            x, y, w, h, encoding = struct.unpack(">HHHHi", await self._read(12))
            if encoding == ENCODING_RAW:
                await self._apply_raw(x, y, w, h)
                pixels += w * h
            elif encoding == ENCODING_DESKTOP_SIZE:
                self._resize(w, h)
                resized = True
            else:
                raise RFBError(f"server sent encoding {encoding}, which was not negotiated")
        return UpdateStats(
            rects=count,
            pixels=pixels,
            bytes_received=self.bytes_received - before,
            seconds=time.monotonic() - started,
            resized=resized,
        )

    async def _apply_raw(self, x: int, y: int, w: int, h: int) -> None:
        data = await self._read(w * h * 4)
        if x + w > self.width or y + h > self.height:
            raise RFBError(
                f"rectangle {w}x{h}+{x}+{y} exceeds the {self.width}x{self.height} framebuffer"
            )
        row = w * 4
        stride = self.width * 4
        fb = self.framebuffer
        for line in range(h):
            dst = (y + line) * stride + x * 4
            fb[dst : dst + row] = data[line * row : (line + 1) * row]

    async def _skip_message(self, msg_type: int) -> None:
        if msg_type == _MSG_SET_COLOUR_MAP_ENTRIES:
            _, count = struct.unpack(">xHH", await self._read(5))
            await self._read(count * 6)
        elif msg_type == _MSG_BELL:
            self.bell_count += 1
        elif msg_type == _MSG_SERVER_CUT_TEXT:
            (length,) = struct.unpack(">3xi", await self._read(7))
            # A negative length is the extended-clipboard form; its payload is |length| bytes.
            data = await self._read(abs(length))
            if length >= 0:
                self.server_cut_text = data.decode("latin-1")
        else:
            raise RFBError(f"unexpected server message type {msg_type}")


def _security_name(sec_type: int) -> str:
    return f"{sec_type} ({_SECURITY_NAMES.get(sec_type, 'unknown')})"
