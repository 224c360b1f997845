"""Liveness, readiness, metrics and the live event stream (SSE)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import func, select, text

from streamspace.config import Settings
from streamspace.controlplane import metrics
from streamspace.controlplane.browser import require_same_origin
from streamspace.controlplane.deps import StateDep, UserDep, bearer_token, client_ip
from streamspace.controlplane.problems import Problem
from streamspace.controlplane.security import constant_eq
from streamspace.db.models import Session as SessionRow

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: StateDep) -> Response:
    try:
        async with state.db() as db:
            await asyncio.wait_for(db.execute(text("SELECT 1")), 3)
    except Exception as exc:
        return JSONResponse(
            {"status": "unavailable", "database": f"unreachable: {type(exc).__name__}"},
            status_code=503,
        )
    return JSONResponse({"status": "ok", "database": "ok", "replica": state.replica_id})


FORWARDED_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def check_metrics_access(request: Request, settings: Settings) -> None:
    """The figures say who runs what where (users, sessions, agents): with a token only its
    holder reads them; without one `streamspace up` keeps them to this machine. A request a
    proxy relayed comes from wherever the proxy's client is, so it is not a local one."""
    if settings.metrics_token:
        if not constant_eq(bearer_token(request) or "", settings.metrics_token):
            raise Problem(
                401,
                "Unauthorized",
                "GET /metrics needs the metrics token (Authorization: Bearer <token>)",
                kind="unauthorized",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return
    if settings.metrics_loopback_only:
        relayed = any(name in request.headers for name in FORWARDED_HEADERS)
        if relayed or not is_loopback(client_ip(request)):
            raise Problem(
                403,
                "Forbidden",
                "metrics are served to this machine only; set STREAMSPACE_METRICS_TOKEN to "
                "scrape them from elsewhere",
                kind="forbidden",
            )


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@router.get("/metrics")
async def prometheus(request: Request, state: StateDep) -> Response:
    check_metrics_access(request, state.settings)
    metrics.agents_connected.set(len(state.hub.connections))
    metrics.streams_active.set(state.streams.active_streams)
    async with state.db() as db:
        counts = dict(
            (
                await db.execute(select(SessionRow.state, func.count()).group_by(SessionRow.state))
            ).all()
        )
    for st in ("pending", "running", "hibernated", "starting", "failed", "stopped"):
        metrics.sessions_by_state.labels(st).set(counts.get(st, 0))
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/api/v1/events", dependencies=[Depends(require_same_origin)])
async def events(request: Request, user: UserDep, state: StateDep) -> StreamingResponse:
    """Server-sent events: `session` (a session changed) and `resync` (re-fetch the list).

    The stream ends with a `revoked` event when the user's sign-in is revoked (logout, password
    change, disabled, deleted, signed out by an admin); see controlplane.revocation."""
    sees_all = user.role in ("admin", "operator") and request.query_params.get("all") == "true"
    user_id, token_version = user.id, user.token_version

    async def stream() -> AsyncIterator[str]:
        async with state.events.subscribe(user_id, sees_all) as sub:
            with state.revocations.track(user_id, token_version, "events", sub.close):
                yield "event: hello\ndata: {}\n\n"
                while True:
                    try:
                        event = await asyncio.wait_for(sub.queue.get(), 15)
                    except TimeoutError:
                        yield ": keepalive\n\n"
                        continue
                    yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
                    if event["type"] == "revoked":
                        return

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
