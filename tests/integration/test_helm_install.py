"""`helm install`, `upgrade` and `uninstall` of the chart against the real test API server.

The generated secrets (signing key, database and Redis passwords) are made at install and must
survive an upgrade: a new signing key would log every user out, a new database password would
lock the control plane out of the bundled PostgreSQL. The chart reads them back from the live
Secret (`lookup`), which only a real install against a server exercises.
"""

from __future__ import annotations

import base64
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import new_client_from_config

from conftest import require
from streamspace_testing.helm import CHART, HELM_MISSING, helm_binary
from streamspace_testing.kube import KubeAPIServer


@pytest.fixture(scope="module")
def helm() -> Iterator[Path]:
    require(HELM_MISSING)
    yield helm_binary()


def run(helm: Path, kubeconfig: Path, home: Path, *args: str) -> str:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "KUBECONFIG": str(kubeconfig)}
    done = subprocess.run(
        [str(helm), *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"helm {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def decoded(secret: k8s.V1Secret) -> dict[str, str]:
    return {key: base64.b64decode(value).decode() for key, value in secret.data.items()}


async def test_install_upgrade_keeps_generated_secrets_and_uninstall_removes_everything(
    kube_apiserver: KubeAPIServer, helm: Path, tmp_path: Path
) -> None:
    namespace = f"ss-install-{uuid.uuid4().hex[:8]}"
    kubeconfig = kube_apiserver.write_kubeconfig(tmp_path / "kubeconfig")
    home = tmp_path / "home"
    home.mkdir()
    chart = str(CHART)
    notes = run(
        helm, kubeconfig, home, "install", "ss", chart, "-n", namespace, "--create-namespace"
    )
    assert "streamspace admin join-token" in notes

    api = await new_client_from_config(config_file=str(kubeconfig))
    try:
        core, apps = k8s.CoreV1Api(api), k8s.AppsV1Api(api)
        rbac = k8s.RbacAuthorizationV1Api(api)
        name = "ss-streamspace-controlplane"
        first = decoded(await core.read_namespaced_secret(name, namespace))
        assert len(first["secret-key"]) == 48
        assert first["postgresql-password"] in first["database-url"]
        before = await apps.read_namespaced_deployment(name, namespace)

        run(helm, kubeconfig, home, "upgrade", "ss", chart, "-n", namespace)
        run(helm, kubeconfig, home, "upgrade", "ss", chart, "-n", namespace, "--reuse-values",
            "--set", "controlPlane.replicas=3")  # fmt: skip
        assert decoded(await core.read_namespaced_secret(name, namespace)) == first
        after = await apps.read_namespaced_deployment(name, namespace)
        assert after.spec.replicas == 3
        # Unchanged settings and secrets: the pods are not rolled for nothing.
        assert after.spec.template.metadata.annotations == before.spec.template.metadata.annotations

        run(helm, kubeconfig, home, "upgrade", "ss", chart, "-n", namespace, "--reuse-values",
            "--set", "secrets.secretKey=a-key-the-operator-chose")  # fmt: skip
        rotated = decoded(await core.read_namespaced_secret(name, namespace))
        assert rotated["secret-key"] == "a-key-the-operator-chose"
        assert rotated["postgresql-password"] == first["postgresql-password"]
        rolled = await apps.read_namespaced_deployment(name, namespace)
        annotations = rolled.spec.template.metadata.annotations
        assert (
            annotations["checksum/secret"]
            != before.spec.template.metadata.annotations["checksum/secret"]
        )

        cluster_role = f"{namespace}-ss-streamspace-agent"
        assert (await rbac.read_cluster_role(cluster_role)).rules[0].resources == ["storageclasses"]
        run(helm, kubeconfig, home, "uninstall", "ss", "-n", namespace)
        for read in (
            core.read_namespaced_secret(name, namespace),
            apps.read_namespaced_deployment(name, namespace),
            rbac.read_namespaced_role("ss-streamspace-agent", namespace),
            rbac.read_cluster_role(cluster_role),
        ):
            with pytest.raises(ApiException) as gone:
                await read
            assert gone.value.status == 404
    finally:
        await api.close()
