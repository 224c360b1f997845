"""Who this agent is: a join token exchanged once for a credential, kept in agent.json.

The stored identity wins over the configuration from then on. An agent embedded in its control
plane can be handed a rotated credential (`adopt`) or, when its credential is rejected, enrol
again with a fresh join token (`forget`); a separate agent never re-enrols on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from pydantic import ValidationError

from streamspace import logs, protocol
from streamspace.agent.errors import AgentError, CredentialRejected, HTTPProblem, TransientError
from streamspace.agent.server import Server
from streamspace.agent.state import AgentState, StateError, load_state, save_state, state_path
from streamspace.protocol import BackendKind, EnrollRequest, EnrollResponse

log = logs.get_logger(__name__)


class Enrolment:
    """This agent's identity, once loaded or obtained; `agent_id` is None until then."""

    def __init__(
        self,
        *,
        server: Server,
        state_dir: Path,
        name: str,
        cluster_id: str,
        cluster_name: str,
        region: str,
        backend: BackendKind,
        join_token: str | None,
        reenrol: Callable[[str], Awaitable[str]] | None,
    ) -> None:
        self._server = server
        self._state_dir = state_dir
        self._name = name
        self._cluster_id = cluster_id
        self._cluster_name = cluster_name
        self._region = region
        self._backend = backend
        self._join_token = join_token
        self._reenrol = reenrol
        self._state: AgentState | None = None

    @property
    def agent_id(self) -> str | None:
        return self._state.agent_id if self._state is not None else None

    @property
    def credential(self) -> str:
        assert self._state is not None
        return self._state.credential

    @property
    def can_reenrol(self) -> bool:
        return self._reenrol is not None and self._state is not None

    async def ensure(self) -> AgentState:
        """The stored identity, or a new one from the join token (AgentError without one)."""
        if self._state is None:
            self._state = await self._load_or_enrol()
        return self._state

    async def forget(self, why: CredentialRejected) -> None:
        """Drop the rejected identity and take a fresh join token, so `ensure` enrols again."""
        assert self._reenrol is not None and self._state is not None
        state = self._state
        log.warning("reenrolling", agent_id=state.agent_id, reason=str(why))
        self._join_token = await self._reenrol(state.agent_id)
        await asyncio.to_thread(state_path(self._state_dir).unlink, missing_ok=True)
        self._state = None

    async def adopt(self, credential: str) -> None:
        """Store a credential the control plane rotated, before the reconnect that presents it."""
        if self._state is None:
            raise AgentError("not enrolled yet")
        state = self._state.model_copy(update={"credential": credential})
        await asyncio.to_thread(save_state, self._state_dir, state)
        self._state = state
        log.event("credential_adopted", agent_id=state.agent_id)

    async def _load_or_enrol(self) -> AgentState:
        try:
            state = await asyncio.to_thread(load_state, self._state_dir)
        except StateError as exc:
            raise AgentError(str(exc)) from exc
        if state is not None:
            if self._join_token:
                log.event(
                    "join_token_ignored_already_enrolled",
                    agent_id=state.agent_id,
                    state_file=state_path(self._state_dir),
                )
            self._warn_on_drift(state)
            return state
        if not self._join_token:
            raise AgentError(
                f"not enrolled: {state_path(self._state_dir)} does not exist and no join token "
                "was given (create one in the admin UI: Clusters -> Add agent)"
            )
        try:
            request = EnrollRequest(
                join_token=self._join_token,
                name=self._name,
                cluster_id=self._cluster_id,
                cluster_name=self._cluster_name,
                region=self._region,
                backend=self._backend,
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise AgentError(f"invalid agent settings: {where}: {first['msg']}") from exc
        try:
            raw = await self._server.request(
                "POST", protocol.AGENT_ENROLL_PATH, content=protocol.encode(request)
            )
        except HTTPProblem as exc:
            raise AgentError(f"enrolment refused: {exc.detail}") from exc
        try:
            response = EnrollResponse.model_validate_json(raw)
        except ValidationError as exc:
            raise TransientError("control plane sent an invalid enrolment response") from exc
        state = AgentState(
            agent_id=response.agent_id,
            credential=response.credential,
            server=self._server.url,
            cluster_id=self._cluster_id,
            cluster_name=self._cluster_name,
            region=self._region,
            backend=self._backend,
            name=self._name,
        )
        path = await asyncio.to_thread(save_state, self._state_dir, state)
        log.event("enrolled", agent_id=state.agent_id, cluster_id=state.cluster_id, state_file=path)
        return state

    def _warn_on_drift(self, state: AgentState) -> None:
        """The stored identity wins over the config; say so when they disagree."""
        for key, configured in (
            ("server", self._server.url),
            ("cluster_id", self._cluster_id),
            ("cluster_name", self._cluster_name),
            ("region", self._region),
            ("name", self._name),
        ):
            stored = getattr(state, key)
            if configured and configured != stored:
                log.warning(
                    "config_differs_from_enrolment",
                    agent_id=state.agent_id,
                    setting=key,
                    configured=configured,
                    enrolled=stored,
                    hint="the enrolled value is used; remove agent.json to re-enrol",
                )
