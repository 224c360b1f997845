"""The control-plane container exactly as the chart configures it starts and serves its probes.

The test API server runs no kubelet, so this test plays the kubelet's part for one pod on this
machine: it takes the rendered Deployment's command, its environment (the ConfigMap, the Secret,
the downward API, `$(VAR)` expansion) and its volume mounts (as fresh directories), runs the
command with the product installed here against real PostgreSQL and Redis, and polls the
startup, readiness and liveness probes the chart declares. A flag the CLI does not take, a
setting that does not parse, or a probe path that does not answer fails it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from replicas_support import REDIS_MISSING, RedisServer

from conftest import free_port, require, wait_for
from streamspace_testing.helm import HELM_MISSING, find, helm_binary, render

ADMIN = "chart-admin-Vq7-ZL3-pw"


@pytest.fixture(scope="module")
def helm() -> Iterator[Path]:
    require(HELM_MISSING)
    yield helm_binary()


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    require(REDIS_MISSING)
    server = RedisServer(tmp_path).start()
    try:
        yield server.url
    finally:
        server.stop()


def container_env(container: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, str]:
    """What the kubelet would put in the environment: envFrom first, then env in order, with
    `$(NAME)` expanded from the variables before it (as Kubernetes does)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        config = find(objects, "ConfigMap", source["configMapRef"]["name"])
        env.update(config["data"])
    downward = {"metadata.name": "ss-streamspace-controlplane-abc12", "status.podIP": "127.0.0.1"}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: env.get(m.group(1), m.group(0)),
                item["value"],
            )
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            env[item["name"]] = downward[source["fieldRef"]["fieldPath"]]
        else:
            ref = source["secretKeyRef"]
            data = find(objects, "Secret", ref["name"])["stringData"]
            if ref["key"] in data:
                env[item["name"]] = data[ref["key"]]
            else:
                assert ref.get("optional"), f"{ref['key']} missing from {ref['name']}"
    return env


def test_the_chart_control_plane_container_starts_and_answers_its_probes(
    helm: Path, pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    objects = render(
        helm,
        sets=(
            "postgresql.bundled=false",
            f"externalDatabase.url={pg_url}",
            "redis.bundled=false",
            f"externalRedis.url={redis_url}",
            f"controlPlane.port={port}",
            f"secrets.adminPassword={ADMIN}",
        ),
    )
    pod = find(objects, "Deployment", "-controlplane")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = container_env(container, objects)
    # The volumes, mounted at fresh directories: paths in settings move with their mount.
    for mount in container["volumeMounts"]:
        local = tmp_path / mount["name"]
        local.mkdir()
        env = {k: v.replace(mount["mountPath"], str(local), 1) for k, v in env.items()}
        if mount["mountPath"] == "/tmp":
            env["TMPDIR"] = str(local)
    assert env["STREAMSPACE_DATA_DIR"].startswith(str(tmp_path))
    command = [
        str(Path(sys.executable).parent / container["command"][0]),
        *container["command"][1:],
    ]
    log = (tmp_path / "controlplane.log").open("wb")
    proc = subprocess.Popen(
        command,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def probe(name: str) -> httpx.Response | None:
            get = container[name]["httpGet"]
            assert get["port"] == "http" and container["ports"][0]["containerPort"] == port
            try:
                return httpx.get(f"{base}{get['path']}", timeout=5)
            except httpx.TransportError:
                assert proc.poll() is None, (tmp_path / "controlplane.log").read_text()
                return None

        def answers(name: str) -> bool:
            response = probe(name)
            return response is not None and response.status_code == 200

        wait_for(lambda: answers("startupProbe"), 60, 0.3, what="the startup probe")
        ready = probe("readinessProbe")
        assert ready is not None and ready.json()["database"] == "ok"
        assert ready.json()["replica"] == "ss-streamspace-controlplane-abc12"
        assert answers("livenessProbe")
        login = httpx.post(
            f"{base}/api/v1/auth/login", json={"username": "admin", "password": ADMIN}, timeout=10
        )
        assert login.status_code == 200, login.text
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()
