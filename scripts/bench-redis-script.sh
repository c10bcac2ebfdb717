#!/bin/bash
# Redis CPU per call of the channel sequencing script, before (three keys, eight commands) and after (a meta hash, six commands), interleaved (INFO commandstats).
# Runs its own redis-server on port 9377 (core 0) and redis-benchmark on core 1.
set -euo pipefail
cd "$(dirname "$0")/.."
P=9377
taskset -c 0 redis-server --port $P --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
R=$!
sleep 0.3
# The script before: three keys, eight commands.
OLD=$(cat <<'L'
if redis.call('SET', KEYS[2], ARGV[4], 'NX') then redis.call('DEL', KEYS[1], KEYS[3]) end
local epoch = redis.call('GET', KEYS[2])
local offset = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], offset .. '-1', 'm', ARGV[2])
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[5]) end
redis.call('PUBLISH', ARGV[1], offset .. ':' .. epoch .. ':' .. ARGV[2])
return {offset, epoch}
L
)
# The script as the bridge runs it today.
NEW=$(awk '/^const SEQUENCE: &str = r#"/ {f = 1; next} /^"#;/ {if (f) exit} f' src/cluster.rs)
[ -n "$NEW" ] || { echo "cannot find SEQUENCE in src/cluster.rs" >&2; exit 1; }
OLD_SHA=$(redis-cli -p $P SCRIPT LOAD "$OLD")
NEW_SHA=$(redis-cli -p $P SCRIPT LOAD "$NEW")
PAY=$(head -c 150 /dev/zero | tr '\0' 'x')
# two subscribers, as two nodes
redis-cli -p $P SUBSCRIBE 'cc:{c}' >/dev/null & S1=$!
redis-cli -p $P SUBSCRIBE 'cc:{d}' >/dev/null & S2=$!
sleep 0.2
for round in 1 2 3; do
  for which in old new; do
    redis-cli -p $P CONFIG RESETSTAT >/dev/null
    if [ $which = old ]; then
      taskset -c 1 redis-benchmark -p $P -n 50000 -c 4 -q EVALSHA $OLD_SHA 3 'cc:{c}:seq' 'cc:{c}:epoch' 'cc:{c}:log' 'cc:{c}' "$PAY" 1000 0123456789abcdef 86400000 >/dev/null
    else
      taskset -c 1 redis-benchmark -p $P -n 50000 -c 4 -q EVALSHA $NEW_SHA 2 'cc:{d}:meta' 'cc:{d}:log' 'cc:{d}' "$PAY" 1000 0123456789abcdef 86400000 >/dev/null
    fi
    echo "round $round $which: $(redis-cli -p $P INFO commandstats | grep -E '^cmdstat_evalsha:' | sed 's/.*usec_per_call=\([0-9.]*\).*/\1/') µs per script"
  done
done
kill $S1 $S2 $R
