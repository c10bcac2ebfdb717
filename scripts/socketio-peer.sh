#!/usr/bin/env bash
# Installs (once) and starts one of the Socket.IO servers corecast is
# measured against (scripts/peers/socketio/server.js), in the foreground:
#
#   scripts/socketio-peer.sh PORT [--redis URL] [--mode plain|seed] [--secret S]
#
# Run two with the same --redis for a Socket.IO + @socket.io/redis-adapter
# pair. Drive them with `corecast bench --protocol socketio --url
# ws://127.0.0.1:PORT/socket.io/` (see docs/BENCHMARKS.md). Needs Node 20
# and npm.
set -euo pipefail
dir="$(cd "$(dirname "$0")/peers/socketio" && pwd)"
[ $# -ge 1 ] || { sed -n 2,11p "$0"; exit 2; }
command -v node >/dev/null || { echo "node is missing (Node 20 and npm)" >&2; exit 2; }
if [ ! -d "$dir/node_modules/socket.io" ]; then
  echo "installing socket.io, @socket.io/redis-adapter, redis, jsonwebtoken..." >&2
  (cd "$dir" && npm install --no-audit --no-fund --no-package-lock --silent)
fi
port=$1
shift
exec node "$dir/server.js" --port "$port" "$@"
