// socket.io-client's browser bundle in real Chromium: a page served by this
// test (another origin than the node's, as an app's would be) connects
// with the default transports (long-polling, then the upgrade), joins a
// channel, sends, and receives what a Node client sends.
//
//   CORECAST_BIN=target/debug/corecast node tests/socketio/browser.mjs
//
// Needs playwright-core (npm) and Chromium at /usr/bin/chromium (or
// CHROMIUM=...); scripts/test.sh installs both.

import { createServer } from "node:http";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { chromium } from "playwright-core";
import { check, connect, next, onStop, run, startNode, token } from "./lib.mjs";

const require = createRequire(import.meta.url);
const bundle = readFileSync(
  join(dirname(require.resolve("socket.io-client/package.json")), "dist", "socket.io.min.js"),
);

const page = `<!doctype html><meta charset="utf-8"><title>corecast</title>
<script src="/socket.io.min.js"></script>
<script>
  window.events = [];
  window.start = (url, token) => new Promise((resolve, reject) => {
    const socket = io(url, { auth: { token } });
    window.socket = socket;
    socket.on("message:new", (m) => window.events.push(m));
    socket.on("connect_error", (e) => reject(String(e.message)));
    socket.on("connect", async () => {
      const join = await socket.emitWithAck("channel:join", { channelId: "web" });
      resolve({ join, transport: socket.io.engine.transport.name });
    });
  });
</script>`;

const server = createServer((req, res) => {
  if (req.url === "/socket.io.min.js") {
    res.writeHead(200, { "content-type": "text/javascript" });
    return res.end(bundle);
  }
  res.writeHead(200, { "content-type": "text/html" });
  res.end(page);
});
await new Promise((r) => server.listen(0, "127.0.0.1", r));
const origin = `http://127.0.0.1:${server.address().port}`;

const node = await startNode();
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
onStop(() => browser.close());
onStop(() => server.close());

await run([
  ["a page connects, joins, sends and receives", async () => {
    const tab = await browser.newPage();
    await tab.goto(origin);
    const started = await tab.evaluate(([url, t]) => window.start(url, t), [node.url, token("webby")]);
    check("joined from the page", started.join.success === true && started.join.channelId === "web", started);

    const peer = await connect(node.url, { auth: { token: token("nodey") } });
    await peer.emitWithAck("channel:join", { channelId: "web" });
    const seen = next(peer, "message:new");
    const sent = await tab.evaluate(() =>
      window.socket.emitWithAck("message:send", { channelId: "web", content: "from the browser" }));
    check("the page's send is acked", sent.success === true && sent.offset >= 1, sent);
    check("a Node client receives it", (await seen).content === "from the browser", {});
    const ack = await peer.emitWithAck("message:send", { channelId: "web", content: "to the browser" });
    check("the Node client's send is acked", ack.success === true, ack);
    await tab.waitForFunction(() => window.events.some((m) => m.content === "to the browser"), null, { timeout: 5000 });
    const events = await tab.evaluate(() => window.events.map((m) => m.content));
    check("the page receives both, in order", JSON.stringify(events) === JSON.stringify(["from the browser", "to the browser"]), events);
    // Long-polling first, then the upgrade to WebSocket.
    await tab.waitForFunction(() => window.socket.io.engine.transport.name === "websocket", null, { timeout: 5000 });
    check("upgraded to WebSocket", true, {});
    peer.close();
  }],
]);
