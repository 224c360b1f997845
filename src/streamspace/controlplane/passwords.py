"""The password policy: at least 12 characters and not easy to guess.

"Easy to guess" is zxcvbn's estimate (score 0-4; 3 and up pass): it knows common passwords,
names, dictionary words, keyboard patterns, dates and repeats, and the user's own username,
display name and email, and it says why a password is weak, which the refusal passes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from zxcvbn import zxcvbn

from streamspace.controlplane.problems import Problem

MIN_LENGTH = 12
MIN_SCORE = 3
ESTIMATE_CHARS = 72
"""zxcvbn refuses longer input (its cost grows fast with length); the estimate of a long
password's first 72 characters is a floor: the rest can only add to it."""


def weakness(password: str, user_inputs: Iterable[str] = ()) -> dict[str, Any] | None:
    """None if `password` is acceptable, else {"reason": ..., "suggestions": [...]}."""
    if len(password) < MIN_LENGTH:
        return {
            "reason": f"must have at least {MIN_LENGTH} characters (it has {len(password)})",
            "suggestions": ["Use a few uncommon words, or let a password manager make one."],
        }
    inputs = [text for text in user_inputs if text]
    result = zxcvbn(password[:ESTIMATE_CHARS], user_inputs=inputs)
    if result["score"] >= MIN_SCORE:
        return None
    feedback = result.get("feedback") or {}
    warning = str(feedback.get("warning") or "").rstrip(".")
    suggestions = [str(s) for s in feedback.get("suggestions") or []]
    reason = "is too easy to guess"
    if warning:
        reason += f" ({warning[0].lower()}{warning[1:]})"
    return {"reason": reason, "suggestions": suggestions}


def describe(field: str, weak: dict[str, Any]) -> str:
    text = f"{field}: {weak['reason']}"
    if weak["suggestions"]:
        text += ". " + " ".join(weak["suggestions"])
    return text


async def require_strong(
    password: str, user_inputs: Iterable[str] = (), field: str = "password"
) -> None:
    """Raise a 422 problem that says why, if the policy refuses `password`."""
    weak = await asyncio.to_thread(weakness, password, list(user_inputs))
    if weak is not None:
        raise Problem(
            422,
            "Weak password",
            describe(field, weak),
            kind="weak-password",
            field=field,
            suggestions=weak["suggestions"],
        )
