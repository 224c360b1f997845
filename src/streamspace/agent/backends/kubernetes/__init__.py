"""The kubernetes backend: sessions as pods on a cluster, through its API server (backend.py).

`objects` says what a session's Pod, PVC, Secret and the agent's NetworkPolicies are (pure
data), `podstate` reads what a pod's status means (pure), `reflector` keeps watch-based caches
of the agent's pods and secrets, `api` reaches the API server and words its refusals,
`monitor` reports pods that ended on their own, `backend` runs sessions with them.
"""

from streamspace.agent.backends.kubernetes.backend import (
    ExitCallback,
    KubernetesBackend,
    ProgressCallback,
)
from streamspace.agent.backends.kubernetes.objects import PodSettings
from streamspace.agent.backends.kubernetes.settings import KubeConfig

__all__ = ["ExitCallback", "KubeConfig", "KubernetesBackend", "PodSettings", "ProgressCallback"]
