#!/usr/bin/env bash
# A reconnect storm, as after a deploy or a network blip: N clients, each its
# own user, each joining one of R rooms, all connecting at once, spread over
# two nodes behind one Redis. Every round starts fresh servers and a fresh
# Redis on the same ports seconds after the previous round stopped (as a
# rolling restart does), and runs, interleaved:
#   corecast       one corecast node (no Redis)
#   cluster        two corecast nodes sharing one Redis
#   socketio       two Socket.IO 4 servers with @socket.io/redis-adapter
#   socketio-seed  the same, doing what the chat backends of the seeds do
#                  (JWT check, presence in Redis, member events, join acks
#                  with the room's size)
# Prints each run and the medians: seconds until every client is joined,
# the servers' CPU per connect, Redis's CPU per connect.
#
#   scripts/bench-storm.sh [ROUNDS] [N] [R]      (defaults 3 10000 100)
#
# Servers and Redis run on core $SERVER_CORE (0), `corecast bench` on core
# $LOADGEN_CORE (1). PARALLEL (default N: all at once) bounds the connects
# in flight; SYSTEMS picks among the four. Needs redis-server, Node 20 and
# npm (the Socket.IO peers are installed by scripts/socketio-peer.sh). Uses
# ports 9500-9510 on 127.0.0.1. Appends the JSON lines, tagged, to $RESULTS
# when set.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-3}
N=${2:-10000}
R=${3:-100}
PARALLEL=${PARALLEL:-$N}
SYSTEMS=${SYSTEMS:-corecast cluster socketio socketio-seed}
SERVER_CORE=${SERVER_CORE:-0}
LOADGEN_CORE=${LOADGEN_CORE:-1}
BIN=target/release/corecast
[ -x "$BIN" ] || cargo build --release --bin corecast
command -v redis-server >/dev/null || { echo "redis-server is missing (apt-get install redis-server)" >&2; exit 2; }
if [[ " $SYSTEMS " == *" socketio"* ]] && [ ! -d scripts/peers/socketio/node_modules/socket.io ]; then
  echo "installing the Socket.IO peers..." >&2
  (cd scripts/peers/socketio && npm install --no-audit --no-fund --no-package-lock --silent)
fi
source scripts/bench-lib.sh
OUT=$(mktemp)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -f "$OUT"; }
trap cleanup EXIT
RPORT=9500
P1=9501
P2=9502

start_redis() {
  taskset -c "$SERVER_CORE" redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
  REDIS=$!
  PIDS+=("$REDIS")
  for _ in $(seq 100); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
}

start_sio() { # PORT MODE
  local log
  log=$(mktemp)
  taskset -c "$SERVER_CORE" node scripts/peers/socketio/server.js --port "$1" --redis "redis://127.0.0.1:$RPORT" --mode "$2" >/dev/null 2>"$log" &
  local pid=$!
  for _ in $(seq 100); do grep -q listening "$log" && break; sleep 0.05; done
  rm -f "$log"
  echo "$pid"
}

for round in $(seq "$ROUNDS"); do
  for sys in $SYSTEMS; do
    REDIS=""
    case $sys in
      corecast)
        A=$(start_node $P1)
        PIDS+=("$A")
        urls="ws://127.0.0.1:$P1/ws"; pids=$A; proto=json ;;
      cluster)
        start_redis
        A=$(start_node $P1 --redis "redis://127.0.0.1:$RPORT")
        B=$(start_node $P2 --redis "redis://127.0.0.1:$RPORT")
        PIDS+=("$A" "$B")
        urls="ws://127.0.0.1:$P1/ws,ws://127.0.0.1:$P2/ws"; pids=$A,$B; proto=json ;;
      socketio | socketio-seed)
        start_redis
        mode=plain
        [ "$sys" = socketio-seed ] && mode=seed
        A=$(start_sio $P1 $mode)
        B=$(start_sio $P2 $mode)
        PIDS+=("$A" "$B")
        urls="ws://127.0.0.1:$P1/socket.io/,ws://127.0.0.1:$P2/socket.io/"; pids=$A,$B; proto=socketio ;;
      *) echo "unknown system '$sys' in SYSTEMS" >&2; exit 2 ;;
    esac
    redis_before=${REDIS:+$(cpu_s "$REDIS")}
    echo "round $round: $sys" >&2
    line=$(taskset -c "$LOADGEN_CORE" "$BIN" bench --protocol "$proto" --url "$urls" --server-pid "$pids" \
      --connect-parallel "$PARALLEL" --connect-timeout 120 --driver epoll connect -n "$N" -r "$R" --hold 1 || true)
    redis_us=0
    if [ -n "$REDIS" ]; then
      redis_us=$(python3 -c 'import sys; print((float(sys.argv[2]) - float(sys.argv[1])) * 1e6 / int(sys.argv[3]))' \
        "$redis_before" "$(cpu_s "$REDIS")" "$N")
    fi
    # (Started in subshells: not this shell's children, so polled.)
    for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
      for _ in $(seq 200); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
      kill -KILL "$p" 2>/dev/null || true
    done
    PIDS=()
    [ -n "$line" ] || { echo "round $round: $sys failed" >&2; continue; }
    tagged=$(python3 -c 'import json, sys; l = json.loads(sys.argv[1]); l["system"] = sys.argv[2]; l["redis_cpu_us_per_connect"] = float(sys.argv[3]); print(json.dumps(l))' \
      "$line" "$sys" "$redis_us")
    echo "$tagged" >>"$OUT"
    [ -n "${RESULTS:-}" ] && echo "$tagged" >>"$RESULTS"
    sleep 2
  done
done

python3 - "$OUT" <<'EOF'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'system':14} {'runs':>4} {'joined s':>9} {'connects/s':>11} {'server µs/connect':>18} {'redis µs/connect':>17}")
for sys_ in dict.fromkeys(r["system"] for r in runs):
    rs = [r for r in runs if r["system"] == sys_]
    med = lambda k: statistics.median(r[k] or 0 for r in rs)
    print(f"{sys_:14} {len(rs):>4} {med('joined_seconds'):>9.2f} {med('connects_per_s'):>11.0f} "
          f"{med('server_cpu_us_per_connect'):>18.1f} {med('redis_cpu_us_per_connect'):>17.1f}")
EOF
