"""The agent's side of a session's VNC server: connect, authenticate, present security None.

Why the agent authenticates: a session's VNC server must not accept anyone who merely reaches
it (another session, another process on the host, another pod in the cluster), so container and
pod sessions require RFB "VNC Authentication" with a per-session password only the agent knows.
The browser never sees that password: its single-use stream ticket is its authentication, so
the agent completes the server's handshake itself and then offers the viewer a fresh RFB 3.8
greeting with security type None (`NoneSecurityFront`). Everything after the security phase
(ClientInit onwards) is passed through untouched.

VNC Authentication is DES of a 16-byte challenge keyed by the password with each byte's bits
mirrored (RFC 6143 section 7.2.2, as implemented by every VNC server). The servers' DES (d3des)
mirrors every key it is given, so the fixed key of the vncpasswd file format needs the same
mirroring here. DES comes from the `cryptography` package: TripleDES with the key repeated
three times is single DES.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from streamspace.protocol import Endpoint

__all__ = [
    "PASSWORD_BYTES",
    "ByteStreamReader",
    "ByteStreamWriter",
    "NoneSecurityFront",
    "SocketRefused",
    "VNCAuthError",
    "authenticate",
    "des_response",
    "new_password",
    "obfuscated_password",
    "open_endpoint",
    "open_unix",
    "socket_handle",
]

PASSWORD_BYTES = 8
"""VNC Authentication uses at most 8 password bytes; all 8 are random."""

_SECURITY_NONE = 1
_SECURITY_VNC_AUTH = 2
_PASSWD_FILE_KEY = bytes([23, 82, 107, 6, 35, 78, 88, 7])
"""The fixed key of the vncpasswd file format (TigerVNC, RealVNC, TightVNC all share it), as
their sources write it: d3des mirrors its bits before use."""
_GREETING = b"RFB 003.008\n"


class VNCAuthError(ConnectionError):
    """The session's VNC server refused the agent or spoke something unexpected."""


class ByteStreamReader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class ByteStreamWriter(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


def new_password() -> bytes:
    """A per-session password: 8 random printable bytes (some servers stop at a NUL)."""
    alphabet = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789"
    return bytes(secrets.choice(alphabet) for _ in range(PASSWORD_BYTES))


def _mirror_bits(key: bytes) -> bytes:
    return bytes(int(f"{b:08b}"[::-1], 2) for b in key)


def _des_ecb(key: bytes, data: bytes) -> bytes:
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def des_response(password: bytes, challenge: bytes) -> bytes:
    """The client's answer to a VNC Authentication challenge."""
    if len(challenge) != 16:
        raise ValueError("a VNC Authentication challenge has 16 bytes")
    key = _mirror_bits(password[:PASSWORD_BYTES].ljust(PASSWORD_BYTES, b"\0"))
    return _des_ecb(key, challenge)


def obfuscated_password(password: bytes) -> bytes:
    """The 8 bytes a vncpasswd file holds for `password` (what Xvnc -PasswordFile reads)."""
    key = _mirror_bits(_PASSWD_FILE_KEY)
    return _des_ecb(key, password[:PASSWORD_BYTES].ljust(PASSWORD_BYTES, b"\0"))


class SocketRefused(ConnectionError):
    """The path is not the socket it should be (a symlink or another file planted there)."""


def checked_socket_fd(path: Path, owner: int | None = None) -> int:
    """An O_PATH descriptor of the Unix socket at `path` (never a symlink; owned by `owner`
    when given), for a child process to connect through `/proc/self/fd/N`. Blocking (open,
    fstat: microseconds)."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISSOCK(st.st_mode) or (owner is not None and st.st_uid != owner):
        os.close(fd)
        raise SocketRefused(f"{path} is not the session's socket")
    return fd


@contextlib.contextmanager
def socket_handle(path: Path, owner: int | None = None) -> Iterator[str]:
    """A connectable name for the Unix socket at `path`, never a symlink planted there.

    Session sockets live where the session user can write: a symlink to the D-Bus system bus
    or a container engine would have the agent, as root, connect wherever it points. The path
    is opened O_PATH|O_NOFOLLOW, checked to be a socket (owned by `owner`, when given), and
    the connect goes through /proc/self/fd to that very inode - which also keeps the address
    short (108 bytes at most) however deep the state dir is. Blocking (open/fstat): call it
    in a thread or accept the microseconds.
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode) or (owner is not None and st.st_uid != owner):
            raise SocketRefused(f"{path} is not the session's VNC socket")
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


async def open_unix(
    path: Path, connect_timeout: float, owner: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the session's socket, waiting while its listen backlog is full.

    A Unix socket whose backlog is full refuses a non-blocking connect with EAGAIN, where TCP
    would retry its SYN; asyncio takes that EAGAIN for "in progress" and hands back a socket
    that never connected (the first read fails with EINVAL). Xvnc's backlog is short: 50 viewers
    opening at once hit it. So the connect is done here and retried until the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + connect_timeout
    delay = 0.002
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        with socket_handle(path, owner) as name:
            while True:
                try:
                    sock.connect(name)
                    break
                except BlockingIOError:
                    if loop.time() + delay > deadline:
                        raise TimeoutError(f"{path}: the VNC server accepts no more now") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
        return await asyncio.open_unix_connection(sock=sock)
    except BaseException:
        sock.close()
        raise


async def open_endpoint(
    endpoint: Endpoint, connect_timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw byte stream to the endpoint (TCP or Unix socket)."""
    if endpoint.unix_path is not None:
        opening = asyncio.open_unix_connection(endpoint.unix_path)
    else:
        opening = asyncio.open_connection(endpoint.host, endpoint.port)
    return await asyncio.wait_for(opening, connect_timeout)


async def _read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as exc:
        raise VNCAuthError("the session's VNC server closed the connection") from exc


async def _reason(reader: asyncio.StreamReader) -> str:
    (length,) = struct.unpack(">I", await _read_exactly(reader, 4))
    return (await _read_exactly(reader, min(length, 4096))).decode(errors="replace")


async def authenticate(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, password: bytes | None
) -> None:
    """Run the server's version and security phases as a client (RFB 3.8, 3.7 or 3.3).

    With a password VNC Authentication is required: a server that offers only None is refused,
    so a misconfigured (open) session server is noticed instead of silently used.
    """
    banner = await _read_exactly(reader, 12)
    if not banner.startswith(b"RFB 003."):
        raise VNCAuthError(f"not an RFB server (banner {banner!r})")
    minor = int(banner[8:11]) if banner[8:11].isdigit() else 3
    chosen = 8 if minor >= 8 else 7 if minor == 7 else 3
    writer.write(b"RFB 003.%03d\n" % chosen)
    wanted = _SECURITY_NONE if password is None else _SECURITY_VNC_AUTH
    if chosen == 3:
        (sec_type,) = struct.unpack(">I", await _read_exactly(reader, 4))
        if sec_type == 0:
            raise VNCAuthError(f"the session's VNC server refused: {await _reason(reader)}")
        if sec_type != wanted:
            raise VNCAuthError(f"the session's VNC server uses security type {sec_type}")
    else:
        (count,) = await _read_exactly(reader, 1)
        if count == 0:
            raise VNCAuthError(f"the session's VNC server refused: {await _reason(reader)}")
        offered = await _read_exactly(reader, count)
        if wanted not in offered:
            raise VNCAuthError(
                f"the session's VNC server offers security types {list(offered)}, "
                f"the agent requires {wanted}"
            )
        writer.write(bytes([wanted]))
    if password is not None:
        challenge = await _read_exactly(reader, 16)
        writer.write(des_response(password, challenge))
    await writer.drain()
    if password is not None or chosen >= 8:
        (result,) = struct.unpack(">I", await _read_exactly(reader, 4))
        if result != 0:
            detail = await _reason(reader) if chosen >= 8 else "authentication failed"
            raise VNCAuthError(f"the session's VNC server refused the agent: {detail}")


class NoneSecurityFront:
    """The viewer's side of an already authenticated server connection.

    Reads return a fresh RFB 3.8 greeting offering security type None, then (once the viewer
    has chosen its version and security type through `write`) whatever the server sends.
    Writes during the handshake are consumed here; later ones go to the server.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._pending = bytearray(_GREETING)
        self._ready = asyncio.Event()
        self._ready.set()
        self._inbox = bytearray()
        self._stage = "version"
        self._version = 8

    @property
    def established(self) -> bool:
        return self._stage == "open"

    async def read(self, n: int = -1) -> bytes:
        while not self._pending and self._stage in ("version", "security"):
            self._ready.clear()
            await self._ready.wait()
        if self._stage == "closed":
            return b""
        if self._pending:
            size = len(self._pending) if n < 0 else min(n, len(self._pending))
            chunk = bytes(self._pending[:size])
            del self._pending[:size]
            return chunk
        return await self._reader.read(n)

    def write(self, data: bytes) -> None:
        if self._stage == "open":
            self._writer.write(data)
            return
        if self._stage == "closed":
            return
        self._inbox += data
        self._advance()

    def _emit(self, data: bytes) -> None:
        self._pending += data
        self._ready.set()

    def _advance(self) -> None:
        if self._stage == "version" and len(self._inbox) >= 12:
            line, self._inbox = bytes(self._inbox[:12]), self._inbox[12:]
            minor = line[8:11]
            if not line.startswith(b"RFB 003.") or not minor.isdigit():
                self._fail()
                return
            self._version = 8 if int(minor) >= 8 else 7 if int(minor) == 7 else 3
            if self._version == 3:
                self._emit(struct.pack(">I", _SECURITY_NONE))
                self._open()
                return
            self._emit(bytes([1, _SECURITY_NONE]))
            self._stage = "security"
        if self._stage == "security" and self._inbox:
            choice, self._inbox = self._inbox[0], self._inbox[1:]
            if choice != _SECURITY_NONE:
                self._fail()
                return
            if self._version >= 8:
                self._emit(struct.pack(">I", 0))
            self._open()

    def _open(self) -> None:
        self._stage = "open"
        self._ready.set()
        if self._inbox:
            self._writer.write(bytes(self._inbox))
            self._inbox.clear()

    def _fail(self) -> None:
        self._stage = "closed"
        self._pending.clear()
        self._writer.close()
        self._ready.set()

    async def drain(self) -> None:
        if self._stage == "open":
            await self._writer.drain()

    def close(self) -> None:
        if self._stage != "open":
            self._stage = "closed"
            self._pending.clear()
        self._writer.close()
        self._ready.set()

    async def wait_closed(self) -> None:
        await self._writer.wait_closed()
