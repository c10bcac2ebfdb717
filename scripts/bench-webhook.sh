#!/usr/bin/env bash
# What the event stream costs on the publish path: the same release build
# with webhooks off and on (to the example backend, examples/backend/
# backend.py, storing into SQLite on /tmp), interleaved (off, on, off, on,
# ...), at each publish rate given. Prints the server's CPU per message
# (every thread of the process: shards, store, webhook) and, with webhooks
# on, how many events each POST carried.
#
#   scripts/bench-webhook.sh ROUNDS RATE [RATE ...]
#   scripts/bench-webhook.sh 3 1000 10000
#
# Load: 100 channels of one member each and one publisher per channel
# (`corecast bench fanout -r 100 -m 1 -s RATE -t 10`), so one delivery per
# message. The server runs on core $SERVER_CORE (0) with one shard; the
# load generator and the backend on core $LOADGEN_CORE (1). Uses ports
# 9500-9699 on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
# UNLIMITED: servers run without their abuse limits.
source scripts/bench-lib.sh
[ $# -ge 2 ] || { sed -n 2,16p "$0"; exit 2; }
ROUNDS=$1
shift
RATES=("$@")
SERVER_CORE=${SERVER_CORE:-0}
LOADGEN_CORE=${LOADGEN_CORE:-1}
BIN=target/release/corecast
[ -x "$BIN" ] || cargo build --release --bin corecast
SECRET=bench-webhook-secret-0123456789
WORK=$(mktemp -d)
OUT=$WORK/runs
backend_pid=
cleanup() {
  [ -n "$backend_pid" ] && kill "$backend_pid" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

port=9500
for round in $(seq "$ROUNDS"); do
  for rate in "${RATES[@]}"; do
    for mode in off on; do
      port=$((port + 2))
      extra=()
      if [ "$mode" = on ]; then
        rm -rf "$WORK/outbox" "$WORK/db.sqlite"
        taskset -c "$LOADGEN_CORE" python3 examples/backend/backend.py --port $((port + 1)) \
          --db "$WORK/db.sqlite" --secret "$SECRET" >"$WORK/backend.log" 2>&1 &
        backend_pid=$!
        for _ in $(seq 100); do grep -q "listening" "$WORK/backend.log" && break; sleep 0.05; done
        extra=(--webhook-url "http://127.0.0.1:$((port + 1))/corecast/events" --webhook-secret "$SECRET"
          --webhook-outbox-dir "$WORK/outbox")
      fi
      log=$WORK/server.log
      "${UNLIMITED[@]}" taskset -c "$SERVER_CORE" "$BIN" serve --listen "127.0.0.1:$port" --shards 1 \
        "${extra[@]}" 2>"$log" &
      pid=$!
      for _ in $(seq 100); do grep -q "listening on" "$log" && break; sleep 0.05; done
      line=$(taskset -c "$LOADGEN_CORE" "$BIN" bench --url "ws://127.0.0.1:$port/ws" \
        --server-pid "$pid" --driver epoll fanout -r 100 -m 1 -s "$rate" -t 10 2>/dev/null || true)
      # Let the backend catch up, then read the stream's figures.
      per_post=0
      if [ "$mode" = on ]; then
        for _ in $(seq 100); do
          m=$(curl -s "http://127.0.0.1:$port/metrics")
          [ "$(echo "$m" | awk '/^corecast_webhook_waiting_bytes/ {print $2}')" = 0 ] && break
          sleep 0.1
        done
        per_post=$(echo "$m" | awk '/^corecast_webhook_delivered_total/ {d=$2} /^corecast_webhook_requests_total/ {r=$2} END {if (r > 0) printf "%.1f", d / r; else print 0}')
      fi
      kill -INT "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
      if [ -n "$backend_pid" ]; then kill "$backend_pid" 2>/dev/null || true; wait "$backend_pid" 2>/dev/null || true; backend_pid=; fi
      [ -n "$line" ] || { echo "round $round, $rate/s, webhooks $mode: the bench failed" >&2; cat "$log" >&2; exit 1; }
      echo "$rate $mode $per_post $line" >>"$OUT"
      python3 -c '
import json, sys
r = json.loads(sys.argv[5])
print("round %s, %s msgs/s, webhooks %-3s: %.3f µs/message, %s events per POST, loss %d, load generator %.0f%%" % (
    sys.argv[1], sys.argv[2], sys.argv[3], r["server_cpu_us_per_delivery"], sys.argv[4], r["loss"],
    100 * r["loadgen_core_share"]), flush=True)
' "$round" "$rate" "$mode" "$per_post" "$line"
    done
  done
done

python3 - "$OUT" <<'EOF'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    rate, mode, per_post, js = line.split(" ", 3)
    runs.setdefault((int(rate), mode), []).append((float(per_post), json.loads(js)))
print("\nmedians (server CPU per message, every thread; on/off: the median of each round's ratio):")
for rate in sorted({r for r, _ in runs}):
    offs = [j["server_cpu_us_per_delivery"] for _, j in runs[(rate, "off")]]
    ons = [j["server_cpu_us_per_delivery"] for _, j in runs[(rate, "on")]]
    ratio = statistics.median(b / a for a, b in zip(offs, ons))
    per = statistics.median(p for p, _ in runs[(rate, "on")])
    print(f"  {rate:>6} msgs/s: off {statistics.median(offs):.3f} µs, on {statistics.median(ons):.3f} µs, "
          f"on/off {ratio:.2f} (+{statistics.median(b - a for a, b in zip(offs, ons)):.2f} µs), "
          f"{per:.0f} events per POST")
EOF
