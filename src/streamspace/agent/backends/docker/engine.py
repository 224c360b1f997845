"""The Docker-API engine as the backend uses it: one lazily created SDK client, every blocking
call in a thread with engine failures turned into BackendError, the local image tags cached,
and helpers that read container attrs from either a list or an inspect answer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container

from streamspace import logs
from streamspace.agent.backends.base import BackendError
from streamspace.protocol import SessionRunState

log = logs.get_logger("streamspace.agent.docker")

RUNNING = frozenset({"running", "restarting"})
_HIBERNATED = frozenset({"created", "exited", "stopped", "configured", "paused", "initialized"})
IMAGE_CACHE_SECONDS = 30.0


def normalize_ref(ref: str) -> str:
    """Add the implicit :latest so catalog references compare equal to engine tags."""
    last = ref.rsplit("/", 1)[-1]
    if "@" in ref or ":" in last:
        return ref
    return f"{ref}:latest"


def state_of(attrs: dict[str, Any]) -> str:
    """The container's status from either list (string) or inspect (dict) attrs."""
    state = attrs.get("State")
    if isinstance(state, dict):
        return str(state.get("Status", "")).lower()
    return str(state or "").lower()


def run_state(status: str) -> SessionRunState:
    if status in RUNNING:
        return "running"
    if status in _HIBERNATED:
        return "hibernated"
    if status in ("dead", "removing"):
        return "exited"
    return "unknown"


def labels_of(attrs: dict[str, Any]) -> dict[str, str]:
    labels = attrs.get("Labels")
    if labels is None:
        labels = (attrs.get("Config") or {}).get("Labels")
    return dict(labels or {})


class Engine:
    """`base_url` None means $DOCKER_HOST or Docker's default socket. The client is created on
    first use, so an engine that is down only fails the calls, never the construction."""

    def __init__(self, base_url: str | None, *, request_timeout: float, stop_timeout: float):
        self.base_url = base_url
        self.request_timeout = request_timeout
        self.stop_timeout = stop_timeout
        self._client: docker.DockerClient | None = None
        self._images: set[str] | None = None
        self._images_at = 0.0
        self._images_refresh: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return self.base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a blocking SDK call in a thread; every engine failure becomes a BackendError.

        Cases a caller must tell apart (missing image, vanished container, name conflict) are
        handled inside the synchronous helpers, which return a value for them instead. The
        client itself is only ever created inside such a thread (construction talks to the
        engine to negotiate the API version).
        """
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except docker.errors.APIError as exc:
            raise BackendError(f"container engine error: {exc.explanation or exc}") from exc
        except (docker.errors.DockerException, OSError) as exc:
            raise self._unreachable(exc) from exc

    async def close(self) -> None:
        if self._images_refresh is not None:
            self._images_refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._images_refresh
            self._images_refresh = None
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)

    def _unreachable(self, exc: BaseException) -> BackendError:
        return BackendError(f"container engine unreachable at {self.url}: {exc}")

    # ---- synchronous helpers: run them through `call` -----------------------------------

    def client(self) -> docker.DockerClient:
        if self._client is None:
            try:
                if self.base_url is None:
                    self._client = docker.from_env(timeout=int(self.request_timeout))
                else:
                    self._client = docker.DockerClient(
                        base_url=self.base_url, timeout=int(self.request_timeout)
                    )
            except docker.errors.DockerException as exc:
                raise self._unreachable(exc) from exc
        return self._client

    def ping(self) -> bool:
        return bool(self.client().ping())

    def has_image(self, ref: str) -> bool:
        try:
            self.client().images.get(ref)
        except docker.errors.ImageNotFound:
            return False
        return True

    def create(self, config: dict[str, Any]) -> Container | None:
        """Create the container; None if its name is taken (HTTP 409)."""
        try:
            return self.client().containers.create(**config)
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                return None
            raise

    def list_containers(self, labels: list[str]) -> list[Container]:
        result: list[Container] = self.client().containers.list(
            all=True, sparse=True, filters={"label": labels}
        )
        return result

    def reload(self, container: Container) -> bool:
        """Refresh container.attrs by inspect; False if the container no longer exists."""
        try:
            container.reload()
        except docker.errors.NotFound:
            return False
        return True

    def stop(self, container: Container) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            container.stop(timeout=int(self.stop_timeout))

    def remove(self, container: Container) -> None:
        try:
            container.remove(force=True, v=False)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            # Removal already under way (e.g. a concurrent stop) counts as removed.
            if exc.status_code != 409:
                raise

    def local_tags(self) -> set[str]:
        tags: set[str] = set()
        for image in self.client().images.list():
            for tag in image.attrs.get("RepoTags") or []:
                tags.add(tag)
                for prefix in ("docker.io/library/", "docker.io/"):
                    if tag.startswith(prefix):
                        tags.add(tag[len(prefix) :])
        return tags

    # ---- local images -------------------------------------------------------------------

    async def refresh_images(self) -> set[str]:
        """Re-read the engine's local image tags (used by `images`)."""
        tags = await self.call(self.local_tags)
        self._images, self._images_at = tags, time.monotonic()
        return tags

    def images(self) -> set[str]:
        """Local image tags for the (synchronous) runnable_templates.

        The first call reads them directly when the engine is on a local unix socket (one quick
        request; an absent socket fails at once); otherwise, and on later calls, the cache is
        used and refreshed in the background when missing or over 30 s old.
        """
        if self._images is None and not self.url.startswith(("unix://", "/")):
            self.schedule_image_refresh()
            return set()
        if self._images is None:
            try:
                self._images, self._images_at = self.local_tags(), time.monotonic()
            except (docker.errors.DockerException, OSError, BackendError) as exc:
                log.warning("image_list_failed", url=self.url, error=exc)
                return set()
        elif time.monotonic() - self._images_at > IMAGE_CACHE_SECONDS:
            self.schedule_image_refresh()
        return self._images

    def schedule_image_refresh(self) -> None:
        if self._images_refresh is not None and not self._images_refresh.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        async def refresh() -> None:
            with contextlib.suppress(BackendError):
                await self.refresh_images()

        self._images_refresh = loop.create_task(refresh(), name="docker-image-refresh")
