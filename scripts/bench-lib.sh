# Helpers shared by the cluster benchmarks (sourced, not run). Expects
# $BIN and $SERVER_CORE.

# Servers under load test run without their abuse limits (one address,
# one user opening thousands of connections, publishing flat out).
UNLIMITED=(env CORECAST_BAN_FILE= 'CORECAST_RATE_LIMITS=*=off' CORECAST_MAX_HANDSHAKES_PER_IP=0
  CORECAST_MAX_CONNECTIONS_PER_IP=0 CORECAST_MAX_CONNECTIONS_PER_SHARD=0)

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
