"""Viewer streams: OpenStream -> the backend's connection to the session's VNC server (or, for
purpose "audio", its sound encoded as Opus: agent/audio.py; for "microphone", a decoder into its
microphone: agent/microphone.py) -> a fresh binary WebSocket dialled back to the control plane,
bytes pumped both ways (audio and microphone: one way each)."""

from __future__ import annotations

import asyncio
import contextlib

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from streamspace import logs
from streamspace.agent import audio, snapshot
from streamspace.agent.backends.base import Backend, BackendError, SoundServer, VNCStream
from streamspace.agent.enrolment import Enrolment
from streamspace.agent.files import FileStreams
from streamspace.agent.microphone import BadFrame, Microphone
from streamspace.agent.outbox import Outbox
from streamspace.agent.server import Server
from streamspace.agent.vnc import ByteStreamReader, ByteStreamWriter
from streamspace.protocol import THUMBNAIL_WIDTH, OpenStream, StreamFailed

log = logs.get_logger(__name__)

STREAM_CHUNK_BYTES = 1024 * 1024
STREAM_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class StreamTunnel:
    def __init__(
        self,
        *,
        backend: Backend,
        server: Server,
        identity: Enrolment,
        outbox: Outbox,
        connect_timeout: float,
    ) -> None:
        self._backend = backend
        self._server = server
        self._identity = identity
        self._outbox = outbox
        self._connect_timeout = connect_timeout
        self._files = FileStreams(backend=backend, identity=identity)

    async def open_session(self, session_id: str) -> VNCStream:
        """A connection to a session's VNC server for one viewer, through the backend (which
        knows where the server is and holds its per-session secret)."""
        log.event("vnc_open", agent_id=self._identity.agent_id, session_id=session_id)
        try:
            return await self._backend.open_vnc(session_id, connect_timeout=self._connect_timeout)
        except BackendError as exc:
            raise ConnectionError(str(exc)) from exc

    async def thumbnail(self, session_id: str) -> bytes:
        """A small JPEG of the session's screen (see snapshot), taken over a connection of its
        own to the session's VNC server."""
        reader, writer = await self.open_session(session_id)
        return await snapshot.thumbnail(
            reader, writer, max_width=THUMBNAIL_WIDTH, within=self._connect_timeout
        )

    def _url(self, msg: OpenStream) -> str | None:
        if not msg.path.startswith("/"):
            self._failed(msg, f"invalid stream path {msg.path!r}")
            return None
        url = (msg.base_url.rstrip("/") or self._server.ws_base) + msg.path
        if not url.startswith(("ws://", "wss://")):
            self._failed(msg, f"invalid stream base URL {msg.base_url!r}")
            return None
        return url

    async def _dial(
        self, msg: OpenStream, url: str, max_queue: int = 16
    ) -> ClientConnection | None:
        """The stream's WebSocket back to the control plane, or None once the failure is
        reported (`max_queue`: frames received ahead of the reader)."""
        try:
            return await self._server.dial(
                url,
                self._identity.credential,
                compression=None,
                max_size=STREAM_MAX_MESSAGE_BYTES,
                max_queue=max_queue,
            )
        except (OSError, InvalidHandshake, InvalidURI) as exc:
            self._failed(msg, f"cannot dial the stream websocket: {exc}")
            return None

    async def run(self, msg: OpenStream) -> None:
        """Serve one dialled-back stream: a viewer's tunnel or sound, one thumbnail, or a file
        operation."""
        if msg.purpose == "thumbnail":
            await self._send_thumbnail(msg)
        else:
            await self._tunnel(msg)

    async def _send_thumbnail(self, msg: OpenStream) -> None:
        """Take the picture first (a failure reaches the control plane as stream_failed, with
        the reason), then dial back and send it as one binary frame."""
        url = self._url(msg)
        if url is None:
            return
        try:
            image = await self.thumbnail(msg.session_id)
        except (OSError, TimeoutError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            self._failed(msg, f"cannot take a thumbnail: {reason}")
            return
        ws = await self._dial(msg, url)
        if ws is None:
            return
        try:
            await ws.send(image)
        except ConnectionClosed:
            pass
        finally:
            await ws.close()
        log.event(
            "thumbnail_sent",
            agent_id=self._identity.agent_id,
            session_id=msg.session_id,
            bytes=len(image),
        )

    async def _tunnel(self, msg: OpenStream) -> None:
        """Bridge one viewer: a fresh binary WebSocket to the control plane <-> the RFB port."""
        url = self._url(msg)
        if url is None:
            return
        if msg.purpose in ("audio", "microphone"):
            await self._run_sound(msg, url)
            return
        if msg.purpose != "vnc":
            await self._run_files(msg, url)
            return
        try:
            reader, writer = await self.open_session(msg.session_id)
        except (OSError, TimeoutError) as exc:
            # Before dialling back, so the viewer gets the reason instead of a bare close.
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            self._failed(msg, f"cannot connect to the session: {reason}")
            return
        ws = await self._dial(msg, url)
        if ws is None:
            writer.close()
            return
        fields = {
            "agent_id": self._identity.agent_id,
            "stream_id": msg.stream_id,
            "session_id": msg.session_id,
        }
        try:
            log.event("stream_open", **fields)
            try:
                await _pump(ws, reader, writer)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            log.event("stream_closed", **fields)
        finally:
            await ws.close()

    async def _run_files(self, msg: OpenStream, url: str) -> None:
        """A file operation on the session's home (agent/files.py); refusals travel on the
        stream itself, so only a failed dial is a StreamFailed."""
        ws = await self._dial(msg, url, max_queue=4)
        if ws is None:
            return
        try:
            await self._files.serve(msg, ws)
        finally:
            await ws.close()

    async def _run_sound(self, msg: OpenStream, url: str) -> None:
        """Through the session's sound server: its sound to one listener (`audio`, one framed
        Opus packet per message), or one browser's microphone into its `microphone` source."""
        try:
            audio.find_encoder()
            source = await self._backend.open_audio(msg.session_id)
        except (BackendError, audio.AudioUnavailable) as exc:
            self._failed(msg, str(exc))
            return
        ws = await self._dial(msg, url)
        if ws is None:
            source.close()
            return
        fields = {
            "agent_id": self._identity.agent_id,
            "stream_id": msg.stream_id,
            "session_id": msg.session_id,
            "purpose": msg.purpose,
        }
        log.event("stream_open", **fields)
        counts: dict[str, int] = {}
        try:
            if msg.purpose == "audio":
                await _pump_audio(ws, source)
            else:
                mic = await Microphone.open(source)
                try:
                    await _pump_microphone(ws, mic)
                finally:
                    counts["dropped_packets"] = mic.dropped
                    await mic.close()
        finally:
            await ws.close()
            log.event("stream_closed", **fields, **counts)

    def _failed(self, msg: OpenStream, error: str) -> None:
        log.warning(
            "stream_failed",
            agent_id=self._identity.agent_id,
            stream_id=msg.stream_id,
            session_id=msg.session_id,
            error=error,
        )
        self._outbox.send_if_connected(StreamFailed(stream_id=msg.stream_id, error=error))


async def _pump(ws: ClientConnection, reader: ByteStreamReader, writer: ByteStreamWriter) -> None:
    """Copy bytes both ways until either side closes.

    Each direction awaits its sink (`drain`, `ws.send`) before reading more, so memory stays
    bounded by one chunk plus the transports' own buffers whatever the speed mismatch.
    """

    async def ws_to_tcp() -> None:
        async for data in ws:
            if isinstance(data, str):
                await ws.close(code=1003, reason="stream websockets carry binary frames only")
                return
            writer.write(data)
            await writer.drain()

    async def tcp_to_ws() -> None:
        while data := await reader.read(STREAM_CHUNK_BYTES):
            await ws.send(data)

    await _until_one_ends(
        asyncio.create_task(ws_to_tcp(), name="stream-ws-to-tcp"),
        asyncio.create_task(tcp_to_ws(), name="stream-tcp-to-ws"),
    )


async def _pump_audio(ws: ClientConnection, source: SoundServer) -> None:
    """Packets to the viewer until it leaves (anything it sends is ignored) or the session's
    sound server goes; each send is awaited before the next packet is read (backpressure)."""

    async def send() -> None:
        async for packet in audio.opus_packets(source, bitrate=audio.BITRATE):
            await ws.send(packet)

    async def drain() -> None:
        async for _ in ws:
            pass

    await _until_one_ends(
        asyncio.create_task(send(), name="audio-to-ws"),
        asyncio.create_task(drain(), name="audio-ws-drain"),
    )


async def _pump_microphone(ws: ClientConnection, mic: Microphone) -> None:
    """The browser's packets into the decoder until either side ends; a message that is not a
    framed Opus packet ends the stream with the reason."""
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            if isinstance(message, str):
                await ws.close(code=1003, reason="microphone streams carry binary frames only")
                return
            try:
                mic.play(message)
            except BadFrame as exc:
                await ws.close(code=1007, reason=str(exc)[:120])
                return
            except (BrokenPipeError, ConnectionResetError):
                await ws.close(code=1011, reason="the session's microphone went away")
                return


async def _until_one_ends(*tasks: asyncio.Task[None]) -> None:
    """Both directions of a stream until one ends (a side closed); the other is cancelled. A
    closed connection is how streams end; anything else is re-raised."""
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for outcome in results:
        if isinstance(outcome, Exception) and not isinstance(outcome, ConnectionClosed | OSError):
            raise outcome
