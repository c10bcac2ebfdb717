#!/bin/bash
# How long a cluster node takes to follow its N connected users again once
# Redis is back: a node (one shard, core 0) with its own redis-server, N idle
# users from `corecast bench idle` (core 1); Redis is killed and restarted.
#
#   scripts/bench-refollow.sh BIN [N] [PORT]
#   scripts/bench-refollow.sh target/release/corecast 5000 9360
set -u
BIN=${1:?usage: scripts/bench-refollow.sh BIN [N] [PORT]}; N=${2:-5000}; P=${3:-9360}
U=(env CORECAST_BAN_FILE= CORECAST_HISTORY_FILE= 'CORECAST_RATE_LIMITS=*=off' CORECAST_MAX_HANDSHAKES_PER_IP=0 CORECAST_MAX_CONNECTIONS_PER_IP=0 CORECAST_MAX_CONNECTIONS_PER_SHARD=0 CORECAST_MAX_CONNECTIONS_PER_USER=0)
taskset -c 0 redis-server --port $P --bind 127.0.0.1 --save '' --appendonly no >/dev/null & R=$!
sleep 0.3
"${U[@]}" taskset -c 0 $BIN serve --listen 127.0.0.1:$((P+1)) --shards 1 --redis redis://127.0.0.1:$P >/dev/null 2>&1 & A=$!
sleep 1
taskset -c 1 "$BIN" bench --url ws://127.0.0.1:$((P+1))/ws --driver epoll idle --connections $N --hold 30 --room-size 0 >/dev/null 2>&1 & B=$!
until [ "$(redis-cli -p $P PUBSUB CHANNELS 'cc:u:*' | wc -l)" -ge $N ]; do sleep 0.2; done
kill $R; wait $R 2>/dev/null
until curl -s 127.0.0.1:$((P+1))/metrics | grep -q '^corecast_cluster_up 0'; do sleep 0.01; done
taskset -c 0 redis-server --port $P --bind 127.0.0.1 --save '' --appendonly no >/dev/null & R=$!
t0=$(date +%s%N)
until curl -s 127.0.0.1:$((P+1))/metrics | grep -q '^corecast_cluster_up 1'; do sleep 0.005; done
t1=$(date +%s%N)
until [ "$(redis-cli -p $P PUBSUB CHANNELS 'cc:u:*' | wc -l)" -ge $N ]; do sleep 0.002; done
t2=$(date +%s%N)
echo "$(basename $BIN): up after $(( (t1-t0)/1000000 )) ms, $N users followed $(( (t2-t1)/1000000 )) ms after that"
kill $B $A $R 2>/dev/null; wait 2>/dev/null
