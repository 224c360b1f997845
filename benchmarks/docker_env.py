"""A control plane with one docker-backend agent on podman, for the container benchmarks."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.common import agent_process, login, product


@contextmanager
def docker_product() -> Iterator[str]:
    from streamspace.images import build_images
    from streamspace.podman import start_podman_service

    run_dir = Path(tempfile.mkdtemp(prefix="ss-bench-podman-"))
    service = start_podman_service(run_dir, export=False)
    try:
        build_images(["xterm", "firefox"], containers_conf=service.conf_path, progress=None)
        with (
            product("server") as url,
            agent_process(
                url,
                login(url),
                "containers",
                run_dir / "agent",
                ["--backend", "docker", "--docker-host", service.docker_host],
            ),
        ):
            yield url
    finally:
        service.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
