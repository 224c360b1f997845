"""Password hashing, access tokens and opaque secrets."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()
JWT_ALG = "HS256"


NO_PASSWORD = "!"
"""The password hash of an account that has no password: no hash format matches it, so
`verify_password` is false for every input."""


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """True for a hash made with other parameters than today's (e.g. before an upgrade)."""
    try:
        return _hasher.check_needs_rehash(password_hash)
    except InvalidHashError:
        return True


_dummy: tuple[PasswordHasher, str] | None = None


def dummy_hash() -> str:
    """A hash of nothing anyone knows, made with today's parameters.

    A login for an unknown username is verified against it, so that it costs the same argon2
    work as a wrong password for a real one: no timing difference tells which usernames exist.
    """
    global _dummy
    if _dummy is None or _dummy[0] is not _hasher:
        _dummy = (_hasher, _hasher.hash(random_secret(32)))
    return _dummy[1]


def random_secret(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


def sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def constant_eq(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def make_access_token(
    secret: str,
    *,
    user_id: str,
    role: str,
    token_version: int,
    ttl_seconds: int,
    sign_in: str = "",
) -> tuple[str, datetime]:
    now = datetime.now(UTC)
    exp = now + timedelta(seconds=ttl_seconds)
    claims: dict[str, Any] = {
        "sub": user_id,
        "role": role,
        "tv": token_version,
        "iat": int(now.timestamp()),
        "exp": int(exp.timestamp()),
        "typ": "access",
    }
    if sign_in:
        claims["sid"] = sign_in
    return jwt.encode(claims, secret, algorithm=JWT_ALG), exp


def decode_access_token(secret: str, token: str) -> dict[str, Any] | None:
    try:
        claims = jwt.decode(token, secret, algorithms=[JWT_ALG], options={"require": ["exp"]})
    except jwt.PyJWTError:
        return None
    if claims.get("typ") != "access":
        return None
    return claims
