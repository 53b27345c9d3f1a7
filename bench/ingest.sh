#!/usr/bin/env bash
# Ingest benchmark (scenario 4): PATCH /events throughput and latency with
# wrk, single events and batches of 100, against a Streamline started here
# on free loopback ports (in-memory hub, one subscriber on the topic so
# every event is also delivered).
#
# Usage: bench/ingest.sh [DURATION_S [CONNECTIONS]]   defaults: 10 64
# Environment: STREAMLINE_BIN (prebuilt binary; else cargo builds it),
# WRK_THREADS (default 1: the gateway gets the other core).
set -euo pipefail
duration=${1:-10} conns=${2:-64}
repo=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/streamline-target}
command -v wrk >/dev/null || { echo "needs wrk: apt-get install -y wrk" >&2; exit 1; }
gateway=${STREAMLINE_BIN:-}
if [ -z "$gateway" ]; then
  (cd "$repo" && cargo build --release --quiet --bin streamline)
  gateway=$CARGO_TARGET_DIR/release/streamline
fi
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
control=$(port) stream=$(port)
# No publish rate limit: wrk is one client address.
RUST_LOG=warn STREAMLINE_PUBLISH_RATE=0 STREAMLINE_SHUTDOWN_DELAY=0s STREAMLINE_DRAIN_WINDOW=1s \
  "$gateway" --control-addr "127.0.0.1:$control" --stream-addr "127.0.0.1:$stream" &
pid=$!
sub=
trap 'kill -TERM $pid ${sub:-} 2>/dev/null; wait $pid 2>/dev/null' EXIT
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$control") 2>/dev/null && break; sleep 0.1; done
curl -sN "http://127.0.0.1:$stream/stream?topic=ingest" > /dev/null &
sub=$!
for script in patch-one patch-batch; do
  echo "== $script: $duration s, $conns connections"
  wrk -t "${WRK_THREADS:-1}" -c "$conns" -d "${duration}s" --latency \
    -s "$repo/bench/wrk/$script.lua" "http://127.0.0.1:$control/events"
done
