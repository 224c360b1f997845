"""`streamspace` command line: run the control plane or an agent, and use the API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import webbrowser
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import httpx
import typer
from rich.console import Console
from rich.table import Table

from streamspace import __version__, logs
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


# ---- running the product ------------------------------------------------------------------


async def _serve(settings: Settings, with_local_agent: bool) -> None:
    import uvicorn

    from streamspace.controlplane.app import create_app

    application = create_app(settings)
    config = uvicorn.Config(
        application,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        ws="websockets-sansio",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=30,
        lifespan="on",
        access_log=False,
        # uvicorn would believe X-Forwarded-For from 127.0.0.1 by default; the app decides,
        # from STREAMSPACE_TRUSTED_PROXIES only (see controlplane/app.py).
        proxy_headers=False,
    )
    server = uvicorn.Server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    serve_task = asyncio.create_task(server.serve())
    while not server.started:
        if serve_task.done():
            await serve_task
            refused = getattr(application.state, "startup_error", None)
            raise CLIError(refused or f"could not listen on {settings.host}:{settings.port}")
        await asyncio.sleep(0.05)
    url = f"http://{settings.host}:{settings.port}"
    console.print(f"[bold green]StreamSpace {__version__}[/] is up at [link={url}]{url}[/link]")
    agent_task: asyncio.Task[None] | None = None
    agent = None
    if with_local_agent:
        agent = await _embedded_agent(application, settings, url)
        application.state.ss.local_agent.attach(agent)
        agent_task = asyncio.create_task(agent.run())
    waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(stop.wait()), serve_task}
    if agent_task is not None:
        waiters.add(agent_task)
    done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if agent is not None:
        await agent.stop()
    if agent_task is not None and agent_task in done and agent_task.exception():
        err.print(f"[red]local agent stopped:[/] {agent_task.exception()}")
    server.should_exit = True
    with contextlib.suppress(Exception):
        await serve_task


def local_backend(settings: Settings, state_dir: Path) -> Any:
    from streamspace.agent.backends.local import LocalBackend
    from streamspace.agent.backends.local.identity import parse_uid_range

    try:
        uid_range = parse_uid_range(settings.local_uid_range)
    except ValueError as exc:
        fail(f"STREAMSPACE_LOCAL_UID_RANGE: {exc}")
    if settings.local_insecure_shared_user:
        err.print(
            "[bold red]WARNING:[/] --insecure-shared-user: sessions run as this user, "
            "unsandboxed; anyone who can start a session can read everything this user can"
        )
    return LocalBackend(
        state_dir=state_dir,
        insecure_shared_user=settings.local_insecure_shared_user,
        uid_range=uid_range,
        enforce_limits=settings.local_enforce_limits,
    )


async def _embedded_agent(application: Any, settings: Settings, url: str) -> Any:
    from streamspace.agent.runtime import Agent, AgentConfig
    from streamspace.controlplane import audit
    from streamspace.controlplane.api.agents import mint_join_token, revoke
    from streamspace.db.models import Agent as AgentRow
    from streamspace.protocol import Capacity

    ss = application.state.ss
    state_dir = settings.data_dir / "agent"

    async def new_join_token() -> str:
        async with ss.db() as db:
            token, _ = await mint_join_token(db, ss.settings, None, 300)
            await db.commit()
        return token

    async def reenrol(old_agent_id: str) -> str:
        """The stored credential was rejected (revoked, or the database is not the one it was
        enrolled in): enrol again. An identity left unrevoked is revoked now, so its sessions
        end as failed instead of staying `running` on an agent that will never return."""
        async with ss.db() as db:
            old = await db.get(AgentRow, old_agent_id)
            audit.record(
                db,
                actor=None,
                action="agent.reenrol",
                resource_type="agent",
                resource_id=old_agent_id,
            )
            if old is not None and not old.revoked:
                why = (
                    f"agent {old.name} was replaced by a new enrolment of this machine's agent; "
                    "its sessions can no longer be reached"
                )
                await revoke(ss, db, old, why)
            else:
                await db.commit()
        return await new_join_token()

    join_token = None
    if not (state_dir / "agent.json").exists():
        join_token = await new_join_token()
    backend = local_backend(settings, state_dir)
    config = AgentConfig(
        server=url,
        state_dir=state_dir,
        name="local",
        cluster_id="local",
        cluster_name="This machine",
        region="",
        backend="local",
        capacity=Capacity(
            max_sessions=settings.agent_max_sessions,
            cpu_millis=settings.agent_cpu_millis,
            memory_mb=settings.agent_memory_mb,
        ),
        max_concurrent_commands=settings.agent_max_concurrent_commands,
        join_token=join_token,
        reenrol=reenrol,
    )
    return Agent(config, backend)


@app.command()
def up(
    port: int = typer.Option(8080, help="Port for the web UI and API."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    data_dir: Path | None = typer.Option(None, help="Where the database, homes and keys live."),
    insecure_shared_user: bool = typer.Option(
        False,
        "--insecure-shared-user",
        help="Run sessions as this user, unsandboxed (a single-person laptop only).",
    ),
) -> None:
    """Everything on this machine: control plane (SQLite) plus a local desktop agent."""
    s = settings_for(data_dir, port=port, host=host)
    if insecure_shared_user:
        s.local_insecure_shared_user = True
    if "STREAMSPACE_METRICS_LOOPBACK_ONLY" not in os.environ:
        s.metrics_loopback_only = True  # whatever --host says; a metrics token opens them
    logs.configure(s.log_level, s.log_format)
    run(_serve(s, with_local_agent=True))


@app.command()
def server(
    port: int = typer.Option(8080),
    host: str = typer.Option("127.0.0.1"),
    data_dir: Path | None = typer.Option(None),
    database_url: str | None = typer.Option(None, help="Overrides STREAMSPACE_DATABASE_URL."),
    replica_id: str | None = typer.Option(None, help="Name of this replica in logs/leases."),
    redis_url: str | None = typer.Option(None, help="Overrides STREAMSPACE_REDIS_URL."),
    advertise_url: str | None = typer.Option(
        None, help="This replica's URL as agents reach it (default: http://HOST:PORT)."
    ),
) -> None:
    """The control plane alone (agents connect to it); run several with Redis to scale out."""
    s = settings_for(
        data_dir,
        port=port,
        host=host,
        database_url=database_url,
        replica_id=replica_id,
        redis_url=redis_url,
        advertise_url=advertise_url,
    )
    if s.redis_url and not s.advertise_url:
        reach = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
        s.advertise_url = f"http://{reach}:{s.port}"
    logs.configure(s.log_level, s.log_format)
    run(_serve(s, with_local_agent=False))


JOIN_TOKEN_ENV = "STREAMSPACE_JOIN_TOKEN"


def _join_token(ctx: typer.Context, given: str | None, path: Path | None) -> str | None:
    """The join token from exactly one of --join-token-file, STREAMSPACE_JOIN_TOKEN and
    --join-token. On the command line it is visible to every local account in `ps` for as long
    as the agent runs, so that way is still accepted (it always was) but warned about."""
    if path is not None:
        if given is not None:
            fail(f"give the join token once: --join-token-file or {JOIN_TOKEN_ENV}/--join-token")
        try:
            token = path.read_text().strip()
        except OSError as exc:
            fail(f"cannot read the join token file {path}: {exc.strerror or exc}")
        if not token:
            fail(f"the join token file {path} is empty")
        return token
    source = ctx.get_parameter_source("join_token")
    if given is not None and getattr(source, "name", "") == "COMMANDLINE":
        logs.get_logger("streamspace.cli").warning(
            "join_token_on_command_line",
            hint="other local accounts can read it in ps; use --join-token-file or "
            + JOIN_TOKEN_ENV,
        )
    return given or None


@app.command()
def agent(
    ctx: typer.Context,
    server_url: str = typer.Option(..., "--server", help="Control plane URL, e.g. http://cp:8080"),
    join_token: str | None = typer.Option(
        None,
        envvar=JOIN_TOKEN_ENV,
        show_envvar=True,
        help="One-time join token (first start only). Prefer the environment variable or "
        "--join-token-file: on the command line other local accounts can read it in `ps`.",
    ),
    join_token_file: Path | None = typer.Option(
        None, help="Read the one-time join token from this file (first start only)."
    ),
    cluster_id: str = typer.Option("default"),
    cluster_name: str = typer.Option("Default cluster"),
    region: str = typer.Option(""),
    name: str | None = typer.Option(None, help="Agent name (default: host name)."),
    backend: str = typer.Option("local", help="local or docker"),
    state_dir: Path | None = typer.Option(None, help="Credential and session state."),
    docker_host: str | None = typer.Option(None, help="Docker Engine API URL (docker backend)."),
    max_sessions: int = typer.Option(10),
    cpu_millis: int = typer.Option(8000),
    memory_mb: int = typer.Option(16384),
    insecure_shared_user: bool = typer.Option(
        False,
        "--insecure-shared-user",
        help="local: run sessions as the agent's user, unsandboxed (single-person laptop only).",
    ),
) -> None:
    """Run an agent: enrol once with a join token, then serve sessions for the control plane."""
    import socket

    from streamspace.agent.runtime import Agent, AgentConfig, AgentError
    from streamspace.protocol import Capacity

    s = Settings()
    logs.configure(s.log_level, s.log_format)
    token = _join_token(ctx, join_token, join_token_file)
    sdir = state_dir or (Path.home() / ".local" / "share" / "streamspace-agent")
    agent_name = name or socket.gethostname()
    be: Any
    if insecure_shared_user:
        s.local_insecure_shared_user = True
    if backend == "local":
        be = local_backend(s, sdir)
    elif backend == "docker":
        from streamspace.agent.backends.docker import DockerBackend

        be = DockerBackend(
            base_url=docker_host or os.environ.get("DOCKER_HOST"),
            agent_id=_backend_label_id(sdir),
            state_dir=sdir,
        )
    else:
        fail(f"unknown backend {backend!r}; use local or docker")
    config = AgentConfig(
        server=server_url.rstrip("/"),
        state_dir=sdir,
        name=agent_name,
        cluster_id=cluster_id,
        cluster_name=cluster_name,
        region=region,
        backend=backend,  # type: ignore[arg-type]
        capacity=Capacity(max_sessions=max_sessions, cpu_millis=cpu_millis, memory_mb=memory_mb),
        join_token=token,
    )
    runner = Agent(config, be)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(runner.stop()))
        try:
            await runner.run()
        except AgentError as exc:
            raise CLIError(str(exc)) from exc

    run(main())


def _backend_label_id(state_dir: Path) -> str:
    """A stable id for labelling this agent's containers, made once per state dir.

    The agent id is only known after enrolment; containers must be findable across restarts
    from the first start on, so the label uses an id of the state dir itself.
    """
    import uuid

    from streamspace.private_files import create_private_file, private_dir

    path = state_dir / "backend-id"
    if path.exists():
        return path.read_text().strip()
    private_dir(state_dir)
    value = uuid.uuid4().hex
    create_private_file(path)
    path.write_text(value)
    return value


# ---- database and admin -------------------------------------------------------------------


async def _with_db(settings: Settings, fn: Callable[[Any], Awaitable[T]]) -> T:
    from streamspace.db import migrate
    from streamspace.db.engine import create_engine, session_factory

    engine = create_engine(settings.resolved_database_url())
    try:
        await migrate.upgrade(engine)
        async with session_factory(engine)() as db:
            return await fn(db)
    except OSError as exc:
        raise CLIError(f"database unreachable: {exc}") from exc
    except migrate.MigrationRefused as exc:
        raise CLIError(str(exc)) from None
    finally:
        await engine.dispose()


@db_app.command("upgrade")
def db_upgrade(data_dir: Path | None = typer.Option(None)) -> None:
    """Apply all migrations (also done by `up` and `server` on start)."""
    from streamspace.db import migrate
    from streamspace.db.engine import create_engine

    s = settings_for(data_dir)

    async def main() -> str | None:
        engine = create_engine(s.resolved_database_url())
        try:
            await migrate.upgrade(engine)
            return await migrate.current_revision(engine)
        except OSError as exc:
            raise CLIError(f"database unreachable: {exc}") from exc
        except migrate.MigrationRefused as exc:
            raise CLIError(str(exc)) from None
        finally:
            await engine.dispose()

    console.print(f"database at revision [bold]{run(main())}[/]")


@admin_app.command("create-user")
def admin_create_user(
    username: str,
    role: str = typer.Option("user", help="admin, operator or user"),
    password: str = typer.Option(..., prompt=True, hide_input=True, confirmation_prompt=True),
    data_dir: Path | None = typer.Option(None),
) -> None:
    """Create a user directly in the database."""
    from sqlalchemy import func, select

    from streamspace.controlplane.api.schemas import USERNAME
    from streamspace.controlplane.passwords import describe, weakness
    from streamspace.controlplane.security import hash_password
    from streamspace.db.models import User

    if role not in ("admin", "operator", "user"):
        fail("role must be admin, operator or user")
    if not re.fullmatch(USERNAME, username):
        fail("username: letters, digits, '.', '_' and '-', starting with a letter or digit; max 64")
    weak = weakness(password, [username])
    if weak is not None:
        fail(describe("password", weak))

    async def create(db: Any) -> str:
        taken = await db.scalar(
            select(User.username).where(func.lower(User.username) == username.lower())
        )
        if taken:
            raise CLIError(f"user {taken!r} exists (usernames are unique whatever their case)")
        user = User(username=username, role=role, password_hash=hash_password(password))
        db.add(user)
        await db.commit()
        return str(user.id)

    user_id = run(_with_db(settings_for(data_dir), create))
    console.print(f"created {role} [bold]{username}[/] ({user_id})")


@admin_app.command("join-token")
def admin_join_token(
    ttl_seconds: int = typer.Option(3600, help="How long the token can be used."),
    data_dir: Path | None = typer.Option(None),
) -> None:
    """Mint a one-time join token for a new agent."""
    from streamspace.controlplane.api.agents import mint_join_token

    s = settings_for(data_dir)

    async def mint(db: Any) -> str:
        token, _ = await mint_join_token(db, s, None, ttl_seconds)
        await db.commit()
        return token

    token = run(_with_db(s, mint))
    console.print(token)


# ---- API client ---------------------------------------------------------------------------


def _client_file() -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return base / "streamspace" / "cli.json"


def _load_client() -> dict[str, str]:
    path = _client_file()
    if not path.exists():
        raise CLIError("not logged in; run `streamspace login --server URL --username NAME`")
    data: dict[str, str] = json.loads(path.read_text())
    return data


def _save_client(data: dict[str, str]) -> None:
    path = _client_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)


def _problem_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        return str(body.get("detail") or body.get("title") or resp.text)
    except ValueError:
        return resp.text or resp.reason_phrase


async def api(method: str, path: str, **kwargs: Any) -> Any:
    cfg = _load_client()
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
                _save_client(cfg)
                continue
            if resp.status_code >= 400:
                raise CLIError(f"{resp.status_code}: {_problem_text(resp)}")
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
                raise CLIError(_problem_text(resp))
            body: dict[str, Any] = resp.json()
            return body

    tokens = run(main())
    _save_client(
        {
            "server": server_url.rstrip("/"),
            "access_token": tokens["access_token"],
            "refresh_token": tokens["refresh_token"],
        }
    )
    console.print(f"logged in as [bold]{tokens['user']['username']}[/] ({tokens['user']['role']})")


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
    url = f"{_load_client()['server']}/#/view/{session_id}"
    console.print(url)
    if open_browser:
        webbrowser.open(url)


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


if __name__ == "__main__":
    main()
