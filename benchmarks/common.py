"""Helpers shared by the benchmark scripts: start the real product, log in, percentiles."""

from __future__ import annotations

import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
ADMIN_PASSWORD = "bench-admin-pass"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * pct / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def describe_machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()} {os.cpu_count()} cores {cpu} python {platform.python_version()}"


def summary(label: str, values: list[float], unit: str = "s") -> str:
    if not values:
        return f"{label}: no samples"
    return (
        f"{label}: n={len(values)} p50={percentile(values, 50):.3f}{unit} "
        f"p95={percentile(values, 95):.3f}{unit} p99={percentile(values, 99):.3f}{unit} "
        f"mean={statistics.fmean(values):.3f}{unit}"
    )


@contextmanager
def product(
    command: str = "up", env: dict[str, str] | None = None, args: list[str] | None = None
) -> Iterator[str]:
    """Run `streamspace up|server` on a free port with a throwaway data dir; yields its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ss-bench-") as data_dir:
        full_env = {
            **os.environ,
            "STREAMSPACE_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "STREAMSPACE_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
            "STREAMSPACE_DEFAULT_QUOTA_SESSIONS": "1000",
            "STREAMSPACE_DEFAULT_QUOTA_CPU_MILLIS": "10000000",
            "STREAMSPACE_DEFAULT_QUOTA_MEMORY_MB": "100000000",
            # Throughput benchmarks drive the load with one user's token (wrk: thousands of
            # requests a second); the per-user fair-use limit would answer most with 429.
            "STREAMSPACE_USER_REQUESTS_PER_SECOND": "0",
            **(env or {}),
        }
        log = open(Path(data_dir) / "server.log", "wb")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streamspace.cli",
                command,
                "--port",
                str(port),
                "--data-dir",
                data_dir,
                *(args or []),
            ],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            else:
                raise RuntimeError(
                    "server did not start: " + (Path(data_dir) / "server.log").read_text()[-2000:]
                )
            yield url
        finally:
            if os.environ.get("BENCH_SHOW_LOG"):
                Path("/tmp/bench-server.log").write_text(
                    (Path(data_dir) / "server.log").read_text()
                )
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def login(url: str, username: str = "admin", password: str = ADMIN_PASSWORD) -> str:
    r = httpx.post(url + "/api/v1/auth/login", json={"username": username, "password": password})
    r.raise_for_status()
    return str(r.json()["access_token"])


@contextmanager
def agent_process(
    url: str,
    token: str,
    cluster_id: str,
    state_dir: Path,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """A `streamspace agent` process enrolled with a fresh join token; yields once it is online
    (and, for backends that need to look, reports runnable templates)."""
    headers = {"Authorization": f"Bearer {token}"}
    join = httpx.post(f"{url}/api/v1/agents/join-tokens", json={}, headers=headers).json()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamspace.cli",
            "agent",
            "--server",
            url,
            "--join-token",
            join["token"],
            "--cluster-id",
            cluster_id,
            "--state-dir",
            str(state_dir),
            *(extra or []),
        ],
        env={**os.environ, "STREAMSPACE_LOG_LEVEL": "WARNING", **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            agents = httpx.get(f"{url}/api/v1/agents", headers=headers).json()
            if any(a["status"] == "online" and a["templates"] for a in agents):
                break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"agent for cluster {cluster_id} never came online")
        yield proc
    finally:
        proc.terminate()
        proc.wait(20)
