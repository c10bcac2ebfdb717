// Refusals a browser can read: real Chromium opens WebSockets to a real
// corecast node and reports the close code and reason its `close` event
// carries, for each kind of refused upgrade.
//
//   CORECAST_BIN=target/debug/corecast node tests/browser/refusals.mjs
//
// Needs playwright-core (npm) and Chromium at /usr/bin/chromium (or
// CHROMIUM=...); scripts/test.sh installs both.

import { spawn, execFileSync } from "node:child_process";
import { chromium } from "playwright-core";

const bin = process.env.CORECAST_BIN ?? "target/debug/corecast";
const secret = "browser-test-secret-0123456789";
const key = "browser-test-api-key-0123456789";

function token(user, ttl) {
  return execFileSync(bin, ["token", "--user", user, `--ttl=${ttl}`, "--auth-secret", secret], {
    encoding: "utf8",
  }).trim();
}

function start() {
  const child = spawn(bin, [
    "serve", "--listen", "127.0.0.1:0", "--shards", "2", "--auth-secret", secret,
    "--max-connections-per-user", "1", "--api-listen", "127.0.0.1:0", "--api-key", key,
  ], { env: { ...process.env, CORECAST_BAN_FILE: "", CORECAST_HISTORY_FILE: "" }, stdio: ["ignore", "ignore", "pipe"] });
  return new Promise((resolve, reject) => {
    let log = "";
    let addr, api;
    const timer = setTimeout(() => reject(new Error(`corecast did not start:\n${log}`)), 20000);
    child.stderr.on("data", (d) => {
      log += d;
      addr ??= /corecast listening on (\S+)/.exec(log)?.[1];
      api ??= /server API listening on (\S+)/.exec(log)?.[1];
      if (addr && api) {
        clearTimeout(timer);
        resolve({ child, addr, api });
      }
    });
    child.on("exit", (code) => reject(new Error(`corecast exited (${code}):\n${log}`)));
  });
}

const failures = [];
function check(what, ok, detail) {
  console.log(`${ok ? "ok  " : "FAIL"} ${what}: ${JSON.stringify(detail)}`);
  if (!ok) failures.push(what);
}

const { child, addr, api } = await start();
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  // A page of the node's own origin, as an app served beside it would be.
  await page.goto(`http://${addr}/health`);
  // Opens a WebSocket and reports what the page saw: the first message, and
  // the close event's code, reason and whether a message came before it.
  const open = (path) => page.evaluate((url) => new Promise((resolve) => {
    const ws = new WebSocket(url);
    const seen = [];
    ws.onmessage = (e) => seen.push(JSON.parse(e.data).t);
    ws.onclose = (e) => resolve({ code: e.code, reason: e.reason, seen });
    setTimeout(() => resolve({ code: null, seen, open: ws.readyState === 1 }), 3000);
  }), `ws://${addr}${path}`);

  let r = await open("/ws?token=not-a-token");
  check("bad token", r.code === 4001 && r.reason.startsWith("invalid token") && r.seen.length === 0, r);
  r = await open(`/ws?token=${token("alice", -600)}`);
  check("expired token", r.code === 4001 && r.reason.includes("ExpiredSignature"), r);

  const ban = await fetch(`http://${api}/api/ban`, {
    method: "POST",
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    body: JSON.stringify({ userId: "troll" }),
  });
  check("ban through the server API", ban.status === 200, ban.status);
  r = await open(`/ws?token=${token("troll", 600)}`);
  check("banned user", r.code === 4004 && r.reason.startsWith("banned"), r);

  // Bob's first connection holds his one slot; the second is refused.
  const bob = token("bob", 600);
  const first = page.evaluate((url) => new Promise((resolve) => {
    window.held = new WebSocket(url);
    window.held.onmessage = (e) => resolve(JSON.parse(e.data).t);
  }), `ws://${addr}/ws?token=${bob}`);
  check("first connection of bob", (await first) === "ready", "ready");
  r = await open(`/ws?token=${bob}`);
  check("past the per-user cap", r.code === 4029 && !r.seen.includes("ready"), r);

  r = await open(`/ws?token=${token("carol", 600)}`);
  check("a valid token", r.code === null && r.seen[0] === "ready", r);
} finally {
  await browser.close();
  child.kill("SIGTERM");
}
if (failures.length) {
  console.error(`\n${failures.length} browser check(s) failed: ${failures.join(", ")}`);
  process.exit(1);
}
console.log("\nevery refusal was readable in the browser");
