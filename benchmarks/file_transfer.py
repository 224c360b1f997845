"""File transfer through the control plane vs `cp` on the same disk, and the control plane's
memory while it streams.

Usage: python -m benchmarks.file_transfer [--mib 200] [--rounds 3] [--client direct|httpx]

Runs `streamspace server` plus a separate `streamspace agent` (local backend; the remote-agent
path: browser HTTP <-> control plane <-> dialled-back agent WebSocket <-> the session's home),
starts an xterm session, then per round: uploads a random file from disk (PUT
/files/content, streamed from the file), downloads it back to disk (GET, streamed to a file),
and copies the same file with `cp` (+ fsync, as the upload does) on the same disk. Prints the
median MB/s of each, the ratios (target >= 50 %), and the control plane's peak RSS growth over
its idle RSS during the transfers (target < 50 MiB).

The default client ("direct") moves bytes the way a browser does, without a Python HTTP stack
competing for the same two cores: uploads with `curl -T` (streamed from the file), downloads
read from the socket into a 1 MiB buffer written straight to the file (curl's own 16 KiB writes
copy a local file at ~65 % of `cp` here, which would measure curl, not the product). It also
downloads to /dev/null with curl: the path's own speed, without the client's disk.
`--client httpx` measures with httpx, streamed in 1 MiB pieces, as earlier runs did.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import httpx

from benchmarks.common import agent_process, describe_machine, login, product

CHUNK = 1024 * 1024


def server_pid(url: str) -> int:
    """The `streamspace server` process serving `url` (found by its --port argument)."""
    port = url.rsplit(":", 1)[1]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"streamspace.cli" in argv and b"server" in argv and port.encode() in argv:
                return int(entry.name)
    raise RuntimeError("cannot find the control plane's process")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Samples a process's RSS every 20 ms while running; `peak` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss(self.pid))

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while data := fh.read(CHUNK):
            yield data


def timed_cp(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


def curl_upload(url: str, token: str, path: str, src: Path) -> None:
    subprocess.run(
        ["curl", "-sS", "--fail", "-o", "/dev/null", "-T", str(src), "-H",
         f"Authorization: Bearer {token}", url + "?" + urlencode({"path": path})],
        check=True,
    )  # fmt: skip


def curl_download(url: str, token: str, path: str, dst: Path | None) -> None:
    """To /dev/null: the path's own speed, without the client's disk."""
    subprocess.run(
        ["curl", "-sS", "--fail", "-o", str(dst or "/dev/null"), "-H",
         f"Authorization: Bearer {token}", url + "?" + urlencode({"path": path})],
        check=True,
    )  # fmt: skip


def blocks_download(url: str, token: str, path: str, dst: Path) -> None:
    """To `dst` in 1 MiB writes straight from the socket (as a browser's download manager
    writes; curl's 16 KiB writes make its own file copies slower than `cp`), then fsync, as
    `cp` is measured."""
    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port, timeout=300)
    try:
        conn.request(
            "GET",
            f"{where.path}?{urlencode({'path': path})}",
            headers={"Authorization": f"Bearer {token}"},
        )
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"download answered {resp.status}")
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        with dst.open("wb", buffering=0) as out:
            while n := resp.readinto(buf):
                out.write(view[:n])
            os.fsync(out.fileno())
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=200, help="size of the file")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--client", choices=("direct", "httpx"), default="direct")
    args = ap.parse_args()
    size = args.mib * CHUNK
    print(f"machine: {describe_machine()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(
        f"file: {args.mib} MiB, {args.rounds} rounds, client {args.client}; "
        "path: server + separate local agent"
    )
    with (
        tempfile.TemporaryDirectory(prefix="ss-bench-files-") as work,
        product("server") as url,
    ):
        token = login(url)
        pid = server_pid(url)
        src = Path(work) / "src.bin"
        with src.open("wb") as fh:
            for _ in range(args.mib):
                fh.write(os.urandom(CHUNK))
        with (
            agent_process(url, token, "bench", Path(work) / "agent"),
            httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=300
            ) as c,
        ):
            sid = c.post("/api/v1/sessions", json={"template": "xterm"}).json()["id"]
            for _ in range(600):
                if c.get(f"/api/v1/sessions/{sid}").json()["state"] == "running":
                    break
                time.sleep(0.1)
            content = f"/api/v1/sessions/{sid}/files/content"
            c.put(content, params={"path": "Uploads/warm"}, content=b"warm").raise_for_status()
            idle = rss(pid)
            up, down, cp, down_null = [], [], [], []
            with PeakRSS(pid) as peak:
                for i in range(args.rounds):
                    name = f"Uploads/bench-{i}.bin"
                    dst = Path(work) / f"down-{i}.bin"
                    t0 = time.perf_counter()
                    if args.client == "direct":
                        curl_upload(url + content, token, name, src)
                    else:
                        r = c.put(content, params={"path": name}, content=chunks(src))
                        r.raise_for_status()
                    up.append(size / (time.perf_counter() - t0) / 1e6)
                    t0 = time.perf_counter()
                    if args.client == "direct":
                        blocks_download(url + content, token, name, dst)
                    else:
                        with (
                            c.stream("GET", content, params={"path": name}) as resp,
                            dst.open("wb") as out,
                        ):
                            resp.raise_for_status()
                            for data in resp.iter_raw(CHUNK):
                                out.write(data)
                            out.flush()
                            os.fsync(out.fileno())
                    down.append(size / (time.perf_counter() - t0) / 1e6)
                    if args.client == "direct":
                        t0 = time.perf_counter()
                        curl_download(url + content, token, name, None)
                        down_null.append(size / (time.perf_counter() - t0) / 1e6)
                    assert dst.stat().st_size == size, "download came back short"
                    dst.unlink()
                    copy = Path(work) / f"cp-{i}.bin"
                    cp.append(size / timed_cp(src, copy) / 1e6)
                    copy.unlink()
            c.delete(f"/api/v1/sessions/{sid}")
    cp_rate = statistics.median(cp)
    up_rate, down_rate = statistics.median(up), statistics.median(down)
    growth = (peak.peak - idle) / 2**20
    print(f"{'cp (+fsync), same disk':<32} {cp_rate:8.1f} MB/s")
    for label, rate in (("upload", up_rate), ("download", down_rate)):
        print(f"{label + ' via control plane':<32} {rate:8.1f} MB/s  {rate / cp_rate:6.0%} of cp")
    if down_null:
        rate = statistics.median(down_null)
        print(
            f"{'download to /dev/null':<32} {rate:8.1f} MB/s  {rate / cp_rate:6.0%} of cp"
            "  (the path without the client's disk)"
        )
    print(
        f"control plane RSS: idle {idle / 2**20:.0f} MiB, peak {peak.peak / 2**20:.0f} MiB, "
        f"growth {growth:.1f} MiB (target < 50 MiB)"
    )


if __name__ == "__main__":
    main()
