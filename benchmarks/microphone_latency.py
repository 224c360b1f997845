"""Microphone latency: a tone burst leaves a WebSocket client on /api/v1/streams/microphone ->
it is heard by an app recording the default source inside a real sandboxed session.

Usage: python -m benchmarks.microphone_latency [--tones 20]

Runs `streamspace up` (control plane + embedded local agent, sandboxed sessions; the setting
STREAMSPACE_MICROPHONE_ALLOW=true) with a template whose app is a small Python program inside
the sandbox: it reads `parec` on the default source (the session's `microphone`, 5 ms target
latency) 5 ms at a time and logs the wall-clock time at which the level first rises above the
silence (same host clock as the client here). The client sends 20 ms Opus frames (libopus via
PyAV, as a browser's AudioEncoder makes them) in real time, silence with a 200 ms 1 kHz burst
every 600 ms, noting when it sent each burst's first frame; latency = heard - sent. Covers the
control plane -> agent WebSocket -> the agent's decoder (RTP, opusdec, pulsesink) -> the
session's PulseAudio -> parec. Not covered: the browser's capture and its 20 ms frame (the
frame exists at once here).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import secrets
import statistics
import time
from pathlib import Path

import av
import httpx
import numpy as np
from websockets.asyncio.client import connect

from benchmarks.common import describe_machine, login, percentile, product
from streamspace.agent.audio import SAMPLE_RATE, frame

FRAME_MS = 20
PERIOD_FRAMES = 30  # 600 ms
BURST_FRAMES = 10  # 200 ms

LISTEN_APP = r"""
import math, os, struct, subprocess, sys, time
log = open(os.path.expanduser("~/" + sys.argv[1]), "a", buffering=1)
parec = subprocess.Popen(
    ["parec", "--raw", "--latency-msec=5", "--rate=48000", "--channels=1", "--format=s16le"],
    stdout=subprocess.PIPE, bufsize=0)
chunk = 240 * 2  # 5 ms
loud = False
buf = b""
while True:
    data = parec.stdout.read(chunk - len(buf))
    if not data:
        break
    buf += data
    if len(buf) < chunk:
        continue
    samples = struct.unpack(f"<{len(buf) // 2}h", buf)
    buf = b""
    level = math.sqrt(sum(s * s for s in samples) / len(samples)) / 32768
    if level > 0.05 and not loud:
        log.write(f"{time.time():.6f}\n")
    loud = level > 0.02
"""


def template(nonce: str) -> dict[str, object]:
    return {
        "name": "mic-bench",
        "display_name": "Microphone listener (benchmark)",
        "category": "Test",
        "resources": {"cpu_millis": 500, "memory_mb": 256},
        "display": {"width": 320, "height": 240, "depth": 24},
        "launch": {"local": {"command": ["/usr/bin/python3", "-c", LISTEN_APP, nonce]}},
    }


def burst_frames(count: int) -> list[bytes]:
    """`count` periods of silence and bursts as framed Opus packets, FRAME_MS each."""
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate = SAMPLE_RATE
    encoder.layout = "mono"
    encoder.format = "s16"
    encoder.options = {"frame_duration": str(FRAME_MS)}
    size = SAMPLE_RATE * FRAME_MS // 1000
    frames: list[bytes] = []
    for i in range(count * PERIOD_FRAMES):
        t = np.arange(i * size, (i + 1) * size) / SAMPLE_RATE
        loud = i % PERIOD_FRAMES < BURST_FRAMES
        pcm = (0.4 * np.sin(2 * np.pi * 1000 * t) * 32767 * loud).astype(np.int16)
        chunk = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        chunk.sample_rate = SAMPLE_RATE
        chunk.pts = i * size
        for packet in encoder.encode(chunk):
            frames.append(frame(len(frames) * FRAME_MS * 1000, bytes(packet), channels=1))
    return frames


async def send(url: str, ticket: str, tones: int) -> list[float]:
    """Wall-clock times at which each burst's first frame was sent."""
    frames = burst_frames(tones + 2)
    sent: list[float] = []
    ws_url = url.replace("http", "ws", 1) + f"/api/v1/streams/microphone?ticket={ticket}"
    async with connect(ws_url, compression=None, open_timeout=20) as ws:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, message in enumerate(frames):
            if i % PERIOD_FRAMES == 0:
                sent.append(time.time())
            await ws.send(message)
            await asyncio.sleep(max(0.0, start + (i + 1) * FRAME_MS / 1000 - loop.time()))
        await asyncio.sleep(0.5)
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tones", type=int, default=20)
    args = parser.parse_args()
    nonce = f"mic-{secrets.token_hex(6)}.log"
    env = {"STREAMSPACE_AGENT_HEARTBEAT_SECONDS": "1", "STREAMSPACE_MICROPHONE_ALLOW": "true"}
    with product(env=env) as url:
        headers = {"Authorization": f"Bearer {login(url)}"}
        with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
            c.post("/api/v1/templates", json=template(nonce)).raise_for_status()
            deadline = time.time() + 60
            while (
                r := c.post("/api/v1/sessions", json={"template": "mic-bench"})
            ).status_code != 201:
                if time.time() > deadline:
                    raise RuntimeError(f"cannot start the listener session: {r.text}")
                time.sleep(0.5)
            sid = r.json()["id"]
            while (state := c.get(f"/api/v1/sessions/{sid}").json())["state"] != "running":
                if state["state"] in ("failed", "stopped") or time.time() > deadline + 60:
                    raise RuntimeError(f"the listener session did not run: {state}")
                time.sleep(0.2)
            time.sleep(1.0)
            ticket = c.post(f"/api/v1/sessions/{sid}/connect").json()["ticket"]
            sent = asyncio.run(send(url, ticket, args.tones))[2:]  # the decoder warms up
            logs = glob.glob(f"/tmp/ss-bench-*/**/{nonce}", recursive=True)
            if not logs:
                raise RuntimeError("the listener app's log was not found")
            heard = [float(x) for x in Path(logs[0]).read_text().split()]
            c.delete(f"/api/v1/sessions/{sid}")
    latencies = []
    for t in sent:
        after = [h for h in heard if h >= t]
        if after and after[0] - t < 0.5:
            latencies.append((after[0] - t) * 1000)
    if not latencies:
        raise RuntimeError(f"no burst was heard in the session ({len(heard)} onsets logged)")
    print(describe_machine())
    print(
        f"microphone burst sent -> heard in the session, {len(latencies)}/{len(sent)} tones: "
        f"p50={statistics.median(latencies):.1f} ms  p90={percentile(latencies, 90):.1f} ms  "
        f"min={min(latencies):.1f} ms  max={max(latencies):.1f} ms  (target p50 < 150 ms)"
    )


if __name__ == "__main__":
    main()
