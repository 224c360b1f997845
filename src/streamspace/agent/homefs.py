"""Traversal-proof access to one session's home, as the session's user (blocking: call it in
a worker thread).

The home is a tree its user controls, and the agent usually runs as root, so nothing here
trusts a name: every component is opened relative to its parent's descriptor with O_NOFOLLOW
(a symlink anywhere in the path is refused, never followed, so no path leaves the home), and
what the session user could not do themselves (read a 0600 file of another uid, write in a
directory they cannot write) is refused by checking the mode bits as that uid. New files and
directories are created owned by the session uid. Uploads go to a hidden temporary file that
is renamed into place only once complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from streamspace.agent.backends.base import HomeAccess
from streamspace.agent.homeusage import tree_bytes
from streamspace.protocol import MAX_LISTING, FileEntry, FileErrorCode, FileType

__all__ = [
    "CHUNK",
    "ChunkSink",
    "FileOpError",
    "Home",
    "Upload",
    "check_allowance",
    "type_of",
    "zip_time",
]

CHUNK = 1024 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ, _WRITE, _EXEC = 4, 2, 1


class FileOpError(Exception):
    def __init__(self, code: FileErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: FileErrorCode = code
        self.message = message


def _os_error(exc: OSError, name: str) -> FileOpError:
    shown = name or "the home"
    if exc.errno == errno.ELOOP:
        return FileOpError("forbidden", f"{shown} is a symbolic link; links are not followed")
    if exc.errno == errno.ENOENT:
        return FileOpError("not_found", f"{shown} does not exist")
    if exc.errno == errno.ENOTDIR:
        return FileOpError("not_a_directory", f"{shown} is not a directory")
    if exc.errno == errno.EISDIR:
        return FileOpError("is_a_directory", f"{shown} is a directory")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return FileOpError("forbidden", f"permission denied: {shown}")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return FileOpError("quota", "no space left for the session's home")
    return FileOpError("failed", f"{shown}: {exc.strerror or exc}")


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def type_of(mode: int) -> FileType:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


@dataclass
class Home:
    """One session's home; `as_root` says whether the kernel checks for us (an agent that is
    not root runs as the session's own uid) or the mode bits must be checked here."""

    access: HomeAccess
    as_root: bool = os.geteuid() == 0

    # ---- permissions as the session user --------------------------------------------------

    def _may(self, st: os.stat_result, want: int) -> bool:
        if not self.as_root:
            return True
        if st.st_uid == self.access.uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid == self.access.gid:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        return bits & want == want

    def _check(self, fd: int, want: int, name: str) -> os.stat_result:
        st = os.fstat(fd)
        if not self._may(st, want):
            raise FileOpError("forbidden", f"permission denied: {name or 'the home'}")
        return st

    # ---- walking --------------------------------------------------------------------------

    def _open_dir(self, parts: list[str], create: bool = False) -> int:
        """A descriptor of the directory `parts` names, every component opened without
        following symlinks (and created, owned by the session uid, if `create`)."""
        try:
            fd = os.open(self.access.root, _DIR_FLAGS)
        except OSError as exc:
            raise _os_error(exc, "") from None
        walked = ""
        try:
            for part in parts:
                self._check(fd, _EXEC, walked)
                walked = f"{walked}/{part}" if walked else part
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except NotADirectoryError:
                    if _is_link(part, fd):
                        raise FileOpError(
                            "forbidden", f"{walked} is a symbolic link; links are not followed"
                        ) from None
                    raise
                except FileNotFoundError:
                    if not create:
                        raise
                    self._check(fd, _WRITE | _EXEC, walked.rpartition("/")[0])
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o700, dir_fd=fd)
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                    self._own(nfd)
                os.close(fd)
                fd = nfd
            return fd
        except OSError as exc:
            os.close(fd)
            raise _os_error(exc, walked) from None
        except BaseException:
            os.close(fd)
            raise

    def _own(self, fd: int) -> None:
        if self.as_root:
            os.fchown(fd, self.access.uid, self.access.gid)

    # ---- list -----------------------------------------------------------------------------

    def list_dir(self, parts: list[str]) -> tuple[list[FileEntry], bool]:
        """The entries of a directory (symlinks listed as such, never followed); True if more
        than MAX_LISTING were there."""
        fd = self._open_dir(parts)
        try:
            self._check(fd, _READ | _EXEC, "/".join(parts))
            entries: list[FileEntry] = []
            truncated = False
            with os.scandir(fd) as it:
                for entry in it:
                    if len(entries) >= MAX_LISTING:
                        truncated = True
                        break
                    with contextlib.suppress(FileNotFoundError):
                        st = entry.stat(follow_symlinks=False)
                        entries.append(
                            FileEntry(
                                name=entry.name,
                                type=type_of(st.st_mode),
                                size=st.st_size if stat.S_ISREG(st.st_mode) else 0,
                                mtime=datetime.fromtimestamp(st.st_mtime, UTC),
                            )
                        )
            return entries, truncated
        finally:
            os.close(fd)

    # ---- read -----------------------------------------------------------------------------

    def open_read(self, parts: list[str]) -> tuple[int, os.stat_result]:
        """A descriptor of the file or directory to download and its stat."""
        if not parts:
            fd = self._open_dir([])
            return fd, self._check(fd, _READ | _EXEC, "")
        parent = self._open_dir(parts[:-1])
        name = "/".join(parts)
        try:
            self._check(parent, _EXEC, "/".join(parts[:-1]))
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(parts[-1], flags, dir_fd=parent)
        except OSError as exc:
            raise _os_error(exc, name) from None
        finally:
            os.close(parent)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                self._check(fd, _READ | _EXEC, name)
            elif stat.S_ISREG(st.st_mode):
                self._check(fd, _READ, name)
                if self.as_root and st.st_nlink > 1 and st.st_uid != self.access.uid:
                    raise FileOpError("forbidden", f"{name} is a hard link to another's file")
                os.set_blocking(fd, True)
            else:
                raise FileOpError("forbidden", f"{name} is not a regular file or directory")
            return fd, st
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def read_chunk(fd: int) -> bytes:
        return os.read(fd, CHUNK)

    def zip_dir(self, fd: int, write: Callable[[bytes], None]) -> None:
        """Write a zip of the tree under the directory `fd` to `write` (an unseekable
        stream), entries stored uncompressed; symlinks and unreadable entries are skipped."""
        sink = ChunkSink(write)
        archive = zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True)  # type: ignore[call-overload]
        with archive as zf:
            for rel, file_fd, st in self._walk(fd, ""):
                try:
                    info = zipfile.ZipInfo(rel, zip_time(st.st_mtime))
                    info.file_size = st.st_size
                    info.external_attr = (st.st_mode & 0o777) << 16
                    with zf.open(info, "w", force_zip64=st.st_size > 2**31) as out:
                        while data := os.read(file_fd, CHUNK):
                            out.write(data)
                finally:
                    os.close(file_fd)
        sink.flush()

    def _walk(self, dir_fd: int, prefix: str) -> Iterator[tuple[str, int, os.stat_result]]:
        """(relative name, open descriptor, stat) of each readable regular file below."""
        with os.scandir(dir_fd) as it:
            names = sorted(e.name for e in it)
        for name in names:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                fd = os.open(name, flags, dir_fd=dir_fd)
            except OSError:
                continue  # a symlink (ELOOP), gone, or unreadable: not part of the archive
            st = os.fstat(fd)
            rel = f"{prefix}{name}"
            if stat.S_ISDIR(st.st_mode) and self._may(st, _READ | _EXEC):
                try:
                    yield from self._walk(fd, rel + "/")
                finally:
                    os.close(fd)
            elif (
                stat.S_ISREG(st.st_mode)
                and self._may(st, _READ)
                and not (self.as_root and st.st_nlink > 1 and st.st_uid != self.access.uid)
            ):
                os.set_blocking(fd, True)
                yield rel, fd, st
            else:
                os.close(fd)

    # ---- write ----------------------------------------------------------------------------

    def start_upload(
        self, parts: list[str], max_bytes: int | None, home_limit_mb: int | None
    ) -> Upload:
        """A hidden temporary file next to the target, owned by the session uid; the
        allowance is the smaller of the upload limit and the room left under the home's
        limit (measured now)."""
        if not parts:
            raise FileOpError("is_a_directory", "cannot upload over the home itself")
        allowance, limited_by = max_bytes, "too_large"
        if home_limit_mb is not None:
            room = max(0, home_limit_mb * 2**20 - tree_bytes(self.access.root))
            if allowance is None or room < allowance:
                allowance, limited_by = room, "quota"
        parent = self._open_dir(parts[:-1], create=True)
        name = parts[-1]
        try:
            self._check(parent, _WRITE | _EXEC, "/".join(parts[:-1]))
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    raise FileOpError("is_a_directory", f"{'/'.join(parts)} is a directory")
            tmp = f".{name[:200]}.upload-{secrets.token_hex(6)}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o644, dir_fd=parent)
            self._own(fd)
        except OSError as exc:
            os.close(parent)
            raise _os_error(exc, "/".join(parts)) from None
        except BaseException:
            os.close(parent)
            raise
        return Upload(
            parent=parent,
            fd=fd,
            tmp=tmp,
            name=name,
            allowance=allowance,
            limited_by="quota" if limited_by == "quota" else "too_large",
        )


@dataclass
class Upload:
    parent: int
    fd: int
    tmp: str
    name: str
    allowance: int | None
    limited_by: FileErrorCode
    written: int = 0

    def write(self, data: bytes) -> None:
        check_allowance(self.written + len(data), self.allowance, self.limited_by)
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except OSError as exc:
                raise _os_error(exc, self.name) from None
            view = view[n:]
        self.written += len(data)

    def commit(self) -> None:
        try:
            os.fsync(self.fd)
            os.rename(self.tmp, self.name, src_dir_fd=self.parent, dst_dir_fd=self.parent)
        except OSError as exc:
            self.abort()
            raise _os_error(exc, self.name) from None
        self._close()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.tmp, dir_fd=self.parent)
        self._close()

    def _close(self) -> None:
        for fd in (self.fd, self.parent):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fd = self.parent = -1


def check_allowance(total: int, allowance: int | None, limited_by: FileErrorCode) -> None:
    """Refuse an upload that has grown past what it may write (`limited_by` says which limit
    that is: the upload size limit, or the room left under the home's size limit)."""
    if allowance is None or total <= allowance:
        return
    what = (
        "the room left under the home's size limit"
        if limited_by == "quota"
        else "the upload size limit"
    )
    raise FileOpError(limited_by, f"the upload is larger than {allowance} bytes, {what}")


def zip_time(ts: float) -> tuple[int, int, int, int, int, int]:
    t = datetime.fromtimestamp(max(ts, 315532800), UTC)
    return (t.year, t.month, t.day, t.hour, t.minute, t.second)


class ChunkSink:
    """An unseekable file object that hands the zip on in ~1 MiB pieces."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self._buf = bytearray()
        self._pos = 0

    def write(self, data: bytes) -> int:
        self._buf += data
        self._pos += len(data)
        if len(self._buf) >= CHUNK:
            self.flush()
        return len(data)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        if self._buf:
            self._write(bytes(self._buf))
            self._buf.clear()
