"""Template catalog: one validated format, loaded from YAML files and editable through the API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from streamspace import logs, protocol
from streamspace.db.models import Template

log = logs.get_logger("streamspace.catalog")

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LocalLaunchSpec(_Strict):
    command: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)


class ImageLaunchSpec(_Strict):
    image: str = Field(min_length=1, max_length=255)
    command: list[str] | None = None
    env: dict[str, str] = Field(default_factory=dict)

    def image_launch(self) -> protocol.ImageLaunch:
        return protocol.ImageLaunch(image=self.image, command=self.command, env=self.env)


class KubernetesLaunchSpec(ImageLaunchSpec):
    """An image plus where its pods may run: node labels they need, taints they tolerate (the
    agent's own `kube_node_selector` wins on a key both set; its tolerations are added)."""

    node_selector: dict[str, str] = Field(default_factory=dict, max_length=32)
    tolerations: list[protocol.Toleration] = Field(default_factory=list, max_length=32)


class LaunchSpec(_Strict):
    local: LocalLaunchSpec | None = None
    docker: ImageLaunchSpec | None = None
    kubernetes: KubernetesLaunchSpec | None = None

    @model_validator(mode="after")
    def _at_least_one(self) -> LaunchSpec:
        if not (self.local or self.docker or self.kubernetes):
            raise ValueError("needs at least one of local, docker, kubernetes")
        return self


class TemplateSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    display_name: str = Field(min_length=1, max_length=128)
    category: str = Field(min_length=1, max_length=64)
    description: str = Field(default="", max_length=2000)
    icon: str = Field(default="", max_length=128)
    tags: list[str] = Field(default_factory=list, max_length=20)
    resources: protocol.Resources = Field(default_factory=protocol.Resources)
    display: protocol.Display = Field(default_factory=protocol.Display)
    idle_timeout_seconds: int | None = Field(default=None, ge=60, le=30 * 24 * 3600)
    max_duration_seconds: int | None = Field(default=None, ge=60, le=90 * 24 * 3600)
    network: bool = Field(
        default=False,
        description="sessions may use the network (a browser needs it); otherwise they have none",
    )
    launch: LaunchSpec
    enabled: bool = True

    def catalog_entry(self) -> protocol.CatalogEntry:
        image = self.launch.docker or self.launch.kubernetes
        return protocol.CatalogEntry(
            name=self.name,
            local=protocol.LocalLaunch(**self.launch.local.model_dump())
            if self.launch.local
            else None,
            image=image.image_launch() if image else None,
        )


class TemplateFileError(ValueError):
    def __init__(self, path: Path, field: str, reason: str) -> None:
        super().__init__(f"{path}: {field}: {reason}" if field else f"{path}: {reason}")
        self.path = path
        self.field = field
        self.reason = reason


def describe_validation_error(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err.get("loc", ()))
    reason = "unknown field" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid")
    return field, reason


def parse_template_file(path: Path) -> TemplateSpec:
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TemplateFileError(path, "", f"not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise TemplateFileError(path, "", "expected a mapping at the top level")
    try:
        spec = TemplateSpec.model_validate(raw)
    except ValidationError as exc:
        field, reason = describe_validation_error(exc)
        raise TemplateFileError(path, field, reason) from exc
    if spec.name != path.stem:
        raise TemplateFileError(path, "name", f"must match the file name ({path.stem!r})")
    return spec


def load_directory(directory: Path) -> tuple[list[TemplateSpec], list[TemplateFileError]]:
    specs: list[TemplateSpec] = []
    errors: list[TemplateFileError] = []
    if not directory.is_dir():
        return specs, errors
    for path in sorted(directory.glob("*.y*ml")):
        try:
            specs.append(parse_template_file(path))
        except TemplateFileError as exc:
            errors.append(exc)
    return specs, errors


def apply_spec(row: Template, spec: TemplateSpec, source: str) -> None:
    row.name = spec.name
    row.display_name = spec.display_name
    row.category = spec.category
    row.description = spec.description
    row.icon = spec.icon
    row.tags = list(spec.tags)
    row.spec = spec.model_dump(mode="json")
    row.source = source
    row.enabled = spec.enabled


async def sync_files(db: AsyncSession, directory: Path) -> list[TemplateFileError]:
    """Upsert file templates; templates created or edited through the API are left alone."""
    specs, errors = load_directory(directory)
    for err in errors:
        log.error("template_invalid", file=err.path, field=err.field, reason=err.reason)
    existing = {t.name: t for t in (await db.scalars(select(Template))).all()}
    for spec in specs:
        row = existing.get(spec.name)
        if row is None:
            row = Template()
            db.add(row)
        elif row.source != "file":
            continue
        apply_spec(row, spec, "file")
    await db.commit()
    log.event("templates_loaded", directory=directory, count=len(specs), invalid=len(errors))
    return errors


def spec_of(row: Template) -> TemplateSpec:
    return TemplateSpec.model_validate(row.spec)
