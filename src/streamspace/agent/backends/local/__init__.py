"""The local backend: sessions as sandboxed processes on the agent host (see backend.py)."""

from streamspace.agent.backends.base import ExitCallback
from streamspace.agent.backends.local.backend import INIT_SCRIPT, LocalBackend
from streamspace.agent.backends.local.sandbox import SESSION_ENV_MARKER

__all__ = ["INIT_SCRIPT", "SESSION_ENV_MARKER", "ExitCallback", "LocalBackend"]
