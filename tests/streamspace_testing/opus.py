"""Decode the viewer's audio stream (agent/audio.py framing) and find what it plays."""

from __future__ import annotations

import av
import numpy as np

from streamspace.agent.audio import SAMPLE_RATE, unframe


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
