"""`templates` and `images`: what sessions are made of."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from streamspace.cli.base import console, err, fail, images_app, run, templates_app
from streamspace.cli.client import api


@templates_app.command("ls")
def templates_ls() -> None:
    """List templates."""
    rows = run(api("GET", "/api/v1/templates"))
    table = Table("NAME", "DISPLAY NAME", "CATEGORY", "TAGS")
    for t in rows:
        table.add_row(t["name"], t["display_name"], t["category"], ",".join(t["tags"]))
    console.print(table)


@templates_app.command("validate")
def templates_validate(paths: list[Path]) -> None:
    """Check template files; prints file, field and reason for each invalid one."""
    from streamspace.controlplane.catalog import TemplateFileError, parse_template_file

    bad = 0
    for path in paths:
        try:
            parse_template_file(path)
            console.print(f"[green]ok[/]  {path}")
        except TemplateFileError as exc:
            bad += 1
            err.print(f"[red]bad[/] {exc}")
    if bad:
        raise typer.Exit(1)


@images_app.command("build")
def images_build(
    only: list[str] = typer.Option([], "--only", help="Build just these images (and base)."),
    force: bool = typer.Option(False, help="Rebuild even when inputs are unchanged."),
) -> None:
    """Build the session images locally with podman (debootstrap, no registry needed)."""
    from streamspace import images

    try:
        results = images.build_images(
            only or None, progress=lambda line: console.print(line, markup=False), force=force
        )
    except images.ImageBuildError as exc:
        fail(str(exc))
    for r in results:
        console.print(
            f"[green]{r.image}[/] {'built' if r.built else 'up to date'} in {r.seconds:.1f} s"
        )


@images_app.command("ls")
def images_ls() -> None:
    """Images this repository can build."""
    from streamspace import images

    for name in images.available_images():
        console.print(f"{name:<10} {images.image_ref(name)}")
