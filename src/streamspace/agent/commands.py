"""Commands from the control plane -> backend calls -> Results.

Each command runs in its own task, one at a time per session and at most `max_concurrent` at
once. Results are cached by command_id, so a command the control plane resends (it did not see
the Result before a disconnect) is answered again instead of run twice.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from streamspace import logs
from streamspace.agent.backends.base import Backend, BackendError
from streamspace.agent.enrolment import Enrolment
from streamspace.agent.outbox import Outbox
from streamspace.agent.sessions import SessionTable
from streamspace.protocol import Command, Result

log = logs.get_logger(__name__)

RESULT_CACHE_SIZE = 1000


class CommandRunner:
    def __init__(
        self,
        *,
        backend: Backend,
        sessions: SessionTable,
        outbox: Outbox,
        identity: Enrolment,
        max_concurrent: int,
    ) -> None:
        self._backend = backend
        self._sessions = sessions
        self._outbox = outbox
        self._identity = identity
        self._semaphore = asyncio.Semaphore(max_concurrent)
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._results: OrderedDict[str, Result] = OrderedDict()

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        return list(self._inflight.values())

    def submit(self, cmd: Command) -> None:
        """Run an acknowledged command, unless it already ran or is running."""
        cached = self._results.get(cmd.command_id)
        if cached is not None:
            log.event(
                "duplicate_command_result_resent",
                agent_id=self._identity.agent_id,
                command_id=cmd.command_id,
                session_id=cmd.session_id,
            )
            self._outbox.send(cached)
            return
        if cmd.command_id in self._inflight:
            log.event(
                "duplicate_command_still_running",
                agent_id=self._identity.agent_id,
                command_id=cmd.command_id,
                session_id=cmd.session_id,
            )
            return
        self._inflight[cmd.command_id] = asyncio.create_task(
            self._run(cmd), name=f"agent-command-{cmd.command_id}"
        )

    async def _run(self, cmd: Command) -> None:
        try:
            async with self._sessions.turn(cmd.session_id), self._semaphore:
                result = await self._execute(cmd)
        finally:
            self._inflight.pop(cmd.command_id, None)
        self._results[cmd.command_id] = result
        while len(self._results) > RESULT_CACHE_SIZE:
            self._results.popitem(last=False)
        self._outbox.send(result)

    async def _execute(self, cmd: Command) -> Result:
        fields = {
            "agent_id": self._identity.agent_id,
            "command_id": cmd.command_id,
            "action": cmd.action,
            "session_id": cmd.session_id,
        }
        log.event("command_started", **fields)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            endpoint = None
            if cmd.action in ("start", "wake"):
                spec = cmd.spec
                if spec is None:
                    raise BackendError(f"{cmd.action} command without a session spec")
                if spec.session_id != cmd.session_id:
                    raise BackendError(
                        f"spec is for session {spec.session_id}, command for {cmd.session_id}"
                    )
                run = self._backend.start if cmd.action == "start" else self._backend.wake
                endpoint = await run(spec)
                self._sessions.started(cmd.session_id, spec)
            elif cmd.action == "stop":
                await self._backend.stop(cmd.session_id)
                self._sessions.ended(cmd.session_id)
            else:
                await self._backend.hibernate(cmd.session_id)
                self._sessions.ended(cmd.session_id)
        except BackendError as exc:
            error = str(exc) or type(exc).__name__
            log.warning("command_failed", **fields, error=error)
            return Result(command_id=cmd.command_id, ok=False, error=error)
        except Exception as exc:
            log.exception("command_crashed", **fields)
            return Result(command_id=cmd.command_id, ok=False, error=f"{type(exc).__name__}: {exc}")
        log.event(
            "command_succeeded",
            **fields,
            endpoint=endpoint.describe() if endpoint else None,
            duration=f"{loop.time() - started:.3f}s",
        )
        return Result(command_id=cmd.command_id, ok=True, endpoint=endpoint)

    async def stop_orphans(self, session_ids: list[str]) -> None:
        """Stop sessions the control plane no longer knows: nobody could ever reach them."""
        for session_id in session_ids:
            if self._sessions.busy(session_id):
                continue  # a command for it arrived meanwhile: the control plane knows it now
            async with self._sessions.turn(session_id):
                log.event(
                    "stopping_unknown_session",
                    agent_id=self._identity.agent_id,
                    session_id=session_id,
                )
                try:
                    await self._backend.stop(session_id)
                except Exception as exc:
                    log.warning(
                        "unknown_session_stop_failed",
                        agent_id=self._identity.agent_id,
                        session_id=session_id,
                        error=f"{type(exc).__name__}: {exc}",
                    )
                self._sessions.ended(session_id)
