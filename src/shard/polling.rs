//! Engine.IO's HTTP long-polling transport, which a default `io(url)`
//! starts with: a GET without `sid` opens a session, GETs take what the
//! server queued for it (waiting when there is nothing), POSTs carry the
//! client's packets, and a WebSocket with the `sid` may take the session
//! over (the upgrade).
//!
//! A session lives on the shard that opened it, and its `sid` names that
//! shard: a request for it that another shard accepted is handed over,
//! socket and bytes, through the mesh (`MeshMsg::Adopt`), so every request
//! of a session, and its upgrade, is served where the session is.
//!
//! The session is a [`Session`] like a WebSocket's, whose outbound side is
//! a [`ConnIo`] without a socket: the engine queues frames on it as on any
//! connection, and a waiting GET answers with them (each frame one packet,
//! binary ones in base64, separated by the record separator). Every
//! response closes its socket (`Connection: close`).

use std::rc::Rc;

use bytes::{Bytes, BytesMut};

use crate::access::Identity;
use crate::admission::Slots;
use crate::protocol::socketio::{self, EnginePacket};
use crate::protocol::DeviceKind;
use crate::ws::handshake;

use super::conn::{ConnIo, State, NEVER};
use super::session::{Mode, Session};
use super::Shard;

/// A long-polling request the shard that holds its session answers.
pub(super) enum PollRequest {
    /// A GET without `sid`: a new session.
    Open {
        device: DeviceKind,
        user: Option<Identity>,
        conformance: Option<bool>,
        ip: Slots,
        cors: String,
    },
    /// A GET: what is queued, now or when there is some.
    Get { sid: String, cors: String },
    /// A POST: the client's packets.
    Post {
        sid: String,
        body: Vec<u8>,
        cors: String,
    },
}

struct PollSession {
    sid: String,
    session: Session,
    io: Rc<ConnIo>,
    /// A GET waiting for something to answer with.
    get: Option<(Rc<ConnIo>, String)>,
    /// A WebSocket probes the upgrade: GETs are answered with a noop.
    upgrading: bool,
    /// When the session left the engine while no GET waited (the client's
    /// close packet, or the server closing it), or `NEVER`: the GET that may
    /// be on its way still gets what was queued (or a noop), for
    /// `close_timeout_ms`.
    closed: u64,
}

#[derive(Default)]
pub(super) struct Polls {
    slots: Vec<Option<PollSession>>,
    free: Vec<u32>,
}

/// The shard that holds the session `sid` (its first four hex digits).
pub(super) fn owner_of(sid: &str) -> Option<u16> {
    sid.get(..4).and_then(|h| u16::from_str_radix(h, 16).ok())
}

fn key_of(sid: &str) -> Option<u32> {
    sid.get(4..12).and_then(|h| u32::from_str_radix(h, 16).ok())
}

/// An HTTP response of the transport.
fn response(status: u16, cors: &str, body: &[u8]) -> Bytes {
    Bytes::from(handshake::http_response(
        status,
        cors,
        "text/plain; charset=UTF-8",
        body,
    ))
}

/// An Engine.IO error (`{"code", "message"}`, 400).
pub(super) fn error_response(cors: &str, code: u8, message: &str) -> Bytes {
    let body = serde_json::json!({ "code": code, "message": message }).to_string();
    Bytes::from(handshake::http_response(
        400,
        cors,
        "application/json",
        body.as_bytes(),
    ))
}

impl Polls {
    fn get_mut(&mut self, sid: &str) -> Option<(u32, &mut PollSession)> {
        let key = key_of(sid)?;
        let ps = self.slots.get_mut(key as usize)?.as_mut()?;
        (ps.sid == sid).then_some((key, ps))
    }

    /// Answers (or parks) a request whose session is on this shard.
    pub(super) fn request(&mut self, shard: &Shard, req: PollRequest, waiter: Rc<ConnIo>) {
        match req {
            PollRequest::Open {
                device,
                user,
                conformance,
                ip,
                cors,
            } => {
                let key = match self.free.pop() {
                    Some(k) => k,
                    None => {
                        self.slots.push(None);
                        (self.slots.len() - 1) as u32
                    }
                };
                let sid = format!(
                    "{:04x}{key:08x}{:016x}",
                    shard.id,
                    crate::clock::random_u64()
                );
                let io = Rc::new(ConnIo::for_poll(
                    shard.outq.clone(),
                    key,
                    shard.outq.now_ms(),
                ));
                let session =
                    Session::socketio(shard, &io, device, user, ip, &sid, true, conformance);
                let m = shard.metrics();
                m.connections.inc();
                m.connections_total.inc();
                let mut ps = PollSession {
                    sid,
                    session,
                    io,
                    get: None,
                    upgrading: false,
                    closed: NEVER,
                };
                // The open packet answers at once.
                ps.get = Some((waiter, cors));
                Self::answer(&mut ps);
                self.slots[key as usize] = Some(ps);
            }
            PollRequest::Get { sid, cors } => {
                let now = shard.outq.now_ms();
                let Some((key, ps)) = self.get_mut(&sid) else {
                    waiter.respond(error_response(&cors, 1, "Session ID unknown"));
                    return;
                };
                if ps.closed != NEVER {
                    if !ps.io.has_queued() {
                        waiter.respond(response(200, &cors, b"6"));
                        return self.end(shard, key);
                    }
                    ps.get = Some((waiter, cors));
                    if Self::answer(ps) {
                        self.end(shard, key);
                    }
                    return;
                }
                // A session past its heartbeat is gone, whatever the sweep
                // has seen yet.
                if ps.io.engine_io_expired(now, &shard.node.config) {
                    waiter.respond(error_response(&cors, 1, "Session ID unknown"));
                    return self.end(shard, key);
                }
                if let Some((old, old_cors)) = ps.get.take() {
                    // Two GETs at once: the client is broken; both end.
                    old.respond(response(200, &old_cors, b"1"));
                    waiter.respond(error_response(&cors, 3, "Bad request"));
                    return self.end(shard, key);
                }
                if ps.upgrading {
                    waiter.respond(response(200, &cors, b"6"));
                    return;
                }
                ps.get = Some((waiter, cors));
                if ps.io.has_queued() || ps.io.state() != State::Open {
                    self.flush(shard, key);
                }
            }
            PollRequest::Post { sid, body, cors } => {
                let Some((key, ps)) = self.get_mut(&sid).filter(|(_, ps)| ps.closed == NEVER)
                else {
                    waiter.respond(error_response(&cors, 1, "Session ID unknown"));
                    return;
                };
                let packets = match socketio::decode_payload(&body) {
                    Ok(p)
                        if p.iter()
                            .all(|(text, p)| !text || socketio::engine_packet(p).is_ok()) =>
                    {
                        p
                    }
                    _ => {
                        waiter.respond(error_response(&cors, 3, "Bad request"));
                        return self.end(shard, key);
                    }
                };
                for (text, p) in packets {
                    if text && socketio::engine_packet(&p) == Ok(EnginePacket::Close) {
                        // The client closes: a waiting GET (or one on its
                        // way) ends with a noop.
                        waiter.respond(response(200, &cors, b"ok"));
                        if let Some((get, get_cors)) = ps.get.take() {
                            get.respond(response(200, &get_cors, b"6"));
                            return self.end(shard, key);
                        }
                        Self::leave(ps, shard);
                        return;
                    }
                    if ps.io.state() != State::Open {
                        // Closed by a packet before: the rest is not read.
                        break;
                    }
                    ps.session
                        .on_engine_io(shard, &ps.io, text, BytesMut::from(&p[..]));
                }
                waiter.respond(response(200, &cors, b"ok"));
                if ps.io.has_queued() || ps.io.state() != State::Open {
                    self.flush(shard, key);
                }
            }
        }
    }

    /// Answers the waiting GET with what is queued. The close packet goes
    /// in a response of its own, after the rest: a client reading both in
    /// one closes before it has handled the packets before it. True when
    /// the close packet went.
    fn answer(ps: &mut PollSession) -> bool {
        let Some((get, cors)) = ps.get.take() else {
            return false;
        };
        let mut frames = ps.io.take_queued();
        let is_close = |f: &Bytes| {
            crate::ws::frame::parse_header(f)
                .ok()
                .flatten()
                .is_some_and(|h| h.opcode == crate::ws::OpCode::Close)
        };
        let close_at = frames.iter().position(is_close);
        let held = match close_at {
            Some(i) if i > 0 => frames.split_off(i),
            _ => Vec::new(),
        };
        let (body, closed) = socketio::encode_payload(frames.iter().map(|f| &f[..]));
        let delivered = get.respond(response(200, &cors, &body));
        // Undelivered (the socket was gone), or held back: queued again,
        // in order, for the next GET.
        let requeue = if delivered {
            held
        } else {
            [frames, held].concat()
        };
        for f in &requeue {
            ps.io.requeue(f.clone());
        }
        delivered && closed
    }

    /// A session queued frames or closed: a waiting GET takes them; a
    /// closed session ends.
    fn flush(&mut self, shard: &Shard, key: u32) {
        let Some(ps) = self.slots.get_mut(key as usize).and_then(Option::as_mut) else {
            return;
        };
        ps.io.unlist_poll();
        let closed = ps.io.state() != State::Open;
        if ps.get.is_some() && !ps.upgrading {
            if Self::answer(ps) {
                self.end(shard, key);
            } else if closed && ps.closed == NEVER {
                Self::leave(ps, shard);
            }
        } else if closed && ps.closed == NEVER {
            // What it queued last (a kick, and the close) waits for the
            // next GET; the session leaves the engine now.
            Self::leave(ps, shard);
        }
    }

    /// Looks at the sessions that queued frames since the last time.
    pub(super) fn flush_ready(&mut self, shard: &Shard) {
        loop {
            let keys = std::mem::take(&mut *shard.outq.polls.borrow_mut());
            if keys.is_empty() {
                return;
            }
            for key in keys {
                self.flush(shard, key);
            }
        }
    }

    /// Heartbeats and deadlines of every session (from the sweep).
    pub(super) fn sweep(&mut self, shard: &Shard, now: u64, ping: &Bytes) {
        for key in 0..self.slots.len() as u32 {
            let Some(ps) = self.slots[key as usize].as_ref() else {
                continue;
            };
            if ps.closed != NEVER {
                if now.saturating_sub(ps.closed) >= shard.node.config.close_timeout_ms {
                    self.end(shard, key);
                }
                continue;
            }
            if ps.upgrading {
                continue;
            }
            if ps.io.engine_io_expired(now, &shard.node.config) {
                shard.metrics().keepalive_closes.inc();
                self.end(shard, key);
                continue;
            }
            shard.check_keepalive(&ps.io, now, ping);
        }
        self.flush_ready(shard);
    }

    /// The session leaves the engine (and the count of connections) while
    /// its slot waits for a last GET.
    fn leave(ps: &mut PollSession, shard: &Shard) {
        ps.closed = shard.outq.now_ms();
        ps.session.end(shard);
        shard.metrics().connections.sub(1);
    }

    /// Ends a session: out of the engine, its waiting GET closed.
    fn end(&mut self, shard: &Shard, key: u32) {
        let Some(mut ps) = self.slots.get_mut(key as usize).and_then(Option::take) else {
            return;
        };
        if let Some((get, cors)) = ps.get.take() {
            get.respond(response(200, &cors, b"1"));
        }
        if ps.closed == NEVER {
            ps.session.end(shard);
            shard.metrics().connections.sub(1);
        }
        ps.io.abort();
        self.free.push(key);
    }

    /// A WebSocket started (`on`) or gave up (`!on`) probing the upgrade of
    /// session `sid`: while it probes, GETs are answered with a noop.
    pub(super) fn probing(&mut self, sid: &str, on: bool) {
        if let Some((_, ps)) = self.get_mut(sid).filter(|(_, ps)| ps.closed == NEVER) {
            ps.upgrading = on;
            if on {
                if let Some((get, cors)) = ps.get.take() {
                    get.respond(response(200, &cors, b"6"));
                }
            }
        }
    }

    /// The upgrade is complete: the WebSocket `ws` takes the session over,
    /// with what it had queued, and the session leaves the table (a later
    /// GET or WebSocket with its `sid` is refused).
    pub(super) fn take_over(
        &mut self,
        shard: &Shard,
        sid: &str,
        ws: &Rc<ConnIo>,
    ) -> Option<Session> {
        // A session closed during the probe still hands over what it
        // queued last (a kick, then the close).
        let (key, _) = self
            .get_mut(sid)
            .filter(|(_, ps)| ps.closed == NEVER || ps.io.has_queued())?;
        let mut ps = self.slots[key as usize].take()?;
        self.free.push(key);
        if let Some((get, cors)) = ps.get.take() {
            get.respond(response(200, &cors, b"6"));
        }
        for f in ps.io.take_queued() {
            ws.push_data(&f);
        }
        ws.last_rx.set(ps.io.last_rx.get());
        ws.ping_sent.set(ps.io.ping_sent.get());
        ws.auth_deadline.set(ps.io.auth_deadline.get());
        if ps.session.protocol == crate::protocol::Protocol::SocketIoMsgpack {
            ws.set_msgpack();
        }
        ps.session.settle_hook();
        match &ps.session.mode {
            Mode::Authenticated(id) => shard.engine.borrow_mut().replace_out(*id, ws.clone()),
            // The connect hook's answer goes to the WebSocket.
            Mode::Hooked(p) => p.retarget(ws),
            _ => {}
        }
        ps.io.abort();
        // The session's count goes with it (the WebSocket gives its own
        // back); one that had left is counted again until the socket ends.
        if ps.closed != NEVER {
            shard.metrics().connections.inc();
        }
        Some(ps.session)
    }

    /// Whether the session `sid` is here and may be upgraded.
    pub(super) fn upgradable(&mut self, sid: &str) -> bool {
        self.get_mut(sid)
            .is_some_and(|(_, ps)| !ps.upgrading && ps.closed == NEVER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sids_name_their_shard_and_slot() {
        let sid = format!("{:04x}{:08x}{:016x}", 3, 42, 7);
        assert_eq!(owner_of(&sid), Some(3));
        assert_eq!(key_of(&sid), Some(42));
        assert_eq!(owner_of("zz"), None);
        assert_eq!(key_of("0001"), None);
    }
}
