"""Fair use: does one user's burst of session creates stall everyone else's API calls?

Usage: python -m benchmarks.fair_use [--burst 30] [--rounds 5] [--command up|server]

Runs the real product on the embedded SQLite (`streamspace server` by default, plus a real
`streamspace agent` with no capacity: xterm is available, so creates are accepted, and the
sessions stay pending with no desktop processes competing for the CPU; `--command up` uses the
embedded agent instead). One user ("abuser", roomy quota) fires `--burst` parallel
`POST /api/v1/sessions`, `--rounds` times; meanwhile another user ("victim") calls
`GET /api/v1/auth/me` back to back. Prints the victim's latency percentiles and maximum, and the
abuser's answers by status code.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx

from benchmarks.common import ROOT, describe_machine, login, percentile, product

PASSWORD = "fair-use-pass-123"


def make_users(url: str, admin: str) -> None:
    headers = {"Authorization": f"Bearer {admin}"}
    for name in ("abuser", "victim"):
        r = httpx.post(
            f"{url}/api/v1/users",
            json={"username": name, "password": PASSWORD},
            headers=headers,
        )
        r.raise_for_status()
    r = httpx.put(
        f"{url}/api/v1/users/abuser/quota",
        json={"max_sessions": 10_000, "max_cpu_millis": 10**7, "max_memory_mb": 10**8},
        headers=headers,
    )
    r.raise_for_status()


@contextlib.contextmanager
def full_agent(url: str, admin: str) -> Iterator[None]:
    """A real local agent that reports its templates but takes no session (max 0)."""
    headers = {"Authorization": f"Bearer {admin}"}
    r = httpx.post(f"{url}/api/v1/agents/join-tokens", json={}, headers=headers)
    r.raise_for_status()
    with tempfile.TemporaryDirectory(prefix="ss-bench-agent-") as state_dir:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "streamspace.cli", "agent", "--server", url),
                *("--state-dir", state_dir, "--join-token", r.json()["token"]),
                *("--cluster-id", "bench", "--cluster-name", "bench", "--max-sessions", "0"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        try:
            deadline = time.time() + 60
            while time.time() < deadline:
                t = httpx.get(f"{url}/api/v1/templates/xterm", headers=headers).json()
                if t.get("available"):
                    break
                time.sleep(0.5)
            else:
                raise RuntimeError("the agent did not make xterm available (Xvnc, xterm?)")
            yield
        finally:
            proc.terminate()
            proc.wait(20)


async def victim(url: str, token: str, stop: asyncio.Event, samples: list[float]) -> list[int]:
    codes: list[int] = []
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    ) as c:
        while not stop.is_set():
            started = time.perf_counter()
            r = await c.get("/api/v1/auth/me")
            samples.append(time.perf_counter() - started)
            codes.append(r.status_code)
            await asyncio.sleep(0.05)
    return codes


async def burst(url: str, token: str, n: int) -> collections.Counter[int]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120, limits=limits
    ) as c:

        async def one() -> int:
            r = await c.post("/api/v1/sessions", json={"template": "xterm"})
            return r.status_code

        return collections.Counter(await asyncio.gather(*(one() for _ in range(n))))


async def measure(url: str, burst_size: int, rounds: int) -> None:
    abuser = login(url, "abuser", PASSWORD)
    victim_token = login(url, "victim", PASSWORD)
    stop = asyncio.Event()
    samples: list[float] = []
    watcher = asyncio.create_task(victim(url, victim_token, stop, samples))
    await asyncio.sleep(0.5)
    quiet = len(samples)
    answers: collections.Counter[int] = collections.Counter()
    started = time.perf_counter()
    for _ in range(rounds):
        answers += await burst(url, abuser, burst_size)
        await asyncio.sleep(0.2)
    elapsed = time.perf_counter() - started
    stop.set()
    codes = await watcher
    during = samples[quiet:]
    print(f"abuser: {burst_size} parallel creates x {rounds} rounds in {elapsed:.1f} s")
    print("abuser answers: " + ", ".join(f"{k}: {v}" for k, v in sorted(answers.items())))
    print(
        f"victim GET /auth/me during the bursts: n={len(during)} "
        f"p50={percentile(during, 50) * 1000:.0f} ms p95={percentile(during, 95) * 1000:.0f} ms "
        f"max={max(during) * 1000:.0f} ms; non-200 answers: {sum(c != 200 for c in codes)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--command", choices=("up", "server"), default="server")
    args = parser.parse_args()
    print(describe_machine())
    env = {
        # The fair-use limits as configured (benchmarks.common turns the request rate off).
        "STREAMSPACE_USER_REQUESTS_PER_SECOND": os.environ.get(
            "STREAMSPACE_USER_REQUESTS_PER_SECOND", "30"
        ),
    }
    with product(args.command, env=env) as url:
        admin = login(url)
        make_users(url, admin)
        agent = full_agent(url, admin) if args.command == "server" else contextlib.nullcontext()
        with agent:
            asyncio.run(measure(url, args.burst, args.rounds))


if __name__ == "__main__":
    main()
