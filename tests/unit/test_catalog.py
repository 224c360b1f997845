from __future__ import annotations

from pathlib import Path

import pytest

from streamspace.controlplane.catalog import TemplateFileError, load_directory, parse_template_file

ROOT = Path(__file__).resolve().parents[2]

VALID = """
name: demo
display_name: Demo
category: Test
launch:
  local:
    command: [xterm]
"""


def test_shipped_templates_are_valid_and_plenty() -> None:
    specs, errors = load_directory(ROOT / "templates")
    assert errors == []
    names = {s.name for s in specs}
    assert len(names) >= 8
    assert {"firefox", "chromium", "xterm"} <= names
    for spec in specs:
        assert spec.launch.local is not None, spec.name
        assert spec.icon.endswith(".svg")


def test_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text(VALID)
    spec = parse_template_file(path)
    assert spec.launch.local is not None and spec.launch.local.command == ["xterm"]
    assert spec.catalog_entry().local is not None


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        (VALID + "bogus: 1\n", "bogus", "unknown field"),
        (VALID.replace("display_name: Demo\n", ""), "display_name", "Field required"),
        (VALID + "resources:\n  cpu_millis: 5\n", "resources.cpu_millis", "greater than"),
        ("name: demo\ndisplay_name: D\ncategory: T\nlaunch: {}\n", "launch", "at least one"),
        (VALID.replace("name: demo", "name: Not Valid"), "name", "pattern"),
        ("[1, 2", "", "not valid YAML"),
        ("- a\n- b\n", "", "mapping"),
    ],
)
def test_invalid_file_names_file_field_and_reason(
    tmp_path: Path, text: str, field: str, reason: str
) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text(text)
    with pytest.raises(TemplateFileError) as info:
        parse_template_file(path)
    assert info.value.path == path
    assert info.value.field == field
    assert reason in info.value.reason
    assert str(path) in str(info.value)


def test_name_must_match_file(tmp_path: Path) -> None:
    path = tmp_path / "other.yaml"
    path.write_text(VALID)
    with pytest.raises(TemplateFileError) as info:
        parse_template_file(path)
    assert info.value.field == "name"


def test_allowed_groups_limit_who_may_launch(tmp_path: Path) -> None:
    from streamspace.controlplane.entitlements import entitled
    from streamspace.db.models import User

    path = tmp_path / "demo.yaml"
    path.write_text(VALID + "allowed_groups: [designers, Domain-Users]\n")
    spec = parse_template_file(path)
    assert spec.allowed_groups == ["designers", "Domain-Users"]
    user, admin = User(role="user"), User(role="admin")
    assert entitled(spec, user, {"designers"})
    assert not entitled(spec, user, {"engineers", "domain-users"})  # names match exactly
    assert entitled(spec, admin, set())
    path.write_text(VALID)
    assert entitled(parse_template_file(path), user, set())  # no list: everyone


def test_bad_allowed_groups_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text(VALID + 'allowed_groups: ["has space"]\n')
    with pytest.raises(TemplateFileError) as err:
        parse_template_file(path)
    assert err.value.field.startswith("allowed_groups")
