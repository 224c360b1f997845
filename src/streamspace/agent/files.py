"""File transfer streams (OpenStream purposes `files_*`): one operation on a session's home per
dialled-back WebSocket, every file access in a worker thread through homefs.

Backpressure both ways: a download awaits each frame's send before reading the next chunk (a
folder's zip producer blocks on a small queue), an upload writes each frame to disk before
receiving the next, so the agent holds a few chunks at most whatever the speeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from streamspace import logs
from streamspace.agent.backends.base import Backend, BackendError, NotSupportedByBackend
from streamspace.agent.enrolment import Enrolment
from streamspace.agent.homefs import FileOpError, Home, Upload
from streamspace.protocol import FileReply, HomePathError, OpenStream, home_path_parts

log = logs.get_logger(__name__)

ZIP_QUEUE_CHUNKS = 4


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
            home = Home(access)
            if msg.purpose == "files_list":
                entries, truncated = await asyncio.to_thread(home.list_dir, parts)
                await _reply(
                    ws, FileReply(ok=True, kind="dir", entries=entries, truncated=truncated)
                )
            elif msg.purpose == "files_read":
                await self._read(ws, home, parts)
            elif msg.purpose == "files_write":
                await self._write(ws, home, parts, msg)
            else:
                raise FileOpError("failed", f"not a file stream: {msg.purpose}")
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

    async def _read(self, ws: ClientConnection, home: Home, parts: list[str]) -> None:
        fd, st = await asyncio.to_thread(home.open_read, parts)
        try:
            if stat.S_ISDIR(st.st_mode):
                await _reply(ws, FileReply(ok=True, kind="dir"))
                await _send_zip(ws, home, fd)
            else:
                await _reply(ws, FileReply(ok=True, kind="file", size=st.st_size))
                # One chunk read ahead while the last one is sent: disk and socket overlap,
                # and at most two chunks are held.
                ahead = asyncio.ensure_future(asyncio.to_thread(home.read_chunk, fd))
                try:
                    while data := await ahead:
                        ahead = asyncio.ensure_future(asyncio.to_thread(home.read_chunk, fd))
                        await ws.send(data)
                finally:
                    if not ahead.done():
                        with contextlib.suppress(Exception):
                            await ahead
            await _reply(ws, FileReply(ok=True, done=True))
        finally:
            os.close(fd)

    async def _write(
        self, ws: ClientConnection, home: Home, parts: list[str], msg: OpenStream
    ) -> None:
        upload: Upload = await asyncio.to_thread(
            home.start_upload, parts, msg.max_bytes, msg.home_limit_mb
        )
        committed = False
        try:
            await _reply(ws, FileReply(ok=True, kind="file"))
            async for data in ws:
                if isinstance(data, str):
                    raise FileOpError("failed", "upload frames must be binary")
                if not data:
                    await asyncio.to_thread(upload.commit)
                    committed = True
                    await _reply(ws, FileReply(ok=True, done=True, size=upload.written))
                    return
                await asyncio.to_thread(upload.write, data)
        finally:
            if not committed:
                await asyncio.to_thread(upload.abort)


async def _reply(ws: ClientConnection, reply: FileReply) -> None:
    await ws.send(reply.model_dump_json())


async def _send_zip(ws: ClientConnection, home: Home, fd: int) -> None:
    """Zip in a thread, sending as it goes: the thread blocks on a bounded queue while the
    socket is slow, so the archive is never whole in memory."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(ZIP_QUEUE_CHUNKS)
    cancelled = False

    def put(data: bytes) -> None:
        if cancelled:
            raise ConnectionAbortedError("download cancelled")
        asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()

    def produce() -> None:
        try:
            home.zip_dir(fd, put)
        finally:
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()

    producer = asyncio.create_task(asyncio.to_thread(produce))
    try:
        while (data := await queue.get()) is not None:
            await ws.send(data)
        await producer
    finally:
        cancelled = True
        while not producer.done():
            with contextlib.suppress(asyncio.QueueEmpty):
                queue.get_nowait()
            await asyncio.sleep(0.01)
        with contextlib.suppress(Exception):
            await producer
