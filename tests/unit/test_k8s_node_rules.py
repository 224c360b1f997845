"""The test node's decisions as data: scheduling fit and messages, container arguments, phase.

These are the rules the integration tests rely on; wrong here, a pod would run where the real
scheduler refuses it or with a different user, command or limit than a kubelet gives it.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from streamspace_testing.k8s_node.fit import (
    Capacity,
    check_claims,
    matches_node,
    quantity,
    resource_problems,
    unschedulable_message,
)
from streamspace_testing.k8s_node.node import kubenet_plugins
from streamspace_testing.k8s_node.spec import ConfigError, Mount, create_spec, expand
from streamspace_testing.k8s_node.status import ContainerState, phase, terminated

LABELS = {"kubernetes.io/hostname": "n1", "zone": "a", "gpus": "2"}


def pod(**spec: Any) -> dict[str, Any]:
    containers = spec.pop("containers", [{"name": "main", "image": "img"}])
    return {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u-1"},
        "spec": {"containers": containers, **spec},
    }


def spec_of(p: dict[str, Any], image_user: str = "1000:1000", **kw: Any) -> dict[str, Any]:
    return create_spec(
        p,
        p["spec"]["containers"][0],
        name="c",
        sandbox="s",
        labels={"l": "v"},
        env=kw.get("env", {}),
        mounts=kw.get("mounts", []),
        image_config={"User": image_user},
    )


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("500m", "0.5"),
        ("2", "2"),
        ("256Mi", str(256 * 2**20)),
        ("1G", "1000000000"),
        ("1e3", "1000"),
    ],
)
def test_quantities(text: str, value: str) -> None:
    assert quantity(text) == Decimal(value)


def test_quantity_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        quantity("lots")


def test_node_selector_and_required_affinity() -> None:
    assert matches_node(pod(nodeSelector={"zone": "a"}), "n1", LABELS)
    assert not matches_node(pod(nodeSelector={"zone": "b"}), "n1", LABELS)
    assert not matches_node(pod(nodeSelector={"disktype": "ssd"}), "n1", LABELS)

    def affinity(*expressions: dict[str, Any], fields: bool = False) -> dict[str, Any]:
        term = {"matchFields" if fields else "matchExpressions": list(expressions)}
        required = {"nodeSelectorTerms": [term]}
        return pod(
            affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}}
        )

    assert matches_node(
        affinity({"key": "zone", "operator": "In", "values": ["a", "b"]}), "n1", LABELS
    )
    assert not matches_node(
        affinity({"key": "zone", "operator": "NotIn", "values": ["a"]}), "n1", LABELS
    )
    assert matches_node(affinity({"key": "gpus", "operator": "Gt", "values": ["1"]}), "n1", LABELS)
    assert not matches_node(
        affinity({"key": "gpus", "operator": "Lt", "values": ["1"]}), "n1", LABELS
    )
    assert not matches_node(affinity({"key": "ssd", "operator": "Exists"}), "n1", LABELS)
    assert matches_node(affinity({"key": "ssd", "operator": "DoesNotExist"}), "n1", LABELS)
    name = {"key": "metadata.name", "operator": "In", "values": ["n2"]}
    assert not matches_node(affinity(name, fields=True), "n1", LABELS)


def test_requests_against_allocatable() -> None:
    capacity = Capacity(cpu=Decimal(2), memory=quantity("1Gi"), pods=2)
    big = pod(
        containers=[{"name": "a", "resources": {"requests": {"cpu": "1500m", "memory": "800Mi"}}}]
    )
    assert resource_problems(big, [], capacity) == []
    assert resource_problems(big, [big], capacity) == ["Insufficient cpu", "Insufficient memory"]
    assert resource_problems(pod(), [pod(), pod()], capacity) == ["Too many pods"]


def test_claims_and_messages() -> None:
    bound = {"metadata": {"name": "a"}, "status": {"phase": "Bound"}}
    unbound = {
        "metadata": {"name": "b"},
        "spec": {"storageClassName": "std"},
        "status": {"phase": "Pending"},
    }
    assert check_claims({"a": bound}, set()).message is None
    assert check_claims({"b": unbound}, {"std"}).to_bind == [unbound]
    assert (
        check_claims({"b": unbound}, set()).message
        == "pod has unbound immediate PersistentVolumeClaims"
    )
    assert check_claims({"x": None}, set()).message == 'persistentvolumeclaim "x" not found'
    assert unschedulable_message(prefilter='persistentvolumeclaim "x" not found') == (
        '0/1 nodes are available: persistentvolumeclaim "x" not found. preemption: 0/1 nodes '
        "are available: 1 Preemption is not helpful for scheduling."
    )
    assert unschedulable_message(resources=["Insufficient cpu", "Insufficient memory"]).startswith(
        "0/1 nodes are available: 1 Insufficient cpu, 1 Insufficient memory. preemption:"
    )


def test_command_and_args_map_onto_entrypoint_and_cmd() -> None:
    both = spec_of(
        pod(containers=[{"name": "m", "image": "img", "command": ["sh", "-c"], "args": ["x"]}])
    )
    assert (both["entrypoint"], both["command"], both["image"]) == (["sh", "-c"], ["x"], "img")
    only_args = spec_of(
        pod(containers=[{"name": "m", "image": "img", "args": ["$(GREETING) $$HOME"]}]),
        env={"GREETING": "hi"},
    )
    assert "entrypoint" not in only_args  # the image's entrypoint stays
    assert only_args["command"] == ["hi $HOME"]
    neither = spec_of(pod())
    assert "entrypoint" not in neither and "command" not in neither


def test_security_context_and_limits() -> None:
    container = {
        "name": "m",
        "image": "img",
        "securityContext": {
            "runAsUser": 1001,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "resources": {"limits": {"cpu": "500m", "memory": "256Mi"}},
    }
    spec = spec_of(
        pod(
            containers=[container],
            securityContext={"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000},
        ),
        env={"SECRET": "s3cret"},
    )
    assert spec["user"] == "1001:1000" and spec["groups"] == ["2000"]
    assert spec["resource_limits"] == {
        "cpu": {"quota": 50_000, "period": 100_000},
        "memory": {"limit": 256 * 2**20, "swap": 256 * 2**20},
    }
    assert spec["no_new_privileges"] is True and spec["cap_drop"] == ["ALL"]
    assert "privileged" not in spec and "seccomp_profile_path" not in spec  # RuntimeDefault
    assert spec["netns"] == spec["utsns"] == {"nsmode": "container", "value": "s"}
    assert spec["env"] == {"SECRET": "s3cret"} and spec["labels"] == {"l": "v"}
    unconfined = pod(
        containers=[{"name": "m", "image": "img"}],
        securityContext={"seccompProfile": {"type": "Unconfined"}},
    )
    assert spec_of(unconfined)["seccomp_profile_path"] == "unconfined"


def test_mounts() -> None:
    mounts = [
        Mount("/data", "/host/claim"),
        Mount("/dev/shm", tmpfs_size=96 * 2**20),
        Mount("/tmp/x", tmpfs_size=0),
        Mount("/s", "/host/s", read_only=True),
    ]
    spec = spec_of(pod(), mounts=mounts)
    assert spec["mounts"] == [
        {
            "destination": "/data",
            "type": "bind",
            "source": "/host/claim",
            "options": ["rw", "rbind"],
        },
        {"destination": "/tmp/x", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]},
        {"destination": "/s", "type": "bind", "source": "/host/s", "options": ["ro", "rbind"]},
    ]
    assert spec["shm_size"] == 96 * 2**20


def test_run_as_non_root_is_verified_like_the_kubelet() -> None:
    strict = pod(securityContext={"runAsNonRoot": True})
    with pytest.raises(ConfigError, match="image will run as root"):
        spec_of(strict, image_user="")
    with pytest.raises(ConfigError, match="non-numeric user"):
        spec_of(strict, image_user="streamspace")
    assert spec_of(strict, image_user="1000:1000")["name"] == "c"
    with pytest.raises(ConfigError, match="runAsUser breaks non-root policy"):
        spec_of(pod(securityContext={"runAsNonRoot": True, "runAsUser": 0}))


def test_expand() -> None:
    assert expand("$(A)-$(B)-$$(A)", {"A": "1"}) == "1-$(B)-$(A)"


def test_phase_follows_restart_policy() -> None:
    def exited(code: int) -> ContainerState:
        return ContainerState("c", "i", state={"terminated": {"exitCode": code}})

    waiting = ContainerState("c", "i")
    running = ContainerState("c", "i", state={"running": {}})
    assert phase([waiting], "Always") == "Pending"
    assert phase([running, exited(1)], "Never") == "Running"
    assert phase([exited(0)], "Never") == "Succeeded"
    assert phase([exited(0), exited(2)], "Never") == "Failed"
    assert phase([exited(2)], "Always") == "Running"
    assert phase([exited(0)], "OnFailure") == "Succeeded"
    backing_off = ContainerState(
        "c",
        "i",
        state={"waiting": {"reason": "CrashLoopBackOff"}},
        last_state={"terminated": {"exitCode": 1}},
    )
    assert phase([backing_off], "Always") == "Running"


def test_podman_times_become_api_times() -> None:
    info = {
        "Id": "abc",
        "State": {
            "ExitCode": 3,
            "StartedAt": "2026-12-02T04:33:09.123456789Z",
            "FinishedAt": "2026-12-02T06:33:10.5+02:00",
        },
    }
    ended = terminated(info)["terminated"]
    assert (ended["startedAt"], ended["finishedAt"]) == (
        "2026-12-02T04:33:09Z",
        "2026-12-02T04:33:10Z",
    )
    assert (ended["exitCode"], ended["reason"]) == (3, "Error")
    zero = terminated({"State": {"FinishedAt": "0001-01-01T00:00:00Z", "OOMKilled": True}})[
        "terminated"
    ]
    assert zero["finishedAt"].startswith("20") and zero["reason"] == "OOMKilled"


PODMAN_CONFLIST = {
    "cniVersion": "0.4.0",
    "name": "ss-k8s-n1",
    "plugins": [
        {
            "type": "bridge",
            "bridge": "cni-podman3",
            "isGateway": True,
            "ipMasq": True,
            "hairpinMode": True,
            "ipam": {
                "type": "host-local",
                "routes": [{"dst": "0.0.0.0/0"}],
                "ranges": [[{"subnet": "10.244.3.0/24", "gateway": "10.244.3.1"}]],
            },
            "capabilities": {"ips": True},
        },
        {"type": "portmap", "capabilities": {"portMappings": True}},
        {"type": "firewall", "backend": ""},
        {"type": "tuning"},
    ],
    "args": {"podman_labels": {"org.streamspace.k8s-node": "n1"}},
}


def test_the_node_network_keeps_only_a_gateway_bridge_with_its_addresses(tmp_path: Any) -> None:
    path = tmp_path / "ss-k8s-n1.conflist"
    path.write_text(json.dumps(PODMAN_CONFLIST))
    assert kubenet_plugins(path)
    config = json.loads(path.read_text())
    assert [p["type"] for p in config["plugins"]] == ["bridge"]
    bridge = config["plugins"][0]
    assert bridge["ipMasq"] is False and bridge["isGateway"] is True
    assert bridge["ipam"] == PODMAN_CONFLIST["plugins"][0]["ipam"]  # type: ignore[index]
    assert config["name"] == "ss-k8s-n1" and config["args"] == PODMAN_CONFLIST["args"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ss-k8s-n1.conflist"]


def test_a_network_that_is_not_a_cni_bridge_file_is_left_alone(tmp_path: Any) -> None:
    assert not kubenet_plugins(tmp_path / "absent.conflist")
    other = tmp_path / "macvlan.conflist"
    text = json.dumps({"name": "m", "plugins": [{"type": "macvlan"}]})
    other.write_text(text)
    assert not kubenet_plugins(other)
    assert other.read_text() == text
