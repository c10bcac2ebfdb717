#!/usr/bin/env bash
# What a connection costs a node alone and a node in a cluster (presence
# kept in Redis, the user followed, its notifications read), interleaved
# round by round: N users connect (one connection each) and hold. Prints
# each run and the medians: connects/s, corecast CPU per connect, Redis CPU
# per connect, RSS per connection, Redis memory per user.
#
#   scripts/bench-connect.sh ROUNDS N
#   scripts/bench-connect.sh 3 5000
#
# corecast (one shard) and redis-server run on core $SERVER_CORE (0), the
# load generator on core $LOADGEN_CORE (1). Needs redis-server; uses ports
# 9700-9999 on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

[ $# -eq 2 ] || { sed -n 2,13p "$0"; exit 2; }
ROUNDS=$1
N=$2
SERVER_CORE=${SERVER_CORE:-0}
LOADGEN_CORE=${LOADGEN_CORE:-1}
BIN=target/release/corecast
[ -x "$BIN" ] || cargo build --release --bin corecast
command -v redis-server >/dev/null || { echo "redis-server is missing (apt-get install redis-server)" >&2; exit 2; }
OUT=$(mktemp)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -f "$OUT"; }
trap cleanup EXIT

source scripts/bench-lib.sh

port=9700
for round in $(seq "$ROUNDS"); do
  for mode in single cluster; do
    port=$((port + 2))
    redis_pid=""
    extra=()
    if [ "$mode" = cluster ]; then
      taskset -c "$SERVER_CORE" redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
      redis_pid=$!
      PIDS+=("$redis_pid")
      for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
      extra=(--redis "redis://127.0.0.1:$port")
    fi
    node=$(start_node $((port + 1)) "${extra[@]}")
    PIDS+=("$node")
    node_before=$(cpu_s "$node")
    redis_before=${redis_pid:+$(cpu_s "$redis_pid")}
    redis_mem_before=${redis_pid:+$(redis-cli -p "$port" info memory | awk -F: '/^used_memory:/ {print $2+0}')}
    line=$(taskset -c "$LOADGEN_CORE" "$BIN" bench --url "ws://127.0.0.1:$((port + 1))/ws" --server-pid "$node" \
      --driver epoll idle -n "$N" --hold 1 --room-size 0 2>/dev/null || true)
    node_cpu=$(python3 -c 'import sys; print(float(sys.argv[2]) - float(sys.argv[1]))' "$node_before" "$(cpu_s "$node")")
    redis_cpu=0
    redis_mem=0
    if [ -n "$redis_pid" ]; then
      redis_cpu=$(python3 -c 'import sys; print(float(sys.argv[2]) - float(sys.argv[1]))' "$redis_before" "$(cpu_s "$redis_pid")")
      redis_mem=$(( $(redis-cli -p "$port" info memory | awk -F: '/^used_memory:/ {print $2+0}') - redis_mem_before ))
    fi
    for p in $node $redis_pid; do kill -INT "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    PIDS=()
    [ -n "$line" ] || { echo "round $round, $mode: the bench failed" >&2; exit 1; }
    line=$(python3 -c '
import json, sys
r = json.loads(sys.argv[1]); r["nodes"] = sys.argv[2]; r["node_cpu_s"] = float(sys.argv[3])
r["redis_cpu_s"] = float(sys.argv[4]); r["redis_bytes"] = int(sys.argv[5])
print(json.dumps(r))' "$line" "$mode" "$node_cpu" "$redis_cpu" "$redis_mem")
    echo "$line" >>"$OUT"
    python3 -c '
import json, sys
r = json.loads(sys.argv[1]); n = int(sys.argv[3])
print("round %s %-7s: %s connects/s, %.1f µs corecast CPU per connect (connect and hold), %.1f µs Redis CPU per connect, %s B RSS per connection, %.0f B Redis memory per user" % (
    sys.argv[2], r["nodes"], format(r.get("connects_per_s", 0), ",.0f"), 1e6 * r["node_cpu_s"] / n,
    1e6 * r["redis_cpu_s"] / n, r.get("server_rss_bytes_per_connection", "?"), r["redis_bytes"] / n))
' "$line" "$round" "$N"
  done
done

python3 - "$OUT" "$N" <<'EOF2'
import json, statistics, sys
n = int(sys.argv[2])
runs = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs.setdefault(r["nodes"], []).append(r)
print("\nmedians:")
for mode, rs in runs.items():
    med = lambda f: statistics.median(f(r) for r in rs)
    print(f"  {mode:7}: {med(lambda r: r.get('connects_per_s', 0)):,.0f} connects/s, "
          f"{med(lambda r: 1e6 * r['node_cpu_s'] / n):.1f} µs corecast CPU per connect, "
          f"{med(lambda r: 1e6 * r['redis_cpu_s'] / n):.1f} µs Redis CPU per connect, "
          f"{med(lambda r: r.get('server_rss_bytes_per_connection') or 0):.0f} B RSS per connection, "
          f"{med(lambda r: r['redis_bytes'] / n):.0f} B Redis memory per user ({len(rs)} runs)")
EOF2
