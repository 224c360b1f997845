"""VNC streaming side by side: (a) straight to the VNC port, (b) through websockify,
(c) through the StreamSpace control plane + agent tunnel. Same Xvnc session for all three.

Usage: python -m benchmarks.stream [--rounds 7] [--updates 40] [--pings 100] [--concurrent 50]
                                   [--agent embedded|separate]

Throughput: repeated full-framebuffer (non-incremental, raw 32 bpp) updates, MB/s.
Latency: round trip of a 1x1 non-incremental update request (client -> server -> client).
Then `--concurrent` viewers through the control plane at once, each doing a handshake and
three full updates; errors are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.common import agent_process, describe_machine, free_port, login, percentile, product
from streamspace_testing.rfb import RFBClient, TCPTransport, Transport, WebSocketTransport

Opener = Callable[[], Awaitable[Transport]]


@dataclass
class PathStats:
    label: str
    rates: list[float] = field(default_factory=list)
    """MB/s of each round"""
    rtts: list[float] = field(default_factory=list)
    """ms, all rounds pooled"""

    def line(self) -> str:
        return (
            f"{self.label:<34} {statistics.median(self.rates):8.1f} MB/s median "
            f"(rounds {min(self.rates):.0f}-{max(self.rates):.0f})   "
            f"rtt p50={percentile(self.rtts, 50):.3f} ms p99={percentile(self.rtts, 99):.3f} ms"
        )


async def measure(stats: PathStats, opener: Opener, updates: int, pings: int) -> None:
    rfb = RFBClient(await opener())
    try:
        await rfb.handshake()
        await rfb.request_update(False)  # warm up
        t0 = time.perf_counter()
        received = 0
        for _ in range(updates):
            got = await rfb.request_update(False, timeout=30)
            received += got.bytes_received
        stats.rates.append(received / (time.perf_counter() - t0) / 1e6)
        for _ in range(pings):
            t = time.perf_counter()
            await rfb.request_update(False, 0, 0, 1, 1, timeout=10)
            stats.rtts.append((time.perf_counter() - t) * 1000)
    finally:
        await rfb.close()


def vnc_socket(session_id: str) -> Path:
    """The session's VNC socket (local backend: `run/<session>/vnc.sock` in the agent's state
    dir, one of this script's temporary dirs), through a short symlink: Unix socket addresses
    are limited to 108 bytes and websockify needs a plain path."""
    for found in Path(tempfile.gettempdir()).glob(f"ss-bench-*/**/run/{session_id}/vnc.sock"):
        link = Path(tempfile.gettempdir()) / f"ss-bench-vnc-{session_id[:12]}.sock"
        link.unlink(missing_ok=True)
        link.symlink_to(found)
        return link
    raise RuntimeError("session's VNC socket not found")


async def tunnel_opener(url: str, token: str, session_id: str) -> Transport:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}) as c:
        t = (await c.post(f"/api/v1/sessions/{session_id}/connect")).json()
    ws = url.replace("http://", "ws://")
    return await WebSocketTransport.connect(f"{ws}{t['ws_path']}?ticket={t['ticket']}")


async def concurrent(url: str, token: str, session_id: str, n: int) -> None:
    async def one() -> int:
        rfb = RFBClient(await tunnel_opener(url, token, session_id))
        try:
            await rfb.handshake()
            got = 0
            for _ in range(3):
                got += (await rfb.request_update(False, timeout=60)).bytes_received
            return got
        finally:
            await rfb.close()

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    total = sum(r for r in results if isinstance(r, int))
    print(
        f"{n} concurrent viewers through the control plane: errors={len(errors)} "
        f"{total / 1e6:.0f} MB in {time.perf_counter() - t0:.1f} s"
        + (f" first error: {errors[0]!r}" if errors else ""),
        flush=True,
    )


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


@contextlib.contextmanager
def separate_agent(url: str, token: str) -> Iterator[None]:
    """A `streamspace agent` process beside `streamspace server`: viewers then take the
    production path for remote agents (a dialled-back agent WebSocket per viewer)."""
    with (
        tempfile.TemporaryDirectory(prefix="ss-bench-agent-") as state_dir,
        agent_process(url, token, "bench", Path(state_dir)),
    ):
        yield


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--updates", type=int, default=40, help="full updates per path per round")
    ap.add_argument("--pings", type=int, default=100, help="1x1 round trips per path per round")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds of (a), (b), (c)")
    ap.add_argument("--concurrent", type=int, default=50)
    ap.add_argument(
        "--agent",
        choices=("embedded", "separate"),
        default="embedded",
        help="embedded: `streamspace up` (agent in the control plane's process); separate: "
        "`streamspace server` plus a `streamspace agent` process (the remote-agent path)",
    )
    args = ap.parse_args()
    print(f"machine: {describe_machine()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"agent: {args.agent}; {args.rounds} rounds x {args.updates} updates, interleaved")
    websockify = shutil.which("websockify") or str(Path(sys.executable).parent / "websockify")
    with product("up" if args.agent == "embedded" else "server") as url:
        token = login(url)
        agent = separate_agent(url, token) if args.agent == "separate" else contextlib.nullcontext()
        with agent, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as c:
            sid = c.post("/api/v1/sessions", json={"template": "xterm"}).json()["id"]
            for _ in range(300):
                if c.get(f"/api/v1/sessions/{sid}").json()["state"] == "running":
                    break
                time.sleep(0.1)
            sock = vnc_socket(sid)
            ws_port = free_port()
            bridge = subprocess.Popen(
                [websockify, f"--unix-target={sock}", f"127.0.0.1:{ws_port}"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_port(ws_port)
                asyncio.run(run_all(args, url, token, sid, sock, ws_port))
            finally:
                sock.unlink(missing_ok=True)
                bridge.terminate()
                bridge.wait(10)
                c.delete(f"/api/v1/sessions/{sid}")
                for _ in range(100):
                    if c.get(f"/api/v1/sessions/{sid}").json()["state"] == "stopped":
                        break
                    time.sleep(0.1)


async def run_all(
    args: argparse.Namespace, url: str, token: str, sid: str, sock: Path, ws_port: int
) -> None:
    """Rounds interleave the three paths so a noisy neighbour hurts all of them alike."""
    direct = PathStats("(a) direct VNC socket")
    bridge = PathStats("(b) websockify")
    ours = PathStats(f"(c) StreamSpace ({args.agent} agent)")
    openers: list[tuple[PathStats, Opener]] = [
        (direct, lambda: TCPTransport.connect_unix(str(sock))),
        (bridge, lambda: WebSocketTransport.connect(f"ws://127.0.0.1:{ws_port}/")),
        (ours, lambda: tunnel_opener(url, token, sid)),
    ]
    for _ in range(args.rounds):
        for stats, opener in openers:
            await measure(stats, opener, args.updates, args.pings)
    for stats, _ in openers:
        print(stats.line(), flush=True)
    ratio = statistics.median(ours.rates) / statistics.median(bridge.rates)
    per_round = [o / b for o, b in zip(ours.rates, bridge.rates, strict=True)]
    print(
        f"(c)/(b) throughput: {ratio * 100:.0f} % of median "
        f"(per round {min(per_round) * 100:.0f}-{max(per_round) * 100:.0f} %; target >= 90 %)"
    )
    added = percentile(ours.rtts, 50) - percentile(direct.rtts, 50)
    print(f"added p50 latency (c) - (a): {added:.3f} ms (target < 1 ms)", flush=True)
    await concurrent(url, token, sid, args.concurrent)


if __name__ == "__main__":
    main()
