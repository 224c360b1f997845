#!/usr/bin/env bash
# Starts PostgreSQL and Redis for the integration tests if they are installed but not running.
# Tests that need them skip loudly with the reason when they still are not reachable.
set -uo pipefail
if command -v pg_ctlcluster >/dev/null && ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  ver=$(ls /etc/postgresql 2>/dev/null | head -n1)
  if [ -n "$ver" ]; then
    pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
    for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 0.5; done
    # trust auth on loopback and a `test` database, as on the CI machines
    if ! psql -h 127.0.0.1 -d test -c 'select 1' >/dev/null 2>&1; then
      hba="/etc/postgresql/$ver/main/pg_hba.conf"
      grep -q "streamspace-test" "$hba" || sed -i '1i host all all 127.0.0.1/32 trust # streamspace-test' "$hba"
      pg_ctlcluster --skip-systemctl-redirect "$ver" main reload || true
      su postgres -c "psql -c \"DO \\\$\\\$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='$(id -un)') THEN CREATE ROLE \\\"$(id -un)\\\" SUPERUSER LOGIN; END IF; END\\\$\\\$;\"" >/dev/null 2>&1 || true
      su postgres -c "createdb -O $(id -un) test" >/dev/null 2>&1 || true
    fi
  fi
fi
if command -v redis-server >/dev/null && ! redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null || true
fi
pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null && echo "postgresql: up" || echo "postgresql: NOT reachable (its tests will be skipped)"
redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && echo "redis: up" || echo "redis: NOT reachable (its tests will be skipped)"
