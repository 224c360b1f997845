"""The session's sound as Opus packets: the session's audio server -> a GStreamer encoder
subprocess -> one framed packet per viewer WebSocket message.

The session's PulseAudio (started by its init script or the image's entrypoint, as the session
user, inside its isolation) plays everything into a null sink. The backend says where it is
(`SoundServer`): an O_PATH descriptor of its native-protocol socket it checked (a socket of the
session's uid, no symlink: see `vnc.socket_handle`), which the encoder inherits and connects
through `/proc/self/fd/N`, so it needs no access to the directories on the way; or, for a pod,
its TCP address and the session's cookie, which the encoder reads from an inherited memfd
(`PULSE_COOKIE`), never from a file on disk. The encoder is `gst-launch-1.0` (Debian's
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
from collections.abc import AsyncIterator, Callable

from streamspace.agent.backends.base import SoundServer

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


def server_address(source: SoundServer) -> str:
    """PulseAudio's name for the server (pure): the inherited socket, or host:port."""
    if source.socket_fd is not None:
        return f"unix:/proc/self/fd/{source.socket_fd}"
    if not source.host or not source.port:
        raise ValueError("a sound server needs a socket or a host and port")
    host = f"[{source.host}]" if ":" in source.host else source.host
    return f"tcp:{host}:{source.port}"


def encoder_argv(gst_launch: str, server: str, bitrate: int, run_as: int | None) -> list[str]:
    """The encoder's command line (pure: the unit tests check it as data)."""
    pipeline = [
        "pulsesrc",
        f"server={server}",
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
    return gst_argv(gst_launch, pipeline, run_as)


def gst_argv(gst_launch: str, pipeline: list[str], run_as: int | None) -> list[str]:
    """`gst-launch-1.0 -q <pipeline>`, as `run_as` with no capabilities when that is set."""
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


def _memfd_with(data: bytes) -> int:
    """An anonymous in-memory file holding `data`, for a child to open by /proc/self/fd/N
    (libpulse reopens the cookie file itself, so a pipe would not do)."""
    fd = os.memfd_create("streamspace-sound-cookie", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        os.fchmod(fd, 0o600 if os.geteuid() != 0 else 0o644)
    except BaseException:
        os.close(fd)
        raise
    return fd


def find_encoder() -> str:
    found = shutil.which("gst-launch-1.0")
    if found is None:
        raise AudioUnavailable("gst-launch-1.0 is not installed (Debian: gstreamer1.0-tools)")
    return found


async def spawn_gst(
    source: SoundServer,
    pipeline: Callable[[str, int | None], list[str]],
    *,
    stdin: int,
    stdout: int,
) -> asyncio.subprocess.Process:
    """Start a GStreamer pipeline that talks to the session's sound server, as `nobody` when
    the agent is root. `pipeline(server, run_as)` gives its command line. Takes ownership of
    `source` (its descriptor is closed once the child holds it)."""
    run_as = NOBODY if os.geteuid() == 0 else None
    env = {"PATH": "/usr/bin:/bin"}
    inherited: list[int] = []
    cookie_fd: int | None = None
    try:
        if source.socket_fd is not None:
            inherited.append(source.socket_fd)
        if source.cookie:
            cookie_fd = _memfd_with(source.cookie)
            inherited.append(cookie_fd)
            env["PULSE_COOKIE"] = f"/proc/self/fd/{cookie_fd}"
        return await asyncio.create_subprocess_exec(
            *pipeline(server_address(source), run_as),
            stdin=stdin,
            stdout=stdout,
            stderr=asyncio.subprocess.DEVNULL,
            pass_fds=tuple(inherited),
            env=env,
        )
    finally:
        source.close()
        if cookie_fd is not None:
            os.close(cookie_fd)


async def opus_packets(source: SoundServer, *, bitrate: int) -> AsyncIterator[bytes]:
    """Framed Opus packets of the session's sound, until the server or the encoder ends.
    Takes ownership of `source`.

    Backpressure: the caller awaits each send before asking for the next packet; meanwhile the
    encoder blocks on its stdout pipe and the audio server drops what its client cannot take,
    so a slow viewer loses sound rather than growing any buffer."""
    gst_launch = find_encoder()
    proc = await spawn_gst(
        source,
        lambda server, run_as: encoder_argv(gst_launch, server, bitrate, run_as),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
    )
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
