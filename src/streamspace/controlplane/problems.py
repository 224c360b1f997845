"""RFC 9457 problem details: every error the API returns has this shape."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm.exc import StaleDataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from streamspace import logs
from streamspace.controlplane.creation import CreateInFlight, TemplateUnavailable, UnknownTemplate
from streamspace.controlplane.entitlements import NotEntitled
from streamspace.controlplane.quotas import QuotaExceeded
from streamspace.controlplane.statemachine import ActionContended, IllegalTransition
from streamspace.db.engine import DatabaseUnavailable

log = logs.get_logger("streamspace.api")

PROBLEM_TYPE_BASE = "https://streamspace.dev/problems/"
MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    """Raise anywhere in a request to answer with problem JSON."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str = "",
        *,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.kind = kind or title.lower().replace(" ", "-")
        self.headers = headers
        self.extra = extra


def not_found(what: str, ident: str) -> Problem:
    return Problem(404, "Not found", f"{what} {ident!r} does not exist", kind="not-found")


def forbidden(detail: str) -> Problem:
    return Problem(403, "Forbidden", detail, kind="forbidden")


def conflict(detail: str, **extra: Any) -> Problem:
    return Problem(409, "Conflict", detail, kind="conflict", **extra)


def bad_request(detail: str, **extra: Any) -> Problem:
    return Problem(400, "Bad request", detail, kind="bad-request", **extra)


DomainError = (
    IllegalTransition
    | ActionContended
    | QuotaExceeded
    | UnknownTemplate
    | NotEntitled
    | TemplateUnavailable
    | CreateInFlight
)
"""What the session machinery refuses with; each has one answer here."""


def domain_problem(exc: DomainError) -> Problem:
    """The answer to a refused or contended session action or create: 409 for the session's
    state, a concurrent request or a template no agent can run now, 403 for a quota or a
    template the user may not launch, 422 for a
    template that is not there."""
    if isinstance(exc, IllegalTransition):
        return conflict(str(exc), current_state=exc.current, allowed_actions=exc.allowed_actions)
    if isinstance(exc, QuotaExceeded):
        return Problem(403, "Quota exceeded", str(exc), kind="quota-exceeded")
    if isinstance(exc, UnknownTemplate):
        return Problem(422, "Invalid request", str(exc), kind="invalid-request")
    if isinstance(exc, NotEntitled):
        return Problem(
            403,
            "Not entitled",
            str(exc),
            kind="template-not-entitled",
            template=exc.template,
            allowed_groups=exc.groups,
        )
    if isinstance(exc, TemplateUnavailable):
        return Problem(
            409,
            "Template unavailable",
            str(exc),
            kind="template-unavailable",
            template=exc.name,
            unavailable_reason=exc.reason,
        )
    return conflict(str(exc))


def problem_response(
    request: Request | None,
    status: int,
    title: str,
    detail: str,
    kind: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + kind,
        "title": title,
        "status": status,
        "detail": detail,
    }
    if request is not None:
        body["instance"] = request.url.path
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def _validation_detail(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    errors = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):
            where = loc[0]
            field = ".".join(loc[1:])
        else:
            where, field = "body", ".".join(loc)
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        if (
            where == "body"
            and not field
            and err.get("type") in ("model_attributes_type", "dict_type", "missing")
        ):
            msg = "request body must be a JSON object (Content-Type: application/json)"
        if err.get("type") == "json_invalid":
            field = ""
            msg = f"malformed JSON: {err.get('ctx', {}).get('error', 'could not parse')}"
        errors.append({"in": where, "field": field, "message": msg})
    first = errors[0] if errors else {"field": "", "message": "invalid request"}
    summary = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
    if len(errors) > 1:
        summary += f" (and {len(errors) - 1} more)"
    return summary, errors


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(
            request, exc.status, exc.title, exc.detail, exc.kind, exc.headers, **exc.extra
        )

    @app.exception_handler(IllegalTransition)
    @app.exception_handler(ActionContended)
    @app.exception_handler(QuotaExceeded)
    @app.exception_handler(UnknownTemplate)
    @app.exception_handler(NotEntitled)
    @app.exception_handler(TemplateUnavailable)
    @app.exception_handler(CreateInFlight)
    async def _domain(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, DomainError)
        return await _problem(request, domain_problem(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        summary, errors = _validation_detail(exc)
        return problem_response(
            request, 422, "Invalid request", summary, "invalid-request", errors=errors
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        titles = {
            404: "Not found",
            405: "Method not allowed",
            401: "Unauthorized",
            413: "Payload too large",
            400: "Bad request",
        }
        title = titles.get(exc.status_code, "Error")
        detail = exc.detail if isinstance(exc.detail, str) else title
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route for {request.method} {request.url.path}"
        return problem_response(
            request,
            exc.status_code,
            title,
            detail,
            title.lower().replace(" ", "-"),
            getattr(exc, "headers", None),
        )

    @app.exception_handler(DataError)
    async def _bad_value(request: Request, exc: Exception) -> JSONResponse:
        return problem_response(
            request,
            422,
            "Invalid request",
            "a value in the request cannot be stored (e.g. a NUL character or out of range)",
            "invalid-request",
        )

    @app.exception_handler(IntegrityError)
    async def _conflict(request: Request, exc: Exception) -> JSONResponse:
        return problem_response(
            request, 409, "Conflict", "the change conflicts with existing data", "conflict"
        )

    @app.exception_handler(StaleDataError)
    async def _changed_meanwhile(request: Request, exc: Exception) -> JSONResponse:
        return problem_response(
            request,
            409,
            "Conflict",
            "the resource changed while this request was applied; read it again and retry",
            "conflict",
        )

    @app.exception_handler(DBAPIError)
    async def _db_error(request: Request, exc: DBAPIError) -> JSONResponse:
        code = str(getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", "") or "")
        if code.startswith("22"):  # SQL "data exception": the input, not the server
            return await _bad_value(request, exc)
        if exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError):
            return await _db_down(request, exc)
        log.exception("database_error", path=request.url.path)
        return problem_response(
            request,
            500,
            "Internal error",
            "an unexpected database error occurred",
            "internal-error",
        )

    @app.exception_handler(RedisError)
    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("redis_unavailable", path=request.url.path, error=exc)
        return problem_response(
            request,
            503,
            "Service unavailable",
            "the routing store (Redis) is unreachable; retry shortly",
            "redis-unavailable",
            {"Retry-After": "2"},
        )

    @app.exception_handler(PoolTimeoutError)
    async def _db_busy(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database_pool_exhausted", path=request.url.path)
        return problem_response(
            request,
            503,
            "Service unavailable",
            "no database connection became free in time: this replica is overloaded or the "
            "database is slow; retry shortly",
            "database-busy",
            {"Retry-After": "2"},
        )

    @app.exception_handler(DatabaseUnavailable)
    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _db_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database_unavailable", path=request.url.path, error=type(exc).__name__)
        return problem_response(
            request,
            503,
            "Service unavailable",
            "the database is unreachable; retry shortly",
            "database-unavailable",
            {"Retry-After": "2"},
        )

    @app.exception_handler(ConnectionError)
    @app.exception_handler(OSError)
    async def _conn(request: Request, exc: Exception) -> JSONResponse:
        log.warning("dependency_unavailable", path=request.url.path, error=exc)
        return problem_response(
            request,
            503,
            "Service unavailable",
            "a backing service is unreachable; retry shortly",
            "service-unavailable",
            {"Retry-After": "2"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled_error", path=request.url.path)
        return problem_response(
            request, 500, "Internal error", "an unexpected error occurred", "internal-error"
        )
