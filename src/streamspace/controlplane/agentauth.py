"""Agent credentials: `agent_id.secret`, the secret stored SHA-256-hashed (it is a 256-bit
random value, not a password). Used by the agent socket, the stream dial-back and the catalog."""

from __future__ import annotations

from streamspace.controlplane.security import constant_eq, sha256
from streamspace.db.engine import Database
from streamspace.db.models import Agent


def parse_credential(header: str) -> tuple[str, str] | None:
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    agent_id, _, secret = token.strip().partition(".")
    if not agent_id or not secret:
        return None
    return agent_id, secret


def make_credential(agent_id: str, secret: str) -> str:
    return f"{agent_id}.{secret}"


async def authenticate(db: Database, authorization: str) -> Agent | None:
    """The agent an `Authorization: Bearer agent_id.secret` header names, if it is valid."""
    parsed = parse_credential(authorization)
    if parsed is None:
        return None
    agent_id, secret = parsed
    async with db() as session:
        agent = await session.get(Agent, agent_id)
    if agent is None or agent.revoked:
        return None
    if not constant_eq(agent.credential_hash, sha256(secret)):
        return None
    return agent
