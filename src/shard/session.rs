//! The WebSocket phase of one connection, as its read side sees it:
//! authentication, the messages it sends, and its bounds; shared by both IO
//! drivers, and tested without a socket through [`super::fuzz_session`].

use std::rc::Rc;

use bytes::BytesMut;

use crate::access::Identity;
use crate::admission::Slots;
use crate::clock::now_ms;
use crate::clock::random_u64;
use crate::engine::{ConnId, Member, Recovery, SessionId};
use crate::protocol::msgpack;
use crate::protocol::socketio::{self, EnginePacket, PacketKind};
use crate::protocol::{
    self, binary, json, AckBody, ClientEvent, DecodeError, DeviceKind, Empty, ErrorCode, Protocol,
    Ready, ServerEvent, ServerMessage,
};
use crate::ws::handshake::Upgrade;
use crate::ws::{close, frame, Message, OpCode};

use super::conformance::{self, Conformance};
use super::conn::{ConnIo, State, NEVER};
use super::connect_hook::{Hook, PendingConnect, Via};
use super::*;

/// An upgrade the shard accepted (its 101 response not yet written).
pub(super) struct Accepted {
    /// A later refusal (by the per-user cap) takes the WebSocket form.
    pub(super) websocket_refusals: bool,
    pub(super) up: Upgrade,
    pub(super) echo: bool,
    /// The long-polling session (its sid) this WebSocket upgrades.
    pub(super) upgrade_of: Option<String>,
    /// `--socketio-conformance`: Socket.IO (true) or Engine.IO (false)
    /// as the official suites expect.
    pub(super) conformance: Option<bool>,
    pub(super) user: Option<Identity>,
    pub(super) device: DeviceKind,
    pub(super) response: Vec<u8>,
    pub(super) ip: Slots,
}

pub(super) enum Mode {
    Echo,
    Unauthenticated,
    /// A Socket.IO connection waiting for its CONNECT packet, with the
    /// user its upgrade's token named, if it carried one.
    Connecting(Option<Box<Identity>>),
    /// `--socketio-conformance` (see `conformance.rs`).
    Conformance(Box<Conformance>),
    /// A WebSocket probing the upgrade of the long-polling session `sid`:
    /// on the client's upgrade packet (`5`) it takes that session over.
    // A thin pointer: `Box<str>` would make every session 8 bytes larger.
    #[allow(clippy::box_collection)]
    Probing(Box<String>),
    Authenticated(ConnId),
    /// Waiting for the connect hook's answer (see `connect_hook.rs`).
    Hooked(Rc<PendingConnect>),
    /// The connection has left the engine.
    Ended,
}

/// What the read loop does after a message.
pub(super) enum Next {
    Continue,
    /// The closing handshake is over (or the connection failed): tear down.
    Finish,
}

/// The WebSocket phase of one connection, as the read side sees it. The
/// shard and the connection's outbound side are passed in by the caller
/// (the io_uring loop or the epoll task), which already holds them.
pub(super) struct Session {
    pub(super) protocol: Protocol,
    pub(super) device: DeviceKind,
    pub(super) mode: Mode,
    /// Messages other than a valid `auth` sent before authenticating.
    pub(super) preauth_strikes: u8,
    /// Binary frames still due as attachments of a Socket.IO packet.
    pub(super) attachments: u8,
    /// The client address's counters (given back at the end).
    pub(super) ip: Slots,
}

impl Session {
    /// Whether the connection waits for its `auth` message.
    pub(super) fn preauth(&self) -> bool {
        match &self.mode {
            Mode::Unauthenticated
            | Mode::Connecting(_)
            | Mode::Conformance(_)
            | Mode::Probing(_) => true,
            // Opened by the answer, though the session has not looked yet.
            Mode::Hooked(p) => !matches!(p.state.get(), Hook::Opened(_)),
            Mode::Echo | Mode::Authenticated(_) | Mode::Ended => false,
        }
    }

    /// What a connection waiting for the connect hook may hold, together.
    fn max_held(&self, shard: &Shard) -> usize {
        shard.node.config.max_unauthenticated_message_size
    }

    /// The largest message the connection may send now: small until it
    /// has authenticated.
    pub(super) fn max_message(&self, c: &crate::config::Config) -> usize {
        if self.preauth() {
            c.max_unauthenticated_message_size.min(c.max_message_size)
        } else {
            c.max_message_size
        }
    }

    /// Starts the WebSocket phase of an accepted upgrade (either IO
    /// driver): the 101 goes first through the connection's queue (it may be
    /// held: see `Session::new`), and the connection is counted.
    pub(super) fn start(shard: &Shard, io: &Rc<ConnIo>, a: Accepted) -> Session {
        let Accepted {
            websocket_refusals,
            conformance,
            upgrade_of,
            up,
            echo,
            user,
            device,
            response,
            ip,
        } = a;
        io.push_control(bytes::Bytes::from(response));
        if websocket_refusals {
            io.refuse_in_websocket();
        }
        let m = shard.metrics();
        m.connections.inc();
        m.connections_total.inc();
        if up.protocol == Protocol::SocketIo {
            if let Some(sid) = upgrade_of {
                // The probe of a long-polling session's upgrade.
                io.set_engine_io();
                return Session {
                    mode: Mode::Probing(Box::new(sid)),
                    ..Session::blank(Protocol::SocketIo, device, ip)
                };
            }
            let sid = format!("{:016x}", random_u64());
            return Session::socketio(shard, io, device, user, ip, &sid, false, conformance);
        }
        Session::new(shard, io, up.protocol, device, echo, user, ip)
    }

    fn blank(protocol: Protocol, device: DeviceKind, ip: Slots) -> Session {
        Session {
            protocol,
            device,
            mode: Mode::Unauthenticated,
            preauth_strikes: 0,
            attachments: 0,
            ip,
        }
    }

    /// An Engine.IO session (WebSocket, or long-polling through `io`, a
    /// socketless queue): its open packet goes first, then the client's
    /// CONNECT packet authenticates it (with the upgrade's token when its
    /// payload has none).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn socketio(
        shard: &Shard,
        io: &Rc<ConnIo>,
        device: DeviceKind,
        user: Option<Identity>,
        ip: Slots,
        sid: &str,
        polling: bool,
        conformance: Option<bool>,
    ) -> Session {
        let c = &shard.node.config;
        io.set_engine_io();
        io.push_control(socketio::open_frame(
            sid,
            polling,
            c.ping_interval_ms,
            c.ping_timeout_ms,
            c.max_message_size,
        ));
        io.auth_deadline
            .set(shard.outq.now_ms() + c.auth_timeout_ms);
        let mode = match conformance {
            Some(socketio) => {
                io.auth_deadline.set(NEVER);
                Mode::Conformance(Box::new(Conformance::new(socketio)))
            }
            None => Mode::Connecting(user.map(Box::new)),
        };
        Session {
            mode,
            ..Session::blank(Protocol::SocketIo, device, ip)
        }
    }

    /// The WebSocket phase of an accepted upgrade: a session that is either
    /// authenticated by the handshake's token, waiting for `auth` (with a
    /// deadline), or an echo.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        shard: &Shard,
        io: &Rc<ConnIo>,
        protocol: Protocol,
        device: DeviceKind,
        echo: bool,
        user: Option<Identity>,
        ip: Slots,
    ) -> Session {
        let mut s = Session::blank(protocol, device, ip);
        if echo {
            s.mode = Mode::Echo;
        }
        match user {
            Some(u) => {
                // The 101 waits for the user's home shard to count the
                // connection: over the per-user cap it becomes a 429.
                if shard.node.config.max_connections_per_user > 0 {
                    io.hold();
                }
                s.authenticate(shard, io, u, None, None, Via::Upgrade)
            }
            None if !echo => io
                .auth_deadline
                .set(shard.outq.now_ms() + shard.node.config.auth_timeout_ms),
            None => {}
        }
        s
    }

    /// Takes the connection out of the engine (its channels, its user). A
    /// connection that never authenticated stays counted as such until its
    /// buffers are freed.
    pub(super) fn end(&mut self, shard: &Shard) {
        shard
            .node
            .admission
            .release_ip(std::mem::take(&mut self.ip));
        if let Mode::Probing(sid) = &self.mode {
            shard.polls.borrow_mut().probing(sid, false);
            self.mode = Mode::Ended;
        }
        self.settle_hook();
        if let Mode::Hooked(p) = &self.mode {
            // Still waiting: the answer will find it gone.
            p.state.set(Hook::Gone);
            self.mode = Mode::Ended;
        }
        if let Mode::Authenticated(id) = self.mode {
            let mut outbox = shard.outbox.borrow_mut();
            shard.engine.borrow_mut().close(id, now_ms(), &mut *outbox);
            outbox.flush();
            self.mode = Mode::Ended;
        }
    }

    pub(super) fn reply(&self, io: &ConnIo, msg: &ServerMessage) {
        io.push_data(&protocol::encode_frame(self.protocol, msg));
    }

    /// The connection is `identity`: it opens in the engine, or, with a
    /// connect hook, waits for the application backend (`via` says how a
    /// refusal reaches it).
    pub(super) fn authenticate(
        &mut self,
        shard: &Shard,
        io: &Rc<ConnIo>,
        identity: Identity,
        ack: Option<u64>,
        recover: Option<(SessionId, Option<String>)>,
        via: Via,
    ) {
        if !shard.node.config.hooks.connect_url.is_empty() {
            return self.ask_connect(shard, io, identity, ack, recover, via);
        }
        let id = open_connection(
            shard,
            io,
            self.protocol,
            self.device,
            identity,
            ack,
            recover,
        );
        self.mode = Mode::Authenticated(id);
    }

    pub(super) fn on_data(
        &mut self,
        shard: &Shard,
        io: &Rc<ConnIo>,
        text: bool,
        mut payload: BytesMut,
    ) {
        if io.state() != State::Open {
            return;
        }
        if let Mode::Echo = self.mode {
            let op = if text { OpCode::Text } else { OpCode::Binary };
            io.push_data(&frame::encode(op, &payload));
            return;
        }
        self.settle_hook();
        if matches!(
            self.protocol,
            Protocol::SocketIo | Protocol::SocketIoMsgpack
        ) {
            return self.on_engine_io(shard, io, text, payload);
        }
        if let Mode::Authenticated(id) = self.mode {
            return self.on_event(shard, id, text, payload);
        }
        if let Mode::Hooked(p) = &self.mode {
            // For the engine once the backend opened the connection.
            if !p.hold(text, payload, self.max_held(shard)) {
                io.close(close::POLICY_VIOLATION, HELD_TOO_MANY);
            }
            return;
        }
        let decoded = match (self.protocol, text) {
            (Protocol::Json, true) => {
                json::decode_client(&mut payload, &mut shard.scratch.borrow_mut())
            }
            (Protocol::Binary, false) => binary::decode_client(&payload),
            (p, _) => Err(DecodeError::wrong_frame(p)),
        };
        let msg = match decoded {
            Ok(m) => m,
            Err(e) => {
                self.reply(io, &ServerMessage::error(e.id, e.code, e.message));
                return self.preauth_strike(shard, io);
            }
        };
        match self.mode {
            Mode::Unauthenticated => match msg.event {
                ClientEvent::Auth(a) => match verify(shard, &a.token) {
                    Ok(identity) => self.authenticate(shard, io, identity, msg.id, None, Via::Auth),
                    Err((code, why)) => {
                        self.reply(io, &ServerMessage::error(msg.id, code, why));
                        if code == ErrorCode::Forbidden {
                            io.close(close::BANNED, "banned");
                        } else {
                            io.close(close::UNAUTHORIZED, "unauthorized");
                        }
                    }
                },
                _ => {
                    self.reply(
                        io,
                        &ServerMessage::error(
                            msg.id,
                            ErrorCode::Unauthorized,
                            "authenticate first: send `auth` with a token",
                        ),
                    );
                    self.preauth_strike(shard, io);
                }
            },
            Mode::Echo
            | Mode::Authenticated(_)
            | Mode::Hooked(_)
            | Mode::Connecting(_)
            | Mode::Conformance(_)
            | Mode::Probing(_) => {
                unreachable!("handled above")
            }
            Mode::Ended => {}
        }
    }

    /// An Engine.IO packet of a Socket.IO connection (a text frame), or an
    /// attachment (a binary frame). A packet that cannot be read closes
    /// the connection, as Socket.IO servers do; a request that can be read
    /// but not carried out is answered in its ack, as on the native
    /// protocol.
    pub(super) fn on_engine_io(
        &mut self,
        shard: &Shard,
        io: &Rc<ConnIo>,
        text: bool,
        mut payload: BytesMut,
    ) {
        self.settle_hook();
        if let Mode::Probing(sid) = &self.mode {
            let sid = sid.clone();
            return self.on_probe(shard, io, text, &payload, &sid);
        }
        if let Mode::Conformance(c) = &mut self.mode {
            let out = if text {
                match socketio::engine_packet(&payload) {
                    Ok(EnginePacket::Message(m)) => {
                        if m.first() == Some(&b'0') {
                            io.auth_deadline.set(NEVER);
                        }
                        c.on_message(m)
                    }
                    Ok(_) => Ok(vec![]),
                    Err(e) => Err(e),
                }
            } else {
                c.on_binary(&payload)
            };
            match out {
                Ok(out) => {
                    for o in out {
                        match o {
                            conformance::Out::Text(t) => {
                                io.push_data(&frame::encode(OpCode::Text, t.as_bytes()));
                            }
                            conformance::Out::Binary(b) => {
                                io.push_data(&frame::encode(OpCode::Binary, &b));
                            }
                            conformance::Out::Later(t) => shard
                                .deferred
                                .borrow_mut()
                                .push((io.clone(), frame::encode(OpCode::Text, t.as_bytes()))),
                        };
                    }
                }
                Err(e) => return self.invalid_packet(shard, io, &e),
            }
            if !text {
                return;
            }
            // Pings, pongs and closes as for any Engine.IO session.
            if matches!(
                socketio::engine_packet(&payload),
                Ok(EnginePacket::Message(_))
            ) {
                return;
            }
        }
        let connecting = matches!(self.mode, Mode::Connecting(_));
        // The Socket.IO packet, in its text form.
        let sio = if text {
            let packet = match socketio::engine_packet(&payload) {
                Ok(p) => p,
                Err(e) => return self.invalid_packet(shard, io, &e),
            };
            match packet {
                EnginePacket::Message(_) => {}
                EnginePacket::Ping(data) => {
                    io.push_control(socketio::pong_frame(data));
                    return;
                }
                EnginePacket::Pong => return io.heard(shard.outq.now_ms()),
                EnginePacket::Close => return io.close(close::NORMAL, ""),
                EnginePacket::Upgrade | EnginePacket::Noop => return,
            }
            let _ = payload.split_to(1);
            payload
        } else if self.protocol == Protocol::SocketIoMsgpack || connecting {
            // socket.io-msgpack-parser: a packet in a binary message (its
            // CONNECT says the client speaks it).
            match msgpack::packet_to_text(&payload) {
                Ok(t) => BytesMut::from(&t[..]),
                Err(e) => return self.invalid_packet(shard, io, &e),
            }
        } else {
            if self.attachments > 0 {
                // Attachments of a packet already refused in its ack.
                self.attachments -= 1;
            } else if let Mode::Authenticated(id) = self.mode {
                self.on_event(shard, id, false, payload);
            } else if let Mode::Hooked(p) = &self.mode {
                if !p.hold(false, payload, self.max_held(shard)) {
                    io.close(close::POLICY_VIOLATION, HELD_TOO_MANY);
                }
            } else {
                self.preauth_strike(shard, io);
            }
            return;
        };
        let (kind, nsp, attachments) = match socketio::packet(&sio) {
            Ok(p) => (p.kind, p.nsp == "/", p.attachments),
            Err(e) => return self.invalid_packet(shard, io, &e),
        };
        self.attachments = attachments as u8;
        if connecting && kind == PacketKind::Connect {
            self.protocol = if text {
                Protocol::SocketIo
            } else {
                io.set_msgpack();
                Protocol::SocketIoMsgpack
            };
        }
        let msgpack = self.protocol == Protocol::SocketIoMsgpack;
        match (kind, &self.mode) {
            (PacketKind::Connect, Mode::Connecting(_)) => self.on_connect(shard, io, &sio),
            (PacketKind::Connect, _) if !nsp => {
                let nsp = socketio::packet(&sio)
                    .map(|p| p.nsp.to_owned())
                    .unwrap_or_default();
                io.push_data(&socketio::connect_error_frame(
                    &nsp,
                    None,
                    "Invalid namespace",
                    msgpack,
                ));
            }
            (PacketKind::Disconnect, _) if nsp => io.close(close::NORMAL, ""),
            (PacketKind::Event | PacketKind::BinaryEvent, Mode::Authenticated(id)) => {
                let id = *id;
                self.on_event(shard, id, true, sio);
            }
            (PacketKind::Event | PacketKind::BinaryEvent, Mode::Hooked(p)) => {
                if !p.hold(true, sio, self.max_held(shard)) {
                    io.close(close::POLICY_VIOLATION, HELD_TOO_MANY);
                }
            }
            // Its CONNECT is being answered.
            (PacketKind::Connect, Mode::Hooked(_)) => {}
            // The server asks for no acks; a second CONNECT changes nothing.
            (
                PacketKind::Ack | PacketKind::BinaryAck | PacketKind::Connect,
                Mode::Authenticated(_),
            ) => {}
            (PacketKind::ConnectError, _) => {
                let e = DecodeError::new(None, "CONNECT_ERROR comes from the server");
                self.invalid_packet(shard, io, &e)
            }
            _ => self.preauth_strike(shard, io),
        }
    }

    /// A packet on a WebSocket probing an upgrade: the probe (`2probe`) is
    /// answered (`3probe`) and the session's pending poll released; the
    /// upgrade packet (`5`) takes the session over, with what it queued.
    fn on_probe(&mut self, shard: &Shard, io: &Rc<ConnIo>, text: bool, payload: &[u8], sid: &str) {
        if !text {
            return self.preauth_strike(shard, io);
        }
        match socketio::engine_packet(payload) {
            Ok(EnginePacket::Ping(data)) => {
                io.push_control(socketio::pong_frame(data));
                shard.polls.borrow_mut().probing(sid, true);
            }
            Ok(EnginePacket::Upgrade) => {
                let taken = shard.polls.borrow_mut().take_over(shard, sid, io);
                match taken {
                    Some(mut session) => {
                        // The session keeps its own address slots and count.
                        shard
                            .node
                            .admission
                            .release_ip(std::mem::take(&mut self.ip));
                        shard.metrics().connections.sub(1);
                        std::mem::swap(self, &mut session);
                    }
                    None => io.close(close::POLICY_VIOLATION, "Session ID unknown"),
                }
            }
            Ok(_) => {}
            Err(e) => self.invalid_packet(shard, io, &e),
        }
    }

    /// A CONNECT to the main namespace: the token of its auth payload, or
    /// else the upgrade's, authenticates the connection. A refusal reaches
    /// the client's `connect_error` with its reason.
    fn on_connect(&mut self, shard: &Shard, io: &Rc<ConnIo>, sio: &[u8]) {
        let Ok(p) = socketio::packet(sio) else {
            return;
        };
        let msgpack = self.protocol == Protocol::SocketIoMsgpack;
        if p.nsp != "/" {
            shard.metrics().auth_failures.inc();
            io.push_data(&socketio::connect_error_frame(
                p.nsp,
                None,
                "Invalid namespace",
                msgpack,
            ));
            return self.preauth_strike(shard, io);
        }
        let auth = socketio::connect_auth(p.data);
        // A reconnection of connection state recovery: its session back.
        let recover = auth.as_ref().ok().and_then(|a| {
            let pid = a.pid.as_deref()?.parse().ok()?;
            Some((pid, a.offset.clone()))
        });
        let verified = match auth.map(|a| a.token) {
            Err(e) => Err((ErrorCode::BadRequest, e.message)),
            Ok(Some(token)) => verify(shard, &token),
            Ok(None) => match std::mem::replace(&mut self.mode, Mode::Unauthenticated) {
                Mode::Connecting(Some(identity)) => Ok(*identity),
                _ => Err((
                    ErrorCode::Unauthorized,
                    "unauthorized: no token (connect with `auth: { token }`)".to_owned(),
                )),
            },
        };
        match verified {
            Ok(identity) => self.authenticate(shard, io, identity, None, recover, Via::SocketIo),
            Err((code, why)) => {
                self.mode = Mode::Connecting(None);
                let code = match code {
                    ErrorCode::Forbidden => "forbidden",
                    ErrorCode::BadRequest => "bad_request",
                    _ => "unauthorized",
                };
                io.push_data(&socketio::connect_error_frame(
                    "/",
                    Some(code),
                    &why,
                    msgpack,
                ));
                self.preauth_strike(shard, io);
            }
        }
    }

    /// A packet that is not Engine.IO or Socket.IO: the connection ends
    /// (1008, with the reason).
    fn invalid_packet(&mut self, shard: &Shard, io: &ConnIo, e: &DecodeError) {
        shard.metrics().protocol_errors.inc();
        let mut reason = e.message.clone();
        reason.truncate(120);
        io.close(close::POLICY_VIOLATION, &reason);
    }

    /// A message of an authenticated connection, for the engine.
    pub(super) fn on_event(&self, shard: &Shard, id: ConnId, text: bool, mut payload: BytesMut) {
        let mut outbox = shard.outbox.borrow_mut();
        let mut scratch = shard.scratch.borrow_mut();
        shard.engine.borrow_mut().handle_frame(
            id,
            text,
            &mut payload,
            &mut scratch,
            now_ms(),
            &mut *outbox,
        );
    }

    /// Counts a message that was not a valid `auth` (or CONNECT) before authentication;
    /// past `rate_limit_strikes` of them the connection is closed (1008).
    pub(super) fn preauth_strike(&mut self, shard: &Shard, io: &ConnIo) {
        self.preauth_strikes = self.preauth_strikes.saturating_add(1);
        let max = shard.node.config.rate_limit_strikes;
        if max > 0 && self.preauth_strikes as u32 > max {
            shard.metrics().rate_limit_closes.inc();
            io.close(
                close::POLICY_VIOLATION,
                "too many invalid messages before authentication",
            );
        }
    }

    pub(super) fn on_message(&mut self, shard: &Shard, io: &Rc<ConnIo>, m: Message) -> Next {
        match m {
            Message::Text(p) => self.on_data(shard, io, true, p),
            Message::Binary(p) => self.on_data(shard, io, false, p),
            Message::Ping(p) => {
                io.push_control(frame::encode(OpCode::Pong, &p));
            }
            Message::Pong(_) => {}
            Message::Close(c) => {
                if io.state() == State::Open {
                    // Echo the peer's code (RFC 6455 §5.5.1).
                    let payload = c
                        .map(|(code, _)| close::payload(code, ""))
                        .unwrap_or_default();
                    io.close_with(payload);
                }
                return Next::Finish;
            }
        }
        Next::Continue
    }
}

/// Opens an authenticated connection in the engine: its ack (of `auth`)
/// and `ready` first, then what opening it queues.
pub(super) fn open_connection(
    shard: &Shard,
    io: &Rc<ConnIo>,
    protocol: Protocol,
    device: DeviceKind,
    identity: Identity,
    ack: Option<u64>,
    recover: Option<(SessionId, Option<String>)>,
) -> ConnId {
    let session = shard.new_session_id();
    let Identity { user, access, .. } = identity;
    let member = Member {
        user: user.as_str().into(),
        session,
        protocol,
    };
    let ready = Ready {
        user_id: user.clone(),
        session_id: session.to_string(),
        shard: shard.id as u32,
        heartbeat_interval_ms: shard.node.config.ping_interval_ms,
    };
    let reply = |msg: &ServerMessage| io.push_data(&protocol::encode_frame(protocol, msg));
    // The ack and `ready` come first: opening the connection may queue
    // events for it at once (pending notifications, when the user's home
    // is this shard). A Socket.IO reconnection's `ready` (its CONNECT
    // answer) says whether its session came back, so it waits for that.
    if ack.is_some() {
        reply(&ServerMessage::ack(ack, AckBody::Empty(Empty {})));
    }
    let ready = match recover {
        Some(r) => Some((r, ready)),
        None => {
            reply(&ServerMessage::event(ServerEvent::Ready(ready)));
            None
        }
    };
    let mut outbox = shard.outbox.borrow_mut();
    let mut engine = shard.engine.borrow_mut();
    let now = now_ms();
    let id = engine.open(io.clone(), member, device, access, now, &mut *outbox);
    if let Some(((pid, last), fresh)) = ready {
        engine.recover(id, pid, Recovery::new(last, fresh), now, &mut *outbox);
    }
    drop(engine);
    outbox.flush();
    io.auth_deadline.set(NEVER);
    id
}

/// Verifies a token and the server-wide ban of its user; the refusal is
/// `unauthorized` or `forbidden` with its reason.
pub(super) fn verify(shard: &Shard, token: &str) -> Result<Identity, (ErrorCode, String)> {
    let hooks = &shard.node.config.hooks;
    if hooks.backend_auth() {
        // The connect hook reads the token; the ban is checked once the
        // backend named the user.
        if token.len() > MAX_BACKEND_TOKEN_BYTES {
            shard.metrics().auth_failures.inc();
            let why = format!("token longer than {MAX_BACKEND_TOKEN_BYTES} bytes");
            return Err((ErrorCode::Unauthorized, why));
        }
        return Ok(Identity {
            user: String::new(),
            access: Default::default(),
            token: Some(token.into()),
        });
    }
    match shard.node.verifier.identify(token) {
        Ok(mut identity) => match shard.engine.borrow().server_ban(&identity.user, now_ms()) {
            None => {
                if !hooks.connect_url.is_empty() {
                    identity.token = Some(token.into());
                }
                Ok(identity)
            }
            Some(why) => {
                shard.metrics().auth_failures.inc();
                Err((ErrorCode::Forbidden, why))
            }
        },
        Err(e) => {
            shard.metrics().auth_failures.inc();
            Err((ErrorCode::Unauthorized, e.0))
        }
    }
}

/// Why a connection that sent too much while the connect hook thought is
/// closed.
const HELD_TOO_MANY: &str = "too many messages before the connection opened";

/// The longest token the connect hook is sent (`connect_auth = backend`).
const MAX_BACKEND_TOKEN_BYTES: usize = 4096;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    /// A session input for [`super::fuzz_session`]: the start byte, then
    /// each message as a length byte and its bytes.
    pub(crate) fn session_input(head: u8, messages: &[&[u8]]) -> Vec<u8> {
        let mut out = vec![head];
        for m in messages {
            out.push(m.len() as u8);
            out.extend_from_slice(m);
        }
        out
    }

    #[test]
    fn whole_sessions_keep_their_bounds() {
        let text = |s: &str| [&[1u8][..], s.as_bytes()].concat();
        let join = text(r#"{"t":"channel:join","id":1,"d":{"channelId":"general"}}"#);
        let send =
            text(r#"{"t":"message:send","id":2,"d":{"channelId":"general","content":"hi"}}"#);
        let ping = [&[3u8][..], &[b'p'; 120][..]].concat();
        // Authenticated, a peer that never reads: messages, then pings past
        // every bound.
        let mut msgs: Vec<&[u8]> = vec![&join, &send, &send];
        msgs.extend(std::iter::repeat_n(&ping[..], 200));
        super::fuzz_session(&session_input(2 | 4, &msgs));
        // The same peer reading, and one without a token sending `auth`.
        super::fuzz_session(&session_input(2 | 4 | 8, &msgs));
        let auth = text(r#"{"t":"auth","id":1,"d":{"token":"x.y.z"}}"#);
        super::fuzz_session(&session_input(1 | 4, &[&auth, &join, &join]));
        // A request written by the input, trickled.
        let req = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n";
        super::fuzz_session(&session_input(
            0,
            &[req, b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"],
        ));
    }

    proptest! {
        #[test]
        fn any_bytes_make_a_session_that_keeps_its_bounds(
            head in 0u8..16,
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..60), 0..12),
        ) {
            let msgs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            super::fuzz_session(&session_input(head, &msgs));
        }
    }

    /// What every connection costs in the shard's tables, whatever it does
    /// (docs/BENCHMARKS.md itemises it): a regression here is memory on
    /// every idle connection.
    #[test]
    fn a_connection_stays_small() {
        assert_eq!(std::mem::size_of::<super::conn::ConnIo>(), 80);
        assert_eq!(
            super::Engine::<std::rc::Rc<super::conn::ConnIo>>::slot_size(),
            72
        );
        assert_eq!(super::uring::loop_slot_size(), 72);
        // A mesh slot: every queue between two shards holds
        // `mesh_queue_capacity` of them, allocated up front.
        assert_eq!(std::mem::size_of::<crate::engine::MeshMsg>(), 48);
    }
}
