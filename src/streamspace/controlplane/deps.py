"""FastAPI dependencies: database session, the caller, and role checks."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import HTTPConnection

from streamspace.controlplane import apikeys, metrics
from streamspace.controlplane.problems import Problem
from streamspace.controlplane.security import decode_access_token
from streamspace.controlplane.state import AppState
from streamspace.controlplane.writerturn import SLOT_KEY
from streamspace.db.models import User


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.ss
    return state


StateDep = Annotated[AppState, Depends(get_state)]


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


ONE_STATEMENT_MARK = "_streamspace_one_statement"

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


def one_statement(endpoint: Endpoint) -> Endpoint:
    """Mark an endpoint whose only write is one `Lifecycle.commit` that fits one statement:
    its request gets a `write_db` session (no BEGIN/COMMIT round trips on PostgreSQL)."""
    setattr(endpoint, ONE_STATEMENT_MARK, True)
    return endpoint


class RequestSlot:
    """A request's place among those allowed a database session at once (`state.db_slots`)."""

    def __init__(self, slots: asyncio.Semaphore, timeout: float) -> None:
        self._slots = slots
        self._timeout = timeout
        self.held = False

    async def acquire(self) -> None:
        if self._slots.locked():  # only then pay for wait_for's task and timer
            try:
                await asyncio.wait_for(self._slots.acquire(), self._timeout)
            except TimeoutError:
                raise PoolTimeoutError("no database connection became free in time") from None
        else:
            await self._slots.acquire()
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._slots.release()


async def get_db(conn: HTTPConnection, state: StateDep) -> AsyncIterator[AsyncSession]:
    """A session per request, admitted first come first served.

    Requests queue on `state.db_slots` (FIFO) rather than in the connection pool: the pool's
    queue lets a newcomer take a connection that was just returned while a waiter is being woken,
    so under overload some requests starved until the pool timeout (503s at 64 concurrent
    clients, with the median request at 0.2 s).
    """
    if conn.scope.get("method") in SAFE_METHODS:
        factory = state.read_db
    elif getattr(conn.scope.get("endpoint"), ONE_STATEMENT_MARK, False):
        factory = state.write_db
    else:
        factory = state.db
    slot = RequestSlot(state.db_slots, state.settings.db_pool_timeout_seconds)
    await slot.acquire()
    try:
        async with factory() as db:
            db.info[SLOT_KEY] = slot
            yield db
    finally:
        slot.release()


@contextlib.asynccontextmanager
async def writer_turn(state: AppState, db: AsyncSession) -> AsyncIterator[None]:
    """On SQLite, this replica's turn to decide and write, waited for without holding a
    pooled connection or a request slot (see writerturn.WriterTurn.taken_by)."""
    async with state.writer_turn.taken_by(db):
        yield


DbDep = Annotated[AsyncSession, Depends(get_db)]


def _unauthorized(detail: str) -> Problem:
    return Problem(
        401, "Unauthorized", detail, kind="unauthorized", headers={"WWW-Authenticate": "Bearer"}
    )


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return token.strip()


def _too_many(detail: str, retry_after: float, limit: str) -> Problem:
    seconds = max(1, math.ceil(retry_after))
    metrics.rate_limited_total.labels(limit).inc()
    return Problem(
        429,
        "Too many requests",
        f"{detail}; try again in {seconds} s",
        kind="rate-limited",
        headers={"Retry-After": str(seconds)},
    )


async def token_claims(request: Request, state: StateDep) -> dict[str, Any]:
    """The access token's claims, and the caller's request rate, checked before the request
    takes a database slot: a user over the limit costs others nothing but this check."""
    token = bearer_token(request)
    if token is None:
        raise _unauthorized("missing bearer token (log in at POST /api/v1/auth/login)")
    claims: dict[str, Any] | None
    if token.startswith(apikeys.PREFIX):
        claims = await _api_key_claims(request, state, token)
    else:
        claims = decode_access_token(state.secret, token)
    if claims is None:
        raise _unauthorized("invalid or expired access token")
    wait = state.user_requests.take(str(claims["sub"]))
    if wait > 0:
        s = state.settings
        raise _too_many(
            f"too many requests from this account (at most {s.user_requests_per_second:g} "
            f"per second, {s.user_request_burst} at once)",
            wait,
            "requests",
        )
    return claims


async def _api_key_claims(request: Request, state: AppState, token: str) -> dict[str, Any]:
    grant = await state.api_keys.resolve(token, client_ip(request))
    if grant is None:
        raise _unauthorized("invalid, expired or revoked API key")
    needed = apikeys.required_scope(request.scope.get("method", "GET"), request.url.path)
    if needed is None:
        raise Problem(
            403,
            "Forbidden",
            "API keys cannot do this (signing in, out and managing keys need a password sign-in)",
            kind="forbidden",
        )
    if not grant.allows(needed):
        held = ", ".join(sorted(grant.scopes))
        raise Problem(
            403,
            "Forbidden",
            f"this API key lacks the scope {needed!r} (it has: {held})",
            kind="insufficient-scope",
        )
    request.state.api_key = grant.key_id
    return {"sub": grant.user_id, "key": grant.key_id, "scopes": sorted(grant.scopes)}


ClaimsDep = Annotated[dict[str, Any], Depends(token_claims)]


async def current_user(request: Request, state: StateDep, claims: ClaimsDep, db: DbDep) -> User:
    user = await state.auth_cache.load(db, claims["sub"])
    if user is None or not user.is_active:
        raise _unauthorized("user no longer exists or is disabled")
    if "key" not in claims and user.token_version != claims.get("tv"):
        raise _unauthorized("token was revoked (logged out or password changed)")
    request.state.user = user
    return user


UserDep = Annotated[User, Depends(current_user)]


async def admin_user(user: UserDep) -> User:
    if user.role != "admin":
        raise Problem(403, "Forbidden", "this action needs the admin role", kind="forbidden")
    return user


async def operator_user(user: UserDep) -> User:
    if user.role not in ("admin", "operator"):
        raise Problem(
            403, "Forbidden", "this action needs the operator or admin role", kind="forbidden"
        )
    return user


async def create_turn(state: StateDep, claims: ClaimsDep) -> AsyncIterator[None]:
    """A place among the caller's session creations under way, taken before any database
    work: 30 parallel creates by one user used to hold every pooled connection."""
    user_id = str(claims["sub"])
    if not state.session_creates.try_enter(user_id):
        raise _too_many(
            f"this account already has {state.session_creates.limit} session creations under "
            "way; wait for them to finish",
            1,
            "session_creates",
        )
    try:
        yield
    finally:
        state.session_creates.leave(user_id)


CreateTurnDep = Annotated[None, Depends(create_turn, scope="function")]


AdminDep = Annotated[User, Depends(admin_user)]
OperatorDep = Annotated[User, Depends(operator_user)]


def client_ip(request: Request) -> str:
    return request.client.host if request.client else ""
