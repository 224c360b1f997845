"""The kubernetes backend: sessions as pods on a cluster, through its API server.

`objects` says what a session's Pod, PVC, Secret and the agent's NetworkPolicies are (pure
data), `podstate` reads what a pod's status means (pure), `reflector` keeps watch-based caches.
"""

from streamspace.agent.backends.kubernetes.objects import PodSettings
from streamspace.agent.backends.kubernetes.settings import KubeConfig

__all__ = ["KubeConfig", "PodSettings"]
