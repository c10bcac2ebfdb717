#!/usr/bin/env bash
# Compares corecast builds on one fan-out load, interleaved (A, B, A, B, ...),
# and prints each run and the medians of server CPU per delivery, p50 and
# p99. For deciding whether a change moved the server's cost: this machine's
# run-to-run noise is about ±10%, so use 7 rounds or more.
#
#   scripts/bench-ab.sh ROUNDS BIN_A BIN_B [BIN_C ...] -- FANOUT ARGS
#   scripts/bench-ab.sh 7 /tmp/corecast-before target/release/corecast -- -r 10 -m 100 -s 1000 -t 4
#
# The server runs on core $SERVER_CORE (0) with one shard, the load
# generator (this tree's release build) on core $LOADGEN_CORE (1). Uses
# ports 9700-9999 on 127.0.0.1.
set -euo pipefail
# Servers under load test run without their abuse limits (one address,
# one user opening thousands of connections, publishing flat out).
UNLIMITED=(env CORECAST_BAN_FILE= CORECAST_HISTORY_FILE= 'CORECAST_RATE_LIMITS=*=off' CORECAST_MAX_HANDSHAKES_PER_IP=0
  CORECAST_MAX_CONNECTIONS_PER_IP=0 CORECAST_MAX_CONNECTIONS_PER_SHARD=0)
cd "$(dirname "$0")/.."

[ $# -ge 4 ] || { sed -n 2,12p "$0"; exit 2; }
ROUNDS=$1
shift
BINS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  [ -x "$1" ] || { echo "not an executable: $1" >&2; exit 2; }
  BINS+=("$1")
  shift
done
[ "${1:-}" = "--" ] || { echo "missing -- before the fanout arguments" >&2; exit 2; }
shift
ARGS=("$@")
SERVER_CORE=${SERVER_CORE:-0}
LOADGEN_CORE=${LOADGEN_CORE:-1}
LOADGEN=target/release/corecast
[ -x "$LOADGEN" ] || cargo build --release --bin corecast
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT

port=9700
for round in $(seq "$ROUNDS"); do
  for i in "${!BINS[@]}"; do
    bin=${BINS[$i]}
    port=$((port + 1))
    log=$(mktemp)
    "${UNLIMITED[@]}" taskset -c "$SERVER_CORE" "$bin" serve --listen "127.0.0.1:$port" --shards 1 2>"$log" &
    pid=$!
    for _ in $(seq 100); do grep -q "listening on" "$log" && break; sleep 0.05; done
    line=$(taskset -c "$LOADGEN_CORE" "$LOADGEN" bench --url "ws://127.0.0.1:$port/ws" \
      --server-pid "$pid" --driver epoll fanout "${ARGS[@]}" 2>/dev/null || true)
    kill -INT "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -f "$log"
    [ -n "$line" ] || { echo "round $round, $bin: the bench failed" >&2; exit 1; }
    echo "$i $line" >>"$OUT"
    python3 -c '
import json, sys
r = json.loads(sys.argv[3])
lat = r["latency_us"]
print("round %s %s: %s deliveries/s, %.3f µs/delivery, p50 %d µs, p99 %d µs, loss %d, load generator %.0f%%" % (
    sys.argv[1], sys.argv[2], format(r["deliveries_per_s"], ",.0f"), r["server_cpu_us_per_delivery"],
    lat["p50"], lat["p99"], r["loss"], 100 * r["loadgen_core_share"]))
' "$round" "$bin" "$line"
  done
done

python3 - "$OUT" "${BINS[@]}" <<'EOF'
import json, statistics, sys
path, bins = sys.argv[1], sys.argv[2:]
runs = {}
for line in open(path):
    i, js = line.split(" ", 1)
    runs.setdefault(int(i), []).append(json.loads(js))
print("\nmedians:")
for i, b in enumerate(bins):
    rs = runs.get(i, [])
    med = lambda f: statistics.median(f(r) for r in rs)
    print(f"  {b}: {med(lambda r: r['server_cpu_us_per_delivery']):.3f} µs/delivery, "
          f"p50 {med(lambda r: r['latency_us']['p50']):.0f} µs, p99 {med(lambda r: r['latency_us']['p99']):.0f} µs "
          f"({len(rs)} runs)")
EOF
