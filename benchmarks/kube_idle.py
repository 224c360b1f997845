"""500 pod sessions held by one kubernetes backend, idle: its watch cache memory and CPU.

Usage: python -m benchmarks.kube_idle [--sessions 500] [--idle 60]

The cluster is a real kube-apiserver + etcd on loopback with no node at all: the benchmark
creates each session's Pod and Secret itself, from the backend's own builders (`make_pod`,
`make_vnc_secret`, so labels and annotations are exactly the agent's), and writes each pod's
status Running with a pod IP through `pods/status` as a kubelet would. No container runs.

A separate process then holds them as the agent does: a `KubernetesBackend` whose two watch
caches (pods, secrets) list everything once and then watch, with the exit watch on, checked to
report all sessions running. The benchmark reads that process's RSS before and after the caches
fill and its CPU time (utime + stime from /proc) over the idle window. What is not in it: the
agent's control connection and heartbeats (measured with the scheduler benchmark) and the
control plane.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, describe_machine
from streamspace.protocol import ImageLaunch, Resources, SessionSpec

AGENT_ID = "bench-agent"
USER_ID = "0f3c9a1b2d4e5f60718293a4b5c6d7e8"


def _rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spec(index: int) -> SessionSpec:
    return SessionSpec(
        session_id=f"bench-{index:04d}",
        user=f"user{index % 50}",
        user_id=USER_ID,
        template="xterm",
        image=ImageLaunch(image="localhost/streamspace/xterm:latest"),
        resources=Resources(cpu_millis=500, memory_mb=512),
        persistent_home=False,
    )


async def populate(kubeconfig: Path, namespace: str, sessions: int) -> None:
    from kubernetes_asyncio import client as k8s
    from kubernetes_asyncio.config import new_client_from_config

    from streamspace.agent.backends.kubernetes.objects import (
        PodSettings,
        files_keys,
        make_pod,
        make_vnc_secret,
    )
    from streamspace.agent.backends.kubernetes.resources import body

    keys = files_keys(b"k" * 32, "bench")

    api = await new_client_from_config(config_file=str(kubeconfig))
    core = k8s.CoreV1Api(api)
    await core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    await core.create_namespaced_service_account(
        namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="default"))
    )
    limit = asyncio.Semaphore(16)

    async def one(index: int) -> None:
        spec = _spec(index)
        pod = make_pod(
            spec,
            agent_id=AGENT_ID,
            namespace=namespace,
            settings=PodSettings(),
            home_claim=None,
        )
        secret = make_vnc_secret(
            spec,
            agent_id=AGENT_ID,
            namespace=namespace,
            password=b"Abcdefgh",
            cookie=bytes(256),
            files=keys,
        )
        async with limit:
            await core.create_namespaced_secret(namespace, body(secret))
            made = await core.create_namespaced_pod(namespace, body(pod))
            await core.patch_namespaced_pod_status(
                made.metadata.name,
                namespace,
                {
                    "status": {
                        "phase": "Running",
                        "podIP": f"10.250.{index // 250}.{index % 250 + 1}",
                        "hostIP": "10.250.255.1",
                        "conditions": [{"type": "Ready", "status": "True"}],
                        "containerStatuses": [
                            {
                                "name": "session",
                                "image": pod["spec"]["containers"][0]["image"],
                                "imageID": "",
                                "ready": True,
                                "restartCount": 0,
                                "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
                            }
                        ],
                    }
                },
            )

    try:
        await asyncio.gather(*(one(i) for i in range(sessions)))
    finally:
        await api.close()


async def hold(kubeconfig: str, namespace: str, state_dir: str, sessions: int) -> None:
    """The child: a backend holding the sessions; prints one JSON line, then idles."""
    from streamspace.agent.backends.kubernetes import KubeConfig, KubernetesBackend

    before = _rss_kib()
    backend = KubernetesBackend(
        AGENT_ID,
        Path(state_dir),
        config=KubeConfig(kubeconfig=kubeconfig, namespace=namespace),
    )

    async def on_exit(session_id: str, reason: str) -> None:
        print(json.dumps({"exit": session_id, "reason": reason}), flush=True)

    started = time.perf_counter()
    items = await backend.inventory()
    await backend.watch_exits(on_exit)
    synced = time.perf_counter() - started
    running = sum(1 for item in items if item.state == "running" and item.endpoint)
    print(
        json.dumps(
            {
                "rss_before_kib": before,
                "rss_after_kib": _rss_kib(),
                "running": running,
                "sessions": len(items),
                "sync_seconds": round(synced, 3),
            }
        ),
        flush=True,
    )
    if running != sessions:
        raise SystemExit(f"only {running} of {sessions} sessions reported running")
    await asyncio.Event().wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sessions", type=int, default=500)
    ap.add_argument("--idle", type=float, default=60.0)
    ap.add_argument("--hold", nargs=3, metavar=("KUBECONFIG", "NAMESPACE", "STATE_DIR"))
    args = ap.parse_args()
    if args.hold:
        kubeconfig, namespace, state_dir = args.hold
        asyncio.run(hold(kubeconfig, namespace, state_dir, sessions=args.sessions))
        return

    from streamspace_testing.kube import running_kube_apiserver

    print(f"machine: {describe_machine()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    with (
        tempfile.TemporaryDirectory(prefix="ss-bench-kidle-") as tmp,
        running_kube_apiserver() as server,
    ):
        kubeconfig = server.write_kubeconfig(Path(tmp) / "kubeconfig")
        namespace = "ss-bench-idle"
        t0 = time.perf_counter()
        asyncio.run(populate(kubeconfig, namespace, args.sessions))
        took = time.perf_counter() - t0
        print(f"created {args.sessions} pods + secrets, status Running, in {took:.1f} s")
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.kube_idle",
                "--sessions",
                str(args.sessions),
                "--hold",
                str(kubeconfig),
                namespace,
                str(Path(tmp) / "state"),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "STREAMSPACE_LOG_LEVEL": "WARNING"},
        )
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            if not line:
                raise SystemExit(f"the holding process ended: {child.wait()}")
            figures = json.loads(line)
            print(
                f"backend holds {figures['running']} running sessions, caches synced in "
                f"{figures['sync_seconds']} s"
            )
            cache_mib = (figures["rss_after_kib"] - figures["rss_before_kib"]) / 1024
            print(
                f"RSS {figures['rss_before_kib'] / 1024:.1f} MiB before the caches, "
                f"{figures['rss_after_kib'] / 1024:.1f} MiB after: {cache_mib:.1f} MiB for "
                f"{args.sessions} pods + secrets ({cache_mib * 1024 / args.sessions:.1f} KiB each)"
            )
            time.sleep(2)  # let the exit watch and the first watch requests settle
            cpu0, wall0 = _cpu_seconds(child.pid), time.perf_counter()
            time.sleep(args.idle)
            cpu = (_cpu_seconds(child.pid) - cpu0) / (time.perf_counter() - wall0)
            print(
                f"idle CPU over {args.idle:.0f} s: {cpu * 100:.2f} % of one core "
                f"({cpu * args.idle:.3f} CPU s) "
                f"(target < 5 %); RSS now {_rss_kib(child.pid) / 1024:.1f} MiB"
            )
            if child.poll() is not None:
                raise SystemExit("the holding process died while idle")
        finally:
            child.terminate()
            child.wait(20)


if __name__ == "__main__":
    main()
