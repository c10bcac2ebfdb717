// The Socket.IO servers corecast is measured against, with corecast's
// event names so that `corecast bench --protocol socketio` drives both:
//
//   node server.js --port 3000 [--redis redis://127.0.0.1:6379] [--mode plain|seed] [--secret S]
//
// plain: join a room with an ack, `message:send` broadcast as `message:new`
//        to the room (the sender included). With --redis, the official
//        @socket.io/redis-adapter carries rooms across processes.
// seed:  what the chat backends our users run do on top (see the seeds):
//        the JWT in the handshake's auth is verified, the user's presence is
//        kept in Redis while connected, a join is told to the room
//        (`channel:member_joined`) and acked with the room's size.
'use strict';
const http = require('http');
const { Server } = require('socket.io');

function arg(name, dflt) {
  const i = process.argv.indexOf('--' + name);
  return i > 0 ? process.argv[i + 1] : dflt;
}

async function main() {
  const port = Number(arg('port', '3000'));
  const redisUrl = arg('redis', '');
  const mode = arg('mode', 'plain');
  const secret = arg('secret', process.env.CORECAST_AUTH_SECRET || 'corecast-development-secret-do-not-use-in-production');
  if (mode !== 'plain' && mode !== 'seed') throw new Error(`--mode must be plain or seed, not ${mode}`);
  const server = http.createServer();
  const io = new Server(server, { transports: ['websocket'], serveClient: false });
  let store = null;
  if (redisUrl) {
    const { createClient } = require('redis');
    const { createAdapter } = require('@socket.io/redis-adapter');
    const pub = createClient({ url: redisUrl });
    const sub = pub.duplicate();
    await Promise.all([pub.connect(), sub.connect()]);
    io.adapter(createAdapter(pub, sub));
    store = pub;
  }
  if (mode === 'seed') {
    const jwt = require('jsonwebtoken');
    io.use((socket, next) => {
      try {
        const claims = jwt.verify(socket.handshake.auth.token || '', secret, { algorithms: ['HS256'] });
        socket.data.user = claims.sub;
        next();
      } catch (e) {
        next(new Error('unauthorized: ' + e.message));
      }
    });
  }
  io.on('connection', (socket) => {
    const user = socket.data.user || socket.id;
    if (mode === 'seed' && store) {
      store.hSet('presence:' + user, socket.id, String(Date.now())).catch(() => {});
      socket.on('disconnect', () => store.hDel('presence:' + user, socket.id).catch(() => {}));
    }
    socket.on('channel:join', async (d, ack) => {
      const room = d && d.channelId;
      if (typeof room !== 'string') return ack && ack({ error: 'channelId' });
      socket.join(room);
      if (mode === 'seed') {
        socket.to(room).emit('channel:member_joined', { channelId: room, userId: user });
        const members = (await io.in(room).allSockets()).size;
        return ack && ack({ channelId: room, members });
      }
      ack && ack({ channelId: room });
    });
    socket.on('message:send', (d, ack) => {
      const room = d && d.channelId;
      if (typeof room !== 'string') return ack && ack({ error: 'channelId' });
      const m = { channelId: room, userId: user, content: d.content, timestamp: Date.now() };
      io.to(room).emit('message:new', m);
      ack && ack({ ok: true });
    });
  });
  server.listen(port, '127.0.0.1', () => console.error(`socket.io (${mode}${redisUrl ? ', redis adapter' : ''}) listening on 127.0.0.1:${port}`));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
