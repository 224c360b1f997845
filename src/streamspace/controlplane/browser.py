"""What the control plane promises browsers: security headers on every response, and which
origins may open the viewer WebSocket, the event stream and the cookie refresh.

Client address and scheme come from the ASGI scope; behind a proxy listed in
`STREAMSPACE_TRUSTED_PROXIES` uvicorn's ProxyHeadersMiddleware (installed in app.py) has
already replaced them with what the proxy forwarded, so `https` here means the browser used TLS.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streamspace.config import Settings
from streamspace.controlplane.problems import Problem

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        # noVNC draws the remote cursor as a data: URL image (core/util/cursor.js); session
        # thumbnails are fetched with the bearer token and shown as blob: URLs the page made.
        "img-src 'self' data: blob:",
        # 'self' covers ws:/wss: to the same host (CSP 3): the viewer's stream WebSocket.
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
HSTS = "max-age=31536000"

_EVERY_RESPONSE = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
_HTML_RESPONSE = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
]


def is_tls(scope: Scope) -> bool:
    return scope.get("scheme") in ("https", "wss")


class SecurityHeaders:
    """nosniff and no-referrer on every response; the CSP on every HTML one; HSTS over TLS."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tls = is_tls(scope)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                present = {name.lower() for name, _ in headers}
                extra = list(_EVERY_RESPONSE)
                content_type = next(
                    (value for name, value in headers if name.lower() == b"content-type"), b""
                )
                if content_type.lower().startswith(b"text/html"):
                    extra += _HTML_RESPONSE
                if tls:
                    extra.append((b"strict-transport-security", HSTS.encode()))
                headers += [(name, value) for name, value in extra if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


# ---- origins --------------------------------------------------------------------------------

_DEFAULT_PORTS = {"http": 80, "https": 443}


def _normalise(scheme: str, host: str) -> str | None:
    """`scheme://host[:port]` in lower case, without the scheme's default port."""
    try:
        parts = urlsplit(f"{scheme}://{host}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    name = parts.hostname
    if ":" in name:
        name = f"[{name}]"
    if port is None or port == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{name}"
    return f"{scheme}://{name}:{port}"


def _origin_of_url(url: str) -> str | None:
    parts = urlsplit(url.strip())
    if parts.scheme not in _DEFAULT_PORTS:
        return None
    return _normalise(parts.scheme, parts.netloc.rpartition("@")[2])


def allowed_origin(conn: HTTPConnection, settings: Settings) -> str | None:
    """The one origin browsers may call from: the configured public URL's, else this request's
    own (its Host header, with the scheme it arrived by)."""
    if settings.public_url:
        return _origin_of_url(settings.public_url)
    host = conn.headers.get("host")
    if not host:
        return None
    return _normalise("https" if is_tls(conn.scope) else "http", host)


def origin_allowed(conn: HTTPConnection, settings: Settings) -> bool:
    """False for a request a browser sent from another site.

    A request without Origin is let through: browsers send one on every WebSocket handshake
    and every cross-origin request, so its absence means a same-origin GET or a non-browser
    client (the CLI, an agent, curl), which ambient credentials do not help anyway.
    """
    origin = conn.headers.get("origin")
    if origin is None:
        return True
    wanted = allowed_origin(conn, settings)
    return wanted is not None and _origin_of_url(origin) == wanted


def require_same_origin(conn: HTTPConnection) -> None:
    """FastAPI dependency: refuse a cross-site browser request with a 403 problem."""
    settings: Settings = conn.app.state.ss.settings
    if not origin_allowed(conn, settings):
        raise Problem(
            403,
            "Forbidden",
            f"cross-origin request refused: Origin {conn.headers.get('origin')!r} is not "
            f"{allowed_origin(conn, settings) or 'this server'!r} (see STREAMSPACE_PUBLIC_URL)",
            kind="cross-origin",
        )
