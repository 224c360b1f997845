"""What a session's Kubernetes objects are, as data: names, labels, the Pod, its home's PVC, its
VNC Secret and the agent's NetworkPolicies.

Pure functions only (kubespawner's `objects.py` style): each takes the session's spec and what
the agent already decided and returns the object as the plain JSON dict the API server takes,
so the isolation a pod gets can be read and tested without a cluster.

Names and label values have stricter syntax than StreamSpace ids (lowercase DNS labels, 63
characters), so objects are named from a readable slug plus a hash of the real id, label values
are sanitised the same way for selection, and the real ids travel in annotations.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from streamspace.agent import vnc
from streamspace.agent.backends.base import BackendError
from streamspace.agent.backends.imageenv import (
    FILES_CLIENT_KEY_ENV,
    FILES_HOST_KEY_ENV,
    FILES_PORT_ENV,
    PULSE_COOKIE_ENV,
    PULSE_PORT_ENV,
    RESERVED_ENV,
    VNC_PASSWORD_ENV,
    printf_octal,
)
from streamspace.protocol import SessionSpec

GROUP = "streamspace.org"
SESSION_LABEL = f"{GROUP}/session"
USER_ID_LABEL = f"{GROUP}/user-id"
TEMPLATE_LABEL = f"{GROUP}/template"
AGENT_LABEL = f"{GROUP}/agent"
NETWORK_LABEL = f"{GROUP}/network"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
SESSION_ANNOTATION = f"{GROUP}/session-id"
USER_ID_ANNOTATION = f"{GROUP}/user-id"
OWNER_ANNOTATION = f"{GROUP}/owner"
TEMPLATE_ANNOTATION = f"{GROUP}/template"

CONTAINER_NAME = "session"
CONTAINER_UID = 1000
"""The images' user `streamspace`; the docker backend runs the same uid."""
CONTAINER_HOME = "/home/streamspace"
SESSION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
VNC_PORT = 5901
"""The port StreamSpace's images' Xvnc listens on when no socket is asked for (entrypoint.sh)."""
SECRET_PASSWORD_KEY = "password"
"""The plain 8-byte VNC password, which the agent reads back to authenticate after a restart."""
SECRET_ENTRYPOINT_KEY = "vncpasswd-printf"
"""The same password obfuscated for vncpasswd, as the printf octal escapes entrypoint.sh takes."""
SOUND_PORT = 4713
"""PulseAudio's native protocol port, where the images' entrypoint serves the session's sound
to the agent (cookie authentication) when STREAMSPACE_PULSE_PORT says so."""
SECRET_COOKIE_KEY = "sound-cookie"
"""The cookie in hex, which the agent's encoder authenticates with."""
SECRET_COOKIE_ENTRYPOINT_KEY = "sound-cookie-printf"
SOUND_COOKIE_BYTES = 256
FILES_PORT = 2222
"""Where the images' entrypoint has OpenSSH serve SFTP of the home (file transfer), to the
agent's per-session key only, when STREAMSPACE_FILES_PORT says so."""
FILES_USER = "streamspace"
SECRET_FILES_HOST_KEY = "files-host-key"
"""The pod's SSH host key (OpenSSH private key), for its sshd."""
SECRET_FILES_HOST_PUBLIC = "files-host-public"
SECRET_FILES_CLIENT_KEY = "files-client-key"
"""The agent's SSH key for this session (OpenSSH private key): for the agent alone."""
SECRET_FILES_CLIENT_PUBLIC = "files-client-public"
SHM_VOLUME = "dshm"
HOME_VOLUME = "home"

_DNS_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_VALUE_RE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")


@dataclass(frozen=True)
class PodSettings:
    """What the operator decides for every session pod of an agent (from its settings)."""

    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, Any]] = ()
    vnc_port: int = VNC_PORT
    service_account: str = ""
    """Empty: the namespace's `default`; its token is never mounted either way."""


def vnc_password(key: bytes, session_id: str) -> bytes:
    """The session's VNC password: 8 printable bytes from an HMAC of its id (as the docker
    backend derives it), so it is the same whichever agent replica recreates the Secret."""
    alphabet = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789"
    digest = hmac.new(key, session_id.encode(), hashlib.sha256).digest()
    return bytes(alphabet[b % len(alphabet)] for b in digest[: vnc.PASSWORD_BYTES])


def sound_cookie(key: bytes, session_id: str) -> bytes:
    """The session's PulseAudio cookie, derived like its VNC password (HMAC blocks of its id),
    so every agent replica computes the same one."""
    blocks = (
        hmac.new(key, f"sound\0{session_id}\0{i}".encode(), hashlib.sha256).digest()
        for i in range(SOUND_COOKIE_BYTES // 32)
    )
    return b"".join(blocks)


@dataclass(frozen=True)
class FilesKeys:
    """The SSH keys of a session's file transfer: the pod's host key and the agent's client
    key, each an OpenSSH private key with its public line."""

    host_private: str
    host_public: str
    client_private: str
    client_public: str


def files_keys(key: bytes, session_id: str) -> FilesKeys:
    """Ed25519 keys from HMAC seeds of the session's id (as its VNC password), so every agent
    replica derives the same ones and the agent knows the pod's host key before it exists."""

    def derive(label: str) -> tuple[str, str]:
        seed = hmac.new(key, f"{label}\0{session_id}".encode(), hashlib.sha256).digest()
        private = Ed25519PrivateKey.from_private_bytes(seed)
        pem = private.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption())
        public = private.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
        return pem.decode("ascii"), public.decode("ascii")

    host_private, host_public = derive("files-host")
    client_private, client_public = derive("files-client")
    return FilesKeys(host_private, host_public, client_private, client_public)


def _digest(*parts: str, length: int = 10) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:length]


def _slug(text: str, limit: int) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")


def label_value(text: str) -> str:
    """`text` itself if it is a valid label value, else a readable slug plus a hash of it."""
    if len(text) <= 63 and _LABEL_VALUE_RE.fullmatch(text):
        return text
    slug = _slug(text, 52)
    return f"{slug}-{_digest(text)}" if slug else _digest(text)


def pod_name(session_id: str) -> str:
    """`ss-<session id>` when the id is a DNS label already, else a slug plus a hash of it; the
    pod, its Secret and nothing else of another session can share it."""
    if not SESSION_ID_RE.fullmatch(session_id):
        raise BackendError(
            f"invalid session id {session_id!r}: use letters, digits and . _ - (max 128)"
        )
    if len(session_id) <= 60 and _DNS_LABEL_RE.fullmatch(session_id):
        return f"ss-{session_id}"
    return f"ss-{_slug(session_id, 40)}-{_digest(session_id)}".replace("--", "-")


def secret_name(session_id: str) -> str:
    return f"{pod_name(session_id)}-vnc"


def home_claim_name(user_id: str, template: str) -> str:
    """One claim per user id and template; the hash keeps `a-b`+`c` and `a`+`b-c` apart (ids
    and template names both contain `-`), the slugs keep it readable."""
    return f"ss-home-{_slug(user_id, 20)}-{_slug(template, 20)}-{_digest(user_id, template)}"


def network_policy_name(agent_id: str) -> str:
    return f"ss-agent-{_slug(agent_id, 30)}-{_digest(agent_id, length=8)}-vnc"


def egress_policy_name(agent_id: str) -> str:
    return f"ss-agent-{_slug(agent_id, 30)}-{_digest(agent_id, length=8)}-no-egress"


def session_labels(spec: SessionSpec, agent_id: str) -> dict[str, str]:
    return {
        SESSION_LABEL: label_value(spec.session_id),
        USER_ID_LABEL: label_value(spec.user_id),
        TEMPLATE_LABEL: label_value(spec.template),
        AGENT_LABEL: label_value(agent_id),
        COMPONENT_LABEL: "session",
        MANAGED_BY_LABEL: "streamspace",
    }


def session_annotations(spec: SessionSpec) -> dict[str, str]:
    return {
        SESSION_ANNOTATION: spec.session_id,
        USER_ID_ANNOTATION: spec.user_id,
        OWNER_ANNOTATION: spec.user,
        TEMPLATE_ANNOTATION: spec.template,
    }


def agent_selector(agent_id: str) -> str:
    """The label selector of every object this agent owns."""
    return f"{AGENT_LABEL}={label_value(agent_id)}"


def _quantity_cpu(millis: int) -> str:
    return f"{millis}m"


def _quantity_memory(mb: int) -> str:
    return f"{mb}Mi"


def make_vnc_secret(
    spec: SessionSpec,
    *,
    agent_id: str,
    namespace: str,
    password: bytes,
    cookie: bytes,
    files: FilesKeys,
) -> dict[str, Any]:
    """The session's VNC password, sound cookie and file transfer keys, for its pod's
    entrypoint (the keys its env names) and for the agent alone."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": secret_name(spec.session_id),
            "namespace": namespace,
            "labels": session_labels(spec, agent_id),
            "annotations": session_annotations(spec),
        },
        "type": "Opaque",
        "stringData": {
            SECRET_PASSWORD_KEY: password.decode("ascii"),
            SECRET_ENTRYPOINT_KEY: printf_octal(vnc.obfuscated_password(password)),
            SECRET_COOKIE_KEY: cookie.hex(),
            SECRET_COOKIE_ENTRYPOINT_KEY: printf_octal(cookie),
            SECRET_FILES_HOST_KEY: files.host_private,
            SECRET_FILES_HOST_PUBLIC: files.host_public,
            SECRET_FILES_CLIENT_KEY: files.client_private,
            SECRET_FILES_CLIENT_PUBLIC: files.client_public,
        },
    }


def make_pvc(
    spec: SessionSpec,
    *,
    agent_id: str,
    namespace: str,
    storage_class: str,
    size: str,
) -> dict[str, Any]:
    """The persistent home of one user id + template; it outlives every session using it.

    `size` is the operator's default unless the session carries a home limit; an empty
    `storage_class` means the cluster's default class."""
    requested = _quantity_memory(spec.home_limit_mb) if spec.home_limit_mb else size
    labels = session_labels(spec, agent_id)
    del labels[SESSION_LABEL]
    labels[COMPONENT_LABEL] = "home"
    claim: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": home_claim_name(spec.user_id, spec.template),
            "namespace": namespace,
            "labels": labels,
            "annotations": {
                USER_ID_ANNOTATION: spec.user_id,
                OWNER_ANNOTATION: spec.user,
                TEMPLATE_ANNOTATION: spec.template,
            },
        },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": requested}},
        },
    }
    if storage_class:
        claim["spec"]["storageClassName"] = storage_class
    return claim


def make_pod(
    spec: SessionSpec,
    *,
    agent_id: str,
    namespace: str,
    settings: PodSettings,
    home_claim: str | None,
) -> dict[str, Any]:
    """The session's one pod: uid 1000 non-root, no privilege escalation, every capability
    dropped, seccomp RuntimeDefault, no ServiceAccount token, requests = limits from the spec's
    resources, the VNC password from its Secret, the home claim (if any) at the home. The app
    exiting ends the pod (restartPolicy Never), as a docker session's container does."""
    if spec.image is None:
        raise BackendError(f"template {spec.template!r} has no container image")
    env: list[dict[str, Any]] = [
        {"name": k, "value": v} for k, v in sorted(spec.image.env.items()) if _env_allowed(k)
    ]
    env += [
        {"name": "VNC_GEOMETRY", "value": f"{spec.display.width}x{spec.display.height}"},
        {"name": "VNC_DEPTH", "value": str(spec.display.depth)},
        {"name": "VNC_CLIPBOARD_IN", "value": "1" if spec.clipboard.copy_in else "0"},
        {"name": "VNC_CLIPBOARD_OUT", "value": "1" if spec.clipboard.copy_out else "0"},
        {
            "name": VNC_PASSWORD_ENV,
            "valueFrom": {
                "secretKeyRef": {"name": secret_name(spec.session_id), "key": SECRET_ENTRYPOINT_KEY}
            },
        },
        {"name": PULSE_PORT_ENV, "value": str(SOUND_PORT)},
        {
            # Optional: a Secret made before sessions had sound lacks the key, and its session
            # must still wake (without sound).
            "name": PULSE_COOKIE_ENV,
            "valueFrom": {
                "secretKeyRef": {
                    "name": secret_name(spec.session_id),
                    "key": SECRET_COOKIE_ENTRYPOINT_KEY,
                    "optional": True,
                }
            },
        },
        {"name": FILES_PORT_ENV, "value": str(FILES_PORT)},
        *(
            {
                "name": name,
                "valueFrom": {
                    "secretKeyRef": {
                        "name": secret_name(spec.session_id),
                        "key": key,
                        "optional": True,
                    }
                },
            }
            for name, key in (
                (FILES_HOST_KEY_ENV, SECRET_FILES_HOST_KEY),
                (FILES_CLIENT_KEY_ENV, SECRET_FILES_CLIENT_PUBLIC),
            )
        ),
    ]
    resources = {
        "cpu": _quantity_cpu(spec.resources.cpu_millis),
        "memory": _quantity_memory(spec.resources.memory_mb),
    }
    shm_mb = max(64, min(512, spec.resources.memory_mb // 4))
    mounts = [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_mb}Mi"}}
    ]
    if home_claim is not None:
        mounts.append({"name": HOME_VOLUME, "mountPath": CONTAINER_HOME})
        volumes.append({"name": HOME_VOLUME, "persistentVolumeClaim": {"claimName": home_claim}})
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image.image,
        "imagePullPolicy": settings.image_pull_policy,
        "env": env,
        "ports": [
            {"name": "vnc", "containerPort": settings.vnc_port, "protocol": "TCP"},
            {"name": "sound", "containerPort": SOUND_PORT, "protocol": "TCP"},
            {"name": "files", "containerPort": FILES_PORT, "protocol": "TCP"},
        ],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": CONTAINER_UID,
            "runAsGroup": CONTAINER_UID,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    }
    if spec.image.command:
        container["args"] = list(spec.image.command)
    labels = session_labels(spec, agent_id)
    labels[NETWORK_LABEL] = "true" if spec.network else "false"
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "hostname": "streamspace",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": CONTAINER_UID,
            "runAsGroup": CONTAINER_UID,
            "fsGroup": CONTAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumes": volumes,
        "terminationGracePeriodSeconds": 5,
    }
    if settings.service_account:
        pod_spec["serviceAccountName"] = settings.service_account
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in settings.image_pull_secrets]
    # The template says where its pods need to run; the agent's operator has the last word on
    # a label both set, and the taints the operator tolerates apply to every session.
    node_selector = {**spec.node_selector, **settings.node_selector}
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    tolerations = [dict(t) for t in settings.tolerations] + [t.manifest() for t in spec.tolerations]
    if tolerations:
        pod_spec["tolerations"] = tolerations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(spec.session_id),
            "namespace": namespace,
            "labels": labels,
            "annotations": session_annotations(spec),
        },
        "spec": pod_spec,
    }


def _env_allowed(name: str) -> bool:
    return name not in RESERVED_ENV


def make_network_policy(
    *,
    agent_id: str,
    namespace: str,
    agent_pod_labels: Mapping[str, str],
    agent_namespace: str = "",
    vnc_port: int = VNC_PORT,
) -> dict[str, Any]:
    """Ingress to this agent's session pods: the VNC, sound and file ports, only from the
    agent's own pods (in `agent_namespace` when it runs in another one), nothing else."""
    peer: dict[str, Any] = {"podSelector": {"matchLabels": dict(agent_pod_labels)}}
    if agent_namespace:
        peer["namespaceSelector"] = {
            "matchLabels": {"kubernetes.io/metadata.name": agent_namespace}
        }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": network_policy_name(agent_id),
            "namespace": namespace,
            "labels": {AGENT_LABEL: label_value(agent_id), MANAGED_BY_LABEL: "streamspace"},
        },
        "spec": {
            "podSelector": {
                "matchLabels": {AGENT_LABEL: label_value(agent_id), COMPONENT_LABEL: "session"}
            },
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [peer],
                    "ports": [
                        {"protocol": "TCP", "port": vnc_port},
                        {"protocol": "TCP", "port": SOUND_PORT},
                        {"protocol": "TCP", "port": FILES_PORT},
                    ],
                }
            ],
        },
    }


def make_egress_policy(*, agent_id: str, namespace: str) -> dict[str, Any]:
    """No egress at all for sessions whose template did not ask for the network (the docker
    backend's `network_mode: none`); replies to the agent's VNC connection still flow."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": egress_policy_name(agent_id),
            "namespace": namespace,
            "labels": {AGENT_LABEL: label_value(agent_id), MANAGED_BY_LABEL: "streamspace"},
        },
        "spec": {
            "podSelector": {
                "matchLabels": {AGENT_LABEL: label_value(agent_id), NETWORK_LABEL: "false"}
            },
            "policyTypes": ["Egress"],
            "egress": [],
        },
    }
