"""What every command shares: the typer apps, the consoles, and running a coroutine."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console

from streamspace.config import Settings

app = typer.Typer(
    help="StreamSpace: desktop apps in the browser.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
admin_app = typer.Typer(help="Administration straight on the database.", no_args_is_help=True)
sessions_app = typer.Typer(help="Your sessions (uses `streamspace login`).", no_args_is_help=True)
templates_app = typer.Typer(help="The template catalog.", no_args_is_help=True)
images_app = typer.Typer(help="Session container images.", no_args_is_help=True)
config_app = typer.Typer(help="The STREAMSPACE_* settings.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(admin_app, name="admin")
app.add_typer(sessions_app, name="sessions")
app.add_typer(templates_app, name="templates")
app.add_typer(images_app, name="images")
app.add_typer(config_app, name="config")

console = Console()
err = Console(stderr=True)
T = TypeVar("T")


class CLIError(Exception):
    pass


def fail(message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(1)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed (uvicorn[standard] brings it): C transports, less CPU per byte."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(coro: Awaitable[T]) -> T:
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(coro)  # type: ignore[arg-type]
    except CLIError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    raise AssertionError("unreachable")


def settings_for(data_dir: Path | None = None, **overrides: Any) -> Settings:
    values = {k: v for k, v in overrides.items() if v is not None}
    if data_dir is not None:
        values["data_dir"] = data_dir
    return Settings(**values)
