"""What a session's Kubernetes objects are, as data: the pod, its home claim, its VNC Secret and
the agent's NetworkPolicies are read here without a cluster, and so is what a pod's status
means (progress milestones, clear failures)."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from streamspace.agent import vnc
from streamspace.agent.backends.base import BackendError
from streamspace.agent.backends.imageenv import (
    FILES_CLIENT_KEY_ENV,
    FILES_HOST_KEY_ENV,
    FILES_PORT_ENV,
    PULSE_COOKIE_ENV,
    PULSE_PORT_ENV,
    VNC_PASSWORD_ENV,
)
from streamspace.agent.backends.kubernetes import PodSettings, podstate
from streamspace.agent.backends.kubernetes.objects import (
    AGENT_LABEL,
    FILES_PORT,
    OWNER_ANNOTATION,
    SECRET_COOKIE_ENTRYPOINT_KEY,
    SECRET_COOKIE_KEY,
    SECRET_ENTRYPOINT_KEY,
    SECRET_FILES_CLIENT_KEY,
    SECRET_FILES_CLIENT_PUBLIC,
    SECRET_FILES_HOST_KEY,
    SECRET_PASSWORD_KEY,
    SESSION_ANNOTATION,
    SESSION_LABEL,
    SOUND_PORT,
    TEMPLATE_LABEL,
    USER_ID_LABEL,
    files_keys,
    home_claim_name,
    label_value,
    make_egress_policy,
    make_network_policy,
    make_pod,
    make_pvc,
    make_vnc_secret,
    pod_name,
    secret_name,
    sound_cookie,
    vnc_password,
)
from streamspace.agent.backends.kubernetes.settings import (
    KubeConfig,
    parse_labels,
    parse_tolerations,
)
from streamspace.config import Settings
from streamspace.controlplane.catalog import TemplateSpec
from streamspace.protocol import Display, ImageLaunch, Resources, SessionSpec, Toleration

USER_ID = "0f3c9a1b2d4e5f60718293a4b5c6d7e8"
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")


def _spec(**overrides: Any) -> SessionSpec:
    fields: dict[str, Any] = {
        "session_id": "s-1",
        "user": "alice",
        "user_id": USER_ID,
        "template": "xterm",
        "image": ImageLaunch(image="localhost/streamspace/xterm:abc", env={"LANG": "C.UTF-8"}),
        "display": Display(width=1024, height=640, depth=16),
        "resources": Resources(cpu_millis=750, memory_mb=384),
    }
    fields.update(overrides)
    return SessionSpec(**fields)


def _pod(spec: SessionSpec | None = None, **settings: Any) -> dict[str, Any]:
    return make_pod(
        spec or _spec(),
        agent_id="agent-1",
        namespace="desks",
        settings=PodSettings(**settings),
        home_claim=home_claim_name(USER_ID, "xterm"),
    )


def test_pod_runs_non_root_without_privileges_or_token() -> None:
    pod = _pod()
    spec = pod["spec"]
    (container,) = spec["containers"]
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 1000
    assert security["allowPrivilegeEscalation"] is False
    assert security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert spec["restartPolicy"] == "Never"
    assert "hostNetwork" not in spec and "hostPID" not in spec


def test_pod_limits_come_from_the_session_resources() -> None:
    (container,) = _pod()["spec"]["containers"]
    assert container["resources"]["limits"] == {"cpu": "750m", "memory": "384Mi"}
    assert container["resources"]["requests"] == {"cpu": "750m", "memory": "384Mi"}


def test_pod_labels_and_owner_annotations() -> None:
    pod = _pod()
    labels = pod["metadata"]["labels"]
    assert labels[SESSION_LABEL] == "s-1"
    assert labels[USER_ID_LABEL] == USER_ID
    assert labels[TEMPLATE_LABEL] == "xterm"
    assert labels[AGENT_LABEL] == "agent-1"
    assert pod["metadata"]["annotations"][OWNER_ANNOTATION] == "alice"
    assert pod["metadata"]["annotations"][SESSION_ANNOTATION] == "s-1"
    assert pod["metadata"]["name"] == "ss-s-1"
    assert pod["metadata"]["namespace"] == "desks"


def test_vnc_password_comes_from_the_session_secret_only() -> None:
    (container,) = _pod()["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env[VNC_PASSWORD_ENV] == {
        "name": VNC_PASSWORD_ENV,
        "valueFrom": {"secretKeyRef": {"name": secret_name("s-1"), "key": SECRET_ENTRYPOINT_KEY}},
    }
    assert env["LANG"]["value"] == "C.UTF-8"
    assert env["VNC_GEOMETRY"]["value"] == "1024x640"
    # A template cannot plant its own password (or other reserved variables).
    spec = _spec(image=ImageLaunch(image="x:1", env={VNC_PASSWORD_ENV: "open", "HOME": "/"}))
    (planted,) = _pod(spec)["spec"]["containers"]
    names = [e["name"] for e in planted["env"]]
    assert names.count(VNC_PASSWORD_ENV) == 1 and "HOME" not in names
    assert all("value" not in e for e in planted["env"] if e["name"] == VNC_PASSWORD_ENV)


def test_home_claim_is_mounted_at_the_home() -> None:
    spec = _pod()["spec"]
    (container,) = spec["containers"]
    assert {"name": "home", "mountPath": "/home/streamspace"} in container["volumeMounts"]
    claim = next(v for v in spec["volumes"] if v["name"] == "home")
    assert claim["persistentVolumeClaim"]["claimName"] == home_claim_name(USER_ID, "xterm")
    no_home = make_pod(
        _spec(),
        agent_id="a",
        namespace="n",
        settings=PodSettings(),
        home_claim=None,
    )
    assert all(v["name"] != "home" for v in no_home["spec"]["volumes"])


def test_pull_policy_secrets_node_selector_and_tolerations_from_settings() -> None:
    toleration = {"key": "desks", "operator": "Exists", "effect": "NoSchedule"}
    pod = _pod(
        image_pull_policy="Always",
        image_pull_secrets=("regcred",),
        node_selector={"pool": "desks"},
        tolerations=(toleration,),
    )
    (container,) = pod["spec"]["containers"]
    assert container["imagePullPolicy"] == "Always"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["spec"]["nodeSelector"] == {"pool": "desks"}
    assert pod["spec"]["tolerations"] == [toleration]
    plain = _pod()["spec"]
    assert "imagePullSecrets" not in plain and "nodeSelector" not in plain


def test_the_templates_node_selector_and_tolerations_reach_the_pod() -> None:
    template = TemplateSpec.model_validate(
        {
            "name": "gpu-desk",
            "display_name": "GPU desk",
            "category": "Development",
            "launch": {
                "kubernetes": {
                    "image": "localhost/streamspace/xterm:abc",
                    "node_selector": {"gpu": "true", "pool": "template-pool"},
                    "tolerations": [
                        {"key": "gpu", "operator": "Exists", "effect": "NoSchedule"},
                        {"key": "spot", "value": "yes", "toleration_seconds": 30},
                    ],
                }
            },
        }
    )
    kube = template.launch.kubernetes
    assert kube is not None
    spec = _spec(node_selector=kube.node_selector, tolerations=kube.tolerations)
    operator = {"key": "desks", "operator": "Exists", "effect": "NoSchedule"}
    pod = _pod(spec, node_selector={"pool": "desks"}, tolerations=(operator,))["spec"]
    # The agent's operator wins on a label both set; its tolerations come first.
    assert pod["nodeSelector"] == {"gpu": "true", "pool": "desks"}
    assert pod["tolerations"] == [
        operator,
        {"key": "gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Equal", "value": "yes", "tolerationSeconds": 30},
    ]
    alone = _pod(spec)["spec"]
    assert alone["nodeSelector"] == {"gpu": "true", "pool": "template-pool"}
    assert len(alone["tolerations"]) == 2


def test_a_toleration_the_api_would_refuse_is_refused_in_the_template() -> None:
    with pytest.raises(ValueError, match="effect"):
        Toleration.model_validate({"key": "gpu", "effect": "Sometimes"})
    with pytest.raises(ValueError, match="extra"):
        Toleration.model_validate({"key": "gpu", "tolerationSeconds": 3})


def test_no_image_is_refused() -> None:
    with pytest.raises(BackendError, match="no container image"):
        _pod(_spec(image=None))


def test_names_and_label_values_are_valid_kubernetes_syntax() -> None:
    odd = "Session_With.UPPER-" + "x" * 100
    name = pod_name(odd)
    assert DNS_LABEL.fullmatch(name) and len(name) <= 63
    assert pod_name(odd) != pod_name(odd + "y")
    value = label_value(odd)
    assert LABEL_VALUE.fullmatch(value) and len(value) <= 63
    assert label_value("s-1") == "s-1"
    long_user = "A" * 64
    assert LABEL_VALUE.fullmatch(label_value(long_user)) and len(label_value(long_user)) <= 63
    with pytest.raises(BackendError):
        pod_name("../etc")
    # Two owners never share a home claim, whatever their ids and templates contain.
    assert home_claim_name("a-b", "c") != home_claim_name("a", "b-c")
    assert DNS_LABEL.fullmatch(home_claim_name(long_user, "dev-chromium"))


def test_pvc_size_and_class() -> None:
    claim = make_pvc(
        _spec(), agent_id="agent-1", namespace="desks", storage_class="fast", size="5Gi"
    )
    assert claim["spec"]["storageClassName"] == "fast"
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert SESSION_LABEL not in claim["metadata"]["labels"]  # outlives every session
    limited = make_pvc(
        _spec(home_limit_mb=2048), agent_id="a", namespace="n", storage_class="", size="5Gi"
    )
    assert limited["spec"]["resources"]["requests"]["storage"] == "2048Mi"
    assert "storageClassName" not in limited["spec"]


def test_secret_holds_the_password_and_the_entrypoint_form() -> None:
    password = vnc_password(b"k" * 32, "s-1")
    assert len(password) == vnc.PASSWORD_BYTES
    assert password == vnc_password(b"k" * 32, "s-1") != vnc_password(b"k" * 32, "s-2")
    cookie = sound_cookie(b"k" * 32, "s-1")
    keys = files_keys(b"k" * 32, "s-1")
    secret = make_vnc_secret(
        _spec(),
        agent_id="agent-1",
        namespace="desks",
        password=password,
        cookie=cookie,
        files=keys,
    )
    assert secret["metadata"]["name"] == secret_name("s-1")
    assert secret["metadata"]["labels"][AGENT_LABEL] == "agent-1"
    data = secret["stringData"]
    assert data[SECRET_PASSWORD_KEY].encode() == password
    octal = data[SECRET_ENTRYPOINT_KEY]
    decoded = bytes(int(octal[i + 1 : i + 4], 8) for i in range(0, len(octal), 4))
    assert decoded == vnc.obfuscated_password(password)
    assert base64.b64encode(password)  # plain ASCII: stores as-is
    assert bytes.fromhex(data[SECRET_COOKIE_KEY]) == cookie
    octal = data[SECRET_COOKIE_ENTRYPOINT_KEY]
    assert bytes(int(octal[i + 1 : i + 4], 8) for i in range(0, len(octal), 4)) == cookie
    assert data[SECRET_FILES_HOST_KEY] == keys.host_private
    assert data[SECRET_FILES_CLIENT_PUBLIC] == keys.client_public


def test_file_transfer_keys_are_per_session_ed25519_pairs() -> None:
    keys = files_keys(b"k" * 32, "s-1")
    again = files_keys(b"k" * 32, "s-1")  # the same keys (OpenSSH's check bytes vary)
    assert (keys.host_public, keys.client_public) == (again.host_public, again.client_public)
    other = files_keys(b"k" * 32, "s-2")
    mine, theirs = {keys.host_public, keys.client_public}, {other.host_public, other.client_public}
    assert mine.isdisjoint(theirs)
    assert keys.host_public != keys.client_public
    for private, public in (
        (keys.host_private, keys.host_public),
        (keys.client_private, keys.client_public),
    ):
        loaded = serialization.load_ssh_private_key(private.encode(), None)
        assert isinstance(loaded, ed25519.Ed25519PrivateKey)
        line = loaded.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        assert line.decode() == public and public.startswith("ssh-ed25519 ")


def test_the_pods_sftp_server_gets_its_host_key_and_the_one_client_key_from_the_secret() -> None:
    (container,) = _pod()["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env[FILES_PORT_ENV]["value"] == str(FILES_PORT)
    for name, key in (
        (FILES_HOST_KEY_ENV, SECRET_FILES_HOST_KEY),
        (FILES_CLIENT_KEY_ENV, SECRET_FILES_CLIENT_PUBLIC),
    ):
        assert env[name]["valueFrom"]["secretKeyRef"] == {
            "name": secret_name("s-1"),
            "key": key,
            "optional": True,
        }
    # The agent's own private key never reaches the pod.
    refs = [e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"] if "valueFrom" in e]
    assert SECRET_FILES_CLIENT_KEY not in refs
    assert {"name": "files", "containerPort": FILES_PORT, "protocol": "TCP"} in container["ports"]
    planted = ImageLaunch(image="x:1", env={FILES_CLIENT_KEY_ENV: "ssh-ed25519 AAAA evil"})
    (c,) = _pod(_spec(image=planted))["spec"]["containers"]
    assert all("value" not in e for e in c["env"] if e["name"] == FILES_CLIENT_KEY_ENV)


def test_the_sound_cookie_is_per_session_and_the_size_pulseaudio_takes() -> None:
    cookie = sound_cookie(b"k" * 32, "s-1")
    assert len(cookie) == 256 == len(set(cookie[i : i + 32] for i in range(0, 256, 32))) * 32
    assert cookie == sound_cookie(b"k" * 32, "s-1") != sound_cookie(b"k" * 32, "s-2")
    assert cookie != sound_cookie(b"j" * 32, "s-1")


def test_the_pod_serves_sound_with_the_cookie_from_its_secret_only() -> None:
    (container,) = _pod()["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env[PULSE_PORT_ENV]["value"] == str(SOUND_PORT)
    # Optional, so a session whose Secret predates sound still wakes (without it).
    assert env[PULSE_COOKIE_ENV]["valueFrom"] == {
        "secretKeyRef": {
            "name": secret_name("s-1"),
            "key": SECRET_COOKIE_ENTRYPOINT_KEY,
            "optional": True,
        }
    }
    assert {"name": "sound", "containerPort": SOUND_PORT, "protocol": "TCP"} in container["ports"]
    planted = ImageLaunch(image="x:1", env={PULSE_COOKIE_ENV: "\\000", PULSE_PORT_ENV: "1"})
    (c,) = _pod(_spec(image=planted))["spec"]["containers"]
    assert all("value" not in e for e in c["env"] if e["name"] == PULSE_COOKIE_ENV)
    assert [e["value"] for e in c["env"] if e["name"] == PULSE_PORT_ENV] == [str(SOUND_PORT)]


def test_network_policy_admits_vnc_and_sound_only_from_the_agent() -> None:
    policy = make_network_policy(
        agent_id="agent-1",
        namespace="desks",
        agent_pod_labels={"app.kubernetes.io/name": "streamspace-agent"},
        vnc_port=5901,
    )
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"][AGENT_LABEL] == "agent-1"
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert rule["ports"] == [
        {"protocol": "TCP", "port": 5901},
        {"protocol": "TCP", "port": SOUND_PORT},
        {"protocol": "TCP", "port": FILES_PORT},
    ]
    assert rule["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "streamspace-agent"}}}
    ]
    elsewhere = make_network_policy(
        agent_id="agent-1",
        namespace="desks",
        agent_pod_labels={"app": "agent"},
        agent_namespace="streamspace",
    )
    (peer,) = elsewhere["spec"]["ingress"][0]["from"]
    assert peer["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "streamspace"}
    }


def test_sessions_without_network_get_no_egress() -> None:
    policy = make_egress_policy(agent_id="agent-1", namespace="desks")
    assert policy["spec"]["egress"] == []
    assert policy["spec"]["policyTypes"] == ["Egress"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    offline = _pod()["metadata"]["labels"]
    online = _pod(_spec(network=True))["metadata"]["labels"]
    assert all(offline.get(k) == v for k, v in selector.items())
    assert not all(online.get(k) == v for k, v in selector.items())


def test_settings_become_the_backend_config() -> None:
    settings = Settings(
        kube_namespace="desks",
        kube_image_pull_secrets="a, b",  # type: ignore[arg-type]
        kube_node_selector="pool=desks,zone=z1",
        kube_tolerations='[{"key": "k", "operator": "Exists"}]',
        kube_storage_class="fast",
    )
    config = KubeConfig.from_settings(settings)
    assert config.namespace == "desks"
    assert config.pod.image_pull_secrets == ("a", "b")
    assert config.pod.node_selector == {"pool": "desks", "zone": "z1"}
    assert config.pod.tolerations == ({"key": "k", "operator": "Exists"},)
    assert config.agent_pod_labels == {"app.kubernetes.io/name": "streamspace-agent"}
    assert KubeConfig.from_settings(settings, namespace="other").namespace == "other"
    with pytest.raises(BackendError):
        parse_labels("novalue", "x")
    with pytest.raises(BackendError):
        parse_tolerations("{}")


# ---- what a pod's status means --------------------------------------------------------------


def _status(**status: Any) -> dict[str, Any]:
    pod = _pod()
    pod["status"] = status
    return pod


def test_pending_pod_has_no_failure_and_no_milestones() -> None:
    pod = _status(phase="Pending")
    assert podstate.failure(pod) is None
    assert podstate.progress(pod) == []
    assert podstate.run_state(pod) == "running"


def test_unschedulable_surfaces_the_scheduler_message() -> None:
    message = "0/3 nodes are available: 3 Insufficient memory."
    pod = _status(
        phase="Pending",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": message,
            }
        ],
    )
    assert podstate.failure(pod) == f"the session pod cannot be scheduled: {message}"


@pytest.mark.parametrize("reason", ["ErrImagePull", "ImagePullBackOff", "CrashLoopBackOff"])
def test_fatal_waiting_reasons_fail_with_the_kubelet_message(reason: str) -> None:
    pod = _status(
        phase="Pending",
        containerStatuses=[
            {"name": "session", "state": {"waiting": {"reason": reason, "message": "no such"}}}
        ],
    )
    assert podstate.failure(pod) == f"{reason}: no such"


def test_milestones_in_order_and_exit_reasons() -> None:
    pod = _status(
        phase="Running",
        podIP="10.1.2.3",
        conditions=[{"type": "PodScheduled", "status": "True"}],
        containerStatuses=[{"name": "session", "state": {"running": {}}}],
    )
    pod["spec"]["nodeName"] = "n1"
    assert podstate.progress(pod) == [
        "scheduled on node n1",
        "pulling image localhost/streamspace/xterm:abc",
        "container started",
    ]
    assert podstate.failure(pod) is None
    assert podstate.container_running(pod) and podstate.pod_ip(pod) == "10.1.2.3"
    oom = _status(
        phase="Failed",
        containerStatuses=[
            {"name": "session", "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}
        ],
    )
    assert podstate.failure(oom) == "app was killed: out of memory"
    assert podstate.run_state(oom) == "exited"
    pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert podstate.run_state(pod) == "stopped"
