"""The agent's VNC Authentication client (streamspace.agent.vnc) against a real TigerVNC Xvnc.

Xvnc reads the password file `obfuscated_password` writes, so a wrong obfuscation key (the
servers' DES mirrors key bits) shows up here as a refused agent, not only in container tests.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from conftest import free_port
from streamspace.agent import vnc
from streamspace.rfb import RFBClient, RFBError

if shutil.which("Xvnc") is None:
    pytest.skip("needs TigerVNC Xvnc (apt-get install tigervnc-standalone-server)", True)

pytestmark = pytest.mark.xvnc

PASSWORD = b"Pq7rSt2u"


@asynccontextmanager
async def xvnc(tmp_path: Path, *security: str) -> AsyncIterator[int]:
    """An Xvnc on a free display and port; yields the RFB port."""
    port = free_port()
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [
            "Xvnc",
            "-displayfd",
            str(write_fd),
            "-rfbport",
            str(port),
            "-geometry",
            "320x200",
            "-nolisten",
            "tcp",
            "-UseBlacklist",
            "0",
            *security,
        ],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "xvnc.log").open("wb"),
        cwd=tmp_path,
    )
    os.close(write_fd)
    try:
        display = await asyncio.wait_for(asyncio.to_thread(os.read, read_fd, 16), 10)
        assert display.strip(), (tmp_path / "xvnc.log").read_text()
        yield port
    finally:
        os.close(read_fd)
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "passwd"
    path.write_bytes(vnc.obfuscated_password(PASSWORD))
    path.chmod(0o600)
    return path


async def connect(
    port: int, password: bytes | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await asyncio.wait_for(vnc.authenticate(reader, writer, password), 10)
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def test_agent_password_opens_the_server_and_the_viewer_sees_security_none(
    tmp_path: Path, password_file: Path
) -> None:
    async with xvnc(
        tmp_path, "-SecurityTypes", "VncAuth", "-PasswordFile", str(password_file)
    ) as port:
        reader, writer = await connect(port, PASSWORD)
        front = vnc.NoneSecurityFront(reader, writer)
        client = await asyncio.wait_for(RFBClient.from_streams(front, front), 10)
        try:
            assert (client.width, client.height) == (320, 200)
            stats = await client.request_update(incremental=False)
            assert stats.pixels == 320 * 200
        finally:
            await client.close()


@pytest.mark.parametrize(
    "wrong",
    [lambda p: p[:7] + b"x", lambda p: b"", lambda p: vnc.new_password()],
    ids=["one-byte-off", "empty", "random"],
)
async def test_wrong_password_is_refused(
    tmp_path: Path, password_file: Path, wrong: Callable[[bytes], bytes]
) -> None:
    async with xvnc(
        tmp_path, "-SecurityTypes", "VncAuth", "-PasswordFile", str(password_file)
    ) as port:
        with pytest.raises(vnc.VNCAuthError, match="refused the agent"):
            await connect(port, wrong(PASSWORD))
        # A security-None client is not let in either.
        with pytest.raises(RFBError, match="VNC Authentication"):
            await asyncio.wait_for(RFBClient.open("127.0.0.1", port), 10)


async def test_an_open_server_is_refused_when_a_password_is_expected(tmp_path: Path) -> None:
    async with xvnc(tmp_path, "-SecurityTypes", "None") as port:
        with pytest.raises(vnc.VNCAuthError, match=r"offers security types \[1\]"):
            await connect(port, PASSWORD)
