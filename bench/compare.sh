#!/usr/bin/env bash
# Side-by-side benchmark: one scenario against Streamline and each peer SSE
# server in ../shared/peers (see its README.md), back to back, then one table.
#
# Usage: bench/compare.sh [SUBSCRIBERS [RATE [DURATION [SIZE [TOPICS]]]]]
#   defaults: 1000 subscribers, 100 events/s, 10 s, 100-byte payloads, 1 topic.
#   RATE 0 runs the idle scenario (open the streams, measure memory, hold).
#   RATE as a comma-separated list (200,400,800) is a rate sweep: each server
#   runs every rate in turn, and the table shows each one's knee (the most
#   deliveries/s with every event published, none lost, p99 <= KNEE_P99).
# Environment:
#   PEERS       which servers, in order (default: streamline nchan axum-naive fastapi-queue)
#   MODES       publisher modes to run against each server, in order (default: serial;
#               "serial pool" runs both, labelled PEER/MODE); see --publisher-mode
#   ROUNDS      repeat everything this many times, every other round in reverse peer
#               order (default 1)
#   KNEE_P99    the p99 bound of a sweep's knee (default 100ms)
#   PEERS_DIR   where the peers live (default: ../shared/peers from the repo root)
#   BENCH_ARGS  extra flags for streamline-bench (e.g. "--publishers 2")
#   OUT         directory for logs and the JSON lines (default: a new temp dir)
#   STREAMLINE_BIN, BENCH_BIN  prebuilt binaries to use (both set: no cargo build)
#
# Each server is started on free loopback ports, sampled by pid (RSS, CPU) and
# stopped with SIGTERM. Not used by the tests; run it on a quiet machine.
set -euo pipefail

subs=${1:-1000} rate=${2:-100} duration=${3:-10} size=${4:-100} topics=${5:-1}
repo=$(cd "$(dirname "$0")/.." && pwd)
peers_dir=${PEERS_DIR:-$repo/../shared/peers}
peers=${PEERS:-streamline nchan axum-naive fastapi-queue}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/streamline-target}
out=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/streamline-compare.XXXXXX")}
mkdir -p "$out"
results=$out/results.jsonl
: > "$results"

ROOT=$repo
# shellcheck source=bench/lib.sh
source "$repo/bench/lib.sh"
if [ -z "${BENCH_BIN:-}" ] || [ -z "${STREAMLINE_BIN:-}" ]; then
  echo "building streamline and streamline-bench (release)..." >&2
fi
find_binaries
bench=$BENCH_BIN
gateway=$STREAMLINE_BIN

# Both the servers and the bench open one socket per stream.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" -lt $((subs + 200)) ]; then
  echo "warning: open-files limit $(ulimit -n) is below $((subs + 200)); streams may fail" >&2
fi

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A loopback port nobody listens on, below the ephemeral range the bench's
# own connections use.
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 12000))
    listening "$p" || { echo "$p"; return; }
  done
}

server_pid=
stop_server() {
  [ -n "$server_pid" ] || return 0
  kill -TERM "$server_pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=
}
trap stop_server EXIT
trap 'exit 130' INT TERM

# wait_ready PORT SECONDS LOG: until the server listens (or dies, or time is up).
wait_ready() {
  local deadline=$((SECONDS + $2))
  while ! listening "$1"; do
    if ! kill -0 "$server_pid" 2>/dev/null; then
      echo "  the server exited; its log ($3):" >&2
      tail -n 20 "$3" >&2
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "  not listening on $1 after $2 s; log: $3" >&2
      return 1
    fi
    sleep 0.1
  done
}

# Why a peer cannot run here, or nothing when it can.
missing_prerequisite() {
  case $1 in
    streamline) ;;
    nchan)
      [ -f /usr/lib/nginx/modules/ngx_nchan_module.so ] && command -v nginx >/dev/null ||
        echo "needs nginx and the nchan module: apt-get install -y nginx libnginx-mod-nchan" ;;
    axum-naive)
      command -v cargo >/dev/null || echo "needs cargo" ;;
    fastapi-queue)
      python3 -c 'import venv, ensurepip' 2>/dev/null ||
        echo "needs python3 with venv: apt-get install -y python3-venv" ;;
  esac
  if [ "$1" != streamline ] && [ ! -x "$peers_dir/$1/run.sh" ]; then
    echo "no $peers_dir/$1/run.sh"
  fi
}

rates=${rate//,/ }
sweep=
[ "$rates" != "$rate" ] && sweep=1
modes=${MODES:-serial}
rounds=${ROUNDS:-1}
nmodes=$(wc -w <<< "$modes")

skipped=()
for round in $(seq 1 "$rounds"); do
order=$peers round_modes=$modes
# Alternate the order so neither server (nor mode) always runs first.
if [ $((round % 2)) = 0 ]; then
  order=$(tr ' ' '\n' <<< "$peers" | tac | tr '\n' ' ')
  round_modes=$(tr ' ' '\n' <<< "$modes" | tac | tr '\n' ' ')
fi
for peer in $order; do
  why=$(missing_prerequisite "$peer")
  if [ -n "$why" ]; then
    echo "== $peer: skipped ($why)" >&2
    skipped+=("$peer: $why")
    continue
  fi
  sub=$(free_port)
  pub=$(free_port)
  while [ "$pub" = "$sub" ]; do pub=$(free_port); done
  log=$out/$peer.server.log
  # Defaults for servers shaped like Streamline: PATCH a JSON event.
  url="http://127.0.0.1:$sub/stream?topic={topic}"
  pub_args=(--pub-url "http://127.0.0.1:$pub/events")
  wait_s=120
  case $peer in
    streamline)
      # Limits through the environment (a setting this build lacks is then
      # ignored): room for every stream, no per-client-address limits (all
      # streams come from 127.0.0.x; no publish rate limit: the publishers
      # share one address), a quick stop.
      RUST_LOG=warn STREAMLINE_MAX_CLIENTS=$((subs + 100)) STREAMLINE_MAX_CONNECTIONS=$((subs + 100)) STREAMLINE_PUBLISH_RATE=0 \
        STREAMLINE_MAX_STREAMS_PER_IP=0 STREAMLINE_MAX_CONN_RATE_PER_IP=0 \
        STREAMLINE_SHUTDOWN_DELAY=0s STREAMLINE_DRAIN_WINDOW=1s \
        "$gateway" --stream-addr "127.0.0.1:$sub" --control-addr "127.0.0.1:$pub" > "$log" 2>&1 &
      ;;
    nchan)
      "$peers_dir/nchan/run.sh" "$sub" "$pub" > "$log" 2>&1 &
      url="http://127.0.0.1:$sub/sub/{topic}"
      pub_args=(--pub-method POST --pub-url "http://127.0.0.1:$pub/pub/{topic}" --pub-body '{payload}')
      ;;
    fastapi-queue)
      "$peers_dir/fastapi-queue/run.sh" "$sub" "$pub" > "$log" 2>&1 &
      pub_args=(--pub-url "http://127.0.0.1:$sub/events")
      wait_s=600 # the first run installs its venv
      ;;
    axum-naive)
      "$peers_dir/axum-naive/run.sh" "$sub" "$pub" > "$log" 2>&1 &
      wait_s=900 # the first run builds it
      ;;
    *)
      "$peers_dir/$peer/run.sh" "$sub" "$pub" > "$log" 2>&1 &
      ;;
  esac
  server_pid=$!
  echo "== $peer: pid $server_pid, streams on :$sub, publish on :$pub" >&2
  if ! wait_ready "$sub" "$wait_s" "$log"; then
    stop_server
    skipped+=("$peer: did not start (see $log)")
    continue
  fi
  for r in $rates; do
    for m in $round_modes; do
      load=(--rate "$r")
      [ "$r" = 0 ] && load=(--idle-only)
      label=$peer
      [ "$nmodes" -gt 1 ] && label=$peer/$m
      run=$out/$peer.$m.$r.round$round.bench.txt
      echo "== $label: rate $r, round $round, $(uptime | sed 's/.*load/load/')" >&2
      # shellcheck disable=SC2086 # BENCH_ARGS is a list of flags
      "$bench" --label "$label" --url "$url" "${pub_args[@]}" --pid "$server_pid" \
        --publisher-mode "$m" --subscribers "$subs" "${load[@]}" --duration "$duration" \
        --size "$size" --topics "$topics" ${BENCH_ARGS:-} | tee "$run" ||
        echo "  streamline-bench failed for $label" >&2
      tail -n 1 "$run" | grep '^{' >> "$results" || true
    done
  done
  stop_server
done
done

echo
echo "scenario: $subs subscribers, rate $rate events/s, $duration s, $size-byte payloads, $topics topics, publisher modes: $modes, $rounds round(s)"
if [ -n "$sweep" ]; then
  "$bench" --knee "$results" --knee-p99 "${KNEE_P99:-100ms}"
else
  "$bench" --table "$results"
fi
for s in "${skipped[@]}"; do echo "skipped $s"; done
echo "logs and JSON lines: $out"
