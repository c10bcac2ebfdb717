#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit, property and
# integration tests (real sockets, real clients), socket.io-client and the
# official Engine.IO and Socket.IO protocol suites, the Autobahn|Testsuite
# fuzzingclient against `corecast serve`, schemathesis against the server
# API and its OpenAPI document, and a short run of every fuzz target.
# Installs what it needs; fails loudly when something cannot run.
#
#   scripts/test.sh            everything
#   FUZZ_RUNS=1000000 scripts/test.sh   longer fuzzing
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cache="$root/target/test-tools"
mkdir -p "$cache"
FUZZ_RUNS=${FUZZ_RUNS:-50000}
PY2=${PY2:-/root/.pyenv/versions/2.7.18/bin/python}

step() { printf '\n==> %s\n' "$*"; }
die() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

need_apt() {
    # need_apt COMMAND PACKAGE: install PACKAGE when COMMAND is missing.
    command -v "$1" >/dev/null 2>&1 && return 0
    command -v apt-get >/dev/null 2>&1 || die "$1 is missing and apt-get is not available to install $2"
    step "installing $2"
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq "$2"
    else sudo apt-get update -qq && sudo apt-get install -y -qq "$2"; fi
}

command -v cargo >/dev/null || die "cargo is missing: install Rust from rustup first"
need_apt cc gcc
need_apt python3 python3
need_apt curl curl
# The cluster tests run their own redis-server processes (and make a Redis
# Cluster with redis-cli, from redis-tools).
need_apt redis-server redis-server
need_apt redis-cli redis-tools
python3 -c 'import venv' 2>/dev/null || need_apt false python3-venv
# The browser tests drive Debian's Chromium with playwright-core (npm).
need_apt chromium chromium
command -v node >/dev/null || die "node is missing: install Node.js 20 with npm"

step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test (unit, property, integration; benches run once as tests)"
# tests/all/bench.rs runs the baseline example server: build it where it looks.
cargo build --examples
cargo test --workspace --all-targets

step "browser: refusals Chromium can read (tests/browser)"
(cd tests/browser && npm install --no-package-lock --no-audit --no-fund --silent) \
    || die "npm could not install tests/browser's packages"
CORECAST_BIN=target/debug/corecast timeout 180 node tests/browser/refusals.mjs \
    || die "the browser tests failed"

step "Socket.IO: socket.io-client against real nodes (tests/socketio)"
(cd tests/socketio && npm install --no-package-lock --no-audit --no-fund --silent) \
    || die "npm could not install tests/socketio's packages"
CORECAST_BIN=target/debug/corecast timeout 300 node tests/socketio/client.mjs \
    || die "the Socket.IO client tests failed"
CORECAST_BIN=target/debug/corecast timeout 180 node tests/socketio/browser.mjs \
    || die "the Socket.IO browser test failed"

step "the official Engine.IO and Socket.IO protocol suites (io_uring, then epoll)"
scripts/socketio-conformance.sh target/debug/corecast
CORECAST_IO_DRIVER=epoll scripts/socketio-conformance.sh target/debug/corecast

step "Autobahn|Testsuite fuzzingclient (sections 1-10; 12-13 are compression)"
[ -x "$PY2" ] || die "the Autobahn suite needs Python 2.7 at $PY2 (set PY2=/path/to/python2.7)"
if [ ! -x "$cache/ab/bin/wstest" ]; then
    echo "installing autobahntestsuite into $cache/ab (about 35 s)"
    python3 -m venv "$cache/ab-tools"
    "$cache/ab-tools/bin/pip" install -q 'virtualenv<20.22'
    "$cache/ab-tools/bin/virtualenv" -q -p "$PY2" "$cache/ab"
    "$cache/ab/bin/pip" install -q autobahntestsuite==25.10.1 2>&1 | grep -v DEPRECATION || true
    [ -x "$cache/ab/bin/wstest" ] || die "autobahntestsuite did not install"
fi
abdir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# The suite opens its ~300 connections from one address faster than the
# default per-address handshake rate, which would refuse them with 429.
CORECAST_BAN_FILE= CORECAST_HISTORY_FILE= target/debug/corecast serve --listen "127.0.0.1:$port" --echo-endpoint \
    --max-message-size 67108864 --max-handshakes-per-ip 0 >"$abdir/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -rf "$abdir"' EXIT
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break
    sleep 0.1
done
cat >"$abdir/spec.json" <<SPEC
{
  "outdir": "$abdir/reports",
  "servers": [{ "agent": "corecast", "url": "ws://127.0.0.1:$port/echo" }],
  "cases": ["*"],
  "exclude-cases": ["12.*", "13.*"],
  "exclude-agent-cases": {}
}
SPEC
(cd "$abdir" && timeout 900 "$cache/ab/bin/wstest" -m fuzzingclient -s spec.json >"$abdir/wstest.log" 2>&1) || {
    tail -20 "$abdir/wstest.log"; die "wstest did not complete"; }
kill -0 $server 2>/dev/null || { cat "$abdir/server.log"; die "corecast died during the Autobahn run"; }
python3 tests/autobahn/check.py "$abdir/reports/index.json" 301 || die "Autobahn cases failed"
kill $server; wait $server 2>/dev/null || true
trap - EXIT
rm -rf "$abdir"

step "server API: schemathesis against docs/openapi.yaml (every check)"
if [ ! -x "$cache/st/bin/schemathesis" ]; then
    echo "installing schemathesis into $cache/st (about 30 s)"
    python3 -m venv "$cache/st"
    "$cache/st/bin/pip" install -q schemathesis==4.32.5
    [ -x "$cache/st/bin/schemathesis" ] || die "schemathesis did not install"
fi
stdir=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
api_port=$(free_port)
key="schemathesis-key-$(date +%s%N)"
CORECAST_BAN_FILE="$stdir/bans.jsonl" CORECAST_HISTORY_FILE="$stdir/history.jsonl" target/debug/corecast serve --listen "127.0.0.1:$port" --shards 2 \
    --api-listen "127.0.0.1:$api_port" --api-key "$key" >"$stdir/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -rf "$stdir"' EXIT
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break
    sleep 0.1
done
# A fixed seed: the same cases every run, so that a failure is reproducible
# (`--seed` other values, by hand, explore further). Schemathesis 4.32 now
# and then takes a path parameter with a control character for a valid one
# (a false "schema-valid request rejected" on channelId).
(cd "$stdir" && timeout 600 "$cache/st/bin/schemathesis" run "$root/docs/openapi.yaml" \
    -u "http://127.0.0.1:$api_port" -H "Authorization: Bearer $key" \
    --checks all --max-examples 100 --seed 1 --no-color) || { tail -20 "$stdir/server.log"; die "schemathesis found the API and docs/openapi.yaml disagreeing"; }
kill -0 $server 2>/dev/null || { cat "$stdir/server.log"; die "corecast died during the schemathesis run"; }
kill $server; wait $server 2>/dev/null || true
trap - EXIT
rm -rf "$stdir"

step "fuzz targets: build, then $FUZZ_RUNS runs each from the seed corpus"
rustup toolchain list | grep -q '^nightly' || die "cargo fuzz needs a nightly toolchain (rustup toolchain install nightly)"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz (about 1-2 min)"
    cargo install cargo-fuzz --locked --version 0.13.2
fi
(cd fuzz && cargo +nightly fuzz build -O)
for t in handshake frame json_envelope binary_envelope session socketio_packet; do
    corpus=$(mktemp -d)
    cp fuzz/corpus/$t/seed-* "$corpus/"
    (cd fuzz && cargo +nightly fuzz run -O "$t" "$corpus" -- -runs="$FUZZ_RUNS" -max_len=4096 2>&1 | grep -E '^Done|ERROR|SUMMARY') \
        || die "fuzz target $t failed"
    rm -rf "$corpus"
done

printf '\nall checks passed\n'
