"""`streamspace sessions`: a user's sessions through the API."""

from __future__ import annotations

import asyncio
import webbrowser
from typing import Any

import typer
from rich.table import Table

from streamspace.cli.base import console, fail, run, sessions_app
from streamspace.cli.client import api, load_client


def _sessions_table(items: list[dict[str, Any]]) -> Table:
    table = Table("ID", "TEMPLATE", "STATE", "CLUSTER", "TAGS", "CREATED", "WHY")
    for s in items:
        table.add_row(
            s["id"],
            s["template"],
            s["state"],
            s.get("cluster_id") or "-",
            ",".join(s["tags"]),
            s["created_at"][:19],
            s.get("failure_reason") or s.get("status_message") or "",
        )
    return table


@sessions_app.command("ls")
def sessions_ls(
    all_users: bool = typer.Option(False, "--all", help="Everyone's sessions (admin)."),
    state: str | None = typer.Option(None, help="Comma-separated states."),
    tag: str | None = typer.Option(None),
    template: str | None = typer.Option(None),
    limit: int = typer.Option(50),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List sessions."""
    params: dict[str, Any] = {"limit": limit}
    if all_users:
        params["all"] = "true"
    for key, value in (("state", state), ("tag", tag), ("template", template)):
        if value:
            params[key] = value
    page = run(api("GET", "/api/v1/sessions", params=params))
    if as_json:
        console.print_json(data=page)
        return
    console.print(_sessions_table(page["items"]))
    console.print(f"{len(page['items'])} of {page['total']}")


@sessions_app.command("create")
def sessions_create(
    template: str,
    tag: list[str] = typer.Option([], "--tag"),
    cluster_id: str | None = typer.Option(None),
    wait: bool = typer.Option(True, help="Wait until it runs or fails."),
) -> None:
    """Start a session from a template."""
    body: dict[str, Any] = {"template": template, "tags": tag}
    if cluster_id:
        body["cluster_id"] = cluster_id

    async def main() -> dict[str, Any]:
        session: dict[str, Any] = await api("POST", "/api/v1/sessions", json=body)
        if not wait:
            return session
        with console.status(f"session {session['id']}: {session['state']}") as status:
            for _ in range(600):
                if session["state"] in ("running", "failed", "stopped"):
                    break
                await asyncio.sleep(0.5)
                session = await api("GET", f"/api/v1/sessions/{session['id']}")
                status.update(
                    f"session {session['id']}: {session['state']} "
                    f"{session.get('status_message', '')}"
                )
        return session

    session = run(main())
    console.print(_sessions_table([session]))
    if session["state"] == "failed":
        raise typer.Exit(1)


@sessions_app.command("show")
def sessions_show(session_id: str) -> None:
    """A session with its recent events (why it is pending or failed)."""
    s = run(api("GET", f"/api/v1/sessions/{session_id}"))
    console.print(_sessions_table([s]))
    for ev in s.get("events") or []:
        console.print(f"  {ev['at'][:19]}  [bold]{ev['kind']:<10}[/] {ev['message']}")


@sessions_app.command("rm")
def sessions_rm(session_ids: list[str]) -> None:
    """Stop sessions (homes are kept)."""
    for sid in session_ids:
        s = run(api("DELETE", f"/api/v1/sessions/{sid}"))
        console.print(f"{sid}: {s['state']}")


@sessions_app.command("hibernate")
def sessions_hibernate(session_id: str) -> None:
    s = run(api("POST", f"/api/v1/sessions/{session_id}/hibernate"))
    console.print(f"{session_id}: {s['state']}")


@sessions_app.command("wake")
def sessions_wake(session_id: str) -> None:
    s = run(api("POST", f"/api/v1/sessions/{session_id}/wake"))
    console.print(f"{session_id}: {s['state']}")


@sessions_app.command("connect")
def sessions_connect(
    session_id: str,
    open_browser: bool = typer.Option(False, "--open", help="Open it in the browser."),
) -> None:
    """Print (or open) the viewer URL of a running session."""
    s = run(api("GET", f"/api/v1/sessions/{session_id}"))
    if s["state"] != "running":
        fail(f"session is {s['state']}, not running")
    url = f"{load_client()['server']}/#/view/{session_id}"
    console.print(url)
    if open_browser:
        webbrowser.open(url)
