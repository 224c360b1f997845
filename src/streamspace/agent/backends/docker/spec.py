"""What a session's container is, as data: names, labels, environment, mounts, limits.

Pure functions only (kubespawner's `make_pod` style): `container_config()` takes the session's
spec and what the agent already decided (its id, the session's VNC password, the socket
directory, the home volume) and returns the keyword arguments of the engine's create call, so
the isolation a container gets can be read and tested without an engine.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from streamspace.agent import vnc
from streamspace.agent.backends.base import BackendError
from streamspace.agent.backends.imageenv import (
    PULSE_SOCKET_ENV,
    RESERVED_ENV,
    VNC_PASSWORD_ENV,
    VNC_SOCKET_ENV,
    printf_octal,
)
from streamspace.protocol import SessionSpec

SESSION_LABEL = "org.streamspace.session"
OWNER_LABEL = "org.streamspace.owner"
OWNER_ID_LABEL = "org.streamspace.owner-id"
TEMPLATE_LABEL = "org.streamspace.template"
AGENT_LABEL = "org.streamspace.agent"

CONTAINER_RUN_DIR = "/run/streamspace"
VNC_SOCKET_NAME = "vnc.sock"
PULSE_SOCKET_NAME = "pulse.sock"
CONTAINER_USER = "1000:1000"
CONTAINER_HOME = "/home/streamspace"
CONTAINER_UID = int(CONTAINER_USER.split(":")[0])
"""Owner of the session's VNC socket under a rootful engine; the container can plant other
files in that directory, so a root agent connects only to a socket of this uid."""
PIDS_LIMIT = 2048
SESSION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
ID_RE = re.compile(r"[A-Za-z0-9-]{1,64}")
_VOLUME_OK_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_TEMPLATE_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def container_name(session_id: str) -> str:
    if not SESSION_ID_RE.fullmatch(session_id):
        raise BackendError(
            f"invalid session id {session_id!r}: use letters, digits and . _ - (max 128)"
        )
    return f"ss-{session_id}"


def home_volume_name(user_id: str, template: str) -> str:
    """`ss-home_<user id>_<template>`: ids are hex and template names have no `_`, so the
    name is unambiguous (the v1 scheme joined names with `-`: alice+dev-chromium and
    alice-dev+chromium collided)."""
    if not ID_RE.fullmatch(user_id) or not _TEMPLATE_RE.fullmatch(template):
        raise BackendError(f"cannot name a home volume for user {user_id!r}, {template!r}")
    return f"ss-home_{user_id}_{template}"


def legacy_home_volume_name(user: str, template: str) -> str:
    """The v1 name, `ss-home-<user>-<template>`, kept only to find volumes to migrate."""
    raw = f"ss-home-{user}-{template}"
    if _VOLUME_OK_RE.fullmatch(raw) and len(raw) <= 200:
        return raw
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{user}-{template}").strip("-.")[:100]
    digest = hashlib.sha256(f"{user}\0{template}".encode()).hexdigest()[:10]
    return f"ss-home-{safe}-{digest}" if safe else f"ss-home-{digest}"


def legacy_key(user_id: str, template: str) -> str:
    """How a migrated v1 volume is found: "<user id>_<template>"."""
    return f"{user_id}_{template}"


def home_volume_for(spec: SessionSpec, legacy: Mapping[str, str]) -> str | None:
    """The session's home volume: none without a persistent home, the user's migrated v1
    volume if there is one, else the one named from the user's id and the template."""
    if not spec.persistent_home:
        return None
    return legacy.get(legacy_key(spec.user_id, spec.template)) or home_volume_name(
        spec.user_id, spec.template
    )


def vnc_password(key: bytes, session_id: str) -> bytes:
    """The session's VNC password: 8 printable bytes from an HMAC of its id."""
    alphabet = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789"
    digest = hmac.new(key, session_id.encode(), hashlib.sha256).digest()
    return bytes(alphabet[b % len(alphabet)] for b in digest[: vnc.PASSWORD_BYTES])


def clipboard_env(spec: SessionSpec) -> dict[str, str]:
    """What the image's entrypoint turns into Xvnc's AcceptCutText / SendCutText."""
    return {
        "VNC_CLIPBOARD_IN": "1" if spec.clipboard.copy_in else "0",
        "VNC_CLIPBOARD_OUT": "1" if spec.clipboard.copy_out else "0",
    }


def container_config(
    spec: SessionSpec,
    *,
    agent_id: str,
    vnc_password: bytes,
    run_dir: Path,
    home_volume: str | None,
) -> dict[str, Any]:
    """The keyword arguments of `containers.create(**config)` for one session.

    uid 1000, every capability dropped, no-new-privileges, a pids limit, CPU/memory from the
    spec's resources; no network unless the template asks; no published port: the VNC server
    listens on a socket in `run_dir`, bind-mounted at /run/streamspace, and so does the sound
    server.
    """
    if spec.image is None:
        raise BackendError(f"template {spec.template!r} has no container image")
    env = {k: v for k, v in spec.image.env.items() if k not in RESERVED_ENV}
    env["VNC_GEOMETRY"] = f"{spec.display.width}x{spec.display.height}"
    env["VNC_DEPTH"] = str(spec.display.depth)
    env.update(clipboard_env(spec))
    env[VNC_PASSWORD_ENV] = printf_octal(vnc.obfuscated_password(vnc_password))
    env[VNC_SOCKET_ENV] = f"{CONTAINER_RUN_DIR}/{VNC_SOCKET_NAME}"
    env[PULSE_SOCKET_ENV] = f"{CONTAINER_RUN_DIR}/{PULSE_SOCKET_NAME}"
    memory_mb = spec.resources.memory_mb
    volumes = {str(run_dir): {"bind": CONTAINER_RUN_DIR, "mode": "rw"}}
    if home_volume is not None:
        volumes[home_volume] = {"bind": CONTAINER_HOME, "mode": "rw"}
    config: dict[str, Any] = {
        "image": spec.image.image,
        "name": container_name(spec.session_id),
        "labels": {
            SESSION_LABEL: spec.session_id,
            OWNER_LABEL: spec.user,
            OWNER_ID_LABEL: spec.user_id,
            TEMPLATE_LABEL: spec.template,
            AGENT_LABEL: agent_id,
        },
        "environment": env,
        "user": CONTAINER_USER,
        "nano_cpus": spec.resources.cpu_millis * 1_000_000,
        "mem_limit": f"{memory_mb}m",
        "shm_size": f"{max(64, min(512, memory_mb // 4))}m",
        "pids_limit": PIDS_LIMIT,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "hostname": "streamspace",
        "detach": True,
        "volumes": volumes,
    }
    if spec.image.command:
        config["command"] = list(spec.image.command)
    if not spec.network:
        config["network_mode"] = "none"
    return config
