"""The control plane as the agent reaches it: its URLs, its HTTP answers, the headers every dial
carries. The agent only ever dials out, so this is the one place that knows how."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect

import streamspace
from streamspace import protocol
from streamspace.agent.errors import AgentError, CredentialRejected, HTTPProblem, TransientError
from streamspace.protocol import Catalog

CLOSE_TIMEOUT_SECONDS = 2.0


def _bases(server: str) -> tuple[str, str]:
    """(http base, ws base) for the server URL; both keep any path prefix, no trailing slash."""
    parts = urlsplit(server.strip())
    schemes = {"http": "ws", "https": "wss"}
    if parts.scheme not in schemes or not parts.netloc:
        raise AgentError(
            f"invalid server URL {server!r}: expected http(s)://host[:port], e.g. "
            "https://streamspace.example.com"
        )
    path = parts.path.rstrip("/")
    http = urlunsplit((parts.scheme, parts.netloc, path, "", ""))
    ws = urlunsplit((schemes[parts.scheme], parts.netloc, path, "", ""))
    return http, ws


def _problem_detail(response: httpx.Response) -> str:
    """The human part of an RFC 9457 problem body, falling back to the status line."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("detail", "title"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value
    return f"HTTP {response.status_code} {response.reason_phrase}".strip()


class Server:
    """One control plane's address; raises AgentError at once for a URL that cannot work."""

    def __init__(self, url: str, *, http_timeout: float, handshake_timeout: float) -> None:
        self.url = url
        self.http_base, self.ws_base = _bases(url)
        self._http_timeout = http_timeout
        self._handshake_timeout = handshake_timeout

    @property
    def user_agent(self) -> str:
        return f"streamspace-agent/{streamspace.__version__}"

    async def request(
        self, method: str, path: str, *, content: str | None = None, credential: str | None = None
    ) -> bytes:
        """The body of a 2xx answer; 5xx, 408 and 429 are transient, other 4xx an HTTPProblem."""
        headers = {"Accept": "application/json", "User-Agent": self.user_agent}
        if content is not None:
            headers["Content-Type"] = "application/json"
        if credential is not None:
            headers["Authorization"] = f"Bearer {credential}"
        url = self.http_base + path
        try:
            async with httpx.AsyncClient(timeout=self._http_timeout) as client:
                response = await client.request(method, url, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise TransientError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 500 or response.status_code in (408, 429):
            raise TransientError(f"{method} {url}: {_problem_detail(response)}")
        if response.status_code >= 400:
            raise HTTPProblem(response.status_code, _problem_detail(response))
        return response.content

    async def fetch_catalog(self, credential: str) -> Catalog:
        try:
            raw = await self.request("GET", protocol.AGENT_CATALOG_PATH, credential=credential)
        except HTTPProblem as exc:
            if exc.status in (401, 403):
                raise CredentialRejected(
                    f"agent credential rejected (revoked?): {exc.detail}"
                ) from exc
            raise AgentError(f"cannot fetch the template catalog: {exc.detail}") from exc
        try:
            return Catalog.model_validate_json(raw)
        except ValidationError as exc:
            raise TransientError("control plane sent an invalid catalog") from exc

    async def dial(self, url: str, credential: str, **options: Any) -> ClientConnection:
        """A WebSocket to `url` as this agent; connection errors are left to the caller, which
        alone knows whether they are fatal."""
        return await connect(
            url,
            additional_headers={"Authorization": f"Bearer {credential}"},
            user_agent_header=self.user_agent,
            open_timeout=self._handshake_timeout,
            close_timeout=CLOSE_TIMEOUT_SECONDS,
            **options,
        )
