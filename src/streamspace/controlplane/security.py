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


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def random_secret(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


def sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def constant_eq(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def make_access_token(
    secret: str, *, user_id: str, role: str, token_version: int, ttl_seconds: int
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
    return jwt.encode(claims, secret, algorithm=JWT_ALG), exp


def decode_access_token(secret: str, token: str) -> dict[str, Any] | None:
    try:
        claims = jwt.decode(token, secret, algorithms=[JWT_ALG], options={"require": ["exp"]})
    except jwt.PyJWTError:
        return None
    if claims.get("typ") != "access":
        return None
    return claims
