"""Files API on the docker backend (podman): the home volume reached from the agent's host, as
the container's uid; what is uploaded is there inside the container, what the container writes
comes back, and a symlink the session user makes inside the container is never followed."""

from __future__ import annotations

import io
import os
import zipfile
from typing import Any

import pytest
from api_support import assert_problem
from test_docker_e2e import setup

from conftest import wait_state

pytestmark = pytest.mark.podman

__all__ = ["setup"]


def test_files_reach_the_container_home(setup: Any) -> None:
    from streamspace.agent.backends.docker import container_name

    _cp, _agent, engine, admin, _ = setup
    r = admin.post("/api/v1/sessions", json={"template": "xterm", "cluster_id": "containers"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert wait_state(admin, sid, {"running", "failed"}, 90)["state"] == "running"
    container = engine.containers.get(container_name(sid))
    content = f"/api/v1/sessions/{sid}/files/content"

    payload = os.urandom(2 * 1024 * 1024 + 5)
    r = admin.put(content, params={"path": "Uploads/in.bin"}, content=payload)
    assert r.status_code == 201, r.text
    code, out = container.exec_run(
        ["sh", "-c", "stat -c %u:%s /home/streamspace/Uploads/in.bin"], user="1000"
    )
    assert code == 0, out
    assert out.decode().strip() == f"1000:{len(payload)}"

    code, out = container.exec_run(
        ["sh", "-c", "echo made-inside > /home/streamspace/inside.txt && "
         "ln -s /etc /home/streamspace/etc-link"],
        user="1000",
    )  # fmt: skip
    assert code == 0, out
    assert admin.get(content, params={"path": "inside.txt"}).content == b"made-inside\n"
    assert admin.get(content, params={"path": "Uploads/in.bin"}).content == payload
    assert_problem(admin.get(content, params={"path": "etc-link/passwd"}), 403, "link")
    assert_problem(admin.put(content, params={"path": "etc-link/x"}, content=b"x"), 403)

    listed = admin.get(f"/api/v1/sessions/{sid}/files").json()["items"]
    kinds = {e["name"]: e["type"] for e in listed}
    assert kinds["etc-link"] == "symlink" and kinds["Uploads"] == "dir"

    with zipfile.ZipFile(io.BytesIO(admin.get(content, params={"path": ""}).content)) as zf:
        assert zf.read("Uploads/in.bin") == payload
        assert not [n for n in zf.namelist() if n.startswith("etc-link")]
