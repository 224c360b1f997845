"""Decode the viewer's audio stream (agent/audio.py framing) and find what it plays."""

from __future__ import annotations

import asyncio

import av
import numpy as np
from websockets.asyncio.client import connect

from streamspace.agent.audio import SAMPLE_RATE, unframe
from streamspace.agent.audio import frame as audio_frame


def tone_template(
    name: str, display_name: str, hz: int, width: int, height: int
) -> dict[str, object]:
    """A catalog template whose app plays a steady sine of `hz` into the session's sound server."""
    return {
        "name": name,
        "display_name": display_name,
        "category": "Test",
        "resources": {"cpu_millis": 200, "memory_mb": 128},
        "display": {"width": width, "height": height, "depth": 24},
        "launch": {
            "local": {
                "command": [
                    "gst-launch-1.0", "-q", "audiotestsrc", f"freq={hz}", "volume=0.5",
                    "is-live=true", "!", "pulsesink",
                ]
            }
        },
    }  # fmt: skip


class OpusListener:
    """Opus packets in, mono float samples out (PyAV's libopus decoder)."""

    def __init__(self) -> None:
        self._codec = av.CodecContext.create("libopus", "r")
        self._codec.sample_rate = SAMPLE_RATE
        self._codec.layout = "stereo"

    def decode(self, message: bytes) -> np.ndarray:
        _channels, _pts, packet = unframe(message)
        chunks = []
        for frame in self._codec.decode(av.Packet(packet)):
            samples = frame.to_ndarray().astype(np.float64)
            if frame.format.is_planar:
                chunks.append(samples.mean(axis=0))
            else:
                chunks.append(samples.reshape(-1, len(frame.layout.channels)).mean(axis=1))
        return np.concatenate(chunks) if chunks else np.zeros(0)


def dominant_frequency(samples: np.ndarray) -> float:
    windowed = samples * np.hanning(len(samples))
    spectrum = np.abs(np.fft.rfft(windowed))
    spectrum[0] = 0
    return float(np.fft.rfftfreq(len(samples), 1 / SAMPLE_RATE)[int(np.argmax(spectrum))])


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples**2))) if len(samples) else 0.0


async def listen(url: str, seconds: float) -> np.ndarray:
    """Decode `seconds` of sound from an audio stream socket (ticket in `url`)."""
    decoder = OpusListener()
    samples: list[np.ndarray] = []
    async with connect(url, max_size=None, compression=None, open_timeout=20) as ws:
        async with asyncio.timeout(seconds + 20):
            decoded = 0
            while decoded < seconds * SAMPLE_RATE:
                message = await ws.recv()
                assert isinstance(message, bytes)
                chunk = decoder.decode(message)
                decoded += len(chunk)
                samples.append(chunk)
    return np.concatenate(samples)


def pacat_tone_command(hz: int) -> list[str]:
    """A container app that plays a square wave of `hz` (its fundamental dominates) with
    `pacat`, for images that have PulseAudio's tools but no GStreamer: one period of 48 kHz
    s16le stereo frames (±0x2000) written by printf in a loop. `hz` must divide 24 kHz."""
    half = SAMPLE_RATE // hz // 2
    if half * 2 * hz != SAMPLE_RATE:
        raise ValueError(f"{hz} Hz is not a whole number of samples at {SAMPLE_RATE} Hz")
    period = r"\000\040\000\040" * half + r"\000\340\000\340" * half
    play = "pacat --playback --raw --format=s16le --rate=48000 --channels=2 --latency-msec=30"
    return ["sh", "-c", f"while :; do printf '{period}'; done | {play}"]


def tone_frames(hz: int, seconds: float, frame_ms: int = 20) -> list[bytes]:
    """`seconds` of a mono sine of `hz` as framed Opus packets (agent/audio.py framing), as a
    browser's microphone sends them: libopus through PyAV."""
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate = SAMPLE_RATE
    encoder.layout = "mono"
    encoder.format = "s16"
    encoder.options = {"frame_duration": str(frame_ms)}
    size = SAMPLE_RATE * frame_ms // 1000
    frames: list[bytes] = []
    for i in range(int(seconds * 1000 / frame_ms)):
        t = np.arange(i * size, (i + 1) * size) / SAMPLE_RATE
        pcm = (0.5 * np.sin(2 * np.pi * hz * t) * 32767).astype(np.int16).reshape(1, -1)
        chunk = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        chunk.sample_rate = SAMPLE_RATE
        chunk.pts = i * size
        for packet in encoder.encode(chunk):
            frames.append(audio_frame(len(frames) * frame_ms * 1000, bytes(packet), channels=1))
    return frames


async def speak(url: str, frames: list[bytes], frame_ms: int = 20) -> None:
    """Send the frames at the pace a microphone makes them, then close."""
    async with connect(url, open_timeout=20, compression=None) as ws:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, message in enumerate(frames):
            await ws.send(message)
            await asyncio.sleep(max(0.0, start + (i + 1) * frame_ms / 1000 - loop.time()))


def mic_loopback_command() -> list[str]:
    """A container app that plays back what it records from the session's default source
    (`parec | pacat`): the browser's microphone comes back on the session's sound."""
    raw = "--raw --format=s16le --rate=48000 --channels=2"
    return ["sh", "-c", f"parec {raw} --latency-msec=20 | pacat --playback {raw} --latency-msec=30"]


async def round_trip(mic_url: str, audio_url: str, hz: int) -> np.ndarray:
    """Send 4 s of a tone to a microphone socket while decoding 3 s of the sound socket."""
    _, samples = await asyncio.gather(speak(mic_url, tone_frames(hz, 4.0)), listen(audio_url, 3.0))
    return samples


def pacat_tone_template(name: str, backend: str, hz: int) -> dict[str, object]:
    """A catalog template for an image backend (docker, kubernetes) whose app plays a square
    wave of `hz` with pacat, in the xterm image."""
    return {
        "name": name,
        "display_name": f"Tone ({backend} audio test)",
        "category": "Test",
        "resources": {"cpu_millis": 250, "memory_mb": 256},
        "display": {"width": 320, "height": 240, "depth": 24},
        "launch": {
            backend: {
                "image": "localhost/streamspace/xterm:latest",
                "command": pacat_tone_command(hz),
            }
        },
    }
