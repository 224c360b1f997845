"""Background work the agent starts and must cancel on stop; a failure is logged, never lost."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from streamspace import logs
from streamspace.agent.enrolment import Enrolment

log = logs.get_logger(__name__)


class Background:
    def __init__(self, *, identity: Enrolment) -> None:
        self._identity = identity
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        return list(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error(
                "background_task_failed",
                agent_id=self._identity.agent_id,
                task=task.get_name(),
                error=exc,
                exc_info=exc,
            )
