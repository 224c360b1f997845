"""Directory login settings refuse what cannot work, and roles come from the named groups."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from streamspace.config import Settings
from streamspace.controlplane.directory import Directory
from streamspace.controlplane.provisioning import VALID_NAME, group_name, ldap_origin, role_for

BASE = {"ldap_url": "ldap://dc.example.org", "ldap_user_base_dn": "ou=people,dc=example,dc=org"}


def test_off_by_default() -> None:
    assert Directory.from_settings(Settings()) is None


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"ldap_url": "http://dc.example.org"}, "not an ldap:// or ldaps://"),
        ({"ldap_url": "ldap://"}, "not an ldap:// or ldaps://"),
        ({"ldap_url": "ldaps://dc.example.org", "ldap_start_tls": True}, "TLS already"),
        ({"ldap_user_base_dn": ""}, "ldap_user_base_dn"),
        ({"ldap_user_filter": "(uid=alice)"}, "{username}"),
        ({"ldap_bind_dn": "cn=svc,dc=example,dc=org"}, "ldap_bind_password"),
        ({"ldap_timeout_seconds": 0}, "greater than 0"),
    ],
)
def test_settings_refuse_what_cannot_work(overrides: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment.replace("(", r"\(").replace("{", r"\{")):
        Settings(**{**BASE, **overrides})


def test_the_bind_password_stays_out_of_the_settings_repr() -> None:
    settings = Settings(**BASE, ldap_bind_dn="cn=svc", ldap_bind_password="hunter2-service")
    assert "hunter2-service" not in repr(settings)
    assert "hunter2-service" not in str(settings)


def test_tls_is_known_from_the_url_or_starttls() -> None:
    assert not Directory(Settings(**BASE)).tls
    assert Directory(Settings(**BASE, ldap_start_tls=True)).tls
    assert Directory(Settings(**{**BASE, "ldap_url": "ldaps://dc.example.org"})).tls


def test_role_from_directory_groups() -> None:
    settings = Settings(**BASE, ldap_admin_group="Admins", ldap_operator_group="ops")
    assert (
        role_for(("engineers", "admins"), ldap_origin(settings)) == "admin"
    )  # names compare caseless
    assert role_for(("OPS", "admins"), ldap_origin(settings)) == "admin"
    assert role_for(("ops",), ldap_origin(settings)) == "operator"
    assert role_for(("engineers",), ldap_origin(settings)) == "user"
    assert (
        role_for(("admins",), ldap_origin(Settings(**BASE))) == "user"
    )  # no admin group configured


def test_directory_names_that_cannot_be_usernames_or_groups() -> None:
    assert VALID_NAME.match("alice.smith")
    for bad in ("", "Domain Users", "-x", "a" * 65, "ålice", "a/b"):
        assert not VALID_NAME.match(bad), bad


def test_directory_group_names_become_group_names() -> None:
    assert group_name("engineers") == "engineers"
    assert group_name("Domain Users") == "Domain-Users"
    assert group_name("R&D / Paris") == "R-D-Paris"
    assert group_name("  _x") == "x"
    assert group_name("Ingeniería") == "Ingenier-a"
    assert group_name("g" * 80) == "g" * 64
    assert group_name("ØØ") is None
    assert group_name("") is None
