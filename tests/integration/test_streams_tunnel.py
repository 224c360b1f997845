"""The VNC tunnel: browser WebSocket -> control plane -> agent WebSocket -> session VNC socket.

The agent connects to the Unix socket its local backend keeps for the session
(`run/<session>/vnc.sock`). Putting a test server (echo, flood) at that path, with the
session's real socket moved aside, runs the complete production path - ticket, control plane,
agent subprocess, agent WebSocket, the backend's own connect - with a peer whose bytes the test
controls. The Xvnc of that session keeps running untouched; its socket is put back afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_streams_support import Desk, desk, rss_bytes, wait_until
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from conftest import wait_for
from streamspace_testing.rfb import RFBClient, RFBError
from vnc_support import short_path, vnc_clients, vnc_socket

pytestmark = pytest.mark.xvnc

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Desk]:
    with desk(tmp_path_factory.mktemp("streams-tunnel")) as shared:
        yield shared


@contextlib.asynccontextmanager
async def session_served_by(d: Desk, session_id: str, handler: Any) -> Any:
    """Serve the session's VNC socket path with `handler` (None: nothing listens there)."""
    path = vnc_socket(d.agent.state_dir, session_id)
    aside = path.with_name("vnc.sock.xvnc")
    path.rename(aside)
    server = None
    try:
        if handler is not None:
            with short_path(path) as short:
                server = await asyncio.start_unix_server(handler, path=short)
            # The agent connects only to a socket of the session's own uid.
            record = json.loads((d.agent.state_dir / "sessions" / f"{session_id}.json").read_text())
            os.chown(path, record["uid"], record["gid"], follow_symlinks=False)
        yield
    finally:
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        path.unlink(missing_ok=True)
        aside.rename(path)


class Echo:
    """Echoes everything back and hashes what it got."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.received = 0
        self.connections = 0
        self.eof = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while data := await reader.read(256 * 1024):
                self.sha.update(data)
                self.received += len(data)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.eof.set()
            writer.close()


class Flood:
    """Writes `total` bytes (a 1 MiB random block, repeated) as fast as the peer takes them."""

    def __init__(self, total: int) -> None:
        self.block = random.Random(7).randbytes(MiB)
        self.total = total
        self.sent = 0
        self.finished = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        view = memoryview(self.block)
        try:
            while self.sent < self.total:
                n = min(len(view), self.total - self.sent)
                writer.write(view[:n])
                await writer.drain()
                self.sent += n
        except ConnectionError:
            pass
        finally:
            self.finished.set()
            writer.close()


# ---- a. byte fidelity ----------------------------------------------------------------------


async def test_bytes_arrive_unmodified_both_ways(d: Desk) -> None:
    sid = d.start_session()["id"]
    rng = random.Random(20240601)
    # Edge sizes around the agent's 64 KiB read chunk and common buffer sizes, then random
    # sizes up to 1 MiB until there are at least 8 MiB.
    sizes = [0, 1, 2, 3, 7, 12, 255, 1000, 4095, 4096, 4097, 65535, 65536, 65537, MiB, 3 * MiB]
    while sum(sizes) < 8 * MiB:
        sizes.append(rng.choice([rng.randint(1, 512), rng.randint(512, 64 * 1024), MiB]))
    rng.shuffle(sizes)
    payload = rng.randbytes(sum(sizes))
    streams = d.cp.state.streams
    echo = Echo()

    async with session_served_by(d, sid, echo.handle):
        ws = await d.open_ws(sid)
        to_browser, from_browser = streams.bytes_to_browser, streams.bytes_from_browser

        async def send() -> None:
            offset = 0
            for n in sizes:
                await ws.send(payload[offset : offset + n])
                offset += n

        async def receive() -> tuple[str, int]:
            sha, got = hashlib.sha256(), 0
            while got < len(payload):
                frame = await ws.recv()
                assert isinstance(frame, bytes), "the tunnel turned binary into text"
                sha.update(frame)
                got += len(frame)
            return sha.hexdigest(), got

        started = time.monotonic()
        _, (back_sha, back_len) = await asyncio.wait_for(asyncio.gather(send(), receive()), 60)
        elapsed = time.monotonic() - started
        sent_sha = hashlib.sha256(payload).hexdigest()
        print(
            f"\necho: {len(payload) / MiB:.1f} MiB in {len(sizes)} frames, both ways in "
            f"{elapsed:.2f}s ({2 * len(payload) / MiB / elapsed:.0f} MiB/s)"
        )
        assert back_len == len(payload)  # not one byte more either
        assert echo.sha.hexdigest() == sent_sha, "browser -> session corrupted the bytes"
        assert back_sha == sent_sha, "session -> browser corrupted the bytes"
        assert echo.connections == 1
        assert streams.bytes_from_browser - from_browser == len(payload)
        assert streams.bytes_to_browser - to_browser == len(payload)

        # A text frame from the browser is delivered as its UTF-8 bytes and comes back as
        # binary (the tunnel is a byte pipe, never text).
        await ws.send("héllo, tunnel")
        back = b""
        while len(back) < len("héllo, tunnel".encode()):
            frame = await asyncio.wait_for(ws.recv(), 10)
            assert isinstance(frame, bytes)
            back += frame
        assert back == "héllo, tunnel".encode()

        # Closing the browser side closes the agent's TCP connection to the session.
        await ws.close()
        await asyncio.wait_for(echo.eof.wait(), 10)
        await wait_until(lambda: streams.active_streams == 0, 10, "the stream to close")
    d.stop_session(sid)


async def test_large_browser_frames_pass_through(d: Desk) -> None:
    """A single browser frame above 4 MiB (a big clipboard paste is one ClientCutText) arrives.

    Fails today: the control plane accepts browser frames up to uvicorn's 16 MiB but forwards
    each one as a single frame to the agent, whose stream WebSocket allows 4 MiB
    (agent.tunnel.STREAM_MAX_MESSAGE_BYTES). The agent closes with 1009 and the browser only sees a
    normal close (1000), with the bytes lost.
    """
    sid = d.start_session()["id"]
    big = random.Random(5).randbytes(6 * MiB)
    echo = Echo()
    async with session_served_by(d, sid, echo.handle):
        ws = await d.open_ws(sid)
        got = bytearray()
        try:
            await ws.send(big)
            await ws.send(b"after")
            while len(got) < len(big) + 5:
                got += await asyncio.wait_for(ws.recv(), 15)
        except ConnectionClosed as exc:
            raise AssertionError(
                f"a {len(big)} byte frame killed the stream after {len(got)} bytes came "
                f"back (close received: {exc.rcvd}); the session got {echo.received} bytes"
            ) from None
        finally:
            await ws.close()
        assert bytes(got) == big + b"after"
        await wait_until(lambda: d.cp.state.streams.active_streams == 0, 10, "close")
    d.stop_session(sid)


async def test_unreachable_session_endpoint_is_reported_to_the_browser(d: Desk) -> None:
    """When the agent cannot reach the session's VNC server the browser is told so.

    Fails today: the agent dials the stream WebSocket *before* the TCP connection, so by the
    time it reports StreamFailed the control plane has already paired the sockets and
    `StreamBroker.agent_failed` does nothing; the agent then closes its side with 1011 and a
    reason, and `_pump_pair` closes the browser with a plain 1000 (OK) and no reason - exactly
    what a normal end of session looks like.
    """
    sid = d.start_session()["id"]
    async with session_served_by(d, sid, None):
        ws = await d.open_ws(sid)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 15)
    await wait_until(lambda: d.cp.state.streams.active_streams == 0, 10, "close")
    assert not d.cp.state.streams._pending
    d.stop_session(sid)
    rcvd = closed.value.rcvd
    assert rcvd is not None
    assert rcvd.code != 1000 and "cannot connect" in rcvd.reason, (
        f"browser got close {rcvd.code} {rcvd.reason!r} for an unreachable session"
    )


# ---- b. a stalled reader ---------------------------------------------------------------------


async def test_stalled_reader_does_not_grow_control_plane_memory(d: Desk) -> None:
    """Flow control holds end to end while the browser does not read.

    Bound asserted: while the reader is stalled, `bytes_to_browser` (bytes the control plane
    handed to the browser socket) must level off (< 2 MiB more between 2 s and 5 s) below
    20 MiB, the flood server must be pushed back (< 64 MiB of its 200 MiB written), and the
    test process RSS - the control plane runs in this process - may grow by at most 64 MiB.
    Why 20 MiB: in user space each hop holds one frame (<= 64 KiB) plus asyncio's 64 KiB write
    high-water mark, but bytes the control plane has written can still sit in the kernel: the
    browser connection's send buffer (autotuned up to tcp_wmem max, 4 MiB by default), the
    client's receive buffer (autotuned with the reader's consumption, so small for a reader that
    stopped; its hard cap tcp_rmem max is 6-32 MiB depending on the distribution), and the
    websockets client's own queue (16 frames, ~1 MiB) before it stops reading. Measured here:
    7-11 MiB. 20 MiB leaves margin and is an order of magnitude below the flood; an unbounded
    buffer anywhere in the control plane would show the whole flood within the 5 s.
    """
    sid = d.start_session()["id"]
    flood = Flood(200 * MiB)
    streams = d.cp.state.streams
    async with session_served_by(d, sid, flood.handle):
        gc.collect()
        rss_before = rss_bytes()
        base = streams.bytes_to_browser
        ws = await d.open_ws(sid)
        try:
            await wait_until(lambda: streams.bytes_to_browser > base, 10, "data to flow")

            samples: list[tuple[float, int, int, int]] = []
            started = time.monotonic()
            while (t := time.monotonic() - started) < 5:
                samples.append((t, streams.bytes_to_browser - base, rss_bytes(), flood.sent))
                await asyncio.sleep(0.25)
            _, stalled_bytes, _, stalled_sent = samples[-1]
            at_2s = next(s for s in samples if s[0] >= 2.0)
            peak_rss = max(s[2] for s in samples)
            print(
                f"\nstall: to_browser={stalled_bytes / MiB:.2f} MiB "
                f"(at 2s {at_2s[1] / MiB:.2f} MiB), flood sent={stalled_sent / MiB:.2f} MiB, "
                f"rss before={rss_before / MiB:.1f} MiB peak={peak_rss / MiB:.1f} MiB "
                f"(+{(peak_rss - rss_before) / MiB:.1f} MiB)"
            )
            assert stalled_bytes < 20 * MiB, f"control plane kept sending: {stalled_bytes}"
            assert stalled_bytes - at_2s[1] < 2 * MiB, "bytes_to_browser kept growing"
            assert stalled_sent < 64 * MiB, "the flood was never pushed back"
            assert not flood.finished.is_set()
            assert peak_rss - rss_before < 64 * MiB, f"RSS grew by {peak_rss - rss_before}"

            # Resume: everything arrives, in order, with nothing lost during the stall.
            received = 0
            block, size = flood.block, len(flood.block)
            resumed = time.monotonic()
            with contextlib.suppress(ConnectionClosed):
                while received < flood.total:
                    frame = await asyncio.wait_for(ws.recv(), 15)
                    assert isinstance(frame, bytes)
                    pos = 0
                    while pos < len(frame):
                        at = (received + pos) % size
                        n = min(size - at, len(frame) - pos)
                        if frame[pos : pos + n] != block[at : at + n]:
                            raise AssertionError(f"stream corrupted near byte {received + pos}")
                        pos += n
                    received += len(frame)
            print(
                f"resume: {received / MiB:.0f} MiB in {time.monotonic() - resumed:.2f}s, "
                f"rss after={rss_bytes() / MiB:.1f} MiB"
            )
            assert received == flood.total
            # Counted once a send returns, which can be after the browser has the bytes.
            await wait_until(
                lambda: streams.bytes_to_browser - base == flood.total, 5, "the byte counter"
            )
            # The flood server closing its socket ends the stream all the way to the browser.
            with contextlib.suppress(ConnectionClosed):
                extra = await asyncio.wait_for(ws.recv(), 10)
                raise AssertionError(f"unexpected bytes after the end: {len(extra)}")
            await wait_until(lambda: streams.active_streams == 0, 10, "the stream to close")
        finally:
            # A failed bound must not leave its stream to the tests after it.
            await ws.close()
    d.stop_session(sid)


# ---- c. several viewers, closing ---------------------------------------------------------------


async def test_several_viewers_share_a_session_and_close_cleanly(d: Desk) -> None:
    sid = d.start_session()["id"]
    streams = d.cp.state.streams
    closed_before = d.agent_log_count("event=stream_closed")
    assert vnc_clients(sid) == 0

    viewers = [await d.open_viewer(sid) for _ in range(3)]
    try:
        await wait_until(lambda: streams.active_streams == 3, 10, "3 streams")
        await wait_until(lambda: vnc_clients(sid) == 3, 10, "3 agent VNC connections")
        for v in viewers:
            await v.request_update(incremental=False)
            assert await v.wait_for(RFBClient.framebuffer_nonblank, timeout=15)
        # Typing through one viewer changes what the others see.
        digests = [v.framebuffer_digest() for v in viewers]
        await viewers[0].pointer(20, 20)
        await viewers[0].type_text("echo typed-by-viewer-zero\n")
        for v, before in zip(viewers[1:], digests[1:], strict=True):
            assert await v.wait_for_change(before, timeout=10), "other viewer saw no change"
        assert await viewers[0].wait_for_change(digests[0], timeout=10)

        # Closing one browser side closes that stream's agent side, and only that one.
        await viewers[0].close()
        await wait_until(lambda: streams.active_streams == 2, 10, "2 streams")
        await wait_until(lambda: vnc_clients(sid) == 2, 10, "agent VNC connection to close")
        await asyncio.to_thread(
            wait_for,
            lambda: d.agent_log_count("event=stream_closed") == closed_before + 1,
            10,
            0.1,
            "the agent to log stream_closed",
        )
        await viewers[1].request_update(incremental=False)  # the others still work
        await viewers[2].request_update(incremental=False)

        # Stopping the session closes the viewers still open.
        await asyncio.to_thread(d.stop_session, sid)

        async def closed(v: RFBClient) -> None:
            with pytest.raises((RFBError, ConnectionClosed)):
                for _ in range(50):
                    await v.request_update(incremental=True, timeout=10)

        await asyncio.wait_for(asyncio.gather(*(closed(v) for v in viewers[1:])), 20)
        for v in viewers[1:]:
            ws = v.transport._ws  # type: ignore[attr-defined]
            await asyncio.wait_for(ws.wait_closed(), 10)
        await wait_until(
            lambda: streams.active_streams == 0 and not streams._pending, 10, "streams to close"
        )
        assert vnc_clients(sid) == 0
    finally:
        for v in viewers:
            await v.close()


# ---- d. many concurrent streams ------------------------------------------------------------------


async def test_twenty_concurrent_streams(d: Desk, caplog: pytest.LogCaptureFixture) -> None:
    """20 streams open at once through one control plane, each moving 3 full frames.

    The streams are *opened* one after another and only then driven concurrently: opening
    many at the same instant trips TigerVNC's per-host blacklist (every viewer reaches Xvnc
    from the agent's 127.0.0.1), which is a separate bug with its own test below.
    """
    caplog.set_level(logging.INFO, logger="streamspace.streams")
    sessions = [d.start_session()["id"] for _ in range(2)]
    streams = d.cp.state.streams
    failed_before = d.agent_log_count("event=stream_failed")
    n = 20
    viewers: list[RFBClient] = []
    try:
        for i in range(n):
            viewers.append(await d.open_viewer(sessions[i % 2], timeout=30))
        assert streams.active_streams == n
        for v in viewers[:2]:  # one per session: the xterm has drawn itself
            await v.request_update(incremental=False)
            assert await v.wait_for(RFBClient.framebuffer_nonblank, timeout=15)

        async def drive(client: RFBClient) -> int:
            total = 0
            for _ in range(3):
                stats = await client.request_update(incremental=False, timeout=30)
                assert stats.pixels == client.width * client.height
                total += stats.bytes_received
            assert client.framebuffer_nonblank()
            return total

        started = time.monotonic()
        moved = await asyncio.wait_for(asyncio.gather(*(drive(v) for v in viewers)), 120)
        elapsed = time.monotonic() - started
        print(f"\n{n} streams x 3 full updates: {sum(moved) / MiB:.0f} MiB in {elapsed:.2f}s")
        assert streams.active_streams == n
        assert len({v.framebuffer_digest() for v in viewers[0::2]}) == 1  # same session, same image
    finally:
        for v in viewers:
            await v.close()
    # active_streams drops before the sockets finish closing; the pending entry goes after.
    await wait_until(
        lambda: streams.active_streams == 0 and not streams._pending, 15, "all streams to close"
    )
    opens = [r for r in caplog.records if r.getMessage().startswith("stream_open ")]
    closes = [r for r in caplog.records if r.getMessage().startswith("stream_closed ")]
    assert len(opens) == n and len(closes) == n
    problems = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("streamspace")
    ]
    assert problems == []
    assert d.agent_log_count("event=stream_failed") == failed_before
    for sid in sessions:
        d.stop_session(sid)


class BufferedWS:
    """An RFB `Transport` over a client WebSocket that can wait for the server's first bytes."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.buf = bytearray()

    async def fill(self) -> None:
        try:
            frame = await self.ws.recv()
        except ConnectionClosed as exc:
            raise RFBError(f"stream closed: {exc}") from exc
        self.buf += frame if isinstance(frame, bytes) else frame.encode()

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self.fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def write(self, data: bytes) -> None:
        await self.ws.send(data)

    async def close(self) -> None:
        await self.ws.close()


async def test_simultaneous_viewers_of_one_session(d: Desk) -> None:
    """Six viewers connecting at the same moment to one session all get a picture.

    "The same moment" is made deterministic: every viewer opens its stream and waits for the
    server's first bytes (so Xvnc has accepted all six connections) before any of them answers
    the RFB handshake - what six browsers a few tens of milliseconds of network away do anyway.

    Fails today: the local backend starts Xvnc with TigerVNC's default per-host blacklist
    (BlacklistThreshold=5, BlacklistTimeout=10 s, doubling on repeat). Every viewer reaches Xvnc
    from the agent, i.e. from 127.0.0.1, and TigerVNC black-marks each connection until it has
    authenticated (the backend's own readiness probe leaves a mark too), so the fifth
    simultaneous viewer and all further ones are refused with "Too many security failures".
    Suggested fix: pass `-UseBlacklist 0` to Xvnc (LocalBackend._spawn_xvnc and
    images/base/entrypoint.sh); access control is the control plane's stream ticket.
    """
    sid = d.start_session()["id"]
    streams = d.cp.state.streams
    tickets = [d.connect(sid)["ticket"] for _ in range(6)]

    async def open_until_first_bytes(ticket: str) -> BufferedWS:
        ws = await connect(
            d.ws_url(ticket),
            subprotocols=["binary"],  # type: ignore[list-item]
            max_size=None,
            compression=None,
            open_timeout=20,
        )
        transport = BufferedWS(ws)
        await asyncio.wait_for(transport.fill(), 20)  # Xvnc accepted and sent its banner
        return transport

    async def finish(transport: BufferedWS) -> str:
        try:
            async with asyncio.timeout(20):
                client = await RFBClient.over(transport)
            await client.request_update(incremental=False, timeout=20)
            nonblank = await client.wait_for(RFBClient.framebuffer_nonblank, timeout=15)
            await client.close()
            return "ok" if nonblank else "blank framebuffer"
        except (RFBError, TimeoutError) as exc:
            await transport.close()
            return repr(exc)
        except ConnectionClosed:
            # Refused so early that the stream closed before our reply; show what came.
            return f"stream closed during the handshake after {bytes(transport.buf)!r}"

    transports = await asyncio.gather(*(open_until_first_bytes(t) for t in tickets))
    results = await asyncio.gather(*(finish(t) for t in transports))
    await wait_until(lambda: streams.active_streams == 0, 15, "all streams to close")
    d.stop_session(sid)
    failures = [r for r in results if r != "ok"]
    assert not failures, (
        f"{len(failures)} of {len(tickets)} simultaneous viewers failed: {failures}"
    )
