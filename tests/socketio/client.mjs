// socket.io-client (the npm package apps ship) against real corecast nodes:
// the seeds' client code, `io(url, { auth: { token } })`,
// `socket.emit(event, data, callback)` and `socket.on(event, ...)`, for
// every event group of docs/PROTOCOL.md, errors in acks, refusals in
// `connect_error`, the heartbeat and a channel shared with native clients,
// each over the default transports (long-polling, then the upgrade),
// WebSocket only and long-polling only; then the framing seen raw and a
// two-node cluster.
//
//   CORECAST_BIN=target/debug/corecast node tests/socketio/client.mjs
//
// scripts/test.sh installs the packages (npm) and redis-server (apt-get).

import WebSocket from "ws";
import { io } from "socket.io-client";
import msgpackParser from "socket.io-msgpack-parser";
import {
  Native, apiKey, check, collect, connect, hookSecret, next, run, sleep, startBackend, startNode, startRedis, token,
  until,
} from "./lib.mjs";

const transports = {
  default: {},
  websocket: { transports: ["websocket"] },
  polling: { transports: ["polling"] },
  // socket.io-msgpack-parser, over the default transports.
  msgpack: { parser: msgpackParser },
};
// The transport options of the round running.
let ws = transports.websocket;

// A node per round: LiveKit configured (voice tokens), a tight limit on
// `typing:start` (rate limits in acks), a short heartbeat.
const nodeArgs = [
  "--livekit-url", "wss://livekit.example.test", "--livekit-api-key", "lk-key",
  "--livekit-api-secret", "lk-secret-0123456789abcdef0123456789",
  "--rate-limit", "typing:start=3/60s",
  "--ping-interval-ms", "300", "--ping-timeout-ms", "400",
  // Tokens of a few seconds are warned of 2 s ahead.
  "--token-refresh-ahead-ms", "2000",
  // The application's own events.
  "--custom-events", "game:*",
];
let node;

async function metric(name) {
  const text = await (await fetch(`${node.url}/metrics`)).text();
  return text.split("\n").filter((l) => l.startsWith(`${name}{`) || l.startsWith(`${name} `))
    .reduce((n, l) => n + Number(l.split(" ").pop()), 0);
}

const sockets = [];
async function user(name, opts = {}, extra = []) {
  const s = await connect(node.url, { ...ws, auth: { token: token(name, extra) }, ...opts });
  sockets.push(s);
  return s;
}

async function api(path, body) {
  const r = await fetch(`http://${node.api}${path}`, {
    method: "POST",
    headers: { authorization: `Bearer ${apiKey}`, "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  return { status: r.status, body: await r.json().catch(() => null) };
}

const eventTests = [
  ["connect with auth.token and receive ready", async () => {
    const s = await user("ann");
    check("connected", s.connected, {});
    check("ready names the user and the session", s.ready?.userId === "ann" && s.ready.sessionId === s.id, s.ready);
    s.close();
  }],

  ["the seeds' client code, unchanged", async () => {
    // As the seeds' README shows it (000_…: messages, presence, voice,
    // typing), with the URL, token and ids of this test.
    const peer = await user("sam");
    await peer.emitWithAck("channel:join", { channelId: "channel-id" });
    await peer.emitWithAck("channel:join", { channelId: "voice-channel-id" });
    const socket = await user("sid");
    await socket.emitWithAck("channel:join", { channelId: "channel-id" });
    const received = [];
    socket.on("message:new", (message) => received.push(message));
    const sent = await new Promise((resolve) => socket.emit("message:send", {
      channelId: "channel-id",
      content: "Hello, world!",
      mentions: ["sam"],
    }, (response) => resolve(response)));
    check("message:send callback", sent.success === true && typeof sent.messageId === "string", sent);
    await until("message:new", () => received.length === 1);
    check("message:new listener", received[0].content === "Hello, world!" && received[0].mentions[0] === "sam", received);
    const changed = next(peer, "presence:changed").catch(() => null);
    await peer.emitWithAck("presence:subscribe", { userIds: ["sid"] });
    socket.emit("presence:update", {
      status: "online",
      activity: { type: "playing", name: "Awesome Game", details: "Level 42" },
    });
    socket.emit("presence:heartbeat");
    const p = await changed;
    check("presence:update with an activity", p?.activity?.name === "Awesome Game", p);
    const voice = await new Promise((resolve) => socket.emit("voice:join", { channelId: "voice-channel-id" }, (response) => {
      if (response.success) {
        const { token, serverUrl } = response;
        resolve({ token, serverUrl });
      } else resolve(response);
    }));
    check("voice:join response.success, token, serverUrl", typeof voice.token === "string" && voice.serverUrl, voice);
    const state = next(peer, "voice:state_update");
    socket.emit("voice:update", { muted: true, deafened: false, speaking: false });
    check("voice:state_update", (await state).state.muted === true, {});
    const typing = next(peer, "typing:user_start");
    socket.emit("typing:start", { channelId: "channel-id" });
    check("typing:user_start", (await typing).userId === "sid", {});
    const stop = next(peer, "typing:user_stop");
    socket.emit("typing:stop", { channelId: "channel-id" });
    check("typing:user_stop", (await stop).userId === "sid", {});
  }],

  ["the token in the query string, and in a header", async () => {
    const q = await connect(node.url, { ...ws, query: { token: token("quinn") } });
    const r = await q.emitWithAck("heartbeat");
    check("query token", r.success === true && typeof r.timestamp === "number", r);
    q.close();
    const h = await connect(node.url, { ...ws, extraHeaders: { authorization: `Bearer ${token("hal")}` } });
    check("bearer header", h.connected, {});
    h.close();
  }],

  ["refused tokens reach connect_error with their reason", async () => {
    let err = await connect(node.url, { ...ws, auth: { token: "not-a-token" } }).catch((e) => e);
    check("bad token", err instanceof Error && err.message.startsWith("invalid token") && err.data?.code === "unauthorized",
      { message: err?.message, data: err?.data });
    err = await connect(node.url, { ...ws, auth: {} }).catch((e) => e);
    check("no token", err instanceof Error && err.message.includes("no token"), { message: err?.message });
    const banned = await api("/api/ban", { userId: "troll", reason: "abuse" });
    check("ban accepted", banned.status === 200, banned);
    err = await connect(node.url, { ...ws, auth: { token: token("troll") } }).catch((e) => e);
    check("banned user", err instanceof Error && err.data?.code === "forbidden" && err.message.includes("abuse"),
      { message: err?.message, data: err?.data });
  }],

  ["channels and messages through emit-with-ack", async () => {
    const a = await user("alice");
    const b = await user("bob");
    let r = await a.emitWithAck("channel:join", { channelId: "general" });
    check("join ack", r.success === true && r.channelId === "general" && r.members === 1, r);
    const joined = next(a, "channel:member_joined");
    r = await b.emitWithAck("channel:join", { channelId: "general" });
    check("second join", r.success === true && r.members === 2, r);
    const mj = await joined;
    check("member_joined", mj.userId === "bob" && mj.channelId === "general", mj);

    const got = next(b, "message:new");
    const sent = await a.emitWithAck("message:send", { channelId: "general", content: "hello @bob", nonce: "n-1" });
    check("send ack", sent.success === true && sent.channelId === "general" && sent.offset >= 1 && sent.nonce === "n-1", sent);
    const m = await got;
    check("message:new", m.content === "hello @bob" && m.userId === "alice" && m.messageId === sent.messageId, m);

    const edited = next(b, "message:edited");
    r = await a.emitWithAck("message:edit", { channelId: "general", messageId: sent.messageId, content: "hello again" });
    check("edit ack", r.success === true, r);
    check("message:edited", (await edited).content === "hello again", {});

    const reacted = next(a, "message:reaction");
    r = await b.emitWithAck("message:react", { channelId: "general", messageId: sent.messageId, emoji: "👍", action: "add" });
    check("react ack", r.success === true, r);
    const re = await reacted;
    check("message:reaction", re.emoji === "👍" && re.userId === "bob", re);

    r = await b.emitWithAck("message:delivered", { channelId: "general", messageId: sent.messageId });
    check("delivered ack", r.success === true, r);
    r = await b.emitWithAck("message:mark_read", { channelId: "general", messageId: sent.messageId });
    check("mark_read ack", r.success === true, r);
    r = await a.emitWithAck("message:get_read_receipts", { channelId: "general", messageId: sent.messageId });
    check("read receipts", r.success === true && r.readers.some((x) => x.userId === "bob"), r);

    r = await b.emitWithAck("channel:get_history", { channelId: "general", limit: 10 });
    check("history", r.success === true && r.messages.length === 1 && r.messages[0].content === "hello again", r);
    r = await b.emitWithAck("channel:get_members", { channelId: "general" });
    check("members", r.success === true && r.members.length === 2, r);

    const deleted = next(b, "message:deleted");
    r = await a.emitWithAck("message:delete", { channelId: "general", messageId: sent.messageId });
    check("delete ack", r.success === true, r);
    check("message:deleted", (await deleted).messageId === sent.messageId, {});

    const left = next(a, "channel:member_left");
    r = await b.emitWithAck("channel:leave", { channelId: "general" });
    check("leave ack", r.success === true, r);
    check("member_left", (await left).userId === "bob", {});
  }],

  ["errors arrive in the ack, or as `error` without one", async () => {
    const c = await user("carol");
    let r = await c.emitWithAck("message:send", { channelId: "nowhere", content: "x" });
    check("forbidden in the ack", r.success === false && r.error.code === "forbidden", r);
    r = await c.emitWithAck("message:send", { channelId: 7 });
    check("bad_request in the ack", r.success === false && r.error.code === "bad_request" && r.error.message.includes("channelId"), r);
    r = await c.emitWithAck("no:such:event", {});
    check("unsupported in the ack", r.success === false && r.error.code === "unsupported", r);
    const e = next(c, "error");
    c.emit("message:send", { channelId: "nowhere", content: "x" });
    const got = await e;
    check("error event without an ack", got.code === "forbidden", got);
    // A success nobody asked an ack for sends nothing back.
    const extra = collect(c, "error");
    c.emit("heartbeat");
    r = await c.emitWithAck("heartbeat");
    check("only the asked ack comes", r.success === true && extra.length === 0, { r, extra });
  }],

  ["rate limits arrive in the ack", async () => {
    const d = await user("dave");
    await d.emitWithAck("channel:join", { channelId: "rl" });
    const acks = [];
    for (let i = 0; i < 5; i++) acks.push(await d.emitWithAck("typing:start", { channelId: "rl" }));
    const limited = acks.filter((a) => a.success === false);
    check("three pass, then rate_limited with retryAfterMs",
      acks.slice(0, 3).every((a) => a.success) && limited.length === 2 &&
        limited.every((a) => a.error.code === "rate_limited" && a.error.retryAfterMs > 0), acks);
  }],

  ["direct messages, presence and typing", async () => {
    const e = await user("erin");
    const f = await user("frank");
    const dm = next(f, "dm:new");
    let r = await e.emitWithAck("dm:send", { toUserId: "frank", content: "lunch?" });
    check("dm ack", r.success === true && r.toUserId === "frank", r);
    const got = await dm;
    check("dm:new", got.content === "lunch?" && got.fromUserId === "erin", got);
    r = await f.emitWithAck("dm:get_conversations", { limit: 5 });
    check("conversations", r.success === true && r.conversations[0]?.userId === "erin", r);

    r = await e.emitWithAck("presence:subscribe", { userIds: ["frank"] });
    check("subscribe ack", r.success === true && r.presences[0]?.userId === "frank", r);
    const changed = next(e, "presence:changed");
    r = await f.emitWithAck("presence:update", { status: "dnd", customStatus: "focus" });
    check("presence update ack", r.success === true, r);
    const p = await changed;
    check("presence:changed", p.userId === "frank" && p.status === "dnd", p);
    r = await e.emitWithAck("presence:get_bulk", { userIds: ["frank"] });
    check("get_bulk", r.presences[0]?.status === "dnd", r);
    f.emit("presence:heartbeat");

    await e.emitWithAck("channel:join", { channelId: "desk" });
    await f.emitWithAck("channel:join", { channelId: "desk" });
    const typing = next(e, "typing:user_start");
    r = await f.emitWithAck("typing:start", { channelId: "desk" });
    check("typing ack", r.success === true, r);
    check("typing:user_start", (await typing).userId === "frank", {});
    r = await e.emitWithAck("typing:get_active", { channelId: "desk" });
    check("typing:get_active", r.userIds.includes("frank"), r);
    const stop = next(e, "typing:user_stop");
    f.emit("typing:stop", { channelId: "desk" });
    check("typing:user_stop", (await stop).userId === "frank", {});
  }],

  ["voice with its LiveKit token", async () => {
    // The seed's client code: `response.success` on `voice:join`.
    const v = await user("vera");
    const w = await user("walt");
    // Voice events go to the channel's members.
    await w.emitWithAck("channel:join", { channelId: "lounge" });
    await w.emitWithAck("voice:join", { channelId: "lounge" });
    const joined = next(w, "voice:user_joined");
    const response = await new Promise((resolve) => v.emit("voice:join", { channelId: "lounge" }, resolve));
    check("voice:join", response.success === true && typeof response.token === "string" &&
      response.token.split(".").length === 3 && response.serverUrl === "wss://livekit.example.test", response);
    check("voice:user_joined", (await joined).userId === "vera", {});
    const upd = next(w, "voice:state_update");
    let r = await v.emitWithAck("voice:update", { muted: true });
    check("voice:update", r.success === true && (await upd).state.muted === true, r);
    r = await w.emitWithAck("voice:get_participants", { channelId: "lounge" });
    check("participants", r.participants.length === 2, r);
    const left = next(w, "voice:user_left");
    r = await v.emitWithAck("voice:leave");
    check("voice:leave", r.success === true && (await left).userId === "vera", r);
  }],

  ["calls", async () => {
    const x = await user("xena");
    const y = await user("yuri");
    const incoming = next(y, "call:incoming");
    let r = await x.emitWithAck("call:initiate", { toUserId: "yuri", callType: "video", sdp: "v=0 offer" });
    check("initiate ack", r.success === true && /^[0-9a-f]{16}$/.test(r.callId), r);
    const callId = r.callId;
    const inc = await incoming;
    check("call:incoming", inc.callId === callId && inc.fromUserId === "xena" && inc.sdp === "v=0 offer", inc);
    const answered = next(x, "call:answered");
    r = await y.emitWithAck("call:answer", { callId, sdp: "v=0 answer" });
    check("answer ack", r.success === true && (await answered).sdp === "v=0 answer", r);
    const ice = next(y, "call:ice_candidate");
    x.emit("call:ice_candidate", { callId, candidate: { candidate: "candidate:1 1 UDP 1 10.0.0.2 5 typ host" } });
    check("ice relayed", (await ice).candidate.candidate.startsWith("candidate:1"), {});
    const ended = next(y, "call:ended");
    r = await x.emitWithAck("call:end", { callId });
    check("end", r.success === true && (await ended).reason === "ended", r);
  }],

  ["notifications and moderation", async () => {
    const n = await user("nora");
    const got = next(n, "notification:new");
    const sent = await api("/api/notify", { userId: "nora", kind: "system", data: { text: "hi" } });
    check("notify accepted", sent.status === 200, sent);
    const note = await got;
    check("notification:new", note.kind === "system" && note.data.text === "hi", note);
    let r = await n.emitWithAck("notification:get_pending");
    check("pending", r.success === true && r.notifications.length === 1, r);
    r = await n.emitWithAck("notification:clear_all");
    check("clear_all", r.success === true, r);

    const mod = await user("mona", {}, ["--roles", "moderator"]);
    const t = await user("tom");
    await mod.emitWithAck("channel:join", { channelId: "mod" });
    await t.emitWithAck("channel:join", { channelId: "mod" });
    const kicked = next(t, "moderation:kicked");
    r = await mod.emitWithAck("moderation:kick_user", { userId: "tom", channelId: "mod", reason: "spam" });
    check("kick ack", r.success === true, r);
    const k = await kicked;
    check("moderation:kicked", k.channelId === "mod" && k.reason === "spam" && k.by === "mona", k);
    r = await t.emitWithAck("message:send", { channelId: "mod", content: "back?" });
    check("kicked user is out", r.success === false && r.error.code === "forbidden", r);
    r = await t.emitWithAck("moderation:ban_user", { userId: "mona" });
    check("moderation needs the role", r.success === false && r.error.code === "forbidden", r);
  }],

  ["native and Socket.IO clients in one channel see one order", async () => {
    // Members of each kind on both shards (a connection's shard is in
    // its `ready`).
    const natives = [];
    const sios = [];
    for (let i = 0; i < 40 && new Set(natives.map((n) => n.ready.shard)).size < 2; i++) {
      natives.push(await Native.open(node.addr, token(`nat${i}`)));
    }
    for (let i = 0; i < 40 && new Set(sios.map((s) => s.ready.shard)).size < 2; i++) {
      sios.push(await user(`sio${i}`));
    }
    check("natives on both shards", new Set(natives.map((n) => n.ready.shard)).size === 2, {});
    check("Socket.IO clients on both shards", new Set(sios.map((s) => s.ready.shard)).size === 2, {});
    for (const s of sios) await s.emitWithAck("channel:join", { channelId: "mixed" });
    for (const n of natives) await n.call("channel:join", { channelId: "mixed" });
    const seen = [...natives, ...sios].map((c) => collect(c, "message:new"));
    const senders = [natives[0], sios[0], natives.at(-1), sios.at(-1)];
    for (let i = 0; i < 40; i++) {
      const s = senders[i % senders.length];
      const d = { channelId: "mixed", content: `m${i}` };
      if (s instanceof Native) s.ws.send(JSON.stringify({ t: "message:send", d }));
      else s.emit("message:send", d);
    }
    await until("every member got 40 messages", () => seen.every((l) => l.length >= 40), 10000);
    const order = seen[0].map((m) => m.offset);
    check("one order everywhere", seen.every((l) => JSON.stringify(l.map((m) => m.offset)) === JSON.stringify(order)), {});
    check("offsets increase", order.every((o, i) => i === 0 || o > order[i - 1]), order);
    check("no duplicates", seen.every((l) => l.length === 40), seen.map((l) => l.length));
    natives.forEach((n) => n.close());
  }],

  ["connection state recovery: socket.recovered, and exactly what was missed", async () => {
    const a = await user("rex");
    const b = await user("ray", { reconnection: true, reconnectionDelay: 50, reconnectionDelayMax: 100 });
    for (const s of [a, b]) {
      for (const c of ["rec-a", "rec-b"]) await s.emitWithAck("channel:join", { channelId: c });
    }
    const seen = [];
    b.on("message:new", (m, offset) => seen.push({ m, offset }));
    const send = async (channelId, content) => {
      const ack = await a.emitWithAck("message:send", { channelId, content });
      if (!ack.success) check(`send ${content}`, false, ack);
      return ack;
    };
    await send("rec-a", "a1");
    await send("rec-b", "b1");
    await send("rec-a", "a2");
    await send("rec-b", "b2");
    await until("four messages", () => seen.length === 4);
    check("each carries its recovery offset", seen.every(({ m, offset }) =>
      offset === `${m.offset}:${m.messageId.split("-")[0]}:${m.channelId}`), seen);
    check("the CONNECT answer gave a pid", typeof b._pid === "string" && b._pid === b.id, { pid: b._pid, id: b.id });
    // The client lost a2 and b2 with its transport: it last received b1.
    b._lastOffset = seen[1].offset;
    seen.length = 0;
    const oldId = b.id;
    const reconnected = next(b, "connect", 10000);
    b.io.engine.close();
    await until("the drop is seen", () => !b.connected);
    await send("rec-a", "a3");
    await send("rec-b", "b3");
    await reconnected;
    check("recovered", b.recovered === true && b.id === oldId, { recovered: b.recovered, oldId, id: b.id });
    await until("the missed messages", () => seen.length >= 4);
    await sleep(100);
    const of = (c) => JSON.stringify(seen.filter(({ m }) => m.channelId === c).map(({ m }) => m.content));
    check("rec-a: what was missed, in order, once", of("rec-a") === '["a2","a3"]', of("rec-a"));
    check("rec-b: what was missed, in order, once", of("rec-b") === '["b2","b3"]', of("rec-b"));
    // Still a member of both, without joining again.
    const back = next(a, "message:new");
    const r = await b.emitWithAck("message:send", { channelId: "rec-b", content: "back" });
    check("sends as a member", r.success === true, r);
    check("and is heard", (await back).content === "back", {});
    check("counted", (await metric("corecast_socketio_recovered_total")) >= 1, {});
  }],

  ["a reconnection that cannot be recovered starts a new session", async () => {
    const a = await user("rob");
    const b = await user("rae", { reconnection: true, reconnectionDelay: 50, reconnectionDelayMax: 100 });
    for (const s of [a, b]) await s.emitWithAck("channel:join", { channelId: "norec" });
    const got = next(b, "message:new");
    await a.emitWithAck("message:send", { channelId: "norec", content: "x" });
    await got;
    // An offset that was never sent to it.
    b._lastOffset = "999:0000000000000000:norec";
    const oldId = b.id;
    const reconnected = next(b, "connect", 10000);
    b.io.engine.close();
    await reconnected;
    check("not recovered", b.recovered === false && b.id !== oldId && b._pid === b.id, { recovered: b.recovered });
    const r = await b.emitWithAck("message:send", { channelId: "norec", content: "y" });
    check("in no channel", r.success === false, r);
    check("counted", (await metric("corecast_socketio_not_recovered_total")) >= 1, {});
  }],

  ["recovery through session:resume (without connection state recovery)", async () => {
    const a = await user("rex2");
    const b = await user("ray2", { reconnection: true, reconnectionDelay: 50, reconnectionDelayMax: 100 });
    await a.emitWithAck("channel:join", { channelId: "rec" });
    const joined = await b.emitWithAck("channel:join", { channelId: "rec" });
    const seen = collect(b, "message:new");
    await a.emitWithAck("message:send", { channelId: "rec", content: "before" });
    await until("the first message", () => seen.length === 1);
    const last = seen[0].offset;
    const oldId = b.id;
    // As a client that does not keep the pid: a plain CONNECT.
    b._pid = undefined;
    const reconnected = next(b, "connect", 10000);
    // The transport drops; socket.io-client reconnects by itself.
    b.io.engine.close();
    await until("the drop is seen", () => !b.connected);
    for (const c of ["missed 1", "missed 2", "missed 3"]) {
      const ack = await a.emitWithAck("message:send", { channelId: "rec", content: c });
      if (!ack.success) check(`send ${c}`, false, ack);
    }
    await reconnected;
    check("a new connection", b.connected && b.id !== oldId && !b.recovered, { oldId, id: b.id });
    const r = await b.emitWithAck("session:resume", {
      sessionId: oldId,
      positions: [{ channelId: "rec", offset: last, epoch: joined.epoch }],
    });
    check("resumed", r.success === true && r.channels[0]?.channelId === "rec" && r.channels[0].recovered === true, r);
    await until("the missed messages", () => seen.length >= 4);
    await sleep(100);
    check("what was missed, in order, once", JSON.stringify(seen.map((m) => m.content)) ===
      JSON.stringify(["before", "missed 1", "missed 2", "missed 3"]), seen.map((m) => m.content));
    const after = next(b, "message:new");
    await a.emitWithAck("message:send", { channelId: "rec", content: "after" });
    check("and the channel goes on", (await after).content === "after", {});
  }],

  ["the application's own events pass through a channel", async () => {
    const a = await user("gus");
    const b = await user("gil");
    for (const s of [a, b]) await s.emitWithAck("channel:join", { channelId: "table" });
    const got = next(b, "game:move");
    const r = await a.emitWithAck("game:move", { channelId: "table", data: { from: "e2", to: "e4" } });
    check("acked", r.success === true, r);
    const m = await got;
    check("heard as sent", m.userId === "gus" && m.channelId === "table" && m.data.to === "e4", m);
    const no = await a.emitWithAck("chess:move", { channelId: "table", data: {} });
    check("a name not allowed is unsupported", no.success === false && no.error.code === "unsupported", no);
    const over = next(b, "game:over");
    const e = await api("/api/emit", { event: "game:over", channelId: "table", data: { winner: "gil" } });
    check("emitted by the server API", e.status === 200 && (await over).data.winner === "gil", e);
  }],

  ["an expiring token: auth:expiring, auth:refresh, and the reconnection that follows an expiry", async () => {
    const a = await user("tim", {}, ["--ttl", "3"]);
    const warned = await next(a, "auth:expiring", 5000);
    check("auth:expiring ahead of the expiry", warned.expiresAt > Date.now(), warned);
    const r = await a.emitWithAck("auth:refresh", { token: token("tim", ["--ttl", "60"]) });
    check("auth:refresh in the ack", r.success === true && r.expiresAt > warned.expiresAt, r);
    const bad = await a.emitWithAck("auth:refresh", { token: token("tom", ["--ttl", "60"]) });
    check("another user's token refused", bad.success === false && bad.error.code === "forbidden", bad);

    // No refresh: the transport closes at the expiry (4002), and
    // socket.io-client reconnects by itself with a fresh token (the `auth`
    // callback) and recovers its session.
    let tokens = 0;
    const b = await user("tess", {
      reconnection: true, reconnectionDelay: 50, reconnectionDelayMax: 100,
      auth: (cb) => cb({ token: token("tess", ["--ttl", tokens++ === 0 ? "3" : "60"]) }),
    });
    await b.emitWithAck("channel:join", { channelId: "expiry" });
    const oldId = b.id;
    const reasons = collect(b, "disconnect");
    const back = next(b, "connect", 10000);
    await back;
    check("a transport close, not the server's DISCONNECT", reasons.length === 1 && reasons[0] !== "io server disconnect", reasons);
    check("reconnected with a fresh token, session recovered", b.recovered === true && b.id === oldId && tokens === 2,
      { recovered: b.recovered, tokens });
    const sent = await b.emitWithAck("message:send", { channelId: "expiry", content: "still here" });
    check("still in its channel", sent.success === true, sent);
    check("counted", (await metric("corecast_token_expiries_total")) >= 1, {});
  }],

  ["a kicked user is told, and does not reconnect by itself", async () => {
    const k = await user("kim", { reconnection: true, reconnectionDelay: 50, reconnectionDelayMax: 100 });
    const gone = next(k, "disconnect");
    const kicked = next(k, "moderation:kicked");
    const r = await api("/api/kick", { userId: "kim", reason: "spam" });
    check("kick accepted", r.status === 200, r);
    check("moderation:kicked", (await kicked).reason === "spam", {});
    const reason = await gone;
    check("io server disconnect", reason === "io server disconnect", reason);
    await sleep(300);
    check("no reconnection", !k.connected, {});
  }],

  ["the heartbeat keeps a quiet client connected", async () => {
    const h = await user("harry");
    const reasons = collect(h, "disconnect");
    // Five ping intervals: socket.io-client drops a server that does not
    // ping within interval + timeout.
    await sleep(1600);
    check("still connected", h.connected && reasons.length === 0, reasons);
    const r = await h.emitWithAck("heartbeat");
    check("and answering", r.success === true, r);
  }],

];

const rounds = [];
for (const [name, opts] of Object.entries(transports)) {
  rounds.push([`[${name}] start a node`, async () => {
    ws = opts;
    node?.child.kill("SIGKILL");
    node = await startNode(nodeArgs);
  }]);
  for (const [what, fn] of eventTests) rounds.push([`[${name}] ${what}`, fn]);
  if (name === "msgpack") {
    rounds.push([`[${name}] JSON and MessagePack clients in one channel`, async () => {
      const m = await user("mia");
      const j = await connect(node.url, { auth: { token: token("jay") } });
      await m.emitWithAck("channel:join", { channelId: "both" });
      await j.emitWithAck("channel:join", { channelId: "both" });
      const gotM = collect(m, "message:new");
      const gotJ = collect(j, "message:new");
      for (let i = 0; i < 10; i++) {
        const ack = await (i % 2 ? j : m).emitWithAck("message:send", { channelId: "both", content: `p${i}` });
        if (!ack.success) check(`send ${i}`, false, ack);
      }
      await until("both got 10", () => gotM.length >= 10 && gotJ.length >= 10);
      const order = (l) => JSON.stringify(l.map((x) => [x.messageId, x.offset, x.content]));
      check("one order for both parsers", order(gotM) === order(gotJ), { gotM, gotJ });
      const raw = await fetch(`${node.url}/metrics`);
      check("metrics still served", raw.status === 200, {});
      j.close();
    }]);
  }
  rounds.push([`[${name}] the transport in use`, async () => {
    const s = await user("tara");
    await sleep(300);
    const used = s.io.engine.transport.name;
    const want = name === "polling" ? "polling" : "websocket";
    check(`${name} ends on ${want}`, used === want, used);
    if (name !== "websocket") {
      // Requests land on either shard: those for the other shard's
      // sessions were handed over, and were served all the same.
      check("requests handed between shards", (await metric("corecast_socketio_handovers_total")) > 0, {});
    }
  }]);
  rounds.push([`[${name}] every connection counted out`, async () => {
    for (const s of sockets.splice(0)) s.close();
    await until("no connection left", async () => (await metric("corecast_connections")) === 0, 5000)
      .catch(async () => check("connections back to 0", false, await metric("corecast_connections")));
  }]);
}

await run([
  ...rounds,
  ["Engine.IO and Socket.IO framing, seen raw", async () => {
    const raw = async (tok) => {
      const sock = new WebSocket(`ws://${node.addr}/socket.io/?EIO=4&transport=websocket`);
      const texts = [];
      const closed = new Promise((r) => sock.on("close", (code, reason) => r({ code, reason: reason.toString() })));
      sock.on("message", (d, binary) => texts.push(binary ? "<binary>" : d.toString()));
      await new Promise((r, j) => { sock.once("open", r); sock.once("error", j); });
      await until("the open packet", () => texts.length >= 1);
      if (tok) {
        sock.send(`40${JSON.stringify({ token: tok })}`);
        await until("the CONNECT answer and ready", () => texts.length >= 3);
      }
      return { sock, texts, closed };
    };
    let c = await raw();
    const open = JSON.parse(c.texts[0].slice(1));
    check("open packet", c.texts[0][0] === "0" && typeof open.sid === "string" && open.pingInterval === 300 &&
      open.pingTimeout === 400 && open.maxPayload === 1048576 && Array.isArray(open.upgrades), open);
    c.sock.send("40/admin,");
    await until("the namespace refusal", () => c.texts.length >= 2);
    check("other namespaces refused", c.texts[1] === '44/admin,{"message":"Invalid namespace"}', c.texts);
    c.sock.close();

    c = await raw(token("rita"));
    check("CONNECT answered with the sid (the pid too), then ready",
      /^40\{"pid":"([0-9a-f]{32})","sid":"\1"\}$/.test(c.texts[1]) && c.texts[2].startsWith('42["ready",'), c.texts);
    // Pings every 300 ms; this client never answers: closed by
    // interval + timeout.
    const t = await c.closed;
    check("pings sent", c.texts.filter((x) => x === "2").length >= 1, c.texts);
    check("no pong closes the connection", t.code === 1008 && t.reason === "ping timeout", t);

    c = await raw(token("rita"));
    c.sock.send('451-5["message:send",{"_placeholder":true,"num":0}]');
    c.sock.send(Buffer.from([1, 2, 3]));
    await until("the refusal", () => c.texts.some((x) => x.startsWith("435[")));
    const refusal = JSON.parse(c.texts.find((x) => x.startsWith("435[")).slice(3))[0];
    check("binary attachments refused in the ack", refusal.success === false && refusal.error.code === "bad_request", refusal);
    c.sock.send("3");
    c.sock.send("2probe");
    await until("the answer to a client ping", () => c.texts.includes("3probe"));
    c.sock.send("42{not an array}");
    const bad = await c.closed;
    check("an invalid packet closes the connection", bad.code === 1008 && bad.reason.includes("invalid payload"), bad);

    c = await raw(token("rita"));
    c.sock.send("41");
    check("DISCONNECT ends it", (await c.closed).code === 1000, {});

    const refused = await fetch(`${node.url}/socket.io/?EIO=3&transport=websocket`);
    const body = await refused.json();
    check("Engine.IO 3 refused", refused.status === 400 && body.code === 5, body);
  }],

  ["rpc and the publish hook, answered by the application backend", async () => {
    const backend = await startBackend();
    const n = await startNode([
      "--hooks-rpc-url", `${backend}/corecast/rpc`, "--hooks-publish-url", `${backend}/corecast/publish`,
      "--hooks-publish-channels", "moderated", "--hooks-secret", hookSecret,
    ]);
    const s = await connect(n.url, { ...ws, auth: { token: token("rita") } });
    sockets.push(s);
    const sum = await s.emitWithAck("rpc", { method: "add", data: [40, 2] });
    check("rpc answered in the ack", sum.success === true && sum.data === 42, sum);
    const missing = await s.emitWithAck("rpc", { method: "nope" });
    check("the backend's error", missing.success === false && missing.error.code === "not_found", missing);
    await s.emitWithAck("channel:join", { channelId: "moderated" });
    const seen = next(s, "message:new");
    const loud = await s.emitWithAck("message:send", { channelId: "moderated", content: "/shout hi" });
    check("allowed and rewritten", loud.success === true && (await seen).content === "HI", loud);
    const linked = next(s, "message:new");
    await s.emitWithAck("message:send", { channelId: "moderated", content: "see https://example.com/a" });
    const withMeta = await linked;
    check("the backend's metadata attached", withMeta.meta?.links?.[0] === "https://example.com/a", withMeta);
    const spam = await s.emitWithAck("message:send", { channelId: "moderated", content: "spam spam" });
    check("rejected with the backend's reason", spam.success === false && spam.error.code === "forbidden" &&
      spam.error.message === "that word is not allowed here", spam);
  }],

  ["the connect hook decides who connects and what they join", async () => {
    const backend = await startBackend();
    const hook = ["--hooks-connect-url", `${backend}/corecast/connect`, "--hooks-secret", hookSecret];
    const n = await startNode(hook);
    // Listening before the CONNECT is answered: the joins follow it at once.
    const s = io(n.url, { forceNew: true, reconnection: false, ...ws, auth: { token: token("mod-max") } });
    sockets.push(s);
    const joined = collect(s, "channel:joined");
    await next(s, "connect", 10000);
    await until("both channels joined", async () => joined.length >= 2);
    const names = joined.map((j) => j.channelId).sort();
    check("joined as it opened", names.join() === "inbox-mod-max,lobby", names);
    const sent = await s.emitWithAck("message:send", { channelId: "lobby", content: "hi" });
    check("a member of what it joined", sent.success === true, sent);
    // A slow answer (1.5 s): the default transports upgrade to WebSocket
    // meanwhile, and the answer follows the session there.
    const slow = await connect(n.url, { auth: { token: token("slow-sue") } });
    sockets.push(slow);
    check("answered after the upgrade", slow.ready?.userId === "slow-sue" &&
      slow.io.engine.transport.name === "websocket", { ready: slow.ready, transport: slow.io.engine.transport.name });
    let err = await connect(n.url, { ...ws, auth: { token: token("suspended-sal") } }).catch((e) => e);
    check("refused by the backend", err instanceof Error && err.message === "account suspended" &&
      err.data?.code === "forbidden", { message: err?.message, data: err?.data });
    err = await connect(n.url, { ...ws, auth: { token: token("fail-fay") } }).catch((e) => e);
    check("the backend failing", err instanceof Error && err.data?.code === "unavailable",
      { message: err?.message, data: err?.data });
    // The backend reads the application's own session tokens.
    const b = await startNode([...hook, "--hooks-connect-auth", "backend"]);
    const z = await connect(b.url, { ...ws, auth: { token: "sess-zed" } });
    sockets.push(z);
    check("named by the backend", z.ready?.userId === "zed", z.ready);
    err = await connect(b.url, { ...ws, auth: { token: token("zed") } }).catch((e) => e);
    check("a JWT means nothing to it", err instanceof Error && err.message === "unknown session", { message: err?.message });
    n.child.kill("SIGKILL");
    b.child.kill("SIGKILL");
  }],

  ["long-polling: refusals and bounds", async () => {
    const n = await startNode(["--auth-timeout-ms", "300", "--max-message-size", "100000"]);
    const base = `${n.url}/socket.io/?EIO=4&transport=polling`;
    const open = async () => JSON.parse((await (await fetch(base)).text()).slice(1)).sid;
    const sid = await open();
    check("a sid names its shard", /^000[01][0-9a-f]{24}$/.test(sid), sid);
    let r = await fetch(`${base}&sid=ffff${sid.slice(4)}`);
    check("a sid of no shard", r.status === 400 && (await r.json()).code === 1, {});
    r = await fetch(`${base}&sid=${sid.slice(0, 12)}0000000000000000`);
    check("a sid of no session", r.status === 400 && (await r.json()).code === 1, {});
    r = await fetch(`${base}&sid=${sid}`, { method: "POST", body: "4" + "x".repeat(300000) });
    check("a body past the bound is refused", r.status === 413, r.status);
    r = await fetch(`${base}&sid=${sid}`, { method: "PUT", body: "3" });
    check("a method other than GET and POST", r.status === 400 && (await r.json()).code === 2, {});
    // No CONNECT within auth_timeout_ms: the session is told, then closed.
    const told = await (await fetch(`${base}&sid=${sid}`)).text();
    check("CONNECT_ERROR, then the close", told.startsWith('44{"data":{"code":"unauthorized"}') , told);
    await until("the session is gone", async () => (await fetch(`${base}&sid=${sid}`)).status === 400);
    // Two GETs at once: the client is broken, the session ends.
    const s2 = await open();
    const [first, second] = await Promise.all([
      fetch(`${base}&sid=${s2}`),
      sleep(50).then(() => fetch(`${base}&sid=${s2}&t=2`)),
    ]);
    check("the first GET gets the close", first.status === 200 && (await first.text()) === "1", {});
    check("the second is refused", second.status === 400, second.status);
    r = await fetch(`${base}&sid=${s2}`);
    check("and the session is gone", r.status === 400, r.status);
    n.child.kill("SIGKILL");
  }],

  ["a two-node cluster (default transports)", async () => {
    const redis = await startRedis();
    const clusterArgs = ["--redis", redis, "--node-timeout-ms", "3000", "--custom-events", "game:*"];
    const a = await startNode(clusterArgs);
    const b = await startNode(clusterArgs);
    const pa = await connect(a.url, { auth: { token: token("pia") } });
    const pb = await connect(b.url, { auth: { token: token("pat") } });
    await pa.emitWithAck("channel:join", { channelId: "global" });
    const joined = next(pa, "channel:member_joined");
    const r = await pb.emitWithAck("channel:join", { channelId: "global" });
    check("join on node b", r.success === true, r);
    check("member_joined across nodes", (await joined).userId === "pat", {});
    const gotA = collect(pa, "message:new");
    const gotB = collect(pb, "message:new");
    for (let i = 0; i < 10; i++) {
      const s = i % 2 ? pb : pa;
      const ack = await s.emitWithAck("message:send", { channelId: "global", content: `c${i}` });
      if (!ack.success) check(`send ${i}`, false, ack);
    }
    await until("both nodes' clients got 10", () => gotA.length >= 10 && gotB.length >= 10, 10000);
    check("one order on both nodes", JSON.stringify(gotA.map((m) => m.content)) === JSON.stringify(gotB.map((m) => m.content)),
      { a: gotA.map((m) => m.content), b: gotB.map((m) => m.content) });
    const move = next(pb, "game:move");
    const moved = await pa.emitWithAck("game:move", { channelId: "global", data: { n: 1 } });
    check("the application's event across nodes", moved.success === true && (await move).userId === "pia", moved);
    const dm = next(pb, "dm:new");
    const ack = await pa.emitWithAck("dm:send", { toUserId: "pat", content: "across" });
    check("dm across nodes", ack.success === true && (await dm).content === "across", ack);

    // Connection state recovery across nodes: pat drops on node b, having
    // last received c9, and reconnects through node a.
    const seen = [];
    pb.on("message:new", (m) => seen.push(m.content));
    const oldId = pb.id;
    pb.io.reconnection(true);
    pb.io.reconnectionDelay(50);
    const reconnected = next(pb, "connect", 10000);
    pb.io.uri = a.url;
    pb.io.engine.close();
    await until("the drop is seen", () => !pb.connected);
    for (const c of ["m1", "m2"]) {
      const ack = await pa.emitWithAck("message:send", { channelId: "global", content: c });
      if (!ack.success) check(`send ${c}`, false, ack);
    }
    await reconnected;
    check("recovered on the other node", pb.recovered === true && pb.id === oldId, { recovered: pb.recovered });
    await until("the missed messages", () => seen.length >= 2, 10000);
    await sleep(100);
    check("what was missed, once", JSON.stringify(seen) === '["m1","m2"]', seen);
    const text = await (await fetch(`${a.url}/metrics`)).text();
    check("recovered by node a", /^corecast_socketio_recovered_total(\{[^}]*\})? [1-9]/m.test(text),
      text.split("\n").filter((l) => l.includes("recovered")));
    pa.close();
    pb.close();
  }],
]);

