"""VNC streaming side by side: (a) straight to the VNC port, (b) through websockify,
(c) through the StreamSpace control plane + agent tunnel. Same Xvnc session for all three.

Usage: python benchmarks/stream.py [--updates 60] [--pings 300] [--concurrent 50]

Throughput: repeated full-framebuffer (non-incremental, raw 32 bpp) updates, MB/s.
Latency: round trip of a 1x1 non-incremental update request (client -> server -> client).
Then `--concurrent` viewers through the control plane at once, each doing a handshake and
three full updates; errors are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from benchmarks.common import describe_machine, free_port, login, percentile, product
from streamspace.rfb import RFBClient, TCPTransport, Transport, WebSocketTransport

Opener = Callable[[], Awaitable[Transport]]


async def measure(label: str, opener: Opener, updates: int, pings: int) -> None:
    rfb = RFBClient(await opener())
    try:
        await rfb.handshake()
        await rfb.request_update(False)  # warm up
        t0 = time.perf_counter()
        received = 0
        for _ in range(updates):
            stats = await rfb.request_update(False, timeout=30)
            received += stats.bytes_received
        elapsed = time.perf_counter() - t0
        rtts = []
        for _ in range(pings):
            t = time.perf_counter()
            await rfb.request_update(False, 0, 0, 1, 1, timeout=10)
            rtts.append((time.perf_counter() - t) * 1000)
    finally:
        await rfb.close()
    print(
        f"{label:<28} {received / elapsed / 1e6:8.1f} MB/s   "
        f"rtt p50={percentile(rtts, 50):.3f} ms p99={percentile(rtts, 99):.3f} ms",
        flush=True,
    )


def xvnc_port(session_id: str) -> int:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "Xvnc" in cmd and session_id in cmd:
            m = re.search(r"-rfbport (\d+)", cmd)
            if m:
                return int(m.group(1))
    raise RuntimeError("session's Xvnc not found")


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--updates", type=int, default=60)
    ap.add_argument("--pings", type=int, default=300)
    ap.add_argument("--concurrent", type=int, default=50)
    args = ap.parse_args()
    print(f"machine: {describe_machine()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    websockify = shutil.which("websockify") or str(Path(sys.executable).parent / "websockify")
    with product("up") as url:
        token = login(url)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as c:
            sid = c.post("/api/v1/sessions", json={"template": "xterm"}).json()["id"]
            for _ in range(200):
                if c.get(f"/api/v1/sessions/{sid}").json()["state"] == "running":
                    break
                time.sleep(0.1)
        port = xvnc_port(sid)
        ws_port = free_port()
        bridge = subprocess.Popen(
            [websockify, f"127.0.0.1:{ws_port}", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_port(ws_port)

            async def run() -> None:
                await measure(
                    "(a) direct VNC port",
                    lambda: TCPTransport.connect("127.0.0.1", port),
                    args.updates,
                    args.pings,
                )
                await measure(
                    "(b) websockify",
                    lambda: WebSocketTransport.connect(f"ws://127.0.0.1:{ws_port}/"),
                    args.updates,
                    args.pings,
                )
                await measure(
                    "(c) StreamSpace tunnel",
                    lambda: tunnel_opener(url, token, sid),
                    args.updates,
                    args.pings,
                )
                await concurrent(url, token, sid, args.concurrent)

            asyncio.run(run())
        finally:
            bridge.terminate()
            bridge.wait(10)
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as c:
                c.delete(f"/api/v1/sessions/{sid}")
                for _ in range(100):
                    if c.get(f"/api/v1/sessions/{sid}").json()["state"] == "stopped":
                        break
                    time.sleep(0.1)


if __name__ == "__main__":
    main()
