"""`streamspace up` as a subprocess: the real product on one machine (control plane, SQLite,
embedded local agent), for tests that drive it from the outside."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from conftest import ADMIN_PASSWORD, ROOT, free_port


class Product:
    def __init__(
        self, data_dir: Path, env: dict[str, str] | None = None, args: list[str] | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.log_path = data_dir.parent / "streamspace-up.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_env = env or {}
        self.extra_args = args or []

    def login(self, username: str = "admin", password: str = ADMIN_PASSWORD) -> httpx.Client:
        c = httpx.Client(base_url=self.url, timeout=30)
        r = c.post("/api/v1/auth/login", json={"username": username, "password": password})
        assert r.status_code == 200, r.text
        c.headers["Authorization"] = f"Bearer {r.json()['access_token']}"
        return c

    def start(self) -> Product:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSPACE_")}
        env.update(STREAMSPACE_ADMIN_PASSWORD=ADMIN_PASSWORD, PYTHONUNBUFFERED="1")
        env.update(self.extra_env)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streamspace.cli",
                "up",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`streamspace up` exited early:\n{self.log()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"`streamspace up` did not answer /healthz:\n{self.log()[-3000:]}")
        # The embedded agent enrols right after the server is up; wait for it to be online.
        with httpx.Client(base_url=self.url, timeout=10) as c:
            token = c.post(
                "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
            ).json()["access_token"]
            c.headers["Authorization"] = f"Bearer {token}"
            while time.time() < deadline:
                if any(a["status"] == "online" for a in c.get("/api/v1/agents").json()):
                    break
                time.sleep(0.2)
            else:
                raise RuntimeError(f"the local agent never came online:\n{self.log()[-3000:]}")
        return self

    def stop_sessions(self) -> None:
        """Sessions outlive `streamspace up` (they survive agent restarts by design): stop what a
        failed test left running so no Xvnc or app process is leaked."""
        with contextlib.suppress(Exception), httpx.Client(base_url=self.url, timeout=10) as c:
            token = c.post(
                "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
            ).json()["access_token"]
            c.headers["Authorization"] = f"Bearer {token}"
            query = {"all": "true", "active": "true", "limit": 200}
            for s in c.get("/api/v1/sessions", params=query).json()["items"]:
                if s["state"] != "stopping":
                    c.delete(f"/api/v1/sessions/{s['id']}")
            deadline = time.time() + 30
            while time.time() < deadline:
                if not c.get("/api/v1/sessions", params=query).json()["total"]:
                    break
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.stop_sessions()
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
