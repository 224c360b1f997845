"""A watch-based cache of one kind of object in one namespace (kubespawner's reflector, client-go's
informer): list once, then watch from the list's resourceVersion, so the agent learns of every
change as it happens and never polls per session.

* A watch the server ends (its timeout, a dropped connection) resumes from the last
  resourceVersion seen; bookmarks keep that version fresh while nothing changes.
* `410 Gone` (the version was compacted away) means events were missed: list again, replace
  the cache, report the difference as events, and watch from the new version.
* Any other error waits a bounded, growing backoff (`backoff_min` doubling to `backoff_max`)
  before the next list, and is kept in `last_error` for the agent's health report.
* Listeners get `(event_type, object)` for every ADDED / MODIFIED / DELETED, in order.

Objects are the API server's JSON as dicts (no model classes), which keeps 500 pods cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException

from streamspace import logs

log = logs.get_logger("streamspace.agent.kubernetes")

Obj = dict[str, Any]
ListCall = Callable[..., Awaitable[Any]]
"""A namespaced list method bound to its namespace, e.g. `partial(core.list_namespaced_pod,
ns)`; called with `_preload_content=False` it returns the raw aiohttp response."""
Listener = Callable[[str, Obj], None]


class Gone(Exception):
    """The watch's resourceVersion is older than the server keeps: list again."""


async def _checked(response: Any) -> Any:
    """The raw response if it succeeded; raw calls (`_preload_content=False`) do not raise."""
    if 200 <= response.status <= 299:
        return response
    try:
        body = await response.read()
    finally:
        response.release()
    text = body.decode(errors="replace")
    if response.status == 410:
        raise Gone(text)
    error = ApiException(status=response.status, reason=response.reason)
    error.body = text
    raise error


def _trim(obj: Obj) -> Obj:
    """Drop `managedFields` (server-side apply bookkeeping): about half of a pod's JSON, and
    nothing the agent reads."""
    (obj.get("metadata") or {}).pop("managedFields", None)
    return obj


def _name(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


def _version(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


class Reflector:
    def __init__(
        self,
        list_call: ListCall,
        *,
        kind: str,
        label_selector: str,
        watch_timeout: int = 300,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        self.kind = kind
        self._list_call = list_call
        self._selector = label_selector
        self.watch_timeout = watch_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.items: dict[str, Obj] = {}
        self.resource_version = ""
        self.last_error: Exception | None = None
        self.lists = 0
        """How many times the cache was (re)listed: once at start, again after each 410."""
        self._listeners: list[Listener] = []
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._force_version: str | None = None

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"kube-reflector-{self.kind}")

    async def wait_synced(self, within: float) -> None:
        """Until the first list is in; raises the list's last error if it does not come, and
        at once if the server refused the credentials or the permission (a retry continues
        in the background, but the caller has an answer to give now)."""
        deadline = time.monotonic() + within
        while not self._synced.is_set():
            error = self.last_error
            if isinstance(error, ApiException) and error.status in (401, 403):
                raise error
            if time.monotonic() >= deadline:
                if error is not None:
                    raise error
                raise TimeoutError(f"{self.kind} not listed within {within:.0f}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._synced.wait(), 0.1)

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    async def wait_for(self, predicate: Callable[[], bool], within: float) -> bool:
        """Until `predicate()` holds after some event (checked at once, too); False on timeout."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(predicate), max(within, 0.0))
            except TimeoutError:
                return False
        return True

    def watch_from(self, resource_version: str) -> None:
        """Test hook: the next watch starts at this version instead of the list's."""
        self._force_version = resource_version

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    # ---- the loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self.backoff_min
        while True:
            try:
                await self._list()
                delay = self.backoff_min
                while True:
                    await self._watch()
                    delay = self.backoff_min
            except Gone:
                log.event("kube_watch_gone", kind=self.kind, resource_version=self.resource_version)
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = exc
                log.warning("kube_watch_failed", kind=self.kind, error=exc, retry_seconds=delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(self.backoff_max, delay * 2)

    async def _list(self) -> None:
        response = await _checked(
            await self._list_call(
                label_selector=self._selector, _preload_content=False, _request_timeout=60
            )
        )
        try:
            body = json.loads(await response.read())
        finally:
            response.release()
        fresh = {_name(item): _trim(item) for item in body.get("items") or []}
        self.resource_version = str((body.get("metadata") or {}).get("resourceVersion") or "")
        self.lists += 1
        self.last_error = None
        old, self.items = self.items, fresh
        for name, item in fresh.items():
            if name not in old:
                await self._emit("ADDED", item)
            elif _version(old[name]) != _version(item):
                await self._emit("MODIFIED", item)
        for name, item in old.items():
            if name not in fresh:
                await self._emit("DELETED", item)
        self._synced.set()
        await self._emit(None, None)

    async def _watch(self) -> None:
        version, self._force_version = self._force_version or self.resource_version, None
        timeout = int(self.watch_timeout * random.uniform(0.9, 1.0))
        response = await _checked(
            await self._list_call(
                label_selector=self._selector,
                watch=True,
                allow_watch_bookmarks=True,
                resource_version=version,
                timeout_seconds=timeout,
                _preload_content=False,
                _request_timeout=(30, timeout + 30),
            )
        )
        try:
            while True:
                line = await response.content.readline()
                if not line:
                    return
                await self._handle(json.loads(line))
        finally:
            response.release()

    async def _handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj = _trim(event.get("object") or {})
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone(obj.get("message", ""))
            raise ApiException(status=obj.get("code"), reason=obj.get("message"))
        version = _version(obj)
        if version:
            self.resource_version = version
        if kind == "BOOKMARK":
            return
        name = _name(obj)
        if kind == "DELETED":
            self.items.pop(name, None)
        elif kind in ("ADDED", "MODIFIED"):
            self.items[name] = obj
        else:
            return
        await self._emit(str(kind), obj)

    async def _emit(self, kind: str | None, obj: Obj | None) -> None:
        if kind is not None and obj is not None:
            for listener in self._listeners:
                try:
                    listener(kind, obj)
                except Exception:
                    log.exception("kube_listener_failed", kind=self.kind)
        async with self._changed:
            self._changed.notify_all()
