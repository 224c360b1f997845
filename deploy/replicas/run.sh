#!/usr/bin/env bash
# Run N control-plane replicas behind nginx on this machine, sharing PostgreSQL and Redis.
#   deploy/replicas/run.sh [N=2] [LB_PORT=8080]
# Env: STREAMSPACE_DATABASE_URL (default postgresql://127.0.0.1:5432/streamspace),
#      STREAMSPACE_REDIS_URL (default redis://127.0.0.1:6379/0), STREAMSPACE_SECRET_KEY (shared),
#      STREAMSPACE_TRUSTED_PROXIES (default 127.0.0.1: the nginx started here).
set -euo pipefail
n="${1:-2}"; lb="${2:-8080}"
here="$(cd "$(dirname "$0")" && pwd)"; root="$(cd "$here/../.." && pwd)"
dir="${STREAMSPACE_REPLICAS_DIR:-$root/build/replicas}"
mkdir -p "$dir"/{body,proxy,fastcgi,uwsgi,scgi}
export STREAMSPACE_DATABASE_URL="${STREAMSPACE_DATABASE_URL:-postgresql://127.0.0.1:5432/streamspace}"
export STREAMSPACE_REDIS_URL="${STREAMSPACE_REDIS_URL:-redis://127.0.0.1:6379/0}"
# nginx below runs on this machine: believe its X-Forwarded-For/-Proto, and nobody else's.
export STREAMSPACE_TRUSTED_PROXIES="${STREAMSPACE_TRUSTED_PROXIES:-127.0.0.1}"
if [ -z "${STREAMSPACE_SECRET_KEY:-}" ]; then
  [ -f "$dir/secret" ] || head -c 32 /dev/urandom | base64 > "$dir/secret"
  export STREAMSPACE_SECRET_KEY="$(cat "$dir/secret")"
fi
upstreams=""; pids=()
for i in $(seq 1 "$n"); do
  port=$((lb + i))
  upstreams+="    server 127.0.0.1:$port max_fails=1 fail_timeout=3s;"$'\n'
  "$root/.venv/bin/streamspace" server --port "$port" --replica-id "replica-$i" \
      --data-dir "$dir/replica-$i" > "$dir/replica-$i.log" 2>&1 &
  pids+=($!)
done
sed -e "s#@DIR@#$dir#g" -e "s#@PORT@#$lb#g" "$here/nginx.conf.template" \
  | awk -v up="$upstreams" '{ if ($0 == "@UPSTREAMS@") printf "%s", up; else print }' > "$dir/nginx.conf"
trap 'kill "${pids[@]}" 2>/dev/null; [ -f "$dir/nginx.pid" ] && kill "$(cat "$dir/nginx.pid")" 2>/dev/null' EXIT
echo "load balancer: http://127.0.0.1:$lb  (replicas on ports $((lb + 1))..$((lb + n)), logs in $dir)"
nginx -c "$dir/nginx.conf" -p "$dir"
