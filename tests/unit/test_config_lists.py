"""Comma-separated list settings read from the environment, each split the same way."""

from __future__ import annotations

import pytest

from streamspace.config import Settings


def test_list_settings_split_on_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMSPACE_MFA_REQUIRED_ROLES", "admin, operator")
    monkeypatch.setenv("STREAMSPACE_MFA_REQUIRED_GROUPS", "secure,,ops ")
    monkeypatch.setenv("STREAMSPACE_KUBE_IMAGE_PULL_SECRETS", "regcred,other")
    s = Settings()
    assert s.mfa_required_roles == ["admin", "operator"]
    assert s.mfa_required_groups == ["secure", "ops"]
    assert s.kube_image_pull_secrets == ["regcred", "other"]


def test_an_unknown_role_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMSPACE_MFA_REQUIRED_ROLES", "admin,root")
    with pytest.raises(ValueError, match="root"):
        Settings()
