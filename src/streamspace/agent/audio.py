"""The session's sound as Opus packets: the session's audio server -> a GStreamer encoder
subprocess -> one framed packet per viewer WebSocket message.

The session's PulseAudio (started by its init script, as the session user, inside its sandbox)
plays everything into a null sink. The backend hands over its native-protocol socket as an
O_PATH descriptor it checked (a socket of the session's uid, no symlink: see
`vnc.socket_handle`); the encoder inherits it and connects through `/proc/self/fd/N`, so it
needs no access to the directories on the way. The encoder is `gst-launch-1.0` (Debian's
GStreamer): `pulsesrc` on the sink's monitor with a 10 ms fragment, Opus, and RTP with RFC 4571
length prefixes, which keep packet boundaries across the pipe. It runs as `nobody` when the
agent is root: it parses what the session's server says, which is no code to run with the
agent's privileges. (`module-simple-protocol-unix` would serve raw PCM without a client
library, but buffers 300 ms before sending anything.)

Wire framing (docs/streaming.md#sound): each binary WebSocket message is a 12-byte header then
one Opus packet. Header: version (u8, 1), channels (u8), reserved (u16, 0), presentation time
in microseconds since the stream began (u64, big endian).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import struct
from collections.abc import AsyncIterator

SAMPLE_RATE = 48_000
CHANNELS = 2
FRAME_MS = 10
"""Opus frame length: 10 ms keeps the encoder's share of the latency small."""
BITRATE = 96_000
"""Opus bits per second: transparent for music at 48 kHz stereo, ~12 kB/s on the wire."""
FRAME_VERSION = 1
HEADER = struct.Struct(">BBHQ")
RTP_HEADER_BYTES = 12
NOBODY = 65534


class AudioUnavailable(RuntimeError):
    """This host cannot encode sound (no GStreamer with Opus)."""


def frame(pts_us: int, packet: bytes, channels: int = CHANNELS) -> bytes:
    return HEADER.pack(FRAME_VERSION, channels, 0, pts_us) + packet


def unframe(message: bytes) -> tuple[int, int, bytes]:
    """(channels, pts in microseconds, Opus packet) of one viewer message."""
    version, channels, _reserved, pts = HEADER.unpack_from(message)
    if version != FRAME_VERSION:
        raise ValueError(f"unknown audio frame version {version}")
    return channels, pts, message[HEADER.size :]


SINK_MONITOR = "streamspace.monitor"
"""The monitor of the null sink session-init.sh loads (`sink_name=streamspace`)."""


def encoder_argv(gst_launch: str, server_fd: int, bitrate: int, run_as: int | None) -> list[str]:
    """The encoder's command line (pure: the unit tests check it as data)."""
    pipeline = [
        "pulsesrc",
        f"server=unix:/proc/self/fd/{server_fd}",
        f"device={SINK_MONITOR}",
        "buffer-time=40000",
        f"latency-time={FRAME_MS * 1000}",
        "client-name=streamspace-viewer",
        "!",
        f"audio/x-raw,format=S16LE,rate={SAMPLE_RATE},channels={CHANNELS}",
        "!",
        "opusenc",
        f"frame-size={FRAME_MS}",
        f"bitrate={bitrate}",
        "!",
        "rtpopuspay",
        "!",
        "rtpstreampay",
        "!",
        "fdsink",
        "fd=1",
        "sync=false",
    ]
    argv = [gst_launch, "-q", *pipeline]
    if run_as is None:
        return argv
    drop = [
        "setpriv",
        f"--reuid={run_as}",
        f"--regid={run_as}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ]
    return [*drop, *argv]


def find_encoder() -> str:
    found = shutil.which("gst-launch-1.0")
    if found is None:
        raise AudioUnavailable("gst-launch-1.0 is not installed (Debian: gstreamer1.0-tools)")
    return found


async def opus_packets(server_fd: int, *, bitrate: int) -> AsyncIterator[bytes]:
    """Framed Opus packets of the session's sound, until the server or the encoder ends.
    Takes ownership of `server_fd` (closed once the encoder holds it).

    Backpressure: the caller awaits each send before asking for the next packet; meanwhile the
    encoder blocks on its stdout pipe and the audio server drops what its client cannot take,
    so a slow viewer loses sound rather than growing any buffer."""
    run_as = NOBODY if os.geteuid() == 0 else None
    try:
        command = encoder_argv(find_encoder(), server_fd, bitrate, run_as)
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            pass_fds=(server_fd,),
            env={"PATH": "/usr/bin:/bin"},
        )
    finally:
        os.close(server_fd)
    assert proc.stdout is not None
    first_ts: int | None = None
    try:
        while True:
            try:
                size = struct.unpack(">H", await proc.stdout.readexactly(2))[0]
                rtp = await proc.stdout.readexactly(size)
            except asyncio.IncompleteReadError:
                return
            if size <= RTP_HEADER_BYTES:
                continue
            timestamp = struct.unpack_from(">I", rtp, 4)[0]
            if first_ts is None:
                first_ts = timestamp
            pts_us = ((timestamp - first_ts) & 0xFFFFFFFF) * 1_000_000 // SAMPLE_RATE
            header_len = RTP_HEADER_BYTES + 4 * (rtp[0] & 0x0F)
            yield frame(pts_us, rtp[header_len:])
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
