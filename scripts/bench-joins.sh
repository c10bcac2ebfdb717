#!/usr/bin/env bash
# Join storms: N clients, each its own user, all joining one channel at
# once, against one node with `large_channel_members` set to each value
# given (0: member events always broadcast), interleaved, ROUNDS times.
# Prints each run and the medians of the seconds until every client has
# joined and of the server's CPU per connect.
#
#   scripts/bench-joins.sh ROUNDS N THRESHOLD [THRESHOLD ...]
#   scripts/bench-joins.sh 3 2000 0 100 1000
#
# The server runs on core $SERVER_CORE (0) with one shard, `corecast bench
# connect` on core $LOADGEN_CORE (1). Uses ports 9400-9499 on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
# UNLIMITED: servers run without their abuse limits.
source scripts/bench-lib.sh
[ $# -ge 3 ] || { sed -n 2,12p "$0"; exit 2; }
ROUNDS=$1
N=$2
shift 2
SERVER_CORE=${SERVER_CORE:-0}
LOADGEN_CORE=${LOADGEN_CORE:-1}
BIN=target/release/corecast
[ -x "$BIN" ] || cargo build --release --bin corecast
OUT=$(mktemp)
LOG=$(mktemp)
trap 'rm -f "$OUT" "$LOG"' EXIT
port=9400
for round in $(seq "$ROUNDS"); do
  for at in "$@"; do
    port=$((port + 1))
    "${UNLIMITED[@]}" CORECAST_LARGE_CHANNEL_MEMBERS="$at" taskset -c "$SERVER_CORE" "$BIN" serve \
      --listen "127.0.0.1:$port" --shards 1 2>"$LOG" &
    pid=$!
    for _ in $(seq 100); do grep -q "listening on" "$LOG" && break; sleep 0.05; done
    line=$(taskset -c "$LOADGEN_CORE" "$BIN" bench --url "ws://127.0.0.1:$port/ws" --server-pid "$pid" \
      --driver epoll connect -n "$N" -r 1 --hold 0 --connect-timeout 120 2>/dev/null || true)
    kill -INT "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    [ -n "$line" ] || { echo "round $round, threshold $at: the bench failed" >&2; cat "$LOG" >&2; exit 1; }
    echo "$at $line" >>"$OUT"
    python3 -c '
import json, sys
r = json.loads(sys.argv[3])
print("round %s, large_channel_members %s: %s" % (sys.argv[1], sys.argv[2],
    "%.2f s until all joined, %.1f µs of server CPU per connect, %d closed" % (
        r["joined_seconds"], r["server_cpu_us_per_connect"], r["closed_connections"])), flush=True)
' "$round" "$at" "$line"
  done
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    at, js = line.split(" ", 1)
    runs.setdefault(int(at), []).append(json.loads(js))
print("\nmedians:")
for at, rs in runs.items():
    secs = statistics.median(r["joined_seconds"] for r in rs)
    cpu = statistics.median(r["server_cpu_us_per_connect"] for r in rs)
    print(f"  large_channel_members {at}: {secs:.2f} s until all joined, {cpu:.1f} µs of server CPU per connect")
PY
