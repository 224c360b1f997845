"""Which backend an agent runs: its kind (`protocol.BackendKind`) -> the class that builds it.

`BackendKind` lives in the protocol because the control plane reads it too, and the protocol
imports nothing of the agent; so the kinds are declared there and this registry is keyed by
them (mypy checks every key is a kind; tests/unit/test_backend_registry.py fails when a kind is
not registered).

Classes are named, not imported, like JupyterHub's `spawner_class`: an agent loads only the
backend it runs, so a local agent never imports the docker SDK (or a Kubernetes client).
Adding a backend is one entry here; the class builds itself with `Backend.from_options`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, TypeGuard, get_args

from streamspace.agent.backends.base import Backend, BackendError, BackendOptions
from streamspace.protocol import BackendKind


@dataclass(frozen=True)
class Registered:
    """Where a backend's class is: `module:name`."""

    module: str
    name: str

    def load(self) -> type[Backend]:
        found = getattr(importlib.import_module(self.module), self.name)
        if not (isinstance(found, type) and issubclass(found, Backend)):
            raise TypeError(f"{self.module}:{self.name} is not a Backend")
        return found


BACKENDS: Final[Mapping[BackendKind, Registered]] = {
    "local": Registered("streamspace.agent.backends.local", "LocalBackend"),
    "docker": Registered("streamspace.agent.backends.docker", "DockerBackend"),
    "kubernetes": Registered("streamspace.agent.backends.kubernetes", "KubernetesBackend"),
}


class UnknownBackend(BackendError):
    """The agent was asked for a backend it does not have."""


def available() -> list[BackendKind]:
    return list(BACKENDS)


def is_kind(name: str) -> TypeGuard[BackendKind]:
    return name in get_args(BackendKind)


def backend_class(kind: str) -> type[Backend]:
    choices = " or ".join(available())
    if not is_kind(kind):
        raise UnknownBackend(f"unknown backend {kind!r}; use {choices}")
    return BACKENDS[kind].load()


def create_backend(kind: str, options: BackendOptions) -> Backend:
    """The backend an agent with these options runs (BackendError: bad kind or settings)."""
    return backend_class(kind).from_options(options)
