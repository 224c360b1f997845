"""A real Kubernetes API server for tests: etcd + kube-apiserver on loopback, as envtest runs them.

No kubelet, scheduler or controller-manager runs, so objects are stored, validated, admitted and
authorized exactly as in a cluster, but nothing acts on them (no pod starts, no namespace's
`default` ServiceAccount appears). The binaries come from scripts/kube-test-binaries.sh, which
builds them once per version into a cache outside the tree.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "kube-test-binaries.sh"
ADMIN_USER = "streamspace-test-admin"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
READY_TIMEOUT = 90.0


def kube_binaries() -> Path:
    """The directory holding kube-apiserver and etcd, building them first when they are missing."""
    done = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=True
    )
    return Path(done.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_service_account_keys(directory: Path) -> tuple[Path, Path]:
    """A fresh RSA key pair per server: tokens minted by one test run never verify on another."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = directory / "sa.key"
    public = directory / "sa.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    private.chmod(0o600)
    return private, public


@dataclass
class KubeAPIServer:
    """What a test needs to talk to the server: its URL, an admin token and the CA to trust."""

    url: str
    admin_token: str
    ca_path: Path
    data_dir: Path
    etcd_url: str = ""
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)
    _logs: list[IO[bytes]] = field(default_factory=list, repr=False)

    def write_kubeconfig(self, path: Path, token: str | None = None, namespace: str = "") -> Path:
        """A kubeconfig for this server as `token`'s bearer (the admin's when not given)."""
        context: dict[str, str] = {"cluster": "test", "user": "test"}
        if namespace:
            context["namespace"] = namespace
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_path)},
                }
            ],
            "users": [{"name": "test", "user": {"token": token or self.admin_token}}],
            "contexts": [{"name": "test", "context": context}],
            "current-context": "test",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    @property
    def pids(self) -> list[int]:
        """etcd's and kube-apiserver's, while they run."""
        return [proc.pid for proc in self._procs if proc.poll() is None]

    def log(self, name: str) -> str:
        """The output of `etcd` or `kube-apiserver`, for failure messages."""
        log_file = self.data_dir / f"{name}.log"
        return log_file.read_text(errors="replace") if log_file.exists() else ""

    def stop(self) -> None:
        """Stop the API server before etcd (it would otherwise log reconnect errors), then
        remove the data directory: nothing of a run survives it."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for log in self._logs:
            log.close()
        self._procs.clear()
        self._logs.clear()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.data_dir / f"{name}.log").open("wb")
        self._logs.append(log)
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self._procs.append(proc)
        return proc

    def _wait_ready(self, name: str, proc: subprocess.Popen[bytes], url: str) -> None:
        tls = url.startswith("https")
        deadline = time.monotonic() + READY_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode}:\n{self.log(name)[-4000:]}"
                )
            request = urllib.request.Request(url)
            if tls:
                request.add_header("Authorization", f"Bearer {self.admin_token}")
            try:
                # The serving certificate appears only once kube-apiserver has generated it.
                context = ssl.create_default_context(cafile=self.ca_path) if tls else None
                with urllib.request.urlopen(request, timeout=5, context=context) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.3)
        raise RuntimeError(
            f"{name} not ready at {url} after {READY_TIMEOUT:.0f} s ({last}):\n"
            f"{self.log(name)[-4000:]}"
        )


def start_kube_apiserver(
    binaries: Path | None = None, extra_args: tuple[str, ...] = ()
) -> KubeAPIServer:
    """Start etcd and kube-apiserver on free loopback ports and return once `/readyz` says so
    (RBAC's bootstrap roles are in place by then). The caller must `stop()` it.

    `extra_args` go to kube-apiserver (e.g. `--watch-cache=false`, so watches read etcd and a
    compacted resourceVersion answers 410 Gone)."""
    binaries = binaries or kube_binaries()
    data_dir = Path(tempfile.mkdtemp(prefix="ss-kube-"))
    cert_dir = data_dir / "certs"
    cert_dir.mkdir()
    server = KubeAPIServer(
        url=f"https://127.0.0.1:{_free_port()}",
        admin_token=os.urandom(24).hex(),
        # kube-apiserver writes a self-signed pair here when given no serving certificate; the
        # .crt file holds the serving certificate followed by the CA that signed it.
        ca_path=cert_dir / "apiserver.crt",
        data_dir=data_dir,
    )
    try:
        etcd_url = f"http://127.0.0.1:{_free_port()}"
        server.etcd_url = etcd_url
        peer_url = f"http://127.0.0.1:{_free_port()}"
        etcd = server._spawn(
            "etcd",
            [
                str(binaries / "etcd"),
                "--name=test",
                f"--data-dir={data_dir / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=test={peer_url}",
                # A test's data is thrown away afterwards; fsync would only slow every write.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        server._wait_ready("etcd", etcd, f"{etcd_url}/readyz")

        private_key, public_key = _write_service_account_keys(data_dir)
        tokens = data_dir / "tokens.csv"
        tokens.write_text(f'{server.admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
        tokens.chmod(0o600)
        port = server.url.rsplit(":", 1)[1]
        apiserver = server._spawn(
            "kube-apiserver",
            [
                str(binaries / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={cert_dir}",
                "--authorization-mode=RBAC",
                "--anonymous-auth=false",
                f"--token-auth-file={tokens}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={public_key}",
                f"--service-account-signing-key-file={private_key}",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                "--profiling=false",
                *extra_args,
            ],
        )
        server._wait_ready("kube-apiserver", apiserver, f"{server.url}/readyz")
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running_kube_apiserver() -> Iterator[KubeAPIServer]:
    server = start_kube_apiserver()
    try:
        yield server
    finally:
        server.stop()
