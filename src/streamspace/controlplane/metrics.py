"""Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

registry = CollectorRegistry(auto_describe=True)

requests_total = Counter(
    "streamspace_http_requests_total",
    "HTTP requests",
    ["method", "route", "status"],
    registry=registry,
)
request_seconds = Histogram(
    "streamspace_http_request_seconds",
    "HTTP request latency",
    ["method", "route"],
    registry=registry,
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
forward_seconds = Histogram(
    "streamspace_router_forward_seconds",
    "agent frames from another replica: published to Redis there -> queued for the agent here",
    registry=registry,
    buckets=(
        0.0005,
        0.001,
        0.002,
        0.003,
        0.005,
        0.0075,
        0.01,
        0.015,
        0.02,
        0.03,
        0.05,
        0.1,
        0.25,
        0.5,
        1,
        2.5,
    ),
)
event_loop_lag_seconds = Histogram(
    "streamspace_event_loop_lag_seconds",
    "how late a 50 ms timer fired on this replica's event loop (time other work held the loop)",
    registry=registry,
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1),
)
agents_connected = Gauge(
    "streamspace_agents_connected", "agents connected to this replica", registry=registry
)
streams_active = Gauge("streamspace_streams_active", "open VNC streams", registry=registry)
sessions_by_state = Gauge("streamspace_sessions", "sessions by state", ["state"], registry=registry)
placements_total = Counter(
    "streamspace_placements_total", "sessions placed on agents", registry=registry
)
loop_runs_total = Counter(
    "streamspace_loop_runs_total",
    "background loop iterations run by this replica",
    ["loop"],
    registry=registry,
)
loop_leader = Gauge(
    "streamspace_loop_leader", "1 if this replica runs the background loops", registry=registry
)
connections_revoked_total = Counter(
    "streamspace_connections_revoked_total",
    "viewer WebSockets and event streams closed because their user's sign-in was revoked",
    ["kind"],
    registry=registry,
)
rate_limited_total = Counter(
    "streamspace_rate_limited_total",
    "requests answered 429 by a per-user limit",
    ["limit"],
    registry=registry,
)
