"""A control plane with one docker-backend agent on podman, for the container benchmarks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from benchmarks.common import ROOT, login, product


@contextmanager
def docker_product() -> Iterator[str]:
    from streamspace.images import build_images
    from streamspace.podman import start_podman_service

    run_dir = Path(tempfile.mkdtemp(prefix="ss-bench-podman-"))
    service = start_podman_service(run_dir, export=False)
    agent: subprocess.Popen[bytes] | None = None
    try:
        build_images(["xterm", "firefox"], containers_conf=service.conf_path, progress=None)
        with product("server") as url:
            token = login(url)
            headers = {"Authorization": f"Bearer {token}"}
            join = httpx.post(url + "/api/v1/agents/join-tokens", json={}, headers=headers)
            agent = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "streamspace.cli",
                    "agent",
                    "--server",
                    url,
                    "--join-token",
                    join.json()["token"],
                    "--cluster-id",
                    "containers",
                    "--backend",
                    "docker",
                    "--docker-host",
                    service.docker_host,
                    "--state-dir",
                    str(run_dir / "agent"),
                ],
                env={**os.environ, "STREAMSPACE_LOG_LEVEL": "WARNING"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=ROOT,
            )
            deadline = time.time() + 60
            while time.time() < deadline:
                agents = httpx.get(url + "/api/v1/agents", headers=headers).json()
                if agents and agents[0]["status"] == "online" and agents[0]["templates"]:
                    break
                time.sleep(0.5)
            yield url
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(20)
        service.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
