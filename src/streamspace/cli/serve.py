"""`up` and `server`: the control plane as a process, with or without an embedded local agent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from streamspace import __version__, logs
from streamspace.cli.backends import build_backend
from streamspace.cli.base import CLIError, app, console, err, run, settings_for
from streamspace.config import Settings

SHUTDOWN_HIBERNATE_SECONDS = 60.0
"""How long `streamspace up` waits on Ctrl-C for its sessions to hibernate before it stops."""


async def _hibernate_local_sessions(ss: Any, agent_id: str | None) -> None:
    """Before the embedded agent stops: hibernate its sessions through the control plane (the
    agent, still connected, runs the commands), so no Xvnc or app outlives the process and each
    can be woken at the next start; give up after SHUTDOWN_HIBERNATE_SECONDS."""
    from sqlalchemy import select

    from streamspace.controlplane.deps import writer_turn
    from streamspace.db.models import Session as SessionRow

    if agent_id is None:
        return
    async with ss.db() as db, writer_turn(ss, db):
        ids = await ss.lifecycle.end_agent_sessions(
            db, agent_id, "hibernated: streamspace up was stopped (wake it after the next start)"
        )
    if not ids:
        return
    console.print(f"hibernating {len(ids)} session(s) before stopping (Ctrl-C again to skip)")
    deadline = asyncio.get_running_loop().time() + SHUTDOWN_HIBERNATE_SECONDS
    while asyncio.get_running_loop().time() < deadline:
        async with ss.db() as db:
            states = set(
                (await db.scalars(select(SessionRow.state).where(SessionRow.id.in_(ids)))).all()
            )
        if states <= {"hibernated", "stopped", "failed"}:
            return
        await asyncio.sleep(0.2)
    err.print("[yellow]some sessions did not hibernate in time; they keep running[/]")


async def _serve(settings: Settings, with_local_agent: bool, keep_sessions: bool = False) -> None:
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

    class Server(uvicorn.Server):
        """The signals are this function's (below), not uvicorn's: uvicorn would stop serving
        at the first Ctrl-C, while the embedded agent still needs the control plane to
        hibernate its sessions."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    server = Server(config)
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
    if (
        agent is not None
        and not keep_sessions
        and agent_task not in done
        and serve_task not in done
    ):
        stop.clear()
        hibernating = asyncio.ensure_future(
            _hibernate_local_sessions(application.state.ss, agent.agent_id)
        )
        # A second Ctrl-C skips the wait: the sessions then keep running, as with
        # --keep-sessions, and the next start adopts them.
        await asyncio.wait(
            {hibernating, asyncio.ensure_future(stop.wait())},
            return_when=asyncio.FIRST_COMPLETED,
        )
        hibernating.cancel()
    if agent is not None:
        await agent.stop()
    if agent_task is not None and agent_task in done and agent_task.exception():
        err.print(f"[red]local agent stopped:[/] {agent_task.exception()}")
    server.should_exit = True
    with contextlib.suppress(Exception):
        await serve_task


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
    backend = build_backend("local", settings, state_dir)
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
    keep_sessions: bool = typer.Option(
        False,
        "--keep-sessions",
        help="On Ctrl-C / SIGTERM leave the sessions running for the next start to adopt, "
        "instead of hibernating them (homes are kept either way).",
    ),
) -> None:
    """Everything on this machine: control plane (SQLite) plus a local desktop agent.

    Stopping it hibernates its sessions (they can be woken after the next start)."""
    s = settings_for(data_dir, port=port, host=host)
    if insecure_shared_user:
        s.local_insecure_shared_user = True
    if "STREAMSPACE_METRICS_LOOPBACK_ONLY" not in os.environ:
        s.metrics_loopback_only = True  # whatever --host says; a metrics token opens them
    logs.configure(s.log_level, s.log_format)
    run(_serve(s, with_local_agent=True, keep_sessions=keep_sessions))


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
