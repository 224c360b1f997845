"""The agent's VNC Authentication and its security-None front, against a real TigerVNC Xvnc
(an independent implementation of both the password file format and the DES challenge)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conftest import free_port
from streamspace.agent import vnc
from streamspace_testing.rfb import RFBClient, RFBError, TCPTransport

pytestmark = pytest.mark.xvnc

if shutil.which("Xvnc") is None:
    pytest.skip("needs TigerVNC Xvnc", allow_module_level=True)


@contextlib.asynccontextmanager
async def xvnc(tmp_path: Path, security: str, password: bytes | None) -> AsyncIterator[int]:
    """An Xvnc on a display it picks itself (-displayfd) and a free port; yields the port."""
    port = free_port()
    args = ["Xvnc", "-displayfd", "", "-rfbport", str(port), "-localhost"]
    args += ["-SecurityTypes", security, "-nolisten", "tcp", "-nolisten", "local"]
    args += ["-UseBlacklist", "0", "-geometry", "640x480"]
    if password is not None:
        passwd = tmp_path / "passwd"
        passwd.write_bytes(vnc.obfuscated_password(password))
        args += ["-PasswordFile", str(passwd)]
    read_fd, write_fd = os.pipe()
    args[2] = str(write_fd)
    log = tmp_path / "xvnc.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(args, pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=err)
    os.close(write_fd)
    try:
        display = await asyncio.wait_for(asyncio.to_thread(os.read, read_fd, 16), 10)
        assert display.strip(), log.read_text()
        yield port
    finally:
        os.close(read_fd)
        proc.terminate()
        proc.wait(10)


async def test_the_right_password_authenticates_and_the_viewer_gets_security_none(
    tmp_path: Path,
) -> None:
    password = vnc.new_password()
    async with xvnc(tmp_path, "VncAuth", password) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await vnc.authenticate(reader, writer, password)
        front = vnc.NoneSecurityFront(reader, writer)
        client = await RFBClient.over(TCPTransport(front, front))  # only speaks security None
        assert (client.width, client.height) == (640, 480)
        await client.request_update(incremental=False)
        assert client.framebuffer  # pixels flow after the handshake
        await client.close()


async def test_a_wrong_password_is_refused(tmp_path: Path) -> None:
    async with xvnc(tmp_path, "VncAuth", b"Correct1") as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises(vnc.VNCAuthError, match="refused the agent"):
            await vnc.authenticate(reader, writer, b"Wrong123")
        writer.close()


async def test_a_client_without_the_password_gets_nothing(tmp_path: Path) -> None:
    async with xvnc(tmp_path, "VncAuth", vnc.new_password()) as port:
        with pytest.raises(RFBError, match="only supports"):
            await RFBClient.open("127.0.0.1", port)


async def test_an_open_server_is_refused_when_a_password_is_expected(tmp_path: Path) -> None:
    """A misconfigured session server (no authentication) is noticed, not silently used."""
    async with xvnc(tmp_path, "None", None) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises(vnc.VNCAuthError, match="requires 2"):
            await vnc.authenticate(reader, writer, vnc.new_password())
        writer.close()


class _Pipe:
    """In-memory server side for the front's handshake rules."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        return None


@pytest.mark.parametrize(
    ("version", "after_version", "choice", "after_choice"),
    [
        (b"RFB 003.008\n", b"\x01\x01", b"\x01", b"\x00\x00\x00\x00"),
        (b"RFB 003.007\n", b"\x01\x01", b"\x01", b""),
        (b"RFB 003.003\n", b"\x00\x00\x00\x01", b"", b""),
    ],
    ids=["3.8", "3.7", "3.3"],
)
async def test_front_speaks_each_rfb_version(
    version: bytes, after_version: bytes, choice: bytes, after_choice: bytes
) -> None:
    upstream = asyncio.StreamReader()
    upstream.feed_data(b"ServerInit...")
    server = _Pipe()
    front = vnc.NoneSecurityFront(upstream, server)  # type: ignore[arg-type]
    assert await front.read(100) == b"RFB 003.008\n"
    front.write(version)
    assert await front.read(100) == after_version
    front.write(choice + b"\x01")  # the choice, then ClientInit (shared) in the same write
    if after_choice:
        assert await front.read(100) == after_choice
    assert front.established
    assert bytes(server.written) == b"\x01"  # only ClientInit reached the server
    assert await front.read(100) == b"ServerInit..."


async def test_front_closes_on_a_security_type_it_did_not_offer() -> None:
    server = _Pipe()
    front = vnc.NoneSecurityFront(asyncio.StreamReader(), server)  # type: ignore[arg-type]
    await front.read(100)
    front.write(b"RFB 003.008\n")
    await front.read(100)
    front.write(b"\x02")  # VNC Authentication: not offered
    assert await front.read(100) == b""
    assert server.closed and not server.written
