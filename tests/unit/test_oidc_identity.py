"""What an OpenID Provider's claims become here: the username, the mapped groups, the role,
the email domain rule; and the PKCE pair."""

from __future__ import annotations

import base64
import hashlib

import pytest

from streamspace.config import OidcProvider, Settings
from streamspace.controlplane.api.auth_oidc import _identity
from streamspace.controlplane.oidc import claim_list, pkce_pair
from streamspace.controlplane.problems import Problem

CONFIG = OidcProvider(
    id="corp",
    name="Corp",
    issuer="https://id.example.com/",
    client_id="ss",
    group_map={"Engineering": "engineers", "design": "designers"},
    admin_group="SSO-Admins",
    operator_group="ops",
)


def test_claims_become_an_identity() -> None:
    claims = {
        "sub": "1",
        "preferred_username": "alice@example.com",
        "name": "Alice",
        "email": "alice@example.com",
        "groups": ["engineering", "sso-admins", "unmapped", "Design"],
    }
    ident = _identity(CONFIG, claims)
    assert ident.username == "alice-example.com"
    assert ident.groups == ("designers", "engineers")  # mapped only, names compare caseless
    assert ident.role == "admin"
    assert ident.source == "oidc:corp"
    assert _identity(CONFIG, {**claims, "groups": ["ops"]}).role == "operator"
    assert _identity(CONFIG, {**claims, "groups": "ops"}).role == "operator"  # one group as text
    assert _identity(CONFIG, {**claims, "groups": None}).groups == ()


def test_username_and_email_domain_refusals() -> None:
    with pytest.raises(Problem, match="no usable"):
        _identity(CONFIG, {"sub": "1", "preferred_username": "@@@"})
    limited = CONFIG.model_copy(update={"allowed_email_domains": ["Example.com"]})
    ok = {"sub": "1", "preferred_username": "bob", "email": "bob@example.com"}
    assert _identity(limited, ok).username == "bob"
    for bad in (
        {**ok, "email": "bob@example.org"},
        {**ok, "email": ""},
        {**ok, "email_verified": False},
        {**ok, "email": "bob@evil.test@example.com.evil.test"},
    ):
        with pytest.raises(Problem, match="email domain"):
            _identity(limited, bad)


def test_settings_refuse_bad_providers() -> None:
    base = {"id": "a", "name": "A", "issuer": "https://a.example", "client_id": "c"}
    assert Settings(oidc_providers=[base]).oidc_providers[0].issuer == "https://a.example"
    for bad in (
        {**base, "id": "Not-Lower"},
        {**base, "id": "much-too-long-id"},
        {**base, "issuer": "ftp://a.example"},
        {**base, "unknown": 1},
    ):
        with pytest.raises(ValueError):
            Settings(oidc_providers=[bad])
    with pytest.raises(ValueError, match="same id"):
        Settings(oidc_providers=[base, base])


def test_pkce_pair_is_s256() -> None:
    verifier, challenge = pkce_pair()
    assert 43 <= len(verifier) <= 128
    digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    assert challenge == digest.decode()
    assert pkce_pair()[0] != verifier
    assert claim_list({"g": ["a", 1, {"x": 1}]}, "g") == ("a", "1")
