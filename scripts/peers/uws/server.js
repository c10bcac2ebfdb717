// The uWebSockets peer for side-by-side figures: uWebSockets.js (the C++
// core, prebuilt in the npm package) as a pub/sub server speaking the `raw`
// contract of `corecast bench --protocol raw`: connect to
// `ws://ADDR/?room=NAME`; every text message a client sends reaches every
// member of its room, the sender included (`app.publish`).
//
//   node scripts/peers/uws/server.js 127.0.0.1:9500
//
// Prints `uws listening on ADDR` once ready. Settings are chosen so that it
// neither drops nor closes under the loads of scripts/bench-compare.sh:
// no compression, no idle timeout, 16 MiB of backpressure per connection
// (corecast's outbound bound), 1 MiB messages.
"use strict";
const uWS = require("@trufflesuite/uws-js-unofficial");

const [host, port] = (process.argv[2] || "127.0.0.1:9500").split(":");
const app = uWS.App();
app.ws("/*", {
  compression: uWS.DISABLED,
  maxPayloadLength: 1 << 20,
  maxBackpressure: 16 << 20,
  idleTimeout: 0,
  upgrade: (res, req, context) => {
    const room = new URLSearchParams(req.getQuery() || "").get("room") || "lobby";
    res.upgrade(
      { room },
      req.getHeader("sec-websocket-key"),
      req.getHeader("sec-websocket-protocol"),
      req.getHeader("sec-websocket-extensions"),
      context,
    );
  },
  open: (ws) => {
    ws.subscribe(ws.getUserData().room);
  },
  message: (ws, message, isBinary) => {
    app.publish(ws.getUserData().room, message, isBinary);
  },
});
app.listen(host, Number(port), (token) => {
  if (!token) {
    console.error(`uws cannot listen on ${host}:${port}`);
    process.exit(1);
  }
  console.error(`uws listening on ${host}:${port}`);
});
