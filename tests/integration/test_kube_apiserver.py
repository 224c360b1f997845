"""The Kubernetes test server is a real one: it stores and lists what the admin creates, mints
ServiceAccount tokens, and RBAC refuses such a token until a RoleBinding grants it the verb.

Clients are kubernetes_asyncio configured from the kubeconfig files the harness writes, the way
the agent's kubernetes backend will be configured outside a cluster.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import new_client_from_config

from streamspace_testing.kube import KubeAPIServer, start_kube_apiserver


@asynccontextmanager
async def api_client(
    server: KubeAPIServer, tmp_path: Path, token: str | None = None
) -> AsyncIterator[k8s.ApiClient]:
    kubeconfig = server.write_kubeconfig(tmp_path / f"kubeconfig-{uuid.uuid4().hex[:8]}", token)
    api = await new_client_from_config(config_file=str(kubeconfig))
    try:
        yield api
    finally:
        await api.close()


def pod(name: str) -> k8s.V1Pod:
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name=name, labels={"app": "streamspace-test"}),
        spec=k8s.V1PodSpec(
            containers=[k8s.V1Container(name="main", image="streamspace/xterm:test")],
            automount_service_account_token=False,
        ),
    )


async def new_namespace(core: k8s.CoreV1Api) -> str:
    """A namespace with its `default` ServiceAccount, which no controller-manager creates here."""
    name = f"ss-test-{uuid.uuid4().hex[:10]}"
    await core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    await core.create_namespaced_service_account(
        name, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="default"))
    )
    return name


async def test_admin_creates_and_lists_a_pod(
    nodeless_kube_apiserver: KubeAPIServer, tmp_path: Path
) -> None:
    # The node-less server: on the shared one the session's test node, once started, binds
    # every pending pod, and this checks that the server alone only stores it.
    async with api_client(nodeless_kube_apiserver, tmp_path) as api:
        core = k8s.CoreV1Api(api)
        namespace = await new_namespace(core)
        _, status, _ = await core.create_namespaced_pod_with_http_info(namespace, pod("desk-1"))
        assert status == 201

        listed = await core.list_namespaced_pod(namespace, label_selector="app=streamspace-test")
        assert [p.metadata.name for p in listed.items] == ["desk-1"]
        stored = listed.items[0]
        assert stored.spec.containers[0].image == "streamspace/xterm:test"
        # Nothing schedules or runs it: the server only stores it.
        assert stored.status.phase == "Pending"
        assert stored.spec.node_name is None
        # Admission ran: the pod got the namespace's default ServiceAccount.
        assert stored.spec.service_account_name == "default"

        with pytest.raises(ApiException) as duplicate:
            await core.create_namespaced_pod(namespace, pod("desk-1"))
        assert duplicate.value.status == 409


async def test_rbac_refuses_a_service_account_until_a_role_binding_grants_it(
    kube_apiserver: KubeAPIServer, tmp_path: Path
) -> None:
    async with api_client(kube_apiserver, tmp_path) as admin:
        core = k8s.CoreV1Api(admin)
        rbac = k8s.RbacAuthorizationV1Api(admin)
        namespace = await new_namespace(core)
        await core.create_namespaced_service_account(
            namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="agent"))
        )
        minted = await core.create_namespaced_service_account_token(
            "agent",
            namespace,
            k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(expiration_seconds=600)),
        )
        token = minted.status.token
        assert token.count(".") == 2  # a signed JWT

        async with api_client(kube_apiserver, tmp_path, token) as agent:
            agent_core = k8s.CoreV1Api(agent)
            with pytest.raises(ApiException) as refused:
                await agent_core.create_namespaced_pod(namespace, pod("desk-1"))
            assert refused.value.status == 403
            assert f"system:serviceaccount:{namespace}:agent" in refused.value.body
            assert 'cannot create resource \\"pods\\"' in refused.value.body

            await rbac.create_namespaced_role(
                namespace,
                k8s.V1Role(
                    metadata=k8s.V1ObjectMeta(name="sessions"),
                    rules=[
                        k8s.V1PolicyRule(
                            api_groups=[""], resources=["pods"], verbs=["create", "get", "list"]
                        )
                    ],
                ),
            )
            await rbac.create_namespaced_role_binding(
                namespace,
                k8s.V1RoleBinding(
                    metadata=k8s.V1ObjectMeta(name="sessions"),
                    role_ref=k8s.V1RoleRef(
                        api_group="rbac.authorization.k8s.io", kind="Role", name="sessions"
                    ),
                    subjects=[
                        k8s.RbacV1Subject(kind="ServiceAccount", name="agent", namespace=namespace)
                    ],
                ),
            )
            status = await create_pod_once_authorized(agent_core, namespace, "desk-1")
            assert status == 201
            listed = await agent_core.list_namespaced_pod(namespace)
            assert [p.metadata.name for p in listed.items] == ["desk-1"]

            # The Role grants neither delete here nor anything in another namespace.
            with pytest.raises(ApiException) as no_delete:
                await agent_core.delete_namespaced_pod("desk-1", namespace)
            assert no_delete.value.status == 403
            with pytest.raises(ApiException) as elsewhere:
                await agent_core.create_namespaced_pod("default", pod("desk-2"))
            assert elsewhere.value.status == 403


async def create_pod_once_authorized(core: k8s.CoreV1Api, namespace: str, name: str) -> int:
    """RBAC authorizes from an informer cache, so a new binding takes effect a moment later."""
    for _ in range(50):
        try:
            _, status, _ = await core.create_namespaced_pod_with_http_info(namespace, pod(name))
            return int(status)
        except ApiException as exc:
            if exc.status != 403:
                raise
            await asyncio.sleep(0.1)
    raise AssertionError("the RoleBinding never took effect")


def test_stop_leaves_no_process_and_no_data(kube_apiserver: KubeAPIServer) -> None:
    """A server of its own (the shared one is still in use); the fixture skips without Go."""
    server = start_kube_apiserver()
    pids = server.pids
    assert len(pids) == 2
    assert all(Path(f"/proc/{pid}").exists() for pid in pids)
    server.stop()
    assert not server.data_dir.exists()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
