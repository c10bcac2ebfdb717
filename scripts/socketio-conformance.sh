#!/usr/bin/env bash
# The official Engine.IO and Socket.IO protocol test suites (unchanged, from
# ../shared/socketio-conformance) against `corecast serve
# --socketio-conformance` on a free port. Installs their npm packages into
# target/test-tools/socketio-conformance; fails unless every test passes.
#
# The suites read one message at a time, with a 300 ms heartbeat: a message
# that arrives in the same read as the one before is lost to them, and so
# is a test on a machine too busy to keep to the heartbeat (their README
# reports the same of the reference server). A suite that fails is run once
# more, after its failures are printed; failing twice fails the script.
#
#   scripts/socketio-conformance.sh [path/to/corecast]
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$root/target/debug/corecast}
suites=${SOCKETIO_CONFORMANCE:-$root/../shared/socketio-conformance}
work=$root/target/test-tools/socketio-conformance

die() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }
[ -x "$bin" ] || die "no corecast binary at $bin (cargo build first)"
[ -d "$suites/engine.io" ] && [ -d "$suites/socket.io" ] || die "the suites are not at $suites"
command -v node >/dev/null || die "node is missing: install Node.js 20 with npm"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
log=$(mktemp)
CORECAST_BAN_FILE= CORECAST_HISTORY_FILE= "$bin" serve --listen "127.0.0.1:$port" --socketio-conformance \
    --max-handshakes-per-ip 0 >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -sf "http://127.0.0.1:$port/ready" >/dev/null || { cat "$log"; die "corecast did not start"; }

failed=0
for suite in engine.io socket.io; do
    dir=$work/$suite
    mkdir -p "$dir"
    cp "$suites/$suite/package.json" "$suites/$suite/node-imports.js" "$dir/"
    # The suite as it is, pointed at this server's port.
    sed "s#^const URL = \"http://localhost:3000\";#const URL = \"http://127.0.0.1:$port\";#" \
        "$suites/$suite/test-suite.js" >"$dir/test-suite.js"
    grep -q "127.0.0.1:$port" "$dir/test-suite.js" || die "could not point the $suite suite at port $port"
    if [ ! -d "$dir/node_modules/mocha" ]; then
        (cd "$dir" && npm install --no-package-lock --no-audit --no-fund --silent) \
            || die "npm could not install the $suite suite's packages"
    fi
    printf '\n==> the official %s protocol suite\n' "$suite"
    if ! (cd "$dir" && timeout 300 npx mocha --reporter dot test-suite.js); then
        printf '\n==> the %s suite failed (above); once more\n' "$suite"
        (cd "$dir" && timeout 300 npx mocha --reporter dot test-suite.js) || failed=1
    fi
done
if [ "$failed" != 0 ]; then
    printf '\nserver log:\n' >&2
    tail -50 "$log" >&2
    die "a protocol suite failed"
fi
printf '\nboth protocol suites passed\n'
