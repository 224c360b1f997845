"""Live thumbnails: time of `GET /api/v1/sessions/{id}/thumbnail` for a real xterm session.

Usage: python -m benchmarks.thumbnail [--captures 30] [--agent embedded|separate]

Uncached: with the cache off (STREAMSPACE_THUMBNAIL_CACHE_SECONDS=0) each request is a capture
by the agent (RFB connect, one full raw frame, scale, JPEG); cached: with the default cache, the
requests a Sessions list in many tabs makes. Prints latency percentiles and the image size.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import agent_process, describe_machine, login, percentile, product


def measure(c: httpx.Client, sid: str, n: int) -> tuple[list[float], int]:
    times: list[float] = []
    size = 0
    for _ in range(n):
        t0 = time.perf_counter()
        r = c.get(f"/api/v1/sessions/{sid}/thumbnail")
        times.append((time.perf_counter() - t0) * 1000)
        r.raise_for_status()
        size = len(r.content)
    return times, size


def run(agent: str, cache_seconds: str, captures: int) -> None:
    env = {"STREAMSPACE_THUMBNAIL_CACHE_SECONDS": cache_seconds}
    with product("up" if agent == "embedded" else "server", env=env) as url:
        token = login(url)
        with contextlib.ExitStack() as stack:
            if agent == "separate":
                state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="ss-bench-"))
                stack.enter_context(agent_process(url, token, "bench", Path(state_dir)))
            c = stack.enter_context(
                httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
            )
            sid = c.post("/api/v1/sessions", json={"template": "xterm"}).json()["id"]
            for _ in range(300):
                if c.get(f"/api/v1/sessions/{sid}").json()["state"] == "running":
                    break
                time.sleep(0.1)
            try:
                measure(c, sid, 3)  # warm up (xterm draws, first connections)
                times, size = measure(c, sid, captures)
                label = "uncached (a capture each)" if cache_seconds == "0" else "cached"
                print(
                    f"{agent:<9} {label:<26} p50={percentile(times, 50):7.1f} ms "
                    f"p90={percentile(times, 90):7.1f} ms max={max(times):7.1f} ms "
                    f"image={size / 1024:.1f} KiB",
                    flush=True,
                )
            finally:
                c.delete(f"/api/v1/sessions/{sid}")
                for _ in range(100):
                    if c.get(f"/api/v1/sessions/{sid}").json()["state"] == "stopped":
                        break
                    time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--captures", type=int, default=30)
    ap.add_argument("--agent", choices=("embedded", "separate", "both"), default="both")
    args = ap.parse_args()
    print(f"machine: {describe_machine()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    agents = ("embedded", "separate") if args.agent == "both" else (args.agent,)
    for agent in agents:
        run(agent, "0", args.captures)
        run(agent, "2", args.captures)


if __name__ == "__main__":
    main()
