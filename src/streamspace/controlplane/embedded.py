"""The agent `streamspace up` runs inside the control plane's process, as the control plane sees
it: a credential rotated for it is handed over in-process, and its viewers are pumped straight
into the session's VNC connection instead of through a dial-back WebSocket.

The agent starts after the HTTP server (it connects to it), so the components that use it are
given the slot at construction and `streamspace up` fills it once the agent exists.
"""

from __future__ import annotations

from typing import Protocol


class SessionReader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class SessionWriter(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class EmbeddedAgent(Protocol):
    """What the control plane uses of `streamspace.agent`'s Agent running in this process."""

    @property
    def agent_id(self) -> str | None: ...

    async def adopt_credential(self, credential: str) -> None: ...

    async def open_session(self, session_id: str) -> tuple[SessionReader, SessionWriter]: ...

    async def thumbnail(self, session_id: str) -> bytes: ...


class EmbeddedAgentSlot:
    """Empty until `streamspace up` attaches its agent; stays empty for `streamspace server`."""

    def __init__(self) -> None:
        self._agent: EmbeddedAgent | None = None

    def attach(self, agent: EmbeddedAgent) -> None:
        self._agent = agent

    def serving(self, agent_id: str | None) -> EmbeddedAgent | None:
        """The embedded agent if it is the one with this id (it knows its id once enrolled)."""
        agent = self._agent
        if agent is None or agent_id is None or agent.agent_id != agent_id:
            return None
        return agent
