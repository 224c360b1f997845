"""Sound latency: a tone starts inside a real sandboxed session -> it is detected in the Opus
stream a WebSocket client decodes at the end of the viewer's path.

Usage: python -m benchmarks.audio_latency [--tones 20]

Runs `streamspace up` (control plane + embedded local agent, sandboxed sessions) with a template
whose app is a small Python program inside the sandbox: it writes PCM to `pacat` (10 ms target
latency) in real time, 5 ms at a time, silence with a 1 kHz tone burst every 600 ms, and logs
the wall-clock time it wrote each burst's first samples (same host clock as the client here).
(The pipe to pacat is shrunk to one page: a full default pipe is 340 ms of delay.)
The client takes a ticket, opens /api/v1/streams/audio, decodes each packet with libopus
(PyAV) and notes when a packet's level first rises above the silence; latency = detection -
onset of the burst just before it. Covers pacat -> PulseAudio -> the agent's encoder (pulsesrc,
opusenc, 10 ms frames) -> agent WebSocket -> control plane -> client. Not covered: the
browser's jitter buffer (30 ms in static/audio.js) and its audio output latency.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import secrets
import statistics
import time
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

from benchmarks.common import describe_machine, login, percentile, product
from streamspace_testing.opus import OpusListener, rms

TONE_APP = r"""
import fcntl, math, os, struct, subprocess, sys, time
log = open(os.path.expanduser("~/" + sys.argv[1]), "a", buffering=1)
pacat = subprocess.Popen(
    ["pacat", "--raw", "--latency-msec=10", "--rate=48000", "--channels=2", "--format=s16le"],
    stdin=subprocess.PIPE, bufsize=0)
# A pipe holds 340 ms of this PCM; written while pacat is still connecting, that backlog would
# stay for good and be measured as latency. One page (21 ms) at most, and a second to connect.
fcntl.fcntl(pacat.stdin.fileno(), fcntl.F_SETPIPE_SZ, 4096)
time.sleep(1)
chunk = 240  # 5 ms
silence = b"\0" * (chunk * 4)
tone = b"".join(struct.pack("<hh", v, v) for v in
                (int(12000 * math.sin(2 * math.pi * 1000 * i / 48000)) for i in range(chunk)))
start = time.monotonic()
n = 0
while True:
    position = n % 120  # 600 ms period
    if position == 0:
        log.write(f"{time.time():.6f}\n")
    pacat.stdin.write(tone if position < 40 else silence)
    n += 1
    delay = start + n * 0.005 - time.monotonic()
    if delay > 0:
        time.sleep(delay)
"""


def template(nonce: str) -> dict[str, object]:
    return {
        "name": "tone-bench",
        "display_name": "Tone bursts (benchmark)",
        "category": "Test",
        "resources": {"cpu_millis": 500, "memory_mb": 256},
        "display": {"width": 320, "height": 240, "depth": 24},
        "launch": {"local": {"command": ["/usr/bin/python3", "-c", TONE_APP, nonce]}},
    }


async def detect(url: str, ticket: str, tones: int) -> list[float]:
    """Wall-clock times at which each burst was first heard."""
    listener = OpusListener()
    heard: list[float] = []
    loud = False
    ws_url = url.replace("http", "ws", 1) + f"/api/v1/streams/audio?ticket={ticket}"
    async with connect(ws_url, max_size=None, compression=None, open_timeout=20) as ws:
        async with asyncio.timeout(tones * 0.6 + 30):
            while len(heard) < tones + 2:
                message = await ws.recv()
                now = time.time()
                assert isinstance(message, bytes)
                level = rms(listener.decode(message))
                if level > 0.05 and not loud:
                    heard.append(now)
                loud = level > 0.02
    return heard[2:]  # the first bursts may predate the stream's start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tones", type=int, default=20)
    args = parser.parse_args()
    nonce = f"tones-{secrets.token_hex(6)}.log"
    with product(env={"STREAMSPACE_AGENT_HEARTBEAT_SECONDS": "1"}) as url:
        headers = {"Authorization": f"Bearer {login(url)}"}
        with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
            c.post("/api/v1/templates", json=template(nonce)).raise_for_status()
            deadline = time.time() + 60
            while (
                r := c.post("/api/v1/sessions", json={"template": "tone-bench"})
            ).status_code != 201:
                if time.time() > deadline:
                    raise RuntimeError(f"cannot start the tone session: {r.text}")
                time.sleep(0.5)
            sid = r.json()["id"]
            while (state := c.get(f"/api/v1/sessions/{sid}").json())["state"] != "running":
                if state["state"] in ("failed", "stopped") or time.time() > deadline + 60:
                    raise RuntimeError(f"the tone session did not run: {state}")
                time.sleep(0.2)
            time.sleep(1.0)
            ticket = c.post(f"/api/v1/sessions/{sid}/connect").json()["ticket"]
            heard = asyncio.run(detect(url, ticket, args.tones))
            logs = glob.glob(f"/tmp/ss-bench-*/**/{nonce}", recursive=True)
            if not logs:
                raise RuntimeError("the tone app's onset log was not found")
            onsets = [float(x) for x in Path(logs[0]).read_text().split()]
            c.delete(f"/api/v1/sessions/{sid}")
    latencies = []
    for t in heard:
        before = [o for o in onsets if o <= t]
        if before:
            latencies.append((t - before[-1]) * 1000)
    print(describe_machine())
    print(
        f"audio onset -> decoded at a WebSocket client, {len(latencies)} tones: "
        f"p50={statistics.median(latencies):.1f} ms  p90={percentile(latencies, 90):.1f} ms  "
        f"min={min(latencies):.1f} ms  max={max(latencies):.1f} ms  (target p50 < 150 ms)"
    )


if __name__ == "__main__":
    main()
