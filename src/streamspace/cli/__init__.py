"""`streamspace` command line: run the control plane or an agent, and use the API.

One module per command group; importing them registers their commands on `app`, in the order
`--help` lists them.
"""

from __future__ import annotations

import typer

from streamspace import __version__
from streamspace.cli.base import CLIError, app, config_app, console, fail

# isort: off
# Commands are listed in the order they were registered: the product first, then the agent.
from streamspace.cli import serve, agent, client, sessions, catalog, admin
# isort: on

__all__ = ["admin", "agent", "app", "catalog", "client", "main", "serve", "sessions"]


@config_app.command("docs")
def config_docs() -> None:
    """Print docs/configuration.md, generated from the settings class (`make docs`)."""
    from streamspace.configdocs import render

    typer.echo(render(), nl=False)


@app.command()
def version() -> None:
    console.print(__version__)


def main() -> None:
    try:
        app()
    except CLIError as exc:
        fail(str(exc))
