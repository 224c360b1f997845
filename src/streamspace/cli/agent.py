"""`streamspace agent`: enrol once with a join token, then serve sessions."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import typer

from streamspace import logs
from streamspace.cli.backends import build_backend
from streamspace.cli.base import CLIError, app, fail, run
from streamspace.config import Settings

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
    backend: str = typer.Option("local", help="local, docker or kubernetes"),
    state_dir: Path | None = typer.Option(None, help="Credential and session state."),
    docker_host: str | None = typer.Option(None, help="Docker Engine API URL (docker backend)."),
    namespace: str | None = typer.Option(
        None,
        help="Namespace the sessions' pods go to (kubernetes backend; default: "
        "STREAMSPACE_KUBE_NAMESPACE, the kubeconfig context's, or the agent's own in a cluster).",
    ),
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
    if insecure_shared_user:
        s.local_insecure_shared_user = True
    if namespace is not None:
        s.kube_namespace = namespace
    be = build_backend(backend, s, sdir, docker_host)
    config = AgentConfig(
        server=server_url.rstrip("/"),
        state_dir=sdir,
        name=agent_name,
        cluster_id=cluster_id,
        cluster_name=cluster_name,
        region=region,
        backend=be.kind,
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
