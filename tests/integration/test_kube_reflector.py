"""The watch cache against a real API server: it lists, then follows creates, changes and deletes
from the watch; a watch whose resourceVersion the server no longer keeps (410 Gone) makes it
list again; and a refused list is retried with backoff and reported, not fatal."""

from __future__ import annotations

import asyncio
import functools
import json
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from kube_support import api_client, eventually, new_namespace
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException

from streamspace.agent.backends.kubernetes.reflector import Reflector
from streamspace_testing.kube import KubeAPIServer, start_kube_apiserver


def pod(name: str, agent: str = "a1") -> k8s.V1Pod:
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name=name, labels={"streamspace.org/agent": agent}),
        spec=k8s.V1PodSpec(
            containers=[k8s.V1Container(name="session", image="streamspace/xterm:test")],
            automount_service_account_token=False,
        ),
    )


async def test_cache_follows_creates_changes_and_deletes(
    kube_apiserver: KubeAPIServer, tmp_path: Path
) -> None:
    async with api_client(kube_apiserver, tmp_path) as admin:
        core = k8s.CoreV1Api(admin)
        namespace = await new_namespace(core)
        await core.create_namespaced_pod(namespace, pod("before"))
        await core.create_namespaced_pod(namespace, pod("other-agent", agent="a2"))
        events: list[tuple[str, str]] = []
        cache = Reflector(
            functools.partial(core.list_namespaced_pod, namespace),
            kind="pods",
            label_selector="streamspace.org/agent=a1",
        )
        cache.add_listener(lambda kind, obj: events.append((kind, obj["metadata"]["name"])))
        cache.start()
        try:
            await cache.wait_synced(10)
            assert set(cache.items) == {"before"}  # the selector keeps other agents' pods out
            assert events == [("ADDED", "before")]

            await core.create_namespaced_pod(namespace, pod("after"))
            await eventually(lambda: "after" in cache.items, what="created pod in the cache")
            await core.patch_namespaced_pod(
                "after", namespace, {"metadata": {"annotations": {"seen": "yes"}}}
            )
            await eventually(
                lambda: (cache.items["after"]["metadata"].get("annotations") or {}).get("seen"),
                what="changed pod in the cache",
            )
            await core.delete_namespaced_pod("before", namespace, grace_period_seconds=0)
            await eventually(lambda: "before" not in cache.items, what="deleted pod gone")
            assert ("MODIFIED", "after") in events and ("DELETED", "before") in events
            assert cache.lists == 1  # all of it came from one list and the watch
        finally:
            await cache.close()


def compact_etcd(server: KubeAPIServer) -> int:
    """Compact etcd to its current revision, as kube-apiserver does every five minutes; returns
    that revision."""

    def post(path: str, body: dict[str, object]) -> dict[str, object]:
        request = urllib.request.Request(
            server.etcd_url + path, data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            result: dict[str, object] = json.load(response)
            return result

    header = post("/v3/kv/range", {"key": "AA=="})["header"]
    assert isinstance(header, dict)
    revision = int(header["revision"])
    post("/v3/kv/compaction", {"revision": revision, "physical": True})
    return revision


async def test_gone_resource_version_lists_again(
    kube_apiserver: KubeAPIServer, tmp_path: Path
) -> None:
    """A real 410: a server of its own with the watch cache off (watches read etcd), etcd
    compacted past the version the watch resumes from, as when an agent was disconnected for
    longer than the compaction interval. The cache must list again and keep following.
    (`kube_apiserver` only makes the test skip where the binaries cannot be built.)"""
    server = await asyncio.to_thread(start_kube_apiserver, None, ("--watch-cache=false",))
    try:
        async with api_client(server, tmp_path) as admin:
            core = k8s.CoreV1Api(admin)
            namespace = await new_namespace(core)
            await core.create_namespaced_pod(namespace, pod("one"))
            old = (await core.list_namespaced_pod(namespace)).metadata.resource_version
            await core.create_namespaced_pod(namespace, pod("two"))
            await core.create_namespaced_config_map(namespace, {"metadata": {"name": "later"}})
            # The watch resumes after `old`; that event's revision is now compacted away.
            assert await asyncio.to_thread(compact_etcd, server) > int(old) + 1
            cache = Reflector(
                functools.partial(core.list_namespaced_pod, namespace),
                kind="pods",
                label_selector="streamspace.org/agent=a1",
            )
            cache.watch_from(old)
            cache.start()
            try:
                await eventually(lambda: cache.lists >= 2, what="a second list after 410")
                assert cache.last_error is None
                assert set(cache.items) == {"one", "two"}
                await core.create_namespaced_pod(namespace, pod("three"))
                await eventually(lambda: "three" in cache.items, what="watch resumed")
            finally:
                await cache.close()
    finally:
        await asyncio.to_thread(server.stop)


async def test_refused_list_is_retried_with_backoff(
    kube_apiserver: KubeAPIServer, tmp_path: Path
) -> None:
    async with api_client(kube_apiserver, tmp_path) as admin:
        core = k8s.CoreV1Api(admin)
        rbac = k8s.RbacAuthorizationV1Api(admin)
        namespace = await new_namespace(core)
        await core.create_namespaced_service_account(
            namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="agent"))
        )
        token = (
            await core.create_namespaced_service_account_token(
                "agent",
                namespace,
                k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec()),
            )
        ).status.token
        async with api_client(kube_apiserver, tmp_path, token) as agent:
            cache = Reflector(
                functools.partial(k8s.CoreV1Api(agent).list_namespaced_pod, namespace),
                kind="pods",
                label_selector="streamspace.org/agent=a1",
                backoff_min=0.05,
                backoff_max=0.2,
            )
            cache.start()
            try:
                await eventually(lambda: cache.last_error is not None, what="a refused list")
                assert getattr(cache.last_error, "status", None) == 403
                assert not cache.synced
                # A waiter is told of the refusal at once, not after its timeout.
                started = time.monotonic()
                with pytest.raises(ApiException):
                    await cache.wait_synced(10)
                assert time.monotonic() - started < 2
                name = f"read-{uuid.uuid4().hex[:6]}"
                await rbac.create_namespaced_role(
                    namespace,
                    k8s.V1Role(
                        metadata=k8s.V1ObjectMeta(name=name),
                        rules=[
                            k8s.V1PolicyRule(
                                api_groups=[""], resources=["pods"], verbs=["list", "watch"]
                            )
                        ],
                    ),
                )
                await rbac.create_namespaced_role_binding(
                    namespace,
                    k8s.V1RoleBinding(
                        metadata=k8s.V1ObjectMeta(name=name),
                        role_ref=k8s.V1RoleRef(
                            api_group="rbac.authorization.k8s.io", kind="Role", name=name
                        ),
                        subjects=[
                            k8s.RbacV1Subject(
                                kind="ServiceAccount", name="agent", namespace=namespace
                            )
                        ],
                    ),
                )
                # The background retry succeeds once RBAC allows it.
                await eventually(lambda: cache.synced, what="a list once RBAC allows it")
                assert cache.last_error is None
            finally:
                await cache.close()
