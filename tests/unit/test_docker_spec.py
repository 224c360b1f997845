"""What a session's container is, as data: `container_config()` is what the engine is asked
to create, so the isolation every docker session gets is read here without an engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from streamspace.agent import vnc
from streamspace.agent.backends.base import BackendError
from streamspace.agent.backends.docker import (
    AGENT_LABEL,
    OWNER_ID_LABEL,
    OWNER_LABEL,
    SESSION_LABEL,
    TEMPLATE_LABEL,
    VNC_PASSWORD_ENV,
    container_config,
    home_volume_name,
    vnc_password,
)
from streamspace.agent.backends.docker.spec import home_volume_for
from streamspace.protocol import Display, ImageLaunch, Resources, SessionSpec

USER_ID = "0f3c9a1b2d4e5f60718293a4b5c6d7e8"
RUN_DIR = Path("/var/lib/streamspace-agent/docker-run/s-1")
PASSWORD = vnc_password(b"k" * 32, "s-1")


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


def _config(spec: SessionSpec | None = None, **kwargs: Any) -> dict[str, Any]:
    spec = spec or _spec()
    args: dict[str, Any] = {
        "agent_id": "agent-7",
        "vnc_password": PASSWORD,
        "run_dir": RUN_DIR,
        "home_volume": home_volume_for(spec, {}),
    }
    args.update(kwargs)
    return container_config(spec, **args)


def test_the_container_runs_unprivileged() -> None:
    config = _config()
    assert config["user"] == "1000:1000"
    assert config["cap_drop"] == ["ALL"]
    assert "cap_add" not in config
    assert config["security_opt"] == ["no-new-privileges"]
    assert "privileged" not in config
    assert config["pids_limit"] == 2048


def test_no_network_unless_the_template_asks() -> None:
    assert _config()["network_mode"] == "none"
    assert "network_mode" not in _config(_spec(network=True))


@pytest.mark.parametrize("network", [False, True])
def test_no_port_is_published(network: bool) -> None:
    config = _config(_spec(network=network, display=Display(vnc_port=5999)))
    assert "ports" not in config
    assert not config.get("publish_all_ports")
    assert config.get("network_mode") != "host"
    assert "5999" not in repr(config)


def test_vnc_and_sound_are_unix_sockets_in_the_bind_mounted_run_dir() -> None:
    config = _config()
    assert config["volumes"][str(RUN_DIR)] == {"bind": "/run/streamspace", "mode": "rw"}
    assert config["environment"]["STREAMSPACE_VNC_SOCKET"] == "/run/streamspace/vnc.sock"
    assert config["environment"]["STREAMSPACE_PULSE_SOCKET"] == "/run/streamspace/pulse.sock"


def test_the_vnc_password_reaches_the_entrypoint_obfuscated_as_printf_octal() -> None:
    encoded = _config()["environment"][VNC_PASSWORD_ENV]
    octets = bytes(int(encoded[i + 1 : i + 4], 8) for i in range(0, len(encoded), 4))
    assert octets == vnc.obfuscated_password(PASSWORD)
    assert PASSWORD.decode() not in encoded


def test_the_home_volume_is_named_from_ids_and_mounted_at_home() -> None:
    config = _config()
    volume = f"ss-home_{USER_ID}_xterm"
    assert volume == home_volume_name(USER_ID, "xterm")
    assert config["volumes"][volume] == {"bind": "/home/streamspace", "mode": "rw"}
    assert len(config["volumes"]) == 2


def test_a_migrated_v1_home_is_used_for_its_new_owner_only() -> None:
    legacy = {f"{USER_ID}_xterm": "ss-home-alice-xterm"}
    assert home_volume_for(_spec(), legacy) == "ss-home-alice-xterm"
    other = _spec(user_id="aa" * 16)
    assert home_volume_for(other, legacy) == f"ss-home_{'aa' * 16}_xterm"


def test_without_a_persistent_home_only_the_run_dir_is_mounted() -> None:
    spec = _spec(persistent_home=False)
    assert home_volume_for(spec, {f"{USER_ID}_xterm": "ss-home-alice-xterm"}) is None
    assert list(_config(spec)["volumes"]) == [str(RUN_DIR)]


def test_labels_name_the_session_owner_template_and_agent() -> None:
    config = _config()
    assert config["name"] == "ss-s-1"
    assert config["labels"] == {
        SESSION_LABEL: "s-1",
        OWNER_LABEL: "alice",
        OWNER_ID_LABEL: USER_ID,
        TEMPLATE_LABEL: "xterm",
        AGENT_LABEL: "agent-7",
    }


def test_limits_come_from_the_spec_resources() -> None:
    config = _config()
    assert config["nano_cpus"] == 750_000_000
    assert config["mem_limit"] == "384m"
    assert config["shm_size"] == "96m"
    big = _config(_spec(resources=Resources(cpu_millis=4000, memory_mb=8192)))
    assert (big["nano_cpus"], big["mem_limit"], big["shm_size"]) == (4_000_000_000, "8192m", "512m")
    small = _config(_spec(resources=Resources(cpu_millis=100, memory_mb=64)))
    assert small["shm_size"] == "64m"


def test_the_environment_sets_the_display_and_keeps_the_templates_own() -> None:
    env = _config()["environment"]
    assert env["VNC_GEOMETRY"] == "1024x640"
    assert env["VNC_DEPTH"] == "16"
    assert env["LANG"] == "C.UTF-8"


@pytest.mark.parametrize(
    "key",
    [
        "VNC_GEOMETRY",
        "DISPLAY",
        "HOME",
        "USER",
        VNC_PASSWORD_ENV,
        "STREAMSPACE_VNC_SOCKET",
        "STREAMSPACE_PULSE_SOCKET",
        "PULSE_SERVER",
    ],
)
def test_template_env_cannot_override_what_the_agent_sets(key: str) -> None:
    image = ImageLaunch(image="img:1", env={key: "/evil"})
    env = _config(_spec(image=image))["environment"]
    assert env.get(key) != "/evil"


def test_image_and_command_pass_through() -> None:
    assert _config()["image"] == "localhost/streamspace/xterm:abc"
    assert "command" not in _config()
    image = ImageLaunch(image="img:1", command=["xterm", "-fa", "Mono"])
    assert _config(_spec(image=image))["command"] == ["xterm", "-fa", "Mono"]


def test_a_template_without_an_image_is_refused() -> None:
    with pytest.raises(BackendError, match="no container image"):
        _config(_spec(image=None))


def test_an_unsafe_session_id_is_refused() -> None:
    with pytest.raises(BackendError, match="invalid session id"):
        _config(_spec(session_id="../x"))


@pytest.mark.parametrize(("copy_in", "copy_out"), [(True, True), (False, True), (True, False)])
def test_the_clipboard_policy_reaches_the_entrypoint(copy_in: bool, copy_out: bool) -> None:
    from streamspace.protocol import Clipboard

    env = _config(_spec(clipboard=Clipboard(copy_in=copy_in, copy_out=copy_out)))["environment"]
    assert env["VNC_CLIPBOARD_IN"] == ("1" if copy_in else "0")
    assert env["VNC_CLIPBOARD_OUT"] == ("1" if copy_out else "0")
