"""File transfer streams (OpenStream purposes `files_*`): one operation on a session's home per
dialled-back WebSocket, through the home's `HomeFiles` (agent/homefiles.py): a directory on
this host or a pod's SFTP server.

Backpressure both ways: a download awaits each frame's send before asking for the next chunk,
an upload writes each frame before receiving the next, so the agent holds a few chunks at most
whatever the speeds.
"""

from __future__ import annotations

import contextlib

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from streamspace import logs
from streamspace.agent import sftphome
from streamspace.agent.backends.base import (
    Backend,
    BackendError,
    HomeAccess,
    NotSupportedByBackend,
    SftpAccess,
)
from streamspace.agent.enrolment import Enrolment
from streamspace.agent.homefiles import HomeFiles, LocalHome
from streamspace.agent.homefs import FileOpError, Home
from streamspace.protocol import FileReply, HomePathError, OpenStream, home_path_parts

log = logs.get_logger(__name__)


class FileStreams:
    def __init__(self, *, backend: Backend, identity: Enrolment) -> None:
        self._backend = backend
        self._identity = identity

    async def serve(self, msg: OpenStream, ws: ClientConnection) -> None:
        """Answer one files_* stream; every refusal is a FileReply the control plane shows."""
        fields = {"agent_id": self._identity.agent_id, "session_id": msg.session_id}
        try:
            parts = home_path_parts(msg.file_path)
            try:
                access = await self._backend.home_access(msg.session_id)
            except NotSupportedByBackend as exc:
                raise FileOpError("unsupported", str(exc)) from None
            except BackendError as exc:
                raise FileOpError("not_found", str(exc)) from None
            home = await _open(access)
            try:
                if msg.purpose == "files_list":
                    entries, truncated = await home.list_dir(parts)
                    await _reply(
                        ws, FileReply(ok=True, kind="dir", entries=entries, truncated=truncated)
                    )
                elif msg.purpose == "files_read":
                    await _read(ws, home, parts)
                elif msg.purpose == "files_write":
                    await _write(ws, home, parts, msg)
                else:
                    raise FileOpError("failed", f"not a file stream: {msg.purpose}")
            finally:
                await home.close()
            log.event("file_stream_done", purpose=msg.purpose, **fields)
        except HomePathError as exc:
            await _reply(ws, FileReply(ok=False, error="invalid_path", message=str(exc)))
        except FileOpError as exc:
            log.event("file_stream_refused", purpose=msg.purpose, error=exc.code, **fields)
            await _reply(ws, FileReply(ok=False, error=exc.code, message=exc.message[:500]))
        except ConnectionClosed:
            log.event("file_stream_cut", purpose=msg.purpose, **fields)
        except OSError as exc:
            log.warning("file_stream_failed", purpose=msg.purpose, error=exc, **fields)
            with contextlib.suppress(ConnectionClosed):
                await _reply(ws, FileReply(ok=False, error="failed", message=str(exc)[:500]))


async def _open(access: HomeAccess | SftpAccess) -> HomeFiles:
    if isinstance(access, SftpAccess):
        return await sftphome.connect(access)
    return LocalHome(Home(access))


async def _read(ws: ClientConnection, home: HomeFiles, parts: list[str]) -> None:
    download = await home.open_read(parts)
    try:
        await _reply(ws, FileReply(ok=True, kind=download.kind, size=download.size))
        async for data in download.chunks():
            await ws.send(data)
        await _reply(ws, FileReply(ok=True, done=True))
    finally:
        await download.close()


async def _write(ws: ClientConnection, home: HomeFiles, parts: list[str], msg: OpenStream) -> None:
    upload = await home.start_upload(parts, msg.max_bytes, msg.home_limit_mb)
    committed = False
    try:
        await _reply(ws, FileReply(ok=True, kind="file"))
        async for data in ws:
            if isinstance(data, str):
                raise FileOpError("failed", "upload frames must be binary")
            if not data:
                await upload.commit()
                committed = True
                await _reply(ws, FileReply(ok=True, done=True, size=upload.written))
                return
            await upload.write(data)
    finally:
        if not committed:
            await upload.abort()


async def _reply(ws: ClientConnection, reply: FileReply) -> None:
    await ws.send(reply.model_dump_json())
