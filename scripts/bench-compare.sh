#!/usr/bin/env bash
# Side-by-side figures: corecast, the tokio + fastwebsockets baseline and
# uWebSockets, interleaved (corecast, baseline, uws, corecast, ...), each server
# pinned to core 0 and `corecast bench` to core 1. Every run appends one or
# more JSON lines (with a "server" field added) to $OUT; progress and human
# summaries go to the terminal. Then draws the chart of docs/BENCHMARKS.md.
#
#   scripts/bench-compare.sh [ROUNDS]        (default 3; about 9 minutes each)
#
# WORKLOADS="fanout max idle echo" (the default) selects what runs; OUT names
# the results file (default target/bench/results.jsonl, appended to).
# SERVERS="corecast baseline uws" (the default) selects the servers, among:
#   corecast        this build, default IO driver (io_uring)
#   corecast-epoll  this build with --io-driver epoll
#   baseline        tokio + fastwebsockets (examples/baseline.rs)
#   uws             uWebSockets.js, the C++ core from npm, as a pub/sub
#                   server (scripts/peers/uws, installed here with npm)
#   prev            another corecast binary, named by PREV_BIN (for example
#                   an older commit's release build), to compare versions
#
# Needs two cores. Uses ports 9600-9699 on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
# SERVER_ENV (the limits lifted for the workload run), stop_pid and run.
source scripts/bench-lib.sh

ROUNDS=${1:-3}
OUT=${OUT:-target/bench/results.jsonl}
SERVER_CORE=${SERVER_CORE:-0}
LOADGEN_CORE=${LOADGEN_CORE:-1}
mkdir -p "$(dirname "$OUT")"
WORKLOADS=${WORKLOADS:-fanout max idle echo}
SERVERS=${SERVERS:-corecast baseline uws}
PREV_BIN=${PREV_BIN:-}
for s in $SERVERS; do
  case $s in
    corecast | corecast-epoll | baseline | uws) ;;
    prev) [ -x "$PREV_BIN" ] || { echo "SERVERS has prev: set PREV_BIN to a corecast binary" >&2; exit 2; } ;;
    *) echo "unknown server '$s' in SERVERS" >&2; exit 2 ;;
  esac
done
has() { [[ " $WORKLOADS " == *" $1 "* ]]; }
has_server() { [[ " $SERVERS " == *" $1 "* ]]; }

echo "building release binaries..."
cargo build --release --quiet --bin corecast --example baseline
BIN=target/release/corecast
BASE=target/release/examples/baseline
UWS=scripts/peers/uws
if has_server uws && [ ! -d "$UWS/node_modules/@trufflesuite/uws-js-unofficial" ]; then
  echo "installing uWebSockets.js (npm)..."
  (cd "$UWS" && npm install --no-audit --no-fund --no-package-lock --silent)
fi

port=9600
SERVER_PID=
start_server() { # $1 = a name of SERVERS
  port=$((port + 1))
  local log=target/bench/server.log
  URL="ws://127.0.0.1:$port/ws"
  PROTO=json
  case $1 in
    corecast) "${SERVER_ENV[@]}" taskset -c "$SERVER_CORE" "$BIN" serve --listen "127.0.0.1:$port" --shards 1 2>"$log" & ;;
    corecast-epoll) "${SERVER_ENV[@]}" taskset -c "$SERVER_CORE" "$BIN" serve --listen "127.0.0.1:$port" --shards 1 \
      --io-driver epoll 2>"$log" & ;;
    prev) "${SERVER_ENV[@]}" taskset -c "$SERVER_CORE" "$PREV_BIN" serve --listen "127.0.0.1:$port" --shards 1 2>"$log" & ;;
    baseline)
      "${SERVER_ENV[@]}" taskset -c "$SERVER_CORE" "$BASE" "127.0.0.1:$port" 2>"$log" &
      URL="ws://127.0.0.1:$port/"
      PROTO=raw
      ;;
    uws)
      taskset -c "$SERVER_CORE" node "$UWS/server.js" "127.0.0.1:$port" 2>"$log" &
      URL="ws://127.0.0.1:$port/"
      PROTO=raw
      ;;
  esac
  SERVER_PID=$!
  for _ in $(seq 100); do
    grep -q "listening on" "$log" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "server did not start:" >&2
  cat "$log" >&2
  exit 1
}
stop_server() { stop_pid "$SERVER_PID"; }
trap stop_server EXIT

for round in $(seq "$ROUNDS"); do
  echo "######## round $round of $ROUNDS"
  for server in $SERVERS; do
    if has fanout; then
      run $server "10x100 smooth 100k/s" fanout -r 10 -m 100 -s 1000 -t 5
      run $server "1x1000 smooth 100k/s" fanout -r 1 -m 1000 -s 100 -t 5
      run $server "10x100 burst10 100k/s" fanout -r 10 -m 100 -s 1000 --burst 10 -t 5
    fi
    if has max; then
      run $server "10x100 max p99<=10ms" max -r 10 -m 100 --start-rate 100 --factor 1.5 \
        --max-rate 40000 --step-duration 2 --max-steps 9
      run $server "10x100 max p99<=200ms" max -r 10 -m 100 --start-rate 2000 --factor 1.5 \
        --max-rate 40000 --step-duration 2 --max-steps 8 --p99-bound-ms 200
    fi
    if has idle; then
      run $server "idle 10k" idle -n 10000 --hold 3
    fi
    if has echo; then
      run $server "echo 100" echo -c 100 -t 5
    fi
  done
  if has idle; then
    for server in $SERVERS; do
      [ "$server" = baseline ] || run "$server" "idle 19k" idle -n 19000 --hold 3
    done
  fi
done

if has max; then
  python3 scripts/chart.py "$OUT" docs/fanout-rate-vs-p99.svg
fi
python3 scripts/summarize.py "$OUT"
