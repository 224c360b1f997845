"""Second factors: TOTP (RFC 6238, via pyotp), recovery codes, and the short-lived token
that carries a half-finished login from the password step to the code step.

The TOTP secret is a password equivalent, so it is stored encrypted (Fernet, with a key
derived from the control plane's secret): a copy of the database alone cannot mint codes.
Recovery codes are kept as HMACs under the same secret, for the same reason: at ~50 bits
each they would not survive an offline guess against a plain hash.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import jwt
import pyotp
import segno
from cryptography.fernet import Fernet, InvalidToken

from streamspace.controlplane.security import JWT_ALG

STEP_SECONDS = 30
DIGITS = 6
RECOVERY_CODES = 10
MFA_TOKEN_SECONDS = 300
Purpose = Literal["verify", "enrol"]
"""`verify`: the user has a factor and must give a code. `enrol`: policy requires a factor
the user has not set up; the token admits only the enrolment calls."""


def _fernet(app_secret: str) -> Fernet:
    key = hashlib.sha256(f"streamspace-totp\0{app_secret}".encode()).digest()
    return Fernet(base64.urlsafe_b64encode(key))


def seal(app_secret: str, totp_secret: str) -> str:
    return _fernet(app_secret).encrypt(totp_secret.encode()).decode()


def unseal(app_secret: str, sealed: str) -> str | None:
    try:
        return _fernet(app_secret).decrypt(sealed.encode()).decode()
    except InvalidToken:
        return None


def new_totp_secret() -> str:
    return pyotp.random_base32()


def provisioning_uri(totp_secret: str, username: str, issuer: str) -> str:
    return pyotp.TOTP(totp_secret, digits=DIGITS, interval=STEP_SECONDS).provisioning_uri(
        name=username, issuer_name=issuer
    )


def qr_rows(uri: str) -> list[str]:
    """The QR code of `uri` as rows of "1" (dark) and "0", quiet zone included: the page
    draws it on a canvas, so no image or inline markup needs to pass the CSP."""
    qr = segno.make(uri, error="m")
    return ["".join("1" if cell else "0" for cell in row) for row in qr.matrix_iter(border=2)]


def accepted_step(totp_secret: str, code: str, last_step: int, now: datetime) -> int | None:
    """The time step `code` belongs to (the current one or either neighbour, for clock skew),
    if it is later than the last accepted one; a used code can never be replayed."""
    code = code.strip().replace(" ", "")
    if len(code) != DIGITS or not code.isdigit():
        return None
    totp = pyotp.TOTP(totp_secret, digits=DIGITS, interval=STEP_SECONDS)
    current = int(now.timestamp()) // STEP_SECONDS
    for step in (current - 1, current, current + 1):
        if step > last_step and hmac.compare_digest(totp.at(step * STEP_SECONDS), code):
            return step
    return None


def new_recovery_codes() -> list[str]:
    alphabet = "abcdefghjkmnpqrstuvwxyz23456789"
    return [
        "-".join("".join(secrets.choice(alphabet) for _ in range(5)) for _ in range(2))
        for _ in range(RECOVERY_CODES)
    ]


def recovery_hash(app_secret: str, code: str) -> str:
    normal = code.strip().lower().replace(" ", "")
    return hmac.new(app_secret.encode(), f"recovery\0{normal}".encode(), "sha256").hexdigest()


def looks_like_recovery_code(code: str) -> bool:
    return "-" in code.strip() and len(code.strip()) == 11


@dataclass(frozen=True)
class Pending:
    """A login past its password step: who, which token version, and where its refresh
    token goes once the second step succeeds."""

    user_id: str
    token_version: int
    purpose: Purpose
    delivery: str


def make_mfa_token(app_secret: str, pending: Pending) -> str:
    now = datetime.now(UTC)
    claims: dict[str, Any] = {
        "sub": pending.user_id,
        "tv": pending.token_version,
        "purpose": pending.purpose,
        "delivery": pending.delivery,
        "iat": int(now.timestamp()),
        "exp": int((now + timedelta(seconds=MFA_TOKEN_SECONDS)).timestamp()),
        "typ": "mfa",
    }
    return jwt.encode(claims, app_secret, algorithm=JWT_ALG)


def read_mfa_token(app_secret: str, token: str) -> Pending | None:
    try:
        claims = jwt.decode(token, app_secret, algorithms=[JWT_ALG], options={"require": ["exp"]})
    except jwt.PyJWTError:
        return None
    if claims.get("typ") != "mfa" or claims.get("purpose") not in ("verify", "enrol"):
        return None
    return Pending(
        str(claims["sub"]), int(claims["tv"]), claims["purpose"], str(claims.get("delivery"))
    )
