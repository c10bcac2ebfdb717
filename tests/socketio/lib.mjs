// What the Socket.IO tests share: starting corecast nodes (and a Redis for a
// cluster) on free ports, minting tokens, connecting socket.io-client and a
// native corecast.json client, waiting for events, and counting failures.

import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { io } from "socket.io-client";
import WebSocket from "ws";

export const bin = process.env.CORECAST_BIN ?? "target/debug/corecast";
export const secret = "socketio-test-secret-0123456789";
export const apiKey = "socketio-test-api-key-0123456789";

const children = [];
const dirs = [];

// Whatever ends this process (a failure, a signal, a closed output) stops
// the servers it started.
process.on("exit", () => {
  for (const c of children) {
    try {
      c.kill("SIGKILL");
    } catch {}
  }
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});
for (const sig of ["SIGINT", "SIGTERM", "SIGHUP", "SIGPIPE"]) process.on(sig, () => process.exit(1));
process.stdout.on("error", () => process.exit(1));

export function token(user, extra = []) {
  return execFileSync(bin, ["token", "--user", user, "--auth-secret", secret, ...extra], {
    encoding: "utf8",
  }).trim();
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function waitForLog(child, patterns, what) {
  return new Promise((resolve, reject) => {
    let log = "";
    const found = {};
    const timer = setTimeout(() => reject(new Error(`${what} did not start:\n${log}`)), 20000);
    const onData = (d) => {
      log += d;
      for (const [name, re] of Object.entries(patterns)) {
        found[name] ??= re.exec(log)?.[1];
      }
      if (Object.keys(patterns).every((n) => found[n])) {
        clearTimeout(timer);
        child.stderr.off("data", onData);
        child.stdout?.off("data", onData);
        resolve(found);
      }
    };
    child.stderr.on("data", onData);
    child.stdout?.on("data", onData);
    child.on("exit", (code) => reject(new Error(`${what} exited (${code}):\n${log}`)));
  });
}

// Starts a corecast node; `args` are extra `serve` flags.
export async function startNode(args = []) {
  const child = spawn(
    bin,
    [
      "serve", "--listen", "127.0.0.1:0", "--shards", "2", "--auth-secret", secret,
      "--api-listen", "127.0.0.1:0", "--api-key", apiKey, ...args,
    ],
    { env: { ...process.env, CORECAST_BAN_FILE: "", CORECAST_HISTORY_FILE: "" }, stdio: ["ignore", "ignore", "pipe"] },
  );
  children.push(child);
  const { addr, api } = await waitForLog(
    child,
    { addr: /corecast listening on (\S+)/, api: /server API listening on (\S+)/ },
    "corecast",
  );
  // Keep draining its log so the pipe never fills.
  child.stderr.on("data", () => {});
  return { child, addr, api, url: `http://${addr}` };
}

// The example backend (examples/backend/backend.py): the event stream,
// the publish hook and rpc, signed with `hookSecret`.
export const hookSecret = "socketio-hook-secret-0123456789";
export async function startBackend() {
  const dir = mkdtempSync(join(tmpdir(), "corecast-sio-backend-"));
  dirs.push(dir);
  const script = new URL("../../examples/backend/backend.py", import.meta.url).pathname;
  const child = spawn(
    "python3",
    [script, "--port", "0", "--db", join(dir, "db.sqlite"), "--secret", hookSecret],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  children.push(child);
  const { addr } = await waitForLog(child, { addr: /backend listening on (\S+)/ }, "the example backend");
  child.stdout.on("data", () => {});
  child.stderr.on("data", () => {});
  return `http://${addr}`;
}

export async function startRedis() {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), "corecast-sio-redis-"));
  dirs.push(dir);
  const child = spawn(
    "redis-server",
    ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  children.push(child);
  await waitForLog(child, { ready: /(Ready to accept connections)/ }, "redis-server");
  child.stdout.on("data", () => {});
  return `redis://127.0.0.1:${port}`;
}

const cleanups = [];
// Runs `fn` (which may be async) when the tests end, before the processes
// they started are stopped.
export function onStop(fn) {
  cleanups.push(fn);
}

export async function stopAll() {
  for (const fn of cleanups) await Promise.resolve().then(fn).catch(() => {});
  for (const c of children) c.kill("SIGKILL");
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
}

// A socket.io-client socket, connected (or refused: the error).
export function connect(url, opts = {}) {
  const socket = io(url, { forceNew: true, reconnection: false, ...opts });
  // `ready` comes with the CONNECT answer, before `connect` fires.
  socket.on("ready", (r) => {
    socket.ready = r;
  });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no connect to ${url}`)), 10000);
    socket.once("connect", () => {
      clearTimeout(timer);
      resolve(socket);
    });
    socket.once("connect_error", (e) => {
      clearTimeout(timer);
      socket.close();
      reject(e);
    });
  });
}

// The next `event` on `emitter` (a socket.io socket or a native client).
export function next(emitter, event, ms = 5000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${event} within ${ms} ms`)), ms);
    emitter.once(event, (d) => {
      clearTimeout(timer);
      resolve(d);
    });
  });
}

// Collects every `event` into an array.
export function collect(emitter, event) {
  const got = [];
  emitter.on(event, (d) => got.push(d));
  return got;
}

export function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

export async function until(what, cond, ms = 5000) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await cond()) return;
    await sleep(20);
  }
  throw new Error(`timed out waiting for ${what}`);
}

// A native corecast.json client with the same `emit(event, data)` /
// `on(event, fn)` shape, for mixed channels.
export class Native {
  constructor(ws) {
    this.ws = ws;
    this.id = 0;
    this.pending = new Map();
    this.handlers = new Map();
    ws.on("message", (raw) => {
      const m = JSON.parse(raw.toString());
      if ((m.t === "ack" || m.t === "error") && this.pending.has(m.id)) {
        this.pending.get(m.id)(m);
        this.pending.delete(m.id);
        return;
      }
      for (const fn of this.handlers.get(m.t) ?? []) fn(m.d);
    });
  }

  static open(addr, tok) {
    const ws = new WebSocket(`ws://${addr}/ws?token=${tok}`);
    return new Promise((resolve, reject) => {
      const n = new Native(ws);
      n.once("ready", (r) => {
        n.ready = r;
        resolve(n);
      });
      ws.once("error", reject);
    });
  }

  on(event, fn) {
    if (!this.handlers.has(event)) this.handlers.set(event, []);
    this.handlers.get(event).push(fn);
  }

  once(event, fn) {
    const wrap = (d) => {
      const list = this.handlers.get(event);
      list.splice(list.indexOf(wrap), 1);
      fn(d);
    };
    this.on(event, wrap);
  }

  call(t, d) {
    const id = ++this.id;
    this.ws.send(JSON.stringify({ t, id, d }));
    return new Promise((resolve) => this.pending.set(id, resolve));
  }

  close() {
    this.ws.close();
  }
}

const failures = [];
export function check(what, ok, detail) {
  console.log(`${ok ? "ok  " : "FAIL"} ${what}${ok ? "" : `: ${JSON.stringify(detail)}`}`);
  if (!ok) failures.push(what);
}

// Runs each named test in turn; a throw is a failure. Exits non-zero when
// anything failed, after stopping every process it started.
export async function run(tests) {
  for (const [name, fn] of tests) {
    const t0 = Date.now();
    try {
      await fn();
    } catch (e) {
      check(`${name} (threw)`, false, String(e?.stack ?? e));
    }
    console.log(`  -- ${name} (${Date.now() - t0} ms)`);
  }
  await stopAll();
  if (failures.length) {
    console.log(`\n${failures.length} Socket.IO check(s) failed:\n  ${failures.join("\n  ")}`);
    process.exit(1);
  }
  console.log("\nevery Socket.IO check passed");
  process.exit(0);
}
