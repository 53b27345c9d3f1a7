#!/usr/bin/env bash
# Ingest benchmark (scenario 4): PATCH /events throughput and latency with
# wrk, single events and batches of 100, against a Streamline started here
# on free loopback ports (in-memory hub, one subscriber on the topic so
# every event is also delivered), and optionally against peers side by side.
#
# Usage: bench/ingest.sh [DURATION_S [CONNECTIONS]]   defaults: 10 64
# Environment:
#   STREAMLINE_BIN  prebuilt binary (else cargo builds it)
#   WRK_THREADS     default 1: the server gets the other core
#   PEERS           servers to run, in order (default: streamline). A peer is
#                   PEERS_DIR/NAME/run.sh PORT_SUB PORT_PUB serving
#                   GET /stream?topic= and PATCH /events on PORT_PUB (as
#                   axum-naive does); it gets patch-one only (one event a body)
#   PEERS_DIR       where the peers live (default: ../shared/peers from the repo root)
#   ROUNDS          repeat this many times, every other round in reverse order
#                   (default 1); the table at the end shows each round's ratio
#   SUBSCRIBER      1 (default): one SSE subscriber (curl) on the topic; 0: none
#   SCRIPTS         wrk scripts in bench/wrk/ (default: patch-one patch-batch)
#
# Every server gets the same subscriber, the same wrk script and the same
# body; Streamline runs with RUST_LOG=warn, no auth and no publish rate
# limit (its default of 1,000/s per publisher would answer most requests
# with a cheap 429, which wrk counts as requests all the same: the
# "non-2xx" column says whether that happened).
set -euo pipefail
duration=${1:-10} conns=${2:-64}
repo=$(cd "$(dirname "$0")/.." && pwd)
peers_dir=${PEERS_DIR:-$repo/../shared/peers}
servers=${PEERS:-streamline} rounds=${ROUNDS:-1} scripts=${SCRIPTS:-patch-one patch-batch}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/streamline-target}
command -v wrk >/dev/null || { echo "needs wrk: apt-get install -y wrk" >&2; exit 1; }
gateway=${STREAMLINE_BIN:-}
if [ -z "$gateway" ] && [[ " $servers " == *" streamline "* ]]; then
  (cd "$repo" && cargo build --release --quiet --bin streamline)
  gateway=$CARGO_TARGET_DIR/release/streamline
fi
# Two free loopback ports, distinct (both held while the kernel picks them).
ports() {
  python3 -c 'import socket; a, b = socket.socket(), socket.socket()
a.bind(("127.0.0.1", 0)); b.bind(("127.0.0.1", 0)); print(a.getsockname()[1], b.getsockname()[1])'
}
out=$(mktemp -d "${TMPDIR:-/tmp}/streamline-ingest.XXXXXX")
pid= sub=
stop() {
  # The subscriber may be gone already: under batches a curl that falls
  # behind is closed as a slow client.
  if [ -n "$sub" ]; then kill -TERM "$sub" 2>/dev/null || true; wait "$sub" 2>/dev/null || true; fi
  if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  pid= sub=
  return 0
}
trap stop EXIT
# utime + stime of a server process, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
summary=()
for round in $(seq "$rounds"); do
  order=$servers
  [ $((round % 2)) -eq 0 ] && order=$(tr ' ' '\n' <<< "$servers" | tac | tr '\n' ' ')
  for server in $order; do
    read -r streams control < <(ports)
    if [ "$server" = streamline ]; then
      RUST_LOG=warn STREAMLINE_PUBLISH_RATE=0 STREAMLINE_SHUTDOWN_DELAY=0s STREAMLINE_DRAIN_WINDOW=1s \
        "$gateway" --control-addr "127.0.0.1:$control" --stream-addr "127.0.0.1:$streams" \
        > "$out/$server.log" 2>&1 &
    else
      [ -x "$peers_dir/$server/run.sh" ] || { echo "no $peers_dir/$server/run.sh" >&2; exit 1; }
      "$peers_dir/$server/run.sh" "$streams" "$control" > "$out/$server.log" 2>&1 &
    fi
    pid=$!
    for _ in $(seq 600); do
      (exec 3<>"/dev/tcp/127.0.0.1/$control") 2>/dev/null && break
      kill -0 "$pid" 2>/dev/null || { echo "$server exited:" >&2; cat "$out/$server.log" >&2; exit 1; }
      sleep 0.1
    done
    if [ "${SUBSCRIBER:-1}" = 1 ]; then
      curl -sN "http://127.0.0.1:$streams/stream?topic=ingest" > /dev/null &
      sub=$!
      sleep 0.5
    fi
    for script in $scripts; do
      [ "$server" != streamline ] && [ "$script" != patch-one ] && continue
      echo "== round $round, $server, $script: $duration s, $conns connections, load $(cut -d' ' -f1 /proc/loadavg)"
      cpu0=$(cpu_ticks "$pid")
      wrk -t "${WRK_THREADS:-1}" -c "$conns" -d "${duration}s" --latency \
        -s "$repo/bench/wrk/$script.lua" "http://127.0.0.1:$control/events" | tee "$out/wrk.txt"
      cpu1=$(cpu_ticks "$pid")
      rps=$(awk '/^Requests\/sec/ {printf "%d", $2}' "$out/wrk.txt")
      reqs=$(awk '/requests in/ {print $1}' "$out/wrk.txt")
      us=$(awk -v t=$((cpu1 - cpu0)) -v hz="$(getconf CLK_TCK)" -v n="$reqs" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
      non2xx=$(awk '/Non-2xx/ {print $NF}' "$out/wrk.txt")
      summary+=("$round $server $script $rps ${non2xx:-0} $us")
    done
    stop
  done
done
echo
echo "| round | server | script | requests/s | non-2xx | server CPU µs/request | streamline ÷ this |"
echo "|------:|--------|--------|-----------:|--------:|----------------------:|------------------:|"
for row in "${summary[@]}"; do
  read -r r s sc rps bad us <<< "$row"
  base=$(printf '%s\n' "${summary[@]}" | awk -v r="$r" -v sc="$sc" '$1==r && $2=="streamline" && $3==sc {print $4}')
  ratio=$(awk -v a="$rps" -v b="${base:-0}" 'BEGIN { if (a > 0 && b > 0) printf "%.2f", b / a; else print "-" }')
  echo "| $r | $s | $sc | $rps | $bad | $us | $ratio |"
done
rm -rf "$out"
