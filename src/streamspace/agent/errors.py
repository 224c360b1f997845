"""How the agent's failures are classified: fatal (give up, tell the operator) or transient
(retry with backoff). Every module of the agent raises these, and only `runtime.Agent` decides
what to do about them."""

from __future__ import annotations

FATAL_ERROR_CODES = frozenset({"revoked", "unauthorized", "unsupported_protocol_version"})
"""Server error codes after which retrying cannot help; the agent gives up with AgentError."""
CREDENTIAL_ERROR_CODES = frozenset({"revoked", "unauthorized"})


class AgentError(Exception):
    """A fatal condition: retrying will not help. The message is shown to the operator as is."""


class CredentialRejected(AgentError):
    """The control plane no longer accepts this agent's credential (revoked or rotated)."""


class TransientError(Exception):
    """A failure worth retrying with backoff (server unreachable, 5xx, dropped handshake)."""


class HTTPProblem(Exception):
    """A 4xx answer from the control plane; `detail` is the RFC 9457 detail (or title)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
