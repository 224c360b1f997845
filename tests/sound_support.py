"""Sound inside a real session, observed from the outside: what its apps would record."""

from __future__ import annotations

import subprocess
import threading

import numpy as np

from vnc_support import in_session, xvnc_processes


class Recorder:
    """`parec` from the session's default source (its `microphone`), run inside the session as
    its user, like any app that records; `stop()` gives the mono samples it heard."""

    def __init__(self, session_id: str) -> None:
        (xvnc,) = xvnc_processes(session_id)
        server = xvnc.environ()["PULSE_SERVER"]
        self.proc: subprocess.Popen[bytes] = in_session(
            session_id, "env", f"PULSE_SERVER={server}", "parec", "--raw",
            "--format=s16le", "--rate=48000", "--channels=1", "--latency-msec=20",
        )  # fmt: skip
        self.chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(65536):
            self.chunks.append(chunk)

    def stop(self) -> np.ndarray:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        data = b"".join(self.chunks)
        return np.frombuffer(data[: len(data) // 2 * 2], np.int16).astype(np.float64) / 32768
