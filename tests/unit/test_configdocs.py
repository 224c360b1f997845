"""docs/configuration.md is what the settings class says, and every setting says something."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field
from typer.testing import CliRunner

from streamspace import configdocs
from streamspace.cli import app
from streamspace.config import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_every_setting_has_a_description() -> None:
    missing = [name for name, f in Settings.model_fields.items() if not (f.description or "")]
    assert missing == []
    short = [
        name for name, f in Settings.model_fields.items() if len((f.description or "").split()) < 4
    ]
    assert short == [], "a description should say what the setting does, not repeat its name"


def test_checked_in_configuration_md_is_current() -> None:
    assert DOC.read_text() == configdocs.render(), (
        "docs/configuration.md is stale: regenerate it with `make docs` "
        "(streamspace config docs > docs/configuration.md)"
    )


def test_every_env_var_has_its_row() -> None:
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| `STREAMSPACE_")]
    documented = [line.split("`")[1] for line in rows]
    assert documented == [f"STREAMSPACE_{name.upper()}" for name in Settings.model_fields]
    assert "STREAMSPACE_METRICS_TOKEN" in documented


def test_rows_show_type_constraint_and_default() -> None:
    rows = {line.split("`")[1]: line for line in configdocs.rows()[2:]}
    assert rows["STREAMSPACE_DB_POOL_SIZE"].startswith(
        "| `STREAMSPACE_DB_POOL_SIZE` | integer ≥ 1 | `20` | "
    )
    assert "| number > 0 | `10` |" in rows["STREAMSPACE_DB_POOL_TIMEOUT_SECONDS"]
    assert "| boolean | `true` |" in rows["STREAMSPACE_LOCAL_ENFORCE_LIMITS"]
    assert "| path | `~/.local/share/streamspace` |" in rows["STREAMSPACE_DATA_DIR"]
    assert str(Path.home()) not in "\n".join(rows.values()), "the doc must not depend on $HOME"


def test_computed_default_without_shown_default_is_refused() -> None:
    info = Field(default_factory=list, description="something computed at start")
    with pytest.raises(ValueError, match="shown_default"):
        configdocs.default_text("computed", info)


def test_cli_prints_the_generated_document() -> None:
    result = CliRunner().invoke(app, ["config", "docs"])
    assert result.exit_code == 0, result.output
    assert result.stdout == configdocs.render()
