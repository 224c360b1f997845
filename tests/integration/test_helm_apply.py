"""The chart's default manifests, applied to a real kube-apiserver, and its agent's Role enforced.

Every rendered object goes in by server-side apply with strict field validation (what a
cluster would accept from `helm install`) and is read back. Then a token minted through the
TokenRequest API for the chart's agent ServiceAccount is asked, verb by verb, what it may do:
exactly the Role's rules, nothing else. Real calls show the same, and removing one verb from
the applied Role makes the API server refuse that call with 403.

No controller runs on the test server, so Deployments and StatefulSets are stored, not run.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import new_client_from_config

from conftest import require
from streamspace_testing.helm import (
    HELM_MISSING,
    find,
    helm_binary,
    read_back,
    render,
    server_side_apply,
)
from streamspace_testing.kube import KubeAPIServer

RELEASE = "ss"
AGENT_SA = "ss-streamspace-agent"
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
# What the kubernetes backend needs (the Role must grant exactly this), and around it what it
# must not get: other resources of the same groups, subresources, cluster-scoped objects.
EXPECTED_RULES = {
    ("", "pods"): {"list", "watch", "create", "delete"},
    ("", "secrets"): {"list", "watch", "create", "delete"},
    ("", "persistentvolumeclaims"): {"get", "create"},
    ("networking.k8s.io", "networkpolicies"): {"create", "update"},
}
# Cluster-wide, with agent.storageClassCheck (the default): reading StorageClasses only.
EXPECTED_CLUSTER_RULES = {("storage.k8s.io", "storageclasses"): {"get"}}
PROBED = [
    *EXPECTED_RULES,
    ("", "pods/exec"),
    ("", "pods/log"),
    ("", "pods/status"),
    ("", "services"),
    ("", "configmaps"),
    ("", "serviceaccounts/token"),
    ("apps", "deployments"),
    ("rbac.authorization.k8s.io", "roles"),
    ("rbac.authorization.k8s.io", "rolebindings"),
    ("storage.k8s.io", "storageclasses"),
    ("", "nodes"),
    ("", "namespaces"),
    ("", "persistentvolumes"),
]


@pytest.fixture(scope="module")
def helm() -> Iterator[Path]:
    require(HELM_MISSING)
    yield helm_binary()


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


async def install(
    api: k8s.ApiClient, helm: Path, *sets: str
) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """A fresh namespace with the chart applied; returns it, what was sent and what came back."""
    namespace = f"ss-helm-{uuid.uuid4().hex[:10]}"
    await k8s.CoreV1Api(api).create_namespace(
        k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace))
    )
    objects = render(helm, release=RELEASE, namespace=namespace, sets=sets)
    for obj in objects:
        elsewhere = obj["metadata"].get("namespace", namespace)  # the sessions namespace
        if elsewhere != namespace:
            await ensure_namespace(api, elsewhere)
    applied = [await server_side_apply(api, obj) for obj in objects]
    return namespace, objects, applied


async def ensure_namespace(api: k8s.ApiClient, name: str) -> None:
    try:
        await k8s.CoreV1Api(api).create_namespace(
            k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name))
        )
    except ApiException as exc:
        if exc.status != 409:
            raise


async def agent_token(api: k8s.ApiClient, namespace: str) -> str:
    minted = await k8s.CoreV1Api(api).create_namespaced_service_account_token(
        AGENT_SA,
        namespace,
        k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(expiration_seconds=600)),
    )
    return str(minted.status.token)


async def may(api: k8s.ApiClient, verb: str, group: str, resource: str, namespace: str) -> bool:
    """SelfSubjectAccessReview: what the API server's RBAC answers for this token."""
    name, _, sub = resource.partition("/")
    review = await k8s.AuthorizationV1Api(api).create_self_subject_access_review(
        k8s.V1SelfSubjectAccessReview(
            spec=k8s.V1SelfSubjectAccessReviewSpec(
                resource_attributes=k8s.V1ResourceAttributes(
                    verb=verb,
                    group=group,
                    resource=name,
                    subresource=sub or None,
                    namespace=namespace,
                )
            )
        )
    )
    return bool(review.status.allowed)


async def granted(api: k8s.ApiClient, namespace: str) -> dict[tuple[str, str], set[str]]:
    """Every probed (group, resource) with the verbs this token may use on it in `namespace`."""
    answers = await asyncio.gather(
        *(may(api, verb, group, res, namespace) for group, res in PROBED for verb in VERBS)
    )
    result: dict[tuple[str, str], set[str]] = {}
    pairs = ((pair, verb) for pair in PROBED for verb in VERBS)
    for (pair, verb), allowed in zip(pairs, answers, strict=True):
        if allowed:
            result.setdefault(pair, set()).add(verb)
    return result


async def settled(
    api: k8s.ApiClient, namespace: str, expected: dict[tuple[str, str], set[str]]
) -> dict[tuple[str, str], set[str]]:
    """What the token may do once RBAC has caught up with the objects just applied (it
    authorizes from an informer cache); returns the last answer, so a wrong Role still shows."""
    answer = await granted(api, namespace)
    for _ in range(50):
        if answer == expected:
            break
        await asyncio.sleep(0.1)
        answer = await granted(api, namespace)
    return answer


async def until_refused(call: Any, attempts: int = 100) -> ApiException:
    """RBAC authorizes from an informer cache: a changed Role applies a moment later."""
    for _ in range(attempts):
        try:
            await call()
        except ApiException as exc:
            if exc.status == 403:
                return exc
            raise
        await asyncio.sleep(0.1)
    raise AssertionError("the API server kept allowing the call")


def session_pod(name: str) -> k8s.V1Pod:
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name=name, labels={"app.kubernetes.io/component": "session"}),
        spec=k8s.V1PodSpec(
            containers=[k8s.V1Container(name="desktop", image="streamspace/xterm:test")],
            automount_service_account_token=False,
            service_account_name=AGENT_SA,  # the namespace has no `default` ServiceAccount here
        ),
    )


async def test_default_manifests_apply_and_read_back(
    kube_apiserver: KubeAPIServer, helm: Path, tmp_path: Path
) -> None:
    async with api_client(kube_apiserver, tmp_path) as api:
        namespace, objects, applied = await install(api, helm)
        assert len(applied) == len(objects) >= 15
        for sent in objects:
            stored = await read_back(api, sent)
            assert stored["metadata"]["uid"]
            assert stored["metadata"]["labels"] == sent["metadata"]["labels"]
            if "spec" in sent and sent["kind"] not in ("Service", "PersistentVolumeClaim"):
                assert stored["spec"].keys() >= sent["spec"].keys(), sent["kind"]

        deployment = await k8s.AppsV1Api(api).read_namespaced_deployment(
            "ss-streamspace-controlplane", namespace
        )
        assert deployment.spec.replicas == 2
        container = deployment.spec.template.spec.containers[0]
        assert container.readiness_probe.http_get.path == "/readyz"
        assert container.security_context.read_only_root_filesystem is True
        role = await k8s.RbacAuthorizationV1Api(api).read_namespaced_role(AGENT_SA, namespace)
        assert {
            (group, res): set(rule.verbs)
            for rule in role.rules
            for group in rule.api_groups
            for res in rule.resources
        } == EXPECTED_RULES
        secret = await k8s.CoreV1Api(api).read_namespaced_secret(
            "ss-streamspace-controlplane", namespace
        )
        assert set(secret.data) >= {"secret-key", "database-url", "redis-url"}


async def test_the_agent_token_can_do_exactly_what_the_role_grants(
    kube_apiserver: KubeAPIServer, helm: Path, tmp_path: Path
) -> None:
    async with api_client(kube_apiserver, tmp_path) as admin:
        namespace, _, _ = await install(admin, helm)
        token = await agent_token(admin, namespace)
        async with api_client(kube_apiserver, tmp_path, token) as agent:
            everything = EXPECTED_RULES | EXPECTED_CLUSTER_RULES
            assert await settled(agent, namespace, everything) == everything
            assert await granted(agent, "") == EXPECTED_CLUSTER_RULES
            assert await granted(agent, "default") == EXPECTED_CLUSTER_RULES

            core = k8s.CoreV1Api(agent)
            _, status, _ = await core.create_namespaced_pod_with_http_info(
                namespace, session_pod("desk-1")
            )
            assert status == 201
            listed = await core.list_namespaced_pod(namespace)
            assert [p.metadata.name for p in listed.items] == ["desk-1"]
            await core.create_namespaced_secret(
                namespace,
                k8s.V1Secret(metadata=k8s.V1ObjectMeta(name="desk-1-vnc"), string_data={"p": "x"}),
            )
            claim = k8s.V1PersistentVolumeClaim(
                metadata=k8s.V1ObjectMeta(name="home-u1-xterm"),
                spec=k8s.V1PersistentVolumeClaimSpec(
                    access_modes=["ReadWriteOnce"],
                    resources=k8s.V1VolumeResourceRequirements(requests={"storage": "1Gi"}),
                ),
            )
            await core.create_namespaced_persistent_volume_claim(namespace, claim)
            await core.read_namespaced_persistent_volume_claim("home-u1-xterm", namespace)
            net = k8s.NetworkingV1Api(agent)
            policy = k8s.V1NetworkPolicy(
                metadata=k8s.V1ObjectMeta(name="vnc-from-agent"),
                spec=k8s.V1NetworkPolicySpec(
                    pod_selector=k8s.V1LabelSelector(), policy_types=["Ingress"]
                ),
            )
            made = await net.create_namespaced_network_policy(namespace, policy)
            policy.metadata.resource_version = made.metadata.resource_version
            await net.replace_namespaced_network_policy("vnc-from-agent", namespace, policy)
            await core.delete_namespaced_pod("desk-1", namespace, grace_period_seconds=0)

            with pytest.raises(ApiException) as get_pod:
                await core.read_namespaced_pod("desk-1", namespace)
            assert get_pod.value.status == 403
            with pytest.raises(ApiException) as deployments:
                await k8s.AppsV1Api(agent).create_namespaced_deployment(
                    namespace,
                    k8s.V1Deployment(
                        metadata=k8s.V1ObjectMeta(name="x"),
                        spec=k8s.V1DeploymentSpec(
                            selector=k8s.V1LabelSelector(match_labels={"a": "b"}),
                            template=k8s.V1PodTemplateSpec(
                                metadata=k8s.V1ObjectMeta(labels={"a": "b"}),
                                spec=session_pod("x").spec,
                            ),
                        ),
                    ),
                )
            assert deployments.value.status == 403
            assert 'cannot create resource \\"deployments\\"' in deployments.value.body
            with pytest.raises(ApiException) as nodes:
                await core.list_node()
            assert nodes.value.status == 403
            with pytest.raises(ApiException) as exec_into:
                await core.connect_get_namespaced_pod_exec(
                    "desk-1", namespace, command=["id"], stdout=True
                )
            assert exec_into.value.status == 403


async def test_removing_a_verb_from_the_role_makes_the_api_server_refuse_it(
    kube_apiserver: KubeAPIServer, helm: Path, tmp_path: Path
) -> None:
    async with api_client(kube_apiserver, tmp_path) as admin:
        namespace, objects, _ = await install(admin, helm)
        token = await agent_token(admin, namespace)
        async with api_client(kube_apiserver, tmp_path, token) as agent:
            everything = EXPECTED_RULES | EXPECTED_CLUSTER_RULES
            assert await settled(agent, namespace, everything) == everything
            core = k8s.CoreV1Api(agent)
            await core.create_namespaced_pod(namespace, session_pod("desk-1"))

            role = find(objects, "Role")
            for rule in role["rules"]:
                if rule["resources"] == ["pods"]:
                    rule["verbs"].remove("create")
            await server_side_apply(admin, role)

            counter = iter(range(2, 1000))
            refused = await until_refused(
                lambda: core.create_namespaced_pod(namespace, session_pod(f"desk-{next(counter)}"))
            )
            assert f"system:serviceaccount:{namespace}:{AGENT_SA}" in refused.body
            assert 'cannot create resource \\"pods\\"' in refused.body
            # Only that verb went: the agent still lists and deletes its pods.
            assert (await core.list_namespaced_pod(namespace)).items
            await core.delete_namespaced_pod("desk-1", namespace, grace_period_seconds=0)
            assert await granted(agent, namespace) == {
                **EXPECTED_RULES,
                **EXPECTED_CLUSTER_RULES,
                ("", "pods"): EXPECTED_RULES[("", "pods")] - {"create"},
            }


async def test_a_separate_sessions_namespace_gets_the_role_and_nothing_else_does(
    kube_apiserver: KubeAPIServer, helm: Path, tmp_path: Path
) -> None:
    sessions = f"ss-sessions-{uuid.uuid4().hex[:8]}"
    async with api_client(kube_apiserver, tmp_path) as admin:
        namespace, objects, _ = await install(
            admin, helm, f"agent.sessionsNamespace={sessions}", "agent.storageClassCheck=false"
        )
        assert not any(obj["kind"].startswith("Cluster") for obj in objects)
        assert find(objects, "Role")["metadata"]["namespace"] == sessions
        assert find(objects, "RoleBinding")["subjects"] == [
            {"kind": "ServiceAccount", "name": AGENT_SA, "namespace": namespace}
        ]
        token = await agent_token(admin, namespace)
        async with api_client(kube_apiserver, tmp_path, token) as agent:
            assert await settled(agent, sessions, EXPECTED_RULES) == EXPECTED_RULES
            assert await granted(agent, namespace) == {}
