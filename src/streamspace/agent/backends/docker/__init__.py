"""The docker backend: sessions as containers on a Docker-API engine (see backend.py).

`spec` says what a container is (pure data), `engine` talks to the engine, `containers` maps
sessions to this agent's containers and sockets, `homes` owns the persistent home volumes,
`monitor` reports containers that stopped on their own, `backend` runs sessions with them.
"""

from streamspace.agent.backends.base import ExitCallback
from streamspace.agent.backends.docker.backend import DockerBackend, label_id
from streamspace.agent.backends.docker.spec import (
    AGENT_LABEL,
    OWNER_ID_LABEL,
    OWNER_LABEL,
    SESSION_LABEL,
    TEMPLATE_LABEL,
    VNC_PASSWORD_ENV,
    container_config,
    container_name,
    home_volume_name,
    legacy_home_volume_name,
    vnc_password,
)

__all__ = [
    "AGENT_LABEL",
    "OWNER_ID_LABEL",
    "OWNER_LABEL",
    "SESSION_LABEL",
    "TEMPLATE_LABEL",
    "VNC_PASSWORD_ENV",
    "DockerBackend",
    "ExitCallback",
    "container_config",
    "container_name",
    "home_volume_name",
    "label_id",
    "legacy_home_volume_name",
    "vnc_password",
]
