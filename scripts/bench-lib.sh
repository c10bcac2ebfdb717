# Helpers shared by the benchmark scripts (sourced, not run). start_node
# expects $BIN and $SERVER_CORE.

# Servers under load test run without their abuse limits (one address,
# one user opening thousands of connections, publishing flat out).
UNLIMITED=(env CORECAST_BAN_FILE= CORECAST_HISTORY_FILE= 'CORECAST_RATE_LIMITS=*=off' CORECAST_MAX_HANDSHAKES_PER_IP=0
  CORECAST_MAX_CONNECTIONS_PER_IP=0 CORECAST_MAX_CONNECTIONS_PER_SHARD=0)
# Memory is measured as users run the server: only the limits one load
# generator on one address cannot meet are lifted (connections per address
# and per shard); the rate limits stay at their defaults (each connection
# its own user, joining once).
CONNECTIONS_UNLIMITED=(env CORECAST_BAN_FILE= CORECAST_HISTORY_FILE= CORECAST_MAX_HANDSHAKES_PER_IP=0
  CORECAST_MAX_CONNECTIONS_PER_IP=0 CORECAST_MAX_CONNECTIONS_PER_SHARD=0)
# What `run` starts a server with (set for each workload).
SERVER_ENV=("${UNLIMITED[@]}")

# CPU seconds (user + system) a process has used.
cpu_s() { python3 -c '
import os, sys
f = open("/proc/%s/stat" % sys.argv[1]).read().rsplit(")", 1)[1].split()
print((int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK"))' "$1"; }

# start_node PORT [SERVE ARGS...]: a one-shard node on core $SERVER_CORE,
# waited for (and, with --redis or --redis-cluster, until it reaches Redis).
# Prints its PID: the caller keeps it (a $(…) cannot add to its arrays).
start_node() {
  local port=$1 log pid
  shift
  log=$(mktemp)
  "${UNLIMITED[@]}" taskset -c "$SERVER_CORE" "$BIN" serve --listen "127.0.0.1:$port" --shards 1 "$@" >/dev/null 2>"$log" &
  pid=$!
  for _ in $(seq 100); do grep -q "listening on" "$log" && break; sleep 0.05; done
  if [ $# -gt 0 ]; then
    for _ in $(seq 100); do curl -s "http://127.0.0.1:$port/metrics" | grep -q '^corecast_cluster_up 1' && break; sleep 0.05; done
  fi
  rm -f "$log"
  echo "$pid"
}

# tag_results SERVER LABEL: copies `corecast bench` JSON lines from stdin to
# stdout with "server" and "label" added.
tag_results() { python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    r["server"] = sys.argv[1]
    r["label"] = sys.argv[2]
    print(json.dumps(r))' "$1" "$2"; }

# stop_pid PID: asks a server to stop (SIGINT), waits up to 5 s, then kills it.
stop_pid() {
  kill -INT "$1" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.05; done
  kill -9 "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# run SERVER LABEL BENCH-ARGS...: the script's start_server SERVER (which
# sets $URL, $PROTO and $SERVER_PID), one `corecast bench` pinned to core
# $LOADGEN_CORE, its results tagged and appended to $OUT, then the script's
# stop_server.
run() {
  local server=$1 label=$2
  shift 2
  if [ "$1" = idle ]; then SERVER_ENV=("${CONNECTIONS_UNLIMITED[@]}"); else SERVER_ENV=("${UNLIMITED[@]}"); fi
  start_server "$server"
  echo "== $server: $label"
  taskset -c "$LOADGEN_CORE" "$BIN" bench "$@" --url "$URL" --protocol "$PROTO" \
    --driver epoll --server-pid "$SERVER_PID" |
    tag_results "$server" "$label" >>"$OUT"
  stop_server
}
