"""StreamSpace: desktop apps in isolated per-user sessions, streamed to the browser over VNC."""

__version__ = "0.1.0"
