"""Files in a session's home: list, download (a folder as a zip), upload; streamed both ways.

Bytes travel on a dialled-back agent stream (StreamBroker.agent_stream, purposes `files_*`), one
WebSocket frame at a time, so neither side holds more than a chunk or two whatever the file's
size. The owner comes from the token (another user's session is a 404), the group policy and
the upload size limit are checked first, and every transfer is audited.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Query, Request, WebSocket
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.websockets import WebSocketDisconnect

from streamspace import logs, protocol
from streamspace.controlplane import audit, grouppolicy
from streamspace.controlplane.api.schemas import Page
from streamspace.controlplane.api.sessions import load_owned
from streamspace.controlplane.deps import DbDep, StateDep, UserDep
from streamspace.controlplane.problems import Problem, conflict, forbidden
from streamspace.controlplane.state import AppState
from streamspace.controlplane.statemachine import State
from streamspace.controlplane.writerturn import SLOT_KEY
from streamspace.db.models import Session as SessionRow
from streamspace.db.models import User

log = logs.get_logger("streamspace.files")

router = APIRouter(prefix="/api/v1/sessions", tags=["files"])

PATH_QUERY = Query("", max_length=protocol.HOME_PATH_MAX, description="relative to the home")
FILE_STATES = (State.RUNNING, State.HIBERNATED)
FRAME_BYTES = 1024 * 1024


class FileOut(BaseModel):
    name: str
    path: str = Field(description="relative to the home")
    type: protocol.FileType
    size: int
    mtime: datetime


def _parts(path: str) -> list[str]:
    try:
        return protocol.home_path_parts(path)
    except protocol.HomePathError as exc:
        raise Problem(400, "Bad request", str(exc), kind="invalid-path") from None


_ERROR_STATUS: dict[str, tuple[int, str]] = {
    "invalid_path": (400, "Bad request"),
    "not_found": (404, "Not found"),
    "not_a_directory": (409, "Conflict"),
    "is_a_directory": (409, "Conflict"),
    "forbidden": (403, "Forbidden"),
    "too_large": (413, "Payload too large"),
    "quota": (413, "Payload too large"),
    "unsupported": (501, "Not implemented"),
    "failed": (502, "Bad gateway"),
}


def _refusal(reply: protocol.FileReply) -> Problem:
    status, title = _ERROR_STATUS.get(reply.error or "failed", (502, "Bad gateway"))
    kind = (reply.error or "failed").replace("_", "-")
    return Problem(status, title, reply.message or title, kind=f"files-{kind}")


async def _session_for_files(db: DbDep, session_id: str, user: User) -> SessionRow:
    session = await load_owned(db, session_id, user)
    if session.state not in FILE_STATES or session.agent_id is None:
        raise conflict(f"session is {session.state}; its files can be reached while it runs")
    return session


async def _release(db: DbDep) -> None:
    """End the request's database use before a long transfer: the connection and the
    request slot go back at once instead of when the last byte is through."""
    await db.commit()
    await db.close()
    slot = db.info.get(SLOT_KEY)
    if slot is not None:
        slot.release()


async def _reply(ws: WebSocket) -> protocol.FileReply:
    """The agent's next text frame (a FileReply)."""
    msg = await ws.receive()
    text = msg.get("text")
    if msg["type"] == "websocket.disconnect" or text is None:
        raise ConnectionError("the agent closed the file stream")
    return protocol.parse_file_reply(text)


def _unavailable(exc: Exception) -> Problem:
    return Problem(503, "Service unavailable", str(exc) or "agent unavailable", kind="agent-down")


async def _check_policy(
    db: DbDep, state: AppState, user: User, request: Request, direction: grouppolicy.Direction,
    session_id: str, path: str,
) -> None:  # fmt: skip
    if await grouppolicy.allowed(db, state.settings, user.id, direction):
        return
    audit.record(
        db,
        actor=user,
        action=f"session.file_{direction}",
        resource_type="session",
        resource_id=session_id,
        request=request,
        status_code=403,
        path=path,
    )
    await db.commit()
    raise forbidden(f"file {direction}s are switched off for your groups")


async def _coalesced(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The request body in frames of about FRAME_BYTES: the server hands it over in small
    pieces (64 KiB), and each frame costs the agent a write in a worker thread."""
    buf = bytearray()
    async for chunk in body:
        buf += chunk
        if len(buf) >= FRAME_BYTES:
            yield bytes(buf)
            buf.clear()
    if buf:
        yield bytes(buf)


@router.get("/{session_id}/files", response_model=Page[FileOut])
async def list_files(
    session_id: str,
    user: UserDep,
    state: StateDep,
    db: DbDep,
    path: str = PATH_QUERY,
    sort: Literal["name", "size", "mtime", "type"] = Query("name"),
    order: Literal["asc", "desc"] = Query("asc"),
    limit: int = Query(200, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=protocol.MAX_LISTING),
) -> Page[FileOut]:
    parts = _parts(path)
    session = await _session_for_files(db, session_id, user)
    agent_id = session.agent_id or ""
    await _release(db)
    try:
        async with state.streams.agent_stream(
            agent_id, session_id, "files_list", file_path="/".join(parts)
        ) as ws:
            reply = await _reply(ws)
    except (ConnectionError, protocol.ProtocolError) as exc:
        raise _unavailable(exc) from None
    if not reply.ok:
        raise _refusal(reply)
    entries = list(reply.entries or [])
    key: Any = {
        "name": lambda e: e.name,
        "size": lambda e: (e.size, e.name),
        "mtime": lambda e: (e.mtime, e.name),
        "type": lambda e: (e.type != "dir", e.name),
    }[sort]
    entries.sort(key=key, reverse=order == "desc")
    window = entries[offset : offset + limit]
    prefix = "/".join(parts)
    items = [
        FileOut(
            name=e.name,
            path=f"{prefix}/{e.name}" if prefix else e.name,
            type=e.type,
            size=e.size,
            mtime=e.mtime,
        )
        for e in window
    ]
    end = offset + len(window)
    return Page[FileOut](
        items=items,
        total=len(entries),
        limit=limit,
        offset=offset,
        next_offset=end if end < len(entries) else None,
    )


@router.get("/{session_id}/files/content", response_model=None)
async def download_file(
    session_id: str,
    request: Request,
    user: UserDep,
    state: StateDep,
    db: DbDep,
    path: str = PATH_QUERY,
) -> StreamingResponse:
    return await _download(session_id, _parts(path), request, user, state, db)


class DownloadLinkOut(BaseModel):
    url: str = Field(description="GET it without credentials, once, before it expires")
    expires_at: datetime


@router.post("/{session_id}/files/link", response_model=DownloadLinkOut, status_code=201)
async def download_link(
    session_id: str,
    request: Request,
    user: UserDep,
    state: StateDep,
    db: DbDep,
    path: str = PATH_QUERY,
) -> DownloadLinkOut:
    """A single-use link to one download, for the browser's own download manager: a page
    cannot put the bearer token on a navigation, and fetching the file into the page would
    hold all of it in the tab's memory. Checked now (owner, state, policy) and again when
    used."""
    parts = _parts(path)
    session = await _session_for_files(db, session_id, user)
    await _check_policy(db, state, user, request, "download", session_id, "/".join(parts))
    ticket, expires = await state.streams.issue_ticket(
        session.id, user.id, user.token_version, purpose="download", path="/".join(parts)
    )
    return DownloadLinkOut(
        url=f"/api/v1/sessions/{session.id}/files/download?ticket={quote(ticket)}",
        expires_at=expires,
    )


@router.get("/{session_id}/files/download", response_model=None)
async def download_by_link(
    session_id: str,
    request: Request,
    state: StateDep,
    db: DbDep,
    ticket: str = Query("", max_length=128),
) -> StreamingResponse:
    """What a link from /files/link downloads: the ticket, not a token, says who asks (its
    user, as of when it was issued: a sign-out since voids it) and what (its path)."""
    try:
        found = await state.streams.consume_ticket(ticket)
    except Exception as exc:  # Redis down: say so instead of a 500
        log.warning("ticket_store_unavailable", error=exc)
        raise Problem(
            503, "Service unavailable", "the link store is unreachable; retry", kind="unavailable"
        ) from None
    if found is None or found.purpose != "download" or found.session_id != session_id:
        raise forbidden("download link invalid, used or expired; ask for a new one")
    user = await db.get(User, found.user_id)
    if user is None or not user.is_active or user.token_version != found.token_version:
        raise forbidden("download link no longer valid: its user signed out or was disabled")
    request.state.user = user
    return await _download(session_id, _parts(found.path), request, user, state, db)


async def _download(
    session_id: str,
    parts: list[str],
    request: Request,
    user: User,
    state: AppState,
    db: DbDep,
) -> StreamingResponse:
    session = await _session_for_files(db, session_id, user)
    await _check_policy(db, state, user, request, "download", session_id, "/".join(parts))
    agent_id = session.agent_id or ""
    audit.record(
        db,
        actor=user,
        action="session.file_download",
        resource_type="session",
        resource_id=session_id,
        request=request,
        path="/".join(parts),
    )
    await _release(db)
    opened = state.streams.agent_stream(
        agent_id, session_id, "files_read", file_path="/".join(parts)
    )
    try:
        ws = await opened.__aenter__()
    except ConnectionError as exc:
        raise _unavailable(exc) from None
    try:
        reply = await _reply(ws)
    except (ConnectionError, protocol.ProtocolError) as exc:
        await opened.__aexit__(None, None, None)
        raise _unavailable(exc) from None
    if not reply.ok:
        await opened.__aexit__(None, None, None)
        raise _refusal(reply)
    name = parts[-1] if parts else "home"
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    if reply.kind == "dir":
        name, media = f"{name}.zip", "application/zip"
    else:
        media = "application/octet-stream"
        if reply.size is not None:
            headers["Content-Length"] = str(reply.size)
    headers["Content-Disposition"] = f"attachment; filename*=UTF-8''{quote(name)}"

    async def body() -> AsyncIterator[bytes]:
        done = False
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                data = msg.get("bytes")
                if data is not None:
                    state.streams.bytes_to_browser += len(data)
                    yield data
                    continue
                text = msg.get("text")
                if text is not None:
                    done = protocol.parse_file_reply(text).done
                    break
        finally:
            await opened.__aexit__(None, None, None)
        if not done:
            log.warning("file_download_cut", session_id=session_id, user_id=user.id)
            raise ConnectionError("the agent's file stream ended early")

    return StreamingResponse(body(), media_type=media, headers=headers)


@router.put("/{session_id}/files/content", status_code=201, response_model=FileOut)
async def upload_file(
    session_id: str,
    request: Request,
    user: UserDep,
    state: StateDep,
    db: DbDep,
    path: str = PATH_QUERY,
) -> FileOut:
    parts = _parts(path)
    if not parts:
        raise Problem(
            400, "Bad request", "name the file to upload: path=Uploads/NAME", kind="invalid-path"
        )
    session = await _session_for_files(db, session_id, user)
    await _check_policy(db, state, user, request, "upload", session_id, path)
    limit = state.settings.files_max_upload_mb * 2**20
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem(
            413,
            "Payload too large",
            f"uploads are limited to {state.settings.files_max_upload_mb} MiB",
            kind="payload-too-large",
        )
    agent_id, home_limit = session.agent_id or "", session.home_limit_mb
    await _release(db)
    try:
        async with state.streams.agent_stream(
            agent_id,
            session_id,
            "files_write",
            file_path="/".join(parts),
            max_bytes=limit,
            home_limit_mb=home_limit,
        ) as ws:
            ready = await _reply(ws)
            if not ready.ok:
                raise _refusal(ready)
            sent, agent_gone = 0, False
            async for chunk in _coalesced(request.stream()):
                sent += len(chunk)
                if sent > limit:
                    break
                try:
                    await ws.send_bytes(chunk)
                except (WebSocketDisconnect, RuntimeError, OSError):
                    agent_gone = True  # it refused mid-way (quota): its reply says why
                    break
                state.streams.bytes_from_browser += len(chunk)
            if sent > limit:
                raise Problem(
                    413,
                    "Payload too large",
                    f"uploads are limited to {state.settings.files_max_upload_mb} MiB",
                    kind="payload-too-large",
                )
            if not agent_gone:
                with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                    await ws.send_bytes(b"")
            final = await _reply(ws)
    except (ConnectionError, protocol.ProtocolError) as exc:
        raise _unavailable(exc) from None
    ok = final.ok and final.done
    async with state.db() as adb:
        actor = await adb.get(User, user.id)
        audit.record(
            adb,
            actor=actor,
            action="session.file_upload",
            resource_type="session",
            resource_id=session_id,
            request=request,
            status_code=201 if ok else _ERROR_STATUS.get(final.error or "failed", (502, ""))[0],
            path="/".join(parts),
            size=final.size if ok else sent,
        )
        await adb.commit()
    if not ok:
        raise _refusal(final)
    return FileOut(
        name=parts[-1],
        path="/".join(parts),
        type="file",
        size=final.size or 0,
        mtime=datetime.now().astimezone(),
    )
