"""A session's home over SFTP (`SftpAccess`: a pod's own sshd, SFTP only, one client key), as
`HomeFiles` for agent/files.py.

The SFTP server runs as the session's user inside the session's pod, so the kernel there checks
every permission, and nothing it can reach is more than the session user could reach with the
session's own terminal. The rules of homefs still hold: every component of a path is
`lstat`ed and a symbolic link anywhere is refused, never followed; uploads go to a hidden
temporary file renamed into place once complete (after fsync). Unlike homefs, the walk is by
name, so a link swapped in between the check and the open could be followed; it could only
lead somewhere in that same pod the session user already reads. The host key is the one the
agent gave the pod (no trust on first use); the client key is the session's own.

asyncssh rather than paramiko: it is asyncio native, so no thread per transfer.
"""

from __future__ import annotations

import contextlib
import secrets
import stat
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import asyncssh

from streamspace.agent.backends.base import SftpAccess
from streamspace.agent.homefs import (
    CHUNK,
    ChunkSink,
    FileOpError,
    check_allowance,
    type_of,
    zip_time,
)
from streamspace.protocol import MAX_LISTING, FileEntry

CONNECT_TIMEOUT_SECONDS = 10.0


async def connect(access: SftpAccess) -> SftpHome:
    """Log in to the session's SFTP server; a refusal or an unreachable pod is a FileOpError
    the user sees."""
    try:
        conn = await asyncssh.connect(
            access.host,
            access.port,
            username=access.user,
            client_keys=[asyncssh.import_private_key(access.client_key)],
            known_hosts=([asyncssh.import_public_key(access.host_key)], [], []),
            config=None,
            agent_path=None,
            preferred_auth="publickey",
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            login_timeout=CONNECT_TIMEOUT_SECONDS,
        )
    except (OSError, TimeoutError, asyncssh.Error) as exc:
        raise FileOpError(
            "failed", f"cannot reach the session's file service: {_reason(exc)}"
        ) from None
    try:
        sftp = await conn.start_sftp_client()
    except (OSError, asyncssh.Error) as exc:
        conn.close()
        raise FileOpError("failed", f"the session's file service failed: {_reason(exc)}") from None
    return SftpHome(conn, sftp, access.root.rstrip("/") or "/")


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", "") or exc) or type(exc).__name__


def _sftp_error(exc: asyncssh.SFTPError, name: str) -> FileOpError:
    shown = name or "the home"
    if isinstance(exc, asyncssh.SFTPNoSuchFile):
        return FileOpError("not_found", f"{shown} does not exist")
    if isinstance(exc, asyncssh.SFTPPermissionDenied):
        return FileOpError("forbidden", f"permission denied: {shown}")
    return FileOpError("failed", f"{shown}: {exc.reason or exc}")


@dataclass
class SftpHome:
    conn: asyncssh.SSHClientConnection
    sftp: asyncssh.SFTPClient
    root: str

    def _path(self, parts: list[str]) -> str:
        return "/".join([self.root, *parts])

    async def _lstat(self, parts: list[str]) -> asyncssh.SFTPAttrs:
        try:
            return await self.sftp.lstat(self._path(parts))
        except asyncssh.SFTPError as exc:
            raise _sftp_error(exc, "/".join(parts)) from None

    async def _dir(self, parts: list[str], create: bool = False) -> str:
        """The path of the directory `parts` names, each component checked to be a real
        directory (created, if `create`)."""
        for depth in range(len(parts) + 1):
            walked = parts[:depth]
            try:
                attrs = await self.sftp.lstat(self._path(walked))
            except asyncssh.SFTPNoSuchFile:
                if not create or not walked:
                    raise FileOpError("not_found", f"{'/'.join(walked)} does not exist") from None
                try:
                    await self.sftp.mkdir(self._path(walked), asyncssh.SFTPAttrs(permissions=0o700))
                except asyncssh.SFTPError as exc:
                    raise _sftp_error(exc, "/".join(walked)) from None
                continue
            except asyncssh.SFTPError as exc:
                raise _sftp_error(exc, "/".join(walked)) from None
            mode = attrs.permissions or 0
            name = "/".join(walked) or "the home"
            if stat.S_ISLNK(mode):
                raise FileOpError("forbidden", f"{name} is a symbolic link; links are not followed")
            if not stat.S_ISDIR(mode):
                raise FileOpError("not_a_directory", f"{name} is not a directory")
        return self._path(parts)

    async def list_dir(self, parts: list[str]) -> tuple[list[FileEntry], bool]:
        path = await self._dir(parts)
        try:
            names = await self.sftp.readdir(path)
        except asyncssh.SFTPError as exc:
            raise _sftp_error(exc, "/".join(parts)) from None
        entries: list[FileEntry] = []
        for item in names:
            name = str(item.filename)
            if name in (".", ".."):
                continue
            if len(entries) >= MAX_LISTING:
                return entries, True
            mode = item.attrs.permissions or 0
            entries.append(
                FileEntry(
                    name=name,
                    type=type_of(mode),
                    size=(item.attrs.size or 0) if stat.S_ISREG(mode) else 0,
                    mtime=datetime.fromtimestamp(item.attrs.mtime or 0, UTC),
                )
            )
        return entries, False

    async def open_read(self, parts: list[str]) -> _SftpFile | _SftpZip:
        if not parts:
            return _SftpZip(self, await self._dir([]))
        await self._dir(parts[:-1])
        name = "/".join(parts)
        mode = (await self._lstat(parts)).permissions or 0
        if stat.S_ISLNK(mode):
            raise FileOpError("forbidden", f"{name} is a symbolic link; links are not followed")
        if stat.S_ISDIR(mode):
            return _SftpZip(self, self._path(parts))
        if not stat.S_ISREG(mode):
            raise FileOpError("forbidden", f"{name} is not a regular file or directory")
        try:
            handle = await self.sftp.open(self._path(parts), "rb")
            st = await handle.stat()
        except asyncssh.SFTPError as exc:
            raise _sftp_error(exc, name) from None
        if not stat.S_ISREG(st.permissions or 0):
            await handle.close()
            raise FileOpError("forbidden", f"{name} is not a regular file or directory")
        return _SftpFile(handle, st.size)

    async def start_upload(
        self, parts: list[str], max_bytes: int | None, home_limit_mb: int | None
    ) -> _SftpUpload:
        """The allowance is the smaller of the upload limit and, when the home has a size
        limit, the room left on the home's volume (a pod's claim is made that size)."""
        if not parts:
            raise FileOpError("is_a_directory", "cannot upload over the home itself")
        allowance, limited_by = max_bytes, "too_large"
        if home_limit_mb is not None:
            try:
                vfs = await self.sftp.statvfs(self.root)
                room = vfs.bavail * vfs.frsize
            except asyncssh.SFTPError as exc:
                raise _sftp_error(exc, "") from None
            if allowance is None or room < allowance:
                allowance, limited_by = room, "quota"
        parent = await self._dir(parts[:-1], create=True)
        name = "/".join(parts)
        try:
            attrs = await self.sftp.lstat(self._path(parts))
            if stat.S_ISDIR(attrs.permissions or 0):
                raise FileOpError("is_a_directory", f"{name} is a directory")
        except asyncssh.SFTPNoSuchFile:
            pass
        except asyncssh.SFTPError as exc:
            raise _sftp_error(exc, name) from None
        tmp = f"{parent}/.{parts[-1][:200]}.upload-{secrets.token_hex(6)}"
        try:
            handle = await self.sftp.open(tmp, "xb", asyncssh.SFTPAttrs(permissions=0o644))
        except asyncssh.SFTPError as exc:
            raise _sftp_error(exc, name) from None
        return _SftpUpload(
            sftp=self.sftp,
            handle=handle,
            tmp=tmp,
            final=self._path(parts),
            name=name,
            allowance=allowance,
            limited_by="quota" if limited_by == "quota" else "too_large",
        )

    async def close(self) -> None:
        self.sftp.exit()
        self.conn.close()
        await self.conn.wait_closed()

    async def walk(self, path: str, prefix: str) -> AsyncIterator[tuple[str, str]]:
        """(relative name, path) of each regular file below `path`; symbolic links and what
        cannot be listed are left out."""
        try:
            names = await self.sftp.readdir(path)
        except asyncssh.SFTPError:
            return
        for item in sorted(names, key=lambda n: str(n.filename)):
            name = str(item.filename)
            if name in (".", ".."):
                continue
            mode = item.attrs.permissions or 0
            if stat.S_ISDIR(mode):
                async for found in self.walk(f"{path}/{name}", f"{prefix}{name}/"):
                    yield found
            elif stat.S_ISREG(mode):
                yield f"{prefix}{name}", f"{path}/{name}"


@dataclass
class _SftpFile:
    handle: asyncssh.SFTPClientFile
    size: int | None
    kind: Literal["file", "dir"] = "file"

    async def chunks(self) -> AsyncIterator[bytes]:
        while data := await self.handle.read(CHUNK):
            assert isinstance(data, bytes)  # opened "rb": no encoding
            yield data

    async def close(self) -> None:
        await self.handle.close()


@dataclass
class _SftpZip:
    """A folder as a stored zip, built as its files are read: what the archive has written
    is handed on after each chunk, so it is never whole in memory."""

    home: SftpHome
    path: str
    kind: Literal["file", "dir"] = "dir"
    size: int | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        pending: list[bytes] = []
        sink = ChunkSink(pending.append)
        archive = zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True)  # type: ignore[call-overload]
        with archive as zf:
            async for rel, path in self.home.walk(self.path, ""):
                try:
                    handle = await self.home.sftp.open(path, "rb")
                except asyncssh.SFTPError:
                    continue  # gone, or unreadable: not part of the archive
                try:
                    st = await handle.stat()
                    if not stat.S_ISREG(st.permissions or 0):
                        continue
                    info = zipfile.ZipInfo(rel, zip_time(st.mtime or 0))
                    info.file_size = st.size or 0
                    info.external_attr = ((st.permissions or 0) & 0o777) << 16
                    with zf.open(info, "w", force_zip64=(st.size or 0) > 2**31) as out:
                        while data := await handle.read(CHUNK):
                            out.write(data)
                            while pending:
                                yield pending.pop(0)
                finally:
                    await handle.close()
        sink.flush()
        while pending:
            yield pending.pop(0)

    async def close(self) -> None:
        return None


@dataclass
class _SftpUpload:
    sftp: asyncssh.SFTPClient
    handle: asyncssh.SFTPClientFile
    tmp: str
    final: str
    name: str
    allowance: int | None
    limited_by: Literal["quota", "too_large"]
    written: int = 0
    _open: bool = field(default=True, repr=False)

    async def write(self, data: bytes) -> None:
        check_allowance(self.written + len(data), self.allowance, self.limited_by)
        try:
            await self.handle.write(data)
        except asyncssh.SFTPError as exc:
            raise _sftp_error(exc, self.name) from None
        self.written += len(data)

    async def commit(self) -> None:
        try:
            await self.handle.fsync()
            await self._close()
            await self.sftp.posix_rename(self.tmp, self.final)
        except asyncssh.SFTPError as exc:
            await self.abort()
            raise _sftp_error(exc, self.name) from None

    async def abort(self) -> None:
        await self._close()
        with contextlib.suppress(asyncssh.SFTPError):
            await self.sftp.remove(self.tmp)

    async def _close(self) -> None:
        if self._open:
            self._open = False
            with contextlib.suppress(asyncssh.SFTPError):
                await self.handle.close()
