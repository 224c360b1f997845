"""The contract with StreamSpace's images (images/base/entrypoint.sh): the environment the
docker and kubernetes backends give its entrypoint, and how secrets are spelled there.

A template's own environment may set none of these names: they are the agent's to decide."""

from __future__ import annotations

VNC_PASSWORD_ENV = "STREAMSPACE_VNC_PASSWD"
"""The obfuscated vncpasswd bytes as a printf format (octal escapes); the entrypoint writes
them to a 0600 file for Xvnc and drops the variable before starting the app."""
VNC_SOCKET_ENV = "STREAMSPACE_VNC_SOCKET"
"""Xvnc listens on this Unix socket only (docker: in the bind-mounted run directory)."""
PULSE_SOCKET_ENV = "STREAMSPACE_PULSE_SOCKET"
"""The session's PulseAudio serves its native protocol on this socket (docker); images
without pulseaudio ignore it and have no sound."""
PULSE_PORT_ENV = "STREAMSPACE_PULSE_PORT"
"""... or on this TCP port, for the agent over the pod network (kubernetes), cookie only."""
PULSE_COOKIE_ENV = "STREAMSPACE_PULSE_COOKIE"
"""The 256-byte cookie for that port, as a printf format (octal escapes)."""
FILES_PORT_ENV = "STREAMSPACE_FILES_PORT"
"""OpenSSH serves SFTP of the session user's files on this TCP port (kubernetes)..."""
FILES_HOST_KEY_ENV = "STREAMSPACE_FILES_HOST_KEY"
"""... with this host key (OpenSSH private key, the session's own)..."""
FILES_CLIENT_KEY_ENV = "STREAMSPACE_FILES_CLIENT_KEY"
"""... to this one client key (an authorized_keys line: the agent's key for the session)."""

RESERVED_ENV = frozenset(
    {
        "VNC_GEOMETRY",
        "VNC_DEPTH",
        "VNC_CLIPBOARD_IN",
        "VNC_CLIPBOARD_OUT",
        "DISPLAY",
        "HOME",
        "USER",
        "PULSE_SERVER",
        VNC_PASSWORD_ENV,
        VNC_SOCKET_ENV,
        PULSE_SOCKET_ENV,
        PULSE_PORT_ENV,
        PULSE_COOKIE_ENV,
        FILES_PORT_ENV,
        FILES_HOST_KEY_ENV,
        FILES_CLIENT_KEY_ENV,
    }
)


def printf_octal(data: bytes) -> str:
    """`data` as a printf format of octal escapes: environment values cannot hold NUL bytes,
    and the entrypoint's `printf` turns this back into the bytes."""
    return "".join(f"\\{b:03o}" for b in data)
