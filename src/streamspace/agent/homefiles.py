"""One interface for file transfer on a session's home, whatever reaches it: `LocalHome` (a
directory on this host, through homefs in worker threads) or `SftpHome` (agent/sftphome.py, a
pod's SFTP server). agent/files.py speaks only this.

Backpressure is the callers': each chunk of a download is produced when asked for (one read
ahead at most), each upload write completes before the next frame is received.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

from streamspace.agent.homefs import Home, Upload
from streamspace.protocol import FileEntry

ZIP_QUEUE_CHUNKS = 4


class Download(Protocol):
    kind: Literal["file", "dir"]
    size: int | None
    """Bytes of a file; None for a folder (its zip's size is known only once sent)."""

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


class UploadSink(Protocol):
    @property
    def written(self) -> int: ...

    async def write(self, data: bytes) -> None: ...

    async def commit(self) -> None: ...

    async def abort(self) -> None: ...


class HomeFiles(Protocol):
    async def list_dir(self, parts: list[str]) -> tuple[list[FileEntry], bool]: ...

    async def open_read(self, parts: list[str]) -> Download: ...

    async def start_upload(
        self, parts: list[str], max_bytes: int | None, home_limit_mb: int | None
    ) -> UploadSink: ...

    async def close(self) -> None: ...


@dataclass
class LocalHome:
    """A home directory on this host (homefs: traversal-proof, as the session's uid)."""

    home: Home

    async def list_dir(self, parts: list[str]) -> tuple[list[FileEntry], bool]:
        return await asyncio.to_thread(self.home.list_dir, parts)

    async def open_read(self, parts: list[str]) -> Download:
        fd, st = await asyncio.to_thread(self.home.open_read, parts)
        if stat.S_ISDIR(st.st_mode):
            return _LocalZip(self.home, fd)
        return _LocalFile(fd, st.st_size)

    async def start_upload(
        self, parts: list[str], max_bytes: int | None, home_limit_mb: int | None
    ) -> UploadSink:
        upload = await asyncio.to_thread(self.home.start_upload, parts, max_bytes, home_limit_mb)
        return _LocalUpload(upload)

    async def close(self) -> None:
        return None


@dataclass
class _LocalFile:
    fd: int
    size: int | None
    kind: Literal["file", "dir"] = "file"

    async def chunks(self) -> AsyncIterator[bytes]:
        # One chunk read ahead while the last one is sent: disk and socket overlap, and at
        # most two chunks are held.
        ahead = asyncio.ensure_future(asyncio.to_thread(Home.read_chunk, self.fd))
        try:
            while data := await ahead:
                ahead = asyncio.ensure_future(asyncio.to_thread(Home.read_chunk, self.fd))
                yield data
        finally:
            if not ahead.done():
                with contextlib.suppress(Exception):
                    await ahead

    async def close(self) -> None:
        os.close(self.fd)


@dataclass
class _LocalZip:
    """A folder as a zip made in a thread, handed on as it goes: the thread blocks on a
    bounded queue while the socket is slow, so the archive is never whole in memory."""

    home: Home
    fd: int
    kind: Literal["file", "dir"] = "dir"
    size: int | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(ZIP_QUEUE_CHUNKS)
        cancelled = False

        def put(data: bytes) -> None:
            if cancelled:
                raise ConnectionAbortedError("download cancelled")
            asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()

        def produce() -> None:
            try:
                self.home.zip_dir(self.fd, put)
            finally:
                with contextlib.suppress(RuntimeError):
                    asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()

        producer = asyncio.create_task(asyncio.to_thread(produce))
        try:
            while (data := await queue.get()) is not None:
                yield data
            await producer
        finally:
            cancelled = True
            while not producer.done():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                await asyncio.sleep(0.01)
            with contextlib.suppress(Exception):
                await producer

    async def close(self) -> None:
        os.close(self.fd)


@dataclass
class _LocalUpload:
    upload: Upload

    @property
    def written(self) -> int:
        return self.upload.written

    async def write(self, data: bytes) -> None:
        await asyncio.to_thread(self.upload.write, data)

    async def commit(self) -> None:
        await asyncio.to_thread(self.upload.commit)

    async def abort(self) -> None:
        await asyncio.to_thread(self.upload.abort)
