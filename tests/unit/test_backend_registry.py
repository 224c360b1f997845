"""The backend registry against the protocol's BackendKind, and building backends from options."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from streamspace.agent.backends.base import Backend, BackendError, BackendOptions
from streamspace.agent.backends.registry import (
    BACKENDS,
    UnknownBackend,
    backend_class,
    create_backend,
)
from streamspace.config import Settings
from streamspace.protocol import BackendKind

CHOICES = " or ".join(BACKENDS)
"""As the old if/elif said it: "local or docker"."""


def test_every_backend_kind_is_registered() -> None:
    assert set(BACKENDS) == set(get_args(BackendKind))


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_registered_classes_are_concrete_backends_of_their_kind(kind: BackendKind) -> None:
    cls = backend_class(kind)
    assert issubclass(cls, Backend)
    assert not inspect.isabstract(cls), getattr(cls, "__abstractmethods__", None)
    assert cls.kind == kind


def test_an_unknown_kind_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(UnknownBackend) as info:
        create_backend("vmware", BackendOptions(state_dir=tmp_path, settings=Settings()))
    assert str(info.value) == f"unknown backend 'vmware'; use {CHOICES}"
    assert CHOICES.startswith("local or docker")  # what the CLI always offered


def test_local_backend_from_settings(tmp_path: Path) -> None:
    settings = Settings(local_uid_range="70000-70999", local_enforce_limits=False)
    backend = create_backend("local", BackendOptions(state_dir=tmp_path / "s", settings=settings))
    assert backend.kind == "local"
    assert backend.state_dir == tmp_path / "s"  # type: ignore[attr-defined]
    assert (backend.identities.first, backend.identities.last) == (70000, 70999)  # type: ignore[attr-defined]
    assert not backend.isolation().limits_enforced


def test_bad_local_settings_are_a_backend_error(tmp_path: Path) -> None:
    settings = Settings(local_uid_range="9-3")
    with pytest.raises(BackendError, match=r"^STREAMSPACE_LOCAL_UID_RANGE: "):
        create_backend("local", BackendOptions(state_dir=tmp_path, settings=settings))


def test_docker_backend_from_options_keeps_its_label_id(tmp_path: Path) -> None:
    options = BackendOptions(
        state_dir=tmp_path / "s", settings=Settings(), docker_host="unix:///nowhere.sock"
    )
    first = create_backend("docker", options)
    assert first.engine_url == "unix:///nowhere.sock"  # type: ignore[attr-defined]
    label = (tmp_path / "s" / "backend-id").read_text()
    assert first.agent_id == label  # type: ignore[attr-defined]
    assert os.stat(tmp_path / "s" / "backend-id").st_mode & 0o077 == 0
    again = create_backend("docker", options)
    assert again.agent_id == label  # type: ignore[attr-defined]


def test_kubernetes_backend_from_options(tmp_path: Path) -> None:
    settings = Settings(kube_namespace="sessions", kube_home_size="2Gi")
    options = BackendOptions(state_dir=tmp_path / "s", settings=settings)
    first = create_backend("kubernetes", options)
    assert first.kind == "kubernetes"
    assert first.namespace == "sessions"  # type: ignore[attr-defined]
    assert first.config.home_size == "2Gi"  # type: ignore[attr-defined]
    label = (tmp_path / "s" / "backend-id").read_text()
    assert first.agent_id == label  # type: ignore[attr-defined]
    assert os.stat(tmp_path / "s" / "backend-id").st_mode & 0o077 == 0
    assert create_backend("kubernetes", options).agent_id == label  # type: ignore[attr-defined]


def test_bad_kubernetes_settings_are_a_backend_error(tmp_path: Path) -> None:
    settings = Settings(kube_node_selector="disk")
    with pytest.raises(BackendError, match="kube_node_selector: 'disk' is not key=value"):
        create_backend("kubernetes", BackendOptions(state_dir=tmp_path, settings=settings))


def test_a_local_agent_never_imports_the_docker_sdk(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from streamspace.agent.backends.base import BackendOptions\n"
        "from streamspace.agent.backends.registry import create_backend\n"
        "from streamspace.config import Settings\n"
        f"create_backend('local', BackendOptions(Path({str(tmp_path)!r}), Settings()))\n"
        "sdks = ('docker', 'kubernetes_asyncio')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in sdks))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stderr


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("vmware", f"unknown backend 'vmware'; use {CHOICES}"),
        ("", f"unknown backend ''; use {CHOICES}"),
    ],
)
def test_the_agent_command_refuses_a_backend_it_cannot_run(
    kind: str, message: str, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from streamspace.cli import app

    result = CliRunner().invoke(
        app,
        [
            "agent",
            "--server",
            "http://127.0.0.1:9",
            "--backend",
            kind,
            "--state-dir",
            str(tmp_path),
        ],
        env={"STREAMSPACE_JOIN_TOKEN": "unused"},
    )
    assert result.exit_code == 1
    assert message in " ".join(result.output.split())
