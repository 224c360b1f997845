"""The API client the user commands share: `login` keeps the tokens, `api()` uses them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import typer

from streamspace.cli.base import CLIError, app, console, run


def client_file() -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return base / "streamspace" / "cli.json"


def load_client() -> dict[str, str]:
    path = client_file()
    if not path.exists():
        raise CLIError("not logged in; run `streamspace login --server URL --username NAME`")
    data: dict[str, str] = json.loads(path.read_text())
    return data


def save_client(data: dict[str, str]) -> None:
    path = client_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)


def problem_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        return str(body.get("detail") or body.get("title") or resp.text)
    except ValueError:
        return resp.text or resp.reason_phrase


async def api(method: str, path: str, **kwargs: Any) -> Any:
    cfg = load_client()
    async with httpx.AsyncClient(base_url=cfg["server"], timeout=30) as client:
        for attempt in range(2):
            headers = {"Authorization": f"Bearer {cfg['access_token']}"}
            try:
                resp = await client.request(method, path, headers=headers, **kwargs)
            except httpx.HTTPError as exc:
                raise CLIError(f"cannot reach {cfg['server']}: {exc}") from exc
            if resp.status_code == 401 and attempt == 0:
                refreshed = await client.post(
                    "/api/v1/auth/refresh", json={"refresh_token": cfg["refresh_token"]}
                )
                if refreshed.status_code != 200:
                    raise CLIError("session expired; run `streamspace login` again")
                tokens = refreshed.json()
                cfg.update(
                    access_token=tokens["access_token"], refresh_token=tokens["refresh_token"]
                )
                save_client(cfg)
                continue
            if resp.status_code >= 400:
                raise CLIError(f"{resp.status_code}: {problem_text(resp)}")
            return resp.json() if resp.content else None
    raise CLIError("unauthorized")


@app.command()
def login(
    server_url: str = typer.Option("http://127.0.0.1:8080", "--server"),
    username: str = typer.Option(..., prompt=True),
    password: str = typer.Option(..., prompt=True, hide_input=True),
) -> None:
    """Log in and keep the tokens for the other commands."""

    async def main() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=server_url, timeout=30) as client:
            try:
                resp = await client.post(
                    "/api/v1/auth/login",
                    json={
                        "username": username,
                        "password": password,
                        # Not a browser: keep the refresh token ourselves (in a 0600 file).
                        "refresh_token_delivery": "body",
                    },
                )
            except httpx.HTTPError as exc:
                raise CLIError(f"cannot reach {server_url}: {exc}") from exc
            if resp.status_code != 200:
                raise CLIError(problem_text(resp))
            body: dict[str, Any] = resp.json()
            return body

    tokens = run(main())
    save_client(
        {
            "server": server_url.rstrip("/"),
            "access_token": tokens["access_token"],
            "refresh_token": tokens["refresh_token"],
        }
    )
    console.print(f"logged in as [bold]{tokens['user']['username']}[/] ({tokens['user']['role']})")
