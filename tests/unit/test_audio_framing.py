"""The audio stream's wire framing and the encoder's command line, as data."""

from __future__ import annotations

import pytest

from streamspace.agent import audio
from streamspace.agent.backends.base import SoundServer
from streamspace.protocol import OpenStream


def test_a_frame_round_trips_and_carries_its_header() -> None:
    message = audio.frame(1_234_567, b"\xfc\x01\x02", channels=2)
    assert len(message) == audio.HEADER.size + 3 == 15
    assert message[:2] == b"\x01\x02"
    assert audio.unframe(message) == (2, 1_234_567, b"\xfc\x01\x02")


def test_an_unknown_frame_version_is_refused() -> None:
    with pytest.raises(ValueError, match="version 7"):
        audio.unframe(b"\x07" + bytes(11) + b"x")


def test_the_encoder_drops_to_the_given_uid_and_reads_the_inherited_socket() -> None:
    server = audio.server_address(SoundServer(socket_fd=5))
    argv = audio.encoder_argv("/usr/bin/gst-launch-1.0", server, 96_000, run_as=65534)
    assert argv[0] == "setpriv" and "--reuid=65534" in argv and "--no-new-privs" in argv
    assert "server=unix:/proc/self/fd/5" in argv
    assert f"device={audio.SINK_MONITOR}" in argv
    assert "opusenc" in argv and "rtpstreampay" in argv
    unprivileged = audio.encoder_argv("/usr/bin/gst-launch-1.0", server, 96_000, run_as=None)
    assert unprivileged[0] == "/usr/bin/gst-launch-1.0"


def test_a_pod_sound_server_is_named_by_its_address() -> None:
    assert audio.server_address(SoundServer(host="10.244.1.7", port=4713)) == "tcp:10.244.1.7:4713"
    assert audio.server_address(SoundServer(host="fd00::7", port=4713)) == "tcp:[fd00::7]:4713"
    with pytest.raises(ValueError):
        audio.server_address(SoundServer(host="10.244.1.7"))


def test_open_stream_defaults_to_vnc_and_accepts_audio() -> None:
    base = {"stream_id": "s", "session_id": "x", "path": "/p"}
    assert OpenStream.model_validate(base).purpose == "vnc"
    assert OpenStream.model_validate({**base, "purpose": "audio"}).purpose == "audio"
    with pytest.raises(ValueError):
        OpenStream.model_validate({**base, "purpose": "shell"})
