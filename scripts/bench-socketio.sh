#!/usr/bin/env bash
# Socket.IO side by side, interleaved in rounds: corecast serving Socket.IO
# clients, corecast's native JSON protocol on the same loads, and a Node
# Socket.IO 4 server doing the same fan-out (scripts/peers/socketio,
# installed by scripts/socketio-peer.sh). Each server is pinned to core 0
# and `corecast bench` to core 1; every run appends a JSON line (with
# "server" and "label" added) to $OUT, then a summary table is printed.
#
#   scripts/bench-socketio.sh [ROUNDS]        (default 3; about 3 minutes each)
#
# WORKLOADS="fanout echo idle" (the default) selects what runs; OUT names the
# results file (default target/bench/socketio.jsonl, appended to).
# Needs two cores, Node 20 and npm. Uses ports 9700-9799 on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
# SERVER_ENV (the limits lifted for the workload run), stop_pid and run.
source scripts/bench-lib.sh

ROUNDS=${1:-3}
OUT=${OUT:-target/bench/socketio.jsonl}
SERVER_CORE=${SERVER_CORE:-0}
LOADGEN_CORE=${LOADGEN_CORE:-1}
WORKLOADS=${WORKLOADS:-fanout echo idle}
mkdir -p "$(dirname "$OUT")"
has() { [[ " $WORKLOADS " == *" $1 "* ]]; }

echo "building the release binary..."
cargo build --release --quiet --bin corecast
BIN=target/release/corecast
peers=scripts/peers/socketio
if [ ! -d "$peers/node_modules/socket.io" ]; then
  echo "installing the Node Socket.IO server's packages..."
  (cd "$peers" && npm install --no-audit --no-fund --no-package-lock --silent)
fi

port=9700
SERVER_PID=
start_server() { # $1 = corecast-socketio | corecast-json | socketio-node
  port=$((port + 1))
  local log=target/bench/server.log
  : >"$log"
  case $1 in
    corecast-socketio | corecast-json)
      "${SERVER_ENV[@]}" taskset -c "$SERVER_CORE" "$BIN" serve --listen "127.0.0.1:$port" --shards 1 2>"$log" &
      ;;
    socketio-node)
      taskset -c "$SERVER_CORE" node "$peers/server.js" --port "$port" --mode plain 2>"$log" &
      ;;
  esac
  SERVER_PID=$!
  case $1 in
    corecast-json) URL="ws://127.0.0.1:$port/ws" PROTO=json ;;
    *) URL="ws://127.0.0.1:$port/socket.io/" PROTO=socketio ;;
  esac
  for _ in $(seq 200); do
    grep -q "listening on" "$log" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "server $1 did not start:" >&2
  cat "$log" >&2
  exit 1
}
stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  stop_pid "$SERVER_PID"
  SERVER_PID=
}
trap stop_server EXIT

SERVERS="corecast-socketio socketio-node corecast-json"
for round in $(seq "$ROUNDS"); do
  echo "######## round $round of $ROUNDS"
  for server in $SERVERS; do
    if has fanout; then
      run "$server" "10x100 smooth 100k/s" fanout -r 10 -m 100 -s 1000 -t 5
      run "$server" "1x1000 smooth 100k/s" fanout -r 1 -m 1000 -s 100 -t 5
    fi
    if has echo; then
      run "$server" "echo 100" echo -c 100 -t 5
    fi
    if has idle; then
      run "$server" "idle 10k" idle -n 10000 --hold 3
    fi
  done
done

python3 - "$OUT" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def pick(r):
    w = r.get("workload")
    if w == "fanout":
        return r.get("server_cpu_us_per_delivery"), "CPU µs/delivery"
    if w == "echo":
        return r.get("server_cpu_us_per_round_trip"), "CPU µs/round trip"
    if w == "idle":
        return r.get("server_rss_bytes_per_connection"), "RSS bytes/connection"
    return None, None
table = {}
for r in rows:
    v, unit = pick(r)
    if v is None:
        continue
    table.setdefault((r["label"], unit), {}).setdefault(r["server"], []).append(v)
servers = ["corecast-socketio", "socketio-node", "corecast-json"]
print("\n| load | measure | " + " | ".join(servers) + " | socketio/node | socketio/json |")
print("|---|---|" + "---|" * (len(servers) + 2))
for (label, unit), by in table.items():
    med = {s: statistics.median(by[s]) for s in servers if s in by}
    cells = [f"{med[s]:.2f} ({len(by[s])})" if s in med else "" for s in servers]
    r1 = f"{med['corecast-socketio'] / med['socketio-node']:.2f}" if {"corecast-socketio", "socketio-node"} <= med.keys() else ""
    r2 = f"{med['corecast-socketio'] / med['corecast-json']:.2f}" if {"corecast-socketio", "corecast-json"} <= med.keys() else ""
    print(f"| {label} | {unit} | " + " | ".join(cells) + f" | {r1} | {r2} |")
EOF
