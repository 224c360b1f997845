"""Create → first VNC frame showing the app, through the real control plane and tunnel.

The app counts as shown when the frame has at least 3 colours (a bare root window has 1-2).

Usage: python benchmarks/session_start.py [--runs 20] [--templates xterm,firefox]
                                          [--backend local|docker|both|kubernetes]
                                          [--unsandboxed]
Prints p50/p95 per template and backend. --unsandboxed also runs the local backend with
--insecure-shared-user, in the same run, as the anchor that shows what the sandbox costs.
--backend kubernetes runs the docker backend and the kubernetes one (pods on a real
kube-apiserver, run by the podman test node: see benchmarks/kube_env.py) side by side, both up
at once on the same podman storage, their runs alternating (each kube run once the previous
session's pod is gone), and prints the ratio of their p50s.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from benchmarks.common import describe_machine, login, percentile, product, summary
from streamspace_testing.rfb import RFBClient, WebSocketTransport


def app_visible(rfb: RFBClient, min_colours: int = 3) -> bool:
    """The app has drawn: a bare root window (black, or the window manager's solid colour)
    samples as 1-2 colours (with the cursor); an app window adds its own."""
    fb = memoryview(rfb.framebuffer)
    seen = set()
    for off in range(0, len(fb) - 4, 4 * 7):
        seen.add(bytes(fb[off : off + 3]))
        if len(seen) >= min_colours:
            return True
    return False


async def first_frame(url: str, token: str, template: str, timeout: float = 60) -> float:
    headers = {"Authorization": f"Bearer {token}"}
    ws_base = url.replace("http://", "ws://")
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as c:
        t0 = time.perf_counter()
        r = await c.post("/api/v1/sessions", json={"template": template})
        r.raise_for_status()
        sid = r.json()["id"]
        try:
            while True:
                s = (await c.get(f"/api/v1/sessions/{sid}")).json()
                if s["state"] == "running":
                    break
                if s["state"] in ("failed", "stopped"):
                    raise RuntimeError(f"session {s['state']}: {s['failure_reason']}")
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError("session did not start")
                await asyncio.sleep(0.02)
            t = (await c.post(f"/api/v1/sessions/{sid}/connect")).json()
            transport = await WebSocketTransport.connect(
                f"{ws_base}{t['ws_path']}?ticket={t['ticket']}"
            )
            rfb = RFBClient(transport)
            await rfb.handshake()
            await rfb.request_update(False)
            while not app_visible(rfb):
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError("app never drew")
                await rfb.request_update(False, timeout=timeout)
            elapsed = time.perf_counter() - t0
            await rfb.close()
            return elapsed
        finally:
            await c.delete(f"/api/v1/sessions/{sid}")
            for _ in range(200):
                s = (await c.get(f"/api/v1/sessions/{sid}")).json()
                if s["state"] in ("stopped", "failed"):
                    break
                await asyncio.sleep(0.05)


@dataclass(frozen=True)
class Contender:
    label: str
    url: str
    settled: Callable[[], Awaitable[None]] | None = None
    """Awaited before each run (of any contender): until what the backend removes after a
    stop has returned (a pod's containers) is gone, so no run is timed against it."""


async def measure(
    contenders: list[Contender], templates: list[str], runs: int
) -> dict[str, dict[str, list[float]]]:
    """label -> template -> times. With several contenders the runs alternate between them,
    so a drift in what else the machine does lands on all of them alike."""
    tokens = {c.label: login(c.url) for c in contenders}
    results: dict[str, dict[str, list[float]]] = {c.label: {} for c in contenders}
    for template in templates:
        times: dict[str, list[float]] = {c.label: [] for c in contenders}
        errors = dict.fromkeys(times, 0)
        for c in contenders:
            await first_frame(c.url, tokens[c.label], template)  # warm caches (fonts, pages)
        for _ in range(runs):
            for c in contenders:
                for other in contenders:  # no run overlaps any backend's teardown
                    if other.settled is not None:
                        await other.settled()
                try:
                    times[c.label].append(await first_frame(c.url, tokens[c.label], template))
                except RuntimeError as exc:
                    errors[c.label] += 1
                    print(f"  {c.label} {template}: error {exc}")
        for c in contenders:
            print(
                summary(f"{c.label:<7} {template:<8} create->first frame", times[c.label])
                + f" errors={errors[c.label]}",
                flush=True,
            )
            results[c.label][template] = times[c.label]
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--templates", default="xterm,firefox")
    ap.add_argument("--backend", default="local", choices=["local", "docker", "both", "kubernetes"])
    ap.add_argument(
        "--unsandboxed", action="store_true", help="also time unsandboxed local sessions"
    )
    args = ap.parse_args()
    templates = args.templates.split(",")
    print(f"machine: {describe_machine()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    if args.backend in ("local", "both"):
        with product("up") as url:
            asyncio.run(measure([Contender("local", url)], templates, args.runs))
        if args.unsandboxed:
            with product("up", args=["--insecure-shared-user"]) as url:
                asyncio.run(measure([Contender("nosbx", url)], templates, args.runs))
    if args.backend in ("docker", "both"):
        from benchmarks.docker_env import docker_product

        with docker_product() as url:
            asyncio.run(measure([Contender("docker", url)], templates, args.runs))
    if args.backend == "kubernetes":
        from benchmarks.docker_env import docker_product
        from benchmarks.kube_env import kube_product

        with docker_product() as url, kube_product(templates) as cluster:
            results = asyncio.run(
                measure(
                    [Contender("docker", url), Contender("kube", cluster.url, cluster.settled)],
                    templates,
                    args.runs,
                )
            )
        for template, times in results["kube"].items():
            docker = results["docker"].get(template)
            if times and docker:
                ratio = percentile(times, 50) / percentile(docker, 50)
                print(f"kube/docker p50 {template}: {ratio:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
