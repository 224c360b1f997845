"""The microphone stream's RTP wrapping and the decoder's command line, as data."""

from __future__ import annotations

import asyncio
import struct

import pytest

from streamspace.agent import audio, microphone


def test_each_browser_frame_becomes_one_length_prefixed_rtp_packet() -> None:
    rtp = microphone.RtpWrapper(ssrc=0xCAFE)
    first = rtp.wrap(audio.frame(0, b"\xfc\x01", channels=1))
    second = rtp.wrap(audio.frame(20_000, b"\xfc\x02", channels=1))
    assert struct.unpack(">H", first[:2])[0] == len(first) - 2 == 12 + 2
    version, marker_pt, seq, ts, ssrc = struct.unpack(">BBHII", first[2:14])
    assert (version, marker_pt, seq, ts, ssrc) == (0x80, 0x80 | 96, 0, 0, 0xCAFE)
    assert first[14:] == b"\xfc\x01"
    _v, marker_pt, seq, ts, _s = struct.unpack(">BBHII", second[2:14])
    assert (marker_pt, seq, ts) == (96, 1, 960)  # 20 ms at 48 kHz


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (b"\x01\x01", "12-byte header"),
        (b"\x07" + bytes(11) + b"x", "version 7"),
        (audio.frame(0, b""), "1 to 4000 bytes"),
        (audio.frame(0, bytes(4001)), "1 to 4000 bytes"),
    ],
)
def test_what_is_not_one_framed_opus_packet_is_refused(message: bytes, why: str) -> None:
    with pytest.raises(microphone.BadFrame, match=why):
        microphone.RtpWrapper().wrap(message)


def test_the_decoder_plays_into_the_microphone_sink_as_the_given_uid() -> None:
    argv = microphone.decoder_argv("/usr/bin/gst-launch-1.0", "unix:/proc/self/fd/5", 65534)
    assert argv[0] == "setpriv" and "--reuid=65534" in argv and "--no-new-privs" in argv
    assert "fdsrc" in argv and "rtpstreamdepay" in argv and "opusdec" in argv
    assert "server=unix:/proc/self/fd/5" in argv and f"device={microphone.MIC_SINK}" in argv


async def test_a_decoder_that_does_not_keep_up_loses_packets_not_memory() -> None:
    """A child that never reads its stdin (a stalled decoder): the pipe fills, then packets
    are dropped and what waits in the agent stays under MAX_PENDING_BYTES plus one packet."""
    proc = await asyncio.create_subprocess_exec(
        "sleep", "60", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL
    )
    mic = microphone.Microphone(proc)
    packet = audio.frame(0, bytes(1000), channels=1)
    try:
        for _ in range(500):  # ~0.5 MB: beyond any pipe buffer plus the agent's bound
            mic.play(packet)
            await asyncio.sleep(0)
        assert proc.stdin is not None
        pending = proc.stdin.transport.get_write_buffer_size()
        assert mic.dropped > 0
        assert pending <= microphone.MAX_PENDING_BYTES + len(packet) + 14
    finally:
        await mic.close()
    with pytest.raises(BrokenPipeError):
        mic.play(packet)
