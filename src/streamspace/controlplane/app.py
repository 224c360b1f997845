"""Application factory: wires the database, hub, lifecycle, streams and loops into FastAPI."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Response
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import func, select
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from streamspace import __version__, logs
from streamspace.config import Settings
from streamspace.controlplane import catalog, datadir, metrics, problems
from streamspace.controlplane.api import (
    agents,
    apikeys,
    audit,
    auth,
    auth_oidc,
    auth_saml,
    files,
    health,
    mfa,
    passkeys,
    sessions,
    signins,
    templates,
    users,
)
from streamspace.controlplane.browser import SecurityHeaders
from streamspace.controlplane.passwords import describe, weakness
from streamspace.controlplane.security import dummy_hash, hash_password, random_secret
from streamspace.controlplane.state import AppState
from streamspace.controlplane.wiring import build_loops, build_state, start_peers
from streamspace.db import migrate
from streamspace.db.engine import create_engine
from streamspace.db.models import User

log = logs.get_logger("streamspace.app")

WEB_DIR = Path(__file__).resolve().parent / "web"


def _streams_own_body(scope: Scope) -> bool:
    """File uploads are streamed to the agent and limited by their own setting
    (files_max_upload_mb, controlplane/api/files.py), never buffered here."""
    path = str(scope.get("path", ""))
    return (
        scope.get("method") == "PUT"
        and path.startswith("/api/v1/sessions/")
        and path.endswith("/files/content")
    )


class BodyLimit:
    """Refuse bodies over the limit with 413 before the handler buffers them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _streams_own_body(scope):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._too_large(send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(413, f"request body exceeds {self.limit} bytes")
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._too_large(send)

    async def _too_large(self, send: Send) -> None:
        resp = problems.problem_response(
            None,
            413,
            "Payload too large",
            f"request body exceeds {self.limit} bytes",
            "payload-too-large",
        )
        await send({"type": "http.response.start", "status": 413, "headers": resp.raw_headers})
        await send({"type": "http.response.body", "body": resp.body})


class _TooLarge(StarletteHTTPException):
    """An HTTPException so that FastAPI's body reader re-raises it instead of answering 400."""


class Observe:
    """Request count and latency per route template (pure ASGI: no per-request task)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            method = scope.get("method", "")
            metrics.requests_total.labels(method, path, str(status)).inc()
            metrics.request_seconds.labels(method, path).observe(time.perf_counter() - started)


class StartupRefused(RuntimeError):
    """A setting makes starting unsafe; the message says which and what to do."""


async def bootstrap_admin(state: AppState) -> str | None:
    """Create `admin` on first start; returns the generated password if one was made.

    A configured STREAMSPACE_ADMIN_PASSWORD the policy refuses stops the start: the first
    account, with every right, would otherwise be the easiest one to guess. It is only
    checked when it is used (no user exists yet), so an old setting never blocks a restart.
    """
    async with state.db() as db:
        if (await db.scalar(select(func.count(User.id)))) or 0:
            return None
        configured = state.settings.admin_password
        if configured:
            weak = await asyncio.to_thread(weakness, configured, ["admin", "Administrator"])
            if weak is not None:
                raise StartupRefused(
                    "refusing to create the first admin: "
                    + describe("STREAMSPACE_ADMIN_PASSWORD", weak)
                    + " Set a stronger one, or unset it to have a random password generated "
                    "and printed once."
                )
        password = configured or random_secret(12)
        db.add(
            User(
                username="admin",
                display_name="Administrator",
                role="admin",
                password_hash=hash_password(password),
            )
        )
        await db.commit()
    return None if state.settings.admin_password else password


GC_THRESHOLDS = (10_000, 20, 100)


def settle_garbage_collector() -> None:
    """Keep full collections rare and small: they stop the event loop for their whole run.

    Under load a replica ran one every ~7 s, walking ~100-200k objects for 60-160 ms (a gen-2
    pause was behind most API requests slower than 50 ms). Start-up objects (routes, models,
    compiled SQL, the ORM registry) are frozen out of the collector's sight, and the thresholds
    make collections of older generations ~100x rarer; reference counting still frees
    everything that is not in a cycle at once.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def create_app(settings: Settings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        datadir.prepare(settings.data_dir)
        engine = create_engine(
            settings.resolved_database_url(),
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            pool_timeout=settings.db_pool_timeout_seconds,
        )
        replica = settings.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        state = build_state(
            settings, engine, replica_id=replica, secret=datadir.load_or_create_secret(settings)
        )
        app.state.ss = state
        try:
            async with migrate.startup_lock(engine):
                await migrate.upgrade(engine)
                generated = await bootstrap_admin(state)
                async with state.db() as db:
                    await catalog.sync_files(db, settings.resolved_templates_dir())
        except (StartupRefused, migrate.MigrationRefused) as exc:
            app.state.startup_error = str(exc)
            await state.peers.close()
            await state.saml.aclose()
            await engine.dispose()
            raise
        await asyncio.to_thread(dummy_hash)
        if generated:
            print(
                f"\n  Created user 'admin' with password: {generated}\n"
                "  (shown once; set STREAMSPACE_ADMIN_PASSWORD to choose it)\n",
                flush=True,
            )
        start_peers(state)
        loops = build_loops(state)
        app.state.loops = loops
        await loops.lease.renew()
        loops.start()
        log.event("control_plane_started", replica=replica, version=__version__)
        settle_garbage_collector()
        try:
            yield
        finally:
            await loops.stop()
            await state.hub.close_all()
            await state.peers.close()
            await state.oidc.close()
            await state.saml.aclose()
            await engine.dispose()

    app = FastAPI(
        title="StreamSpace",
        version=__version__,
        lifespan=lifespan,
        openapi_url="/api/openapi.json",
        # FastAPI's docs pages load Swagger UI from a CDN with an inline script: they break
        # offline and under the UI's CSP. The schema stays at /api/openapi.json.
        docs_url=None,
        redoc_url=None,
    )
    problems.install(app)
    routers = (
        auth,
        auth_oidc,
        auth_saml,
        signins,
        mfa,
        passkeys,
        apikeys,
        users,
        templates,
        sessions,
        files,
        agents,
        audit,
    )
    for module in (*routers, health):
        app.include_router(module.router)

    app.add_middleware(Observe)
    _mount_ui(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(SecurityHeaders)
    if settings.trusted_proxies:
        # Outermost, so that everything inside sees the client the proxy forwarded.
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxies)
    return app


def _mount_ui(app: FastAPI) -> None:
    static = WEB_DIR / "static"
    vendor = WEB_DIR / "vendor"
    if static.is_dir():
        app.mount("/static", StaticFiles(directory=static), name="static")
    if vendor.is_dir():
        app.mount("/vendor", StaticFiles(directory=vendor), name="vendor")
    index = WEB_DIR / "index.html"

    @app.get("/", include_in_schema=False)
    async def ui_index() -> Response:
        if not index.exists():
            return problems.problem_response(
                None, 404, "Not found", "the web UI is not installed", "not-found"
            )
        return FileResponse(index, headers={"Cache-Control": "no-store"})
