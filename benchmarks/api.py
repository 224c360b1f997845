"""Throughput and latency of GET /api/v1/sessions (page of 50) with 5,000 sessions in PostgreSQL.

Usage: python benchmarks/api.py [--pg postgresql://127.0.0.1:5432/test] [--rows 5000]
                                [--connections 64] [--duration 20] [--workers 1]
Needs PostgreSQL and `wrk` (apt-get install wrk), which generates the load from C so the Python
client does not compete with the server for the 2 cores. Prints req/s and p50/p99 latency.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta

from benchmarks.common import describe_machine, login, product
from streamspace.db.engine import create_engine
from streamspace.db.models import Session as SessionRow
from streamspace.db.models import User


async def seed(db_url: str, rows: int) -> None:
    from sqlalchemy import insert, select

    engine = create_engine(db_url)
    async with engine.begin() as conn:
        owner = (await conn.execute(select(User.id).where(User.username == "admin"))).scalar_one()
        now = datetime.now(UTC)
        batch = []
        for i in range(rows):
            at = now - timedelta(seconds=rows - i)
            batch.append(
                {
                    "id": uuid.uuid4().hex,
                    "owner_id": owner,
                    "template_name": "xterm",
                    "state": "stopped",
                    "tags": [f"t{i % 10}"],
                    "cpu_millis": 500,
                    "memory_mb": 512,
                    "persistent_home": True,
                    "idle_timeout_seconds": 3600,
                    "max_duration_seconds": 43200,
                    "failure_reason": "",
                    "status_message": "",
                    "created_at": at,
                    "updated_at": at,
                    "state_changed_at": at,
                    "last_activity": at,
                }
            )
        await conn.execute(insert(SessionRow), batch)
    await engine.dispose()


def run_wrk(url: str, token: str, connections: int, duration: int) -> str:
    cmd = [
        "wrk",
        f"-t{min(2, connections)}",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        "-H",
        f"Authorization: Bearer {token}",
        url + "/api/v1/sessions?limit=50",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def parse_wrk(out: str) -> dict[str, str]:
    fields = {}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M)
        fields[f"p{pct}"] = m.group(1) if m else "?"
    m = re.search(r"Requests/sec:\s+(\S+)", out)
    fields["rps"] = m.group(1) if m else "?"
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    fields["errors"] = m.group(1) if m else "0"
    return fields


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pg", default="postgresql://127.0.0.1:5432/test")
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--connections", default="64")
    ap.add_argument("--duration", type=int, default=20)
    args = ap.parse_args()
    import psycopg2

    name = f"ss_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(args.pg)
    admin.autocommit = True
    admin.cursor().execute(f'CREATE DATABASE "{name}"')
    db_url = args.pg.rsplit("/", 1)[0] + "/" + name
    print(f"machine: {describe_machine()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    try:
        env = {"STREAMSPACE_DATABASE_URL": db_url, "STREAMSPACE_LOCAL_AGENT": "false"}
        with product("server", env=env) as url:
            asyncio.run(seed(db_url, args.rows))
            token = login(url)
            run_wrk(url, token, 8, 3)  # warm up
            for conns in args.connections.split(","):
                res = parse_wrk(run_wrk(url, token, int(conns), args.duration))
                print(
                    f"GET /api/v1/sessions?limit=50 rows={args.rows} connections={conns}: "
                    f"{res['rps']} req/s p50={res['p50']} p99={res['p99']} "
                    f"non-2xx={res['errors']}",
                    flush=True,
                )
    finally:
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


if __name__ == "__main__":
    main()
