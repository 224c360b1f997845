"""One log line format for every agent module, so an operator can grep a whole agent's story."""

from __future__ import annotations

import json
import logging

log = logging.getLogger("streamspace.agent")


def fmt(event: str, **fields: object) -> str:
    """`event key=value ...`: greppable structured logs without a logging dependency."""
    parts = [event]
    for key, value in fields.items():
        if value is None:
            continue
        text = str(value)
        if not text or any(c.isspace() or c in '"=' for c in text):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)
