"""The browser's microphone into the session: framed Opus packets from the viewer's socket ->
a GStreamer decoder subprocess -> the session's virtual microphone.

The session's PulseAudio (session-init.sh, the image's entrypoint) has a second null sink,
`streamspace_mic`, whose monitor is remapped as the source `microphone`, the session's
default source: what the decoder plays into the sink is what apps inside record. The decoder
is `gst-launch-1.0` started like the sound encoder (audio.spawn_gst: as `nobody`, reaching the
server through the inherited socket or TCP address and cookie). Its stdin carries RTP with
RFC 4571 length prefixes, so packet boundaries survive the pipe: the agent wraps each Opus
packet of the browser's frames (audio.py's framing) in a 12-byte RTP header.

Backpressure: the sound is live, so a decoder that falls behind loses packets instead of
queueing them: once more than MAX_PENDING_BYTES wait in the pipe, new packets are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import struct

from streamspace.agent.audio import (
    RTP_HEADER_BYTES,
    SAMPLE_RATE,
    find_encoder,
    gst_argv,
    spawn_gst,
    unframe,
)
from streamspace.agent.backends.base import SoundServer

MIC_SINK = "streamspace_mic"
"""The null sink whose monitor is the session's `microphone` source."""
PAYLOAD_TYPE = 96
MAX_PACKET_BYTES = 4000
"""Larger than any Opus packet (RFC 6716: at most 120 ms, 1275 bytes per frame)."""
MAX_PENDING_BYTES = 16 * 1024
"""Bytes waiting for the decoder before packets are dropped: ~1 s of 96 kbit/s Opus."""


class BadFrame(ValueError):
    """A browser message that is not one framed Opus packet."""


def decoder_argv(gst_launch: str, server: str, run_as: int | None) -> list[str]:
    """The decoder's command line (pure: the unit tests check it as data).

    `sync=false`: packets are played as they come, the browser's own clock paces them; the
    sink's buffer bounds how far ahead they may get."""
    caps = f"media=audio,clock-rate={SAMPLE_RATE},encoding-name=OPUS,payload={PAYLOAD_TYPE}"
    pipeline = [
        "fdsrc",
        "fd=0",
        "!",
        f"application/x-rtp-stream,{caps}",
        "!",
        "rtpstreamdepay",
        "!",
        "rtpopusdepay",
        "!",
        "opusdec",
        "!",
        "audioconvert",
        "!",
        "audioresample",
        "!",
        "pulsesink",
        f"server={server}",
        f"device={MIC_SINK}",
        "client-name=streamspace-microphone",
        "buffer-time=40000",
        "latency-time=10000",
        "sync=false",
    ]
    return gst_argv(gst_launch, pipeline, run_as)


class RtpWrapper:
    """Opus packets with their presentation times -> RFC 4571 framed RTP (pure)."""

    def __init__(self, ssrc: int | None = None) -> None:
        self._ssrc = secrets.randbits(32) if ssrc is None else ssrc
        self._seq = 0

    def wrap(self, message: bytes) -> bytes:
        """One browser frame as a length-prefixed RTP packet; BadFrame if it is not one."""
        if len(message) < 12:
            raise BadFrame("a microphone frame is a 12-byte header and one Opus packet")
        try:
            _channels, pts_us, packet = unframe(message)
        except ValueError as exc:
            raise BadFrame(str(exc)) from None
        if not packet or len(packet) > MAX_PACKET_BYTES:
            raise BadFrame(f"an Opus packet is 1 to {MAX_PACKET_BYTES} bytes")
        timestamp = (pts_us * SAMPLE_RATE // 1_000_000) & 0xFFFFFFFF
        marker = 0x80 if self._seq == 0 else 0
        header = struct.pack(
            ">BBHII", 0x80, marker | PAYLOAD_TYPE, self._seq, timestamp, self._ssrc
        )
        self._seq = (self._seq + 1) & 0xFFFF
        rtp = header + packet
        assert len(header) == RTP_HEADER_BYTES
        return struct.pack(">H", len(rtp)) + rtp


class Microphone:
    """One browser's microphone playing into one session, for as long as its stream lasts."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self._rtp = RtpWrapper()
        self.dropped = 0

    @classmethod
    async def open(cls, source: SoundServer) -> Microphone:
        """Start the decoder; takes ownership of `source`."""
        gst_launch = find_encoder()
        proc = await spawn_gst(
            source,
            lambda server, run_as: decoder_argv(gst_launch, server, run_as),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
        )
        return cls(proc)

    @property
    def running(self) -> bool:
        return self._proc.returncode is None

    def play(self, message: bytes) -> None:
        """Queue one framed packet for the decoder, or drop it when the decoder is behind.
        BadFrame for a malformed message; BrokenPipeError once the decoder is gone."""
        packet = self._rtp.wrap(message)
        stdin = self._proc.stdin
        assert stdin is not None
        if stdin.is_closing() or not self.running:
            raise BrokenPipeError("the microphone decoder exited")
        if stdin.transport.get_write_buffer_size() > MAX_PENDING_BYTES:
            self.dropped += 1
            return
        stdin.write(packet)

    async def close(self) -> None:
        stdin = self._proc.stdin
        if stdin is not None:
            with contextlib.suppress(OSError):
                stdin.close()
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        await self._proc.wait()
