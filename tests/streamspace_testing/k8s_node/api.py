"""The test node's view of the API server: JSON in, JSON out, on kubernetes_asyncio's client.

The node reads and writes objects as the API's own JSON (camelCase, the shape `kubectl get -o
json` shows) through `ApiClient.call_api` instead of the generated model classes: pods move
between watch, scheduler and kubelet code as plain dicts, and status patches are merge patches.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

from kubernetes_asyncio.client import ApiClient

from streamspace.logs import get_logger

Obj = dict[str, Any]
MERGE = "application/merge-patch+json"
log = get_logger(__name__)


class KubeError(RuntimeError):
    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        super().__init__(f"{method} {path}: {status} {body[:1000]}")
        self.status = status


class Kube:
    def __init__(self, client: ApiClient) -> None:
        self.client = client

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float | None = 30.0,
    ) -> Obj:
        """The decoded response; KubeError for any status outside 2xx."""
        response = await self._send(method, path, body, query, content_type, timeout)
        try:
            raw = await response.read()
            status = response.status
        finally:
            response.release()
        if not 200 <= status < 300:
            raise KubeError(status, method, path, raw.decode(errors="replace"))
        return dict(json.loads(raw)) if raw else {}

    async def _send(
        self,
        method: str,
        path: str,
        body: Any,
        query: dict[str, str] | None,
        content_type: str,
        timeout: float | None,
    ) -> Any:
        return await self.client.call_api(
            path,
            method,
            query_params=list((query or {}).items()),
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=timeout,
        )

    async def get(self, path: str) -> Obj | None:
        try:
            return await self.request("GET", path)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, path: str, body: Obj) -> Obj | None:
        """The created object, or None when it already exists."""
        try:
            return await self.request("POST", path, body)
        except KubeError as exc:
            if exc.status == 409:
                return None
            raise

    async def patch(self, path: str, body: Obj) -> Obj | None:
        """A merge patch; None when the object is gone."""
        try:
            return await self.request("PATCH", path, body, content_type=MERGE)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def delete(self, path: str, body: Obj | None = None) -> None:
        try:
            await self.request("DELETE", path, body)
        except KubeError as exc:
            if exc.status not in (404, 409):
                raise

    async def watch(self, path: str, handle: Callable[[str, Obj], Awaitable[None]]) -> None:
        """List, then watch from the list's resourceVersion, for ever: every object as
        ("ADDED"|"MODIFIED"|"DELETED", obj); after a lost watch, a fresh list replays
        everything (handlers are idempotent), and objects gone meanwhile come as DELETED."""
        known: dict[str, Obj] = {}
        while True:
            try:
                listed = await self.request("GET", path)
                seen = {}
                for item in listed.get("items") or []:
                    seen[item["metadata"]["uid"]] = item
                    await handle("MODIFIED" if item["metadata"]["uid"] in known else "ADDED", item)
                for uid, old in known.items():
                    if uid not in seen:
                        await handle("DELETED", old)
                known = seen
                version = listed["metadata"]["resourceVersion"]
                async for kind, obj in self._stream(path, version):
                    uid = obj["metadata"]["uid"]
                    if kind == "DELETED":
                        known.pop(uid, None)
                    else:
                        known[uid] = obj
                    await handle(kind, obj)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.event("k8s_node.watch_lost", path=path, error=str(exc)[:200])
                await asyncio.sleep(0.5)

    async def _stream(self, path: str, version: str) -> AsyncIterator[tuple[str, Obj]]:
        query = {"watch": "1", "resourceVersion": version, "allowWatchBookmarks": "false"}
        response = await self._send("GET", path, None, query, "application/json", None)
        try:
            if response.status != 200:
                raise KubeError(response.status, "WATCH", path, (await response.text())[:300])
            while line := await response.content.readline():
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    raise KubeError(
                        int(event["object"].get("code", 500)), "WATCH", path, str(event)
                    )
                yield str(event["type"]), dict(event["object"])
        finally:
            response.release()


def ns_path(namespace: str, resource: str, name: str = "", sub: str = "") -> str:
    path = f"/api/v1/namespaces/{quote(namespace)}/{resource}"
    if name:
        path += f"/{quote(name)}"
    if sub:
        path += f"/{sub}"
    return path
