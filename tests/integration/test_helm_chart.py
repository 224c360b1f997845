"""The Helm chart renders, lints, and every object it renders is valid Kubernetes.

Four value sets: the defaults (bundled PostgreSQL and Redis, two replicas, the agent), external
databases with the Ingress (ci/external-ingress-values.yaml), bundled databases with three
replicas and no agent (ci/bundled-ha-values.yaml), and only an agent dialling a control plane in
another cluster (ci/agent-only-values.yaml). Each object is validated strictly (unknown
fields are errors) against the OpenAPI schemas of Kubernetes 1.36, the version of the test API
server, bundled in `kubernetes-validate`: no network is needed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from conftest import require
from streamspace_testing.helm import (
    CHART,
    CLUSTER_SCOPED,
    HELM_MISSING,
    PLURALS,
    find,
    helm_binary,
    render,
    run_helm,
    template_args,
)

KUBE_SCHEMA_VERSION = "1.36.0"
VALUE_SETS = {
    "default": (),
    "external-ingress": ("ci/external-ingress-values.yaml",),
    "bundled-ha": ("ci/bundled-ha-values.yaml",),
    "agent-only": ("ci/agent-only-values.yaml",),
}


@pytest.fixture(scope="module")
def helm() -> Iterator[Path]:
    require(HELM_MISSING)
    yield helm_binary()


@pytest.fixture(scope="module")
def rendered(helm: Path) -> dict[str, list[dict[str, Any]]]:
    return {name: render(helm, values_files=files) for name, files in VALUE_SETS.items()}


def test_helm_lint_passes_strictly_for_every_value_set(helm: Path) -> None:
    for files in VALUE_SETS.values():
        args = ["lint", str(CHART), "--strict"]
        for name in files:
            args += ["--values", str(CHART / name)]
        done = run_helm(helm, *args)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_every_rendered_object_is_valid_kubernetes_1_36(
    rendered: dict[str, list[dict[str, Any]]], value_set: str
) -> None:
    objects = rendered[value_set]
    assert {obj["kind"] for obj in objects} <= set(PLURALS)
    for obj in objects:
        kubernetes_validate.validate(obj, KUBE_SCHEMA_VERSION, strict=True)
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"]
            assert obj["metadata"]["name"].startswith("streamspace-ss-")  # one per release
        elif obj["kind"] in ("Role", "RoleBinding"):  # in the sessions namespace
            assert obj["metadata"]["namespace"] in ("streamspace", "desktops")
        else:
            assert obj["metadata"]["namespace"] == "streamspace", obj["metadata"]["name"]


def test_strict_validation_catches_what_it_should(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """The validator is not vacuous: a misspelt field in a rendered Deployment fails it."""
    deployment = json.loads(json.dumps(find(rendered["default"], "Deployment", "-controlplane")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBE_SCHEMA_VERSION, strict=True)


def test_the_value_sets_render_what_they_say(rendered: dict[str, list[dict[str, Any]]]) -> None:
    def kinds(name: str) -> list[str]:
        return sorted(f"{o['kind']}/{o['metadata']['name']}" for o in rendered[name])

    default = kinds("default")
    assert "StatefulSet/ss-streamspace-postgresql" in default
    assert "StatefulSet/ss-streamspace-redis" in default
    assert "Deployment/ss-streamspace-agent" in default
    assert not any(k.startswith("Ingress/") for k in default)

    external = kinds("external-ingress")
    assert "Ingress/ss-streamspace" in external
    assert not any(k.startswith("StatefulSet/") for k in external)

    agent_only = kinds("agent-only")
    assert agent_only == [
        "Deployment/ss-streamspace-agent",
        "NetworkPolicy/ss-streamspace-agent",
        "PersistentVolumeClaim/ss-streamspace-agent-state",
        "Role/ss-streamspace-agent",
        "RoleBinding/ss-streamspace-agent",
        "ServiceAccount/ss-streamspace-agent",
    ]
    agent = find(rendered["agent-only"], "Deployment", "-agent")["spec"]["template"]["spec"]
    command = agent["containers"][0]["command"]
    assert command[command.index("--server") + 1] == "https://desktops.example.com"
    assert find(rendered["agent-only"], "Role")["metadata"]["namespace"] == "desktops"

    ha = kinds("bundled-ha")
    assert find(rendered["bundled-ha"], "Deployment", "-controlplane")["spec"]["replicas"] == 3
    assert not any("agent" in k for k in ha)


def test_the_control_plane_is_hardened_probed_and_spread(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["default"]
    deployment = find(objects, "Deployment", "-controlplane")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] == 2
    assert container["command"][:2] == ["streamspace", "server"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    selector = deployment["spec"]["selector"]["matchLabels"]
    (spread,) = pod["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert spread["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector
    assert find(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    assert find(objects, "Service", "-controlplane")["spec"]["selector"] == selector

    hard = find(rendered["external-ingress"], "Deployment", "-controlplane")
    affinity = hard["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" in affinity


def test_every_workload_runs_non_root_without_privilege_escalation(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for objects in rendered.values():
        for obj in objects:
            if obj["kind"] not in ("Deployment", "StatefulSet"):
                continue
            pod = obj["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, obj["metadata"]["name"]
            assert pod["securityContext"]["runAsUser"] > 0
            for container in pod["containers"]:
                context = container["securityContext"]
                assert context["allowPrivilegeEscalation"] is False
                assert context["capabilities"]["drop"] == ["ALL"]
                assert context["readOnlyRootFilesystem"] is True


def test_secrets_are_in_the_secret_and_settings_in_the_config_map(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["external-ingress"]
    config = find(objects, "ConfigMap")["data"]
    secret = find(objects, "Secret")["stringData"]
    assert secret["database-url"].startswith("postgresql://streamspace:s3cret-pw@")
    assert secret["redis-url"].startswith("redis://")
    assert secret["admin-password"] == "correct-horse-battery-staple-42"
    assert "s3cret-pw" not in yaml.safe_dump(config)
    assert not any(key in config for key in ("STREAMSPACE_DATABASE_URL", "STREAMSPACE_SECRET_KEY"))
    # The Ingress host becomes the public URL (the origin browsers may open WebSockets from).
    assert config["STREAMSPACE_PUBLIC_URL"] == "https://desktops.example.com"
    assert config["STREAMSPACE_TRUSTED_PROXIES"] == "10.0.0.0/8"
    assert config["STREAMSPACE_DEFAULT_QUOTA_SESSIONS"] == "3"

    env = {
        item["name"]: item
        for item in find(objects, "Deployment", "-controlplane")["spec"]["template"]["spec"][
            "containers"
        ][0]["env"]
    }
    for name in ("STREAMSPACE_DATABASE_URL", "STREAMSPACE_REDIS_URL", "STREAMSPACE_SECRET_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "ss-streamspace-controlplane"

    bundled = find(rendered["default"], "Secret")["stringData"]
    assert bundled["database-url"] == (
        f"postgresql://streamspace:{bundled['postgresql-password']}@ss-streamspace-postgresql"
        ":5432/streamspace"
    )
    assert len(bundled["secret-key"]) == 48


def test_the_ingress_keeps_websockets_open(rendered: dict[str, list[dict[str, Any]]]) -> None:
    ingress = find(rendered["external-ingress"], "Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [
        {"hosts": ["desktops.example.com"], "secretName": "desktops-tls"}
    ]


def test_databases_admit_only_the_control_plane(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["default"]
    cp_labels = find(objects, "Deployment", "-controlplane")["spec"]["selector"]["matchLabels"]
    for name, port in (("postgresql", 5432), ("redis", 6379)):
        policy = find(objects, "NetworkPolicy", f"-{name}")["spec"]
        db_labels = find(objects, "StatefulSet", f"-{name}")["spec"]["selector"]["matchLabels"]
        assert policy["podSelector"]["matchLabels"] == db_labels
        assert policy["ingress"] == [
            {
                "from": [{"podSelector": {"matchLabels": cp_labels}}],
                "ports": [{"port": port, "protocol": "TCP"}],
            }
        ]
    agent = find(objects, "NetworkPolicy", "-agent")["spec"]
    assert agent["policyTypes"] == ["Ingress"] and "ingress" not in agent


def test_the_agent_is_labelled_as_its_sessions_network_policy_expects(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """The backend admits VNC into session pods only from pods with the labels it is told."""
    deployment = find(rendered["default"], "Deployment", "-agent")
    pod = deployment["spec"]["template"]
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    told = dict(item.split("=", 1) for item in env["STREAMSPACE_KUBE_AGENT_POD_LABELS"].split(","))
    assert told == deployment["spec"]["selector"]["matchLabels"]
    assert told.items() <= pod["metadata"]["labels"].items()
    assert env["STREAMSPACE_KUBE_NAMESPACE"] == "streamspace"
    assert pod["spec"]["serviceAccountName"] == "ss-streamspace-agent"
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize(
    ("sets", "complaint"),
    [
        (("controlPlane.replicas=0",), "/controlPlane/replicas"),
        (("controlPlane.antiAffinity=maybe",), "/controlPlane/antiAffinity"),
        (("no.such.key=1",), "additional properties 'no' not allowed"),
        (("agent.sessionsNamespace=Not_A_Namespace",), "/agent/sessionsNamespace"),
        (("secrets.adminPassword=short",), "/secrets/adminPassword"),
        (("postgresql.bundled=false",), "/externalDatabase/url"),
        (("externalDatabase.url=mysql://db/x",), "/externalDatabase/url"),
        (("config.extra.NOT_OURS=x",), "'NOT_OURS' does not match pattern"),
        (("controlPlane.enabled=false",), "/agent/serverUrl"),
    ],
)
def test_values_schema_refuses_bad_values(
    helm: Path, sets: tuple[str, ...], complaint: str
) -> None:
    done = run_helm(helm, *template_args("ss", "streamspace", (), sets))
    assert done.returncode != 0
    assert "values don't meet the specifications of the schema" in done.stderr
    assert complaint in done.stderr


def test_several_replicas_without_redis_are_refused(helm: Path) -> None:
    done = run_helm(helm, *template_args("ss", "streamspace", (), ("redis.bundled=false",)))
    assert done.returncode != 0
    assert "controlPlane.replicas > 1 needs Redis" in done.stderr
    one = render(helm, sets=("redis.bundled=false", "controlPlane.replicas=1"))
    env = find(one, "Deployment", "-controlplane")["spec"]["template"]["spec"]["containers"][0]
    assert "STREAMSPACE_REDIS_URL" not in {item["name"] for item in env["env"]}


def test_the_schema_is_strict_everywhere(helm: Path) -> None:
    """Every object in values.schema.json with properties refuses keys it does not list."""
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node: Any, where: str) -> Iterator[str]:
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                yield where
            for key, value in node.items():
                yield from walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                yield from walk(value, f"{where}/{index}")

    loose = [w for w in walk(schema, "") if "/allOf/" not in w]
    assert loose == []
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"])


def test_the_agent_command_uses_only_flags_the_cli_has(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    import typer.main

    from streamspace.cli import app

    agent = typer.main.get_command(app).commands["agent"]
    known = {opt for param in agent.params for opt in param.opts}
    container = find(rendered["default"], "Deployment", "-agent")["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert container["command"][:2] == ["streamspace", "agent"]
    flags = [arg for arg in container["command"][2:] if arg.startswith("--")]
    assert "--backend" in flags and "--server" in flags
    assert set(flags) <= known, set(flags) - known
    server = container["command"][container["command"].index("--server") + 1]
    assert server == "http://ss-streamspace-controlplane.streamspace.svc:8080"
