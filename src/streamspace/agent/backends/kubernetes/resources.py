"""The objects a session's pod needs before it is created: the agent's NetworkPolicies (once),
the session's VNC Secret, and the user's home PVC (checked to be theirs, of a class that
exists). Each is created if missing and left as it is otherwise, so start and wake are
idempotent."""

from __future__ import annotations

from typing import Any

from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException

from streamspace.agent.backends.base import BackendError
from streamspace.agent.backends.kubernetes import api, objects
from streamspace.agent.backends.kubernetes.reflector import Reflector
from streamspace.agent.backends.kubernetes.settings import KubeConfig
from streamspace.protocol import SessionSpec

SYNC_TIMEOUT = 15.0


def body(obj: dict[str, Any]) -> Any:
    """A builder's dict as a request body: the client serialises dicts as they are."""
    return obj


class SessionObjects:
    def __init__(
        self,
        *,
        client: k8s.ApiClient,
        namespace: str,
        agent_id: str,
        config: KubeConfig,
        secrets: Reflector,
        vnc_key: bytes,
    ) -> None:
        self._client = client
        self.namespace = namespace
        self.agent_id = agent_id
        self.config = config
        self._secrets = secrets
        self._vnc_key = vnc_key
        self._core = k8s.CoreV1Api(client)
        self._policies_done = False

    async def _call(
        self, awaitable: Any, verb: str, resource: str, ok: tuple[int, ...] = ()
    ) -> Any:
        return await api.call(awaitable, verb, resource, self.namespace, ok=ok)

    async def ensure_policies(self) -> None:
        if self._policies_done or not self.config.network_policies:
            return
        net = k8s.NetworkingV1Api(self._client)
        for manifest in (
            objects.make_network_policy(
                agent_id=self.agent_id,
                namespace=self.namespace,
                agent_pod_labels=self.config.agent_pod_labels,
                agent_namespace=self.config.agent_namespace,
                vnc_port=self.config.pod.vnc_port,
            ),
            objects.make_egress_policy(agent_id=self.agent_id, namespace=self.namespace),
        ):
            made = await self._call(
                net.create_namespaced_network_policy(self.namespace, body(manifest)),
                "create",
                "networkpolicies",
                ok=(409,),
            )
            if made is None:  # there already: make it say what this agent says now
                await self._call(
                    net.replace_namespaced_network_policy(
                        manifest["metadata"]["name"], self.namespace, body(manifest)
                    ),
                    "update",
                    "networkpolicies",
                )
        self._policies_done = True

    async def ensure_secret(self, spec: SessionSpec) -> None:
        if objects.secret_name(spec.session_id) in self._secrets.items:
            return
        manifest = objects.make_vnc_secret(
            spec,
            agent_id=self.agent_id,
            namespace=self.namespace,
            password=objects.vnc_password(self._vnc_key, spec.session_id),
            cookie=objects.sound_cookie(self._vnc_key, spec.session_id),
            files=objects.files_keys(self._vnc_key, spec.session_id),
        )
        made = await self._call(
            self._core.create_namespaced_secret(self.namespace, body(manifest)),
            "create",
            "secrets",
            ok=(409,),
        )
        if made is None:
            # Made by someone else just now (an earlier agent, whose key may differ): the
            # password to authenticate with is the one in it, so wait for the cache to hold it.
            # One made here holds what this agent derives, so nothing needs to wait for it.
            secrets, name = self._secrets, manifest["metadata"]["name"]
            await secrets.wait_for(lambda: name in secrets.items, SYNC_TIMEOUT)

    async def ensure_home(self, spec: SessionSpec) -> str:
        name = objects.home_claim_name(spec.user_id, spec.template)
        if self.config.storage_class:
            await self._check_storage_class(self.config.storage_class)
        manifest = objects.make_pvc(
            spec,
            agent_id=self.agent_id,
            namespace=self.namespace,
            storage_class=self.config.storage_class,
            size=self.config.home_size,
        )
        made = await self._call(
            self._core.create_namespaced_persistent_volume_claim(self.namespace, body(manifest)),
            "create",
            "persistentvolumeclaims",
            ok=(409,),
        )
        if made is None:
            existing = await self._call(
                self._core.read_namespaced_persistent_volume_claim(name, self.namespace),
                "get",
                "persistentvolumeclaims",
            )
            notes = existing.metadata.annotations or {}
            if (
                notes.get(objects.USER_ID_ANNOTATION) != spec.user_id
                or notes.get(objects.TEMPLATE_ANNOTATION) != spec.template
            ):
                raise BackendError(
                    f"the PVC {name} exists but belongs to another user or template; "
                    "refusing to mount it as this session's home"
                )
        return name

    async def _check_storage_class(self, storage_class: str) -> None:
        """A claim of a class that does not exist stays Pending forever: say so now. An agent
        not allowed to read StorageClasses (cluster-scoped) skips the check."""
        storage = k8s.StorageV1Api(self._client)
        try:
            await storage.read_storage_class(storage_class)
        except ApiException as exc:
            if exc.status == 404:
                raise BackendError(
                    f"storage class {storage_class!r} does not exist in the cluster, so the "
                    "session's home cannot be provisioned (set kube_storage_class)"
                ) from exc
            if exc.status != 403:
                raise api.translate(exc, "get", "storageclasses", "") from exc
