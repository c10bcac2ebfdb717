#!/usr/bin/env bash
# One load on a single node, then on two nodes sharing a Redis (each
# channel's members spread over both), interleaved round by round. With
# MODES="single cluster rcluster socketio", also on two nodes sharing a
# three-master Redis Cluster (sharded pub/sub), and on two Socket.IO 4
# processes with @socket.io/redis-adapter sharing one Redis (the pair our
# users run today). WORKLOAD is fanout (the default) or echo. Prints each
# run and the medians: deliveries (or round trips) per second, the
# servers' CPU per delivery (both nodes added up), the same with Redis
# added, p50 and p99.
#
#   scripts/bench-cluster.sh ROUNDS -- WORKLOAD ARGS
#   scripts/bench-cluster.sh 3 -- -r 10 -m 100 -s 1000 -t 5
#   WORKLOAD=echo MODES="cluster socketio" scripts/bench-cluster.sh 3 -- -c 100 -t 5
#
# corecast (one shard per node), the Socket.IO servers and redis-server run
# on core $SERVER_CORE (0), the load generator on core $LOADGEN_CORE (1).
# Needs redis-server (and redis-cli for the Redis Cluster; Node 20 and npm
# for Socket.IO); uses ports 9400-9699 on 127.0.0.1 (and 19400-19699 for
# the Redis Cluster's bus). Appends the JSON lines, tagged, to $RESULTS
# (docs/bench-results.jsonl) when set.
set -euo pipefail
cd "$(dirname "$0")/.."

[ $# -ge 2 ] && [ "$2" = "--" ] || { sed -n 2,21p "$0"; exit 2; }
MODES=${MODES:-single cluster}
WORKLOAD=${WORKLOAD:-fanout}
case $WORKLOAD in fanout | echo) ;; *) echo "WORKLOAD must be fanout or echo" >&2; exit 2 ;; esac
if [[ " $MODES " == *" socketio "* ]] && [ ! -d scripts/peers/socketio/node_modules/socket.io ]; then
  echo "installing the Socket.IO peers..." >&2
  (cd scripts/peers/socketio && npm install --no-audit --no-fund --no-package-lock --silent)
fi
ROUNDS=$1
shift 2
ARGS=("$@")
SERVER_CORE=${SERVER_CORE:-0}
LOADGEN_CORE=${LOADGEN_CORE:-1}
BIN=target/release/corecast
[ -x "$BIN" ] || cargo build --release --bin corecast
command -v redis-server >/dev/null || { echo "redis-server is missing (apt-get install redis-server)" >&2; exit 2; }
OUT=$(mktemp)
PIDS=()
DIRS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -f "$OUT"
  for d in "${DIRS[@]}"; do rm -rf "$d"; done
}
trap cleanup EXIT

source scripts/bench-lib.sh

port=9400
for round in $(seq "$ROUNDS"); do
  for mode in $MODES; do
    port=$((port + 5))
    redis_pid=""
    proto=json
    if [ "$mode" = socketio ]; then
      taskset -c "$SERVER_CORE" redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
      redis_pid=$!
      PIDS+=("$redis_pid")
      for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
      sio=()
      for p in $((port + 1)) $((port + 2)); do
        log=$(mktemp)
        taskset -c "$SERVER_CORE" node scripts/peers/socketio/server.js --port "$p" \
          --redis "redis://127.0.0.1:$port" >/dev/null 2>"$log" &
        sio+=($!)
        PIDS+=($!)
        for _ in $(seq 100); do grep -q listening "$log" && break; sleep 0.05; done
        rm -f "$log"
      done
      urls="ws://127.0.0.1:$((port + 1))/socket.io/,ws://127.0.0.1:$((port + 2))/socket.io/"
      pids="${sio[0]},${sio[1]}"
      proto=socketio
    elif [ "$mode" = single ]; then
      a=$(start_node "$port")
      PIDS+=("$a")
      urls="ws://127.0.0.1:$port/ws"
      pids="$a"
    elif [ "$mode" = rcluster ]; then
      dir=$(mktemp -d)
      DIRS+=("$dir")
      redis_pids=()
      for p in $((port + 2)) $((port + 3)) $((port + 4)); do
        (cd "$dir" && exec taskset -c "$SERVER_CORE" redis-server --port "$p" --bind 127.0.0.1 --save '' --appendonly no \
          --cluster-enabled yes --cluster-config-file "nodes-$p.conf") >/dev/null &
        redis_pids+=($!)
        PIDS+=($!)
      done
      for p in $((port + 2)) $((port + 3)) $((port + 4)); do
        for _ in $(seq 100); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.05; done
      done
      redis-cli --cluster create "127.0.0.1:$((port + 2))" "127.0.0.1:$((port + 3))" "127.0.0.1:$((port + 4))" \
        --cluster-replicas 0 --cluster-yes >/dev/null
      for _ in $(seq 200); do redis-cli -p "$((port + 2))" cluster info | grep -q cluster_state:ok && break; sleep 0.05; done
      seeds="redis://127.0.0.1:$((port + 2)),redis://127.0.0.1:$((port + 3)),redis://127.0.0.1:$((port + 4))"
      a=$(start_node "$port" --redis-cluster "$seeds")
      b=$(start_node $((port + 1)) --redis-cluster "$seeds")
      PIDS+=("$a" "$b")
      urls="ws://127.0.0.1:$port/ws,ws://127.0.0.1:$((port + 1))/ws"
      pids="$a,$b"
      redis_pid="${redis_pids[*]}"
    else
      taskset -c "$SERVER_CORE" redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
      redis_pid=$!
      PIDS+=("$redis_pid")
      for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
      a=$(start_node $((port + 1)) --redis "redis://127.0.0.1:$port")
      b=$(start_node $((port + 2)) --redis "redis://127.0.0.1:$port")
      PIDS+=("$a" "$b")
      urls="ws://127.0.0.1:$((port + 1))/ws,ws://127.0.0.1:$((port + 2))/ws"
      pids="$a,$b"
    fi
    redis_cpu_all() { local t=0; for p in $redis_pid; do t=$(python3 -c 'import sys; print(float(sys.argv[1]) + float(sys.argv[2]))' "$t" "$(cpu_s "$p")"); done; echo "$t"; }
    redis_before=${redis_pid:+$(redis_cpu_all)}
    line=$(taskset -c "$LOADGEN_CORE" "$BIN" bench --protocol "$proto" --url "$urls" --server-pid "$pids" \
      --driver epoll "$WORKLOAD" "${ARGS[@]}" 2>/dev/null || true)
    redis_cpu=0
    if [ -n "$redis_pid" ]; then
      redis_cpu=$(python3 -c 'import sys; print(float(sys.argv[2]) - float(sys.argv[1]))' "$redis_before" "$(redis_cpu_all)")
    fi
    # (Nodes start in subshells: not this shell's children, so polled.)
    for p in ${pids//,/ } $redis_pid; do kill -INT "$p" 2>/dev/null || true; done
    for p in ${pids//,/ } $redis_pid; do
      for _ in $(seq 200); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
      kill -KILL "$p" 2>/dev/null || true
    done
    PIDS=()
    [ -n "$line" ] || { echo "round $round, $mode: the bench failed" >&2; exit 1; }
    line=$(python3 -c '
import json, sys
r = json.loads(sys.argv[1]); r["nodes"] = sys.argv[2]; r["redis_cpu_s"] = float(sys.argv[3])
print(json.dumps(r))' "$line" "$mode" "$redis_cpu")
    echo "$line" >>"$OUT"
    [ -z "${RESULTS:-}" ] || echo "$line" >>"$RESULTS"
    python3 -c '
import json, sys
r = json.loads(sys.argv[1]); lat = r["latency_us"]
units = r.get("delivered") or r.get("round_trips") or 1
per = r.get("server_cpu_us_per_delivery") or r.get("server_cpu_us_per_round_trip") or 0
rate = r.get("deliveries_per_s") or r.get("round_trips_per_s")
redis = 1e6 * r["redis_cpu_s"] / units
print("round %s %-8s: %s %s/s, %.2f us of server CPU per %s (%.2f with Redis), p50 %d us, p99 %d us, load generator %.0f%%" % (
    sys.argv[2], r["nodes"], format(rate, ",.0f"), sys.argv[3], per, sys.argv[3], per + redis,
    lat["p50"], lat["p99"], 100 * r["loadgen_core_share"]))
' "$line" "$round" "$([ "$WORKLOAD" = echo ] && echo round-trip || echo delivery)"
  done
done

python3 - "$OUT" <<'EOF'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs.setdefault(r["nodes"], []).append(r)
print("\nmedians:")
for mode, rs in runs.items():
    med = lambda f: statistics.median(f(r) for r in rs)
    units = lambda r: r.get("delivered") or r.get("round_trips") or 1
    per = lambda r: r.get("server_cpu_us_per_delivery") or r.get("server_cpu_us_per_round_trip") or 0
    rate = lambda r: r.get("deliveries_per_s") or r.get("round_trips_per_s")
    print(f"  {mode:8}: {med(rate):,.0f}/s, {med(per):.2f} us server CPU per unit, "
          f"{med(lambda r: per(r) + 1e6 * r['redis_cpu_s'] / units(r)):.2f} us with Redis, "
          f"p50 {med(lambda r: r['latency_us']['p50']):.0f} us, p99 {med(lambda r: r['latency_us']['p99']):.0f} us ({len(rs)} runs)")
EOF
