//! The connect hook's IO side (`engine::connect_hook` decides): a
//! connection that authenticates is held while the application backend
//! says who it is. Its question goes to the hooks endpoint of the mesh;
//! the shard serves every other connection meanwhile. What the client sends
//! in the meantime waits (bounded) and reaches the engine, in order, once
//! the connection opened. An upgrade's 101 waits too, so that a refusal is
//! an HTTP status; an `auth` is answered with its error, a Socket.IO
//! CONNECT with `connect_error`.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use bytes::BytesMut;

use crate::access::Identity;
use crate::engine::connect_hook::{admit, connect_body, Admission};
use crate::engine::hooks::{HookAnswer, HookCall, HookKind};
use crate::engine::{MeshMsg, MeshTx, SessionId};
use crate::protocol::{socketio, ErrorCode, ServerMessage};
use crate::ws::{close, handshake};

use super::conn::{ConnIo, NEVER};
use super::session::{open_connection, Mode, Session};
use super::{now_ms, Shard};

/// Messages a connection may send before the backend answered; past it
/// the connection is closed (1008).
pub(super) const MAX_HELD: usize = 64;

/// Tokens of connect questions have this bit (the engine's questions do
/// not): their answers come back to the shell, not to the engine.
const CONNECT_TOKEN: u64 = 1 << 63;

/// How the connection authenticated: what a refusal looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Via {
    /// The upgrade's token: the 101 waits, a refusal is an HTTP status.
    Upgrade,
    /// An `auth` message: its error, then a close.
    Auth,
    /// A Socket.IO CONNECT: `connect_error`, and the client may try again.
    SocketIo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hook {
    Waiting,
    Opened(crate::engine::ConnId),
    Refused,
    /// The connection ended first: the answer is dropped.
    Gone,
}

/// A connection waiting for the connect hook's answer.
pub(super) struct PendingConnect {
    /// The connection's outbound side (a long-polling session's upgrade
    /// moves it to the WebSocket).
    io: RefCell<Rc<ConnIo>>,
    session: SessionParts,
    asked: RefCell<Option<Identity>>,
    ack: Option<u64>,
    recover: RefCell<Option<(SessionId, Option<String>)>>,
    via: Via,
    held: RefCell<Vec<(bool, BytesMut)>>,
    pub(super) state: Cell<Hook>,
}

/// What opening the connection needs of its session.
#[derive(Clone, Copy)]
struct SessionParts {
    protocol: crate::protocol::Protocol,
    device: crate::protocol::DeviceKind,
}

impl PendingConnect {
    /// Keeps a message (the engine's input: a frame, or a Socket.IO
    /// packet) for when the connection opens; false when too many wait, or
    /// more than `max_bytes` together (what one unauthenticated message may
    /// be: a waiting connection holds no more than a connection that has
    /// not authenticated).
    pub(super) fn hold(&self, text: bool, payload: BytesMut, max_bytes: usize) -> bool {
        let mut held = self.held.borrow_mut();
        let bytes: usize = held.iter().map(|(_, p)| p.len()).sum();
        if held.len() >= MAX_HELD || bytes + payload.len() > max_bytes {
            return false;
        }
        held.push((text, payload));
        true
    }

    /// A long-polling session upgraded while it waited: the answer goes to
    /// the WebSocket that took it over.
    pub(super) fn retarget(&self, ws: &Rc<ConnIo>) {
        *self.io.borrow_mut() = ws.clone();
    }
}

impl Session {
    /// Asks the connect hook about a connection that came with `asked`,
    /// and holds it until the answer.
    pub(super) fn ask_connect(
        &mut self,
        shard: &Shard,
        io: &Rc<ConnIo>,
        asked: Identity,
        ack: Option<u64>,
        recover: Option<(SessionId, Option<String>)>,
        via: Via,
    ) {
        let node = &shard.node;
        if via == Via::Upgrade {
            io.hold();
        }
        let pending = Rc::new(PendingConnect {
            io: RefCell::new(io.clone()),
            session: SessionParts {
                protocol: self.protocol,
                device: self.device,
            },
            asked: RefCell::new(None),
            ack,
            recover: RefCell::new(recover),
            via,
            held: RefCell::new(Vec::new()),
            state: Cell::new(Hook::Waiting),
        });
        if shard.connecting.borrow().len() >= node.config.hooks.max_waiting {
            shard.metrics().hook_refused.inc();
            let why = "too many connections wait for the application backend; try again";
            refuse(shard, &pending, ErrorCode::Unavailable, why);
            self.mode = self.refused_mode();
            return;
        }
        let next = shard.connect_next.get() + 1;
        shard.connect_next.set(next);
        let token = CONNECT_TOKEN | next;
        let body = connect_body(&asked, self.protocol, self.device);
        *pending.asked.borrow_mut() = Some(asked);
        shard.connecting.borrow_mut().insert(token, pending.clone());
        if io.auth_deadline.get() == NEVER {
            // The backend has until the authentication deadline.
            io.auth_deadline
                .set(shard.outq.now_ms() + node.config.auth_timeout_ms);
        }
        shard.metrics().hook_calls.inc();
        let call = HookCall {
            from: shard.id,
            token,
            kind: HookKind::Connect,
            body,
        };
        let endpoint = crate::mesh::hooks_endpoint(node.shards());
        let mut outbox = shard.outbox.borrow_mut();
        outbox.send(endpoint, MeshMsg::HookCall(Box::new(call)));
        outbox.flush();
        self.mode = Mode::Hooked(pending);
    }

    /// What the session is once its connect hook answered (still
    /// `Hooked` while it waits).
    pub(super) fn settle_hook(&mut self) {
        let Mode::Hooked(p) = &self.mode else {
            return;
        };
        self.mode = match p.state.get() {
            Hook::Waiting | Hook::Gone => return,
            Hook::Opened(id) => Mode::Authenticated(id),
            Hook::Refused => self.refused_mode(),
        };
    }

    /// After a refusal: a Socket.IO client may send another CONNECT.
    fn refused_mode(&self) -> Mode {
        match self.protocol {
            crate::protocol::Protocol::SocketIo | crate::protocol::Protocol::SocketIoMsgpack => {
                Mode::Connecting(None)
            }
            _ => Mode::Unauthenticated,
        }
    }
}

/// Whether an answer is the connect hook's (for the shell, not the engine).
pub(super) fn is_connect_answer(a: &HookAnswer) -> bool {
    a.token & CONNECT_TOKEN != 0
}

impl Shard {
    /// The connect hook's answers that came: each waiting connection opens
    /// (and joins what the answer named, and gets what it sent meanwhile)
    /// or is refused.
    pub(super) fn answer_connects(&self) {
        let answers = std::mem::take(&mut *self.connect_answers.borrow_mut());
        for a in answers {
            let Some(p) = self.connecting.borrow_mut().remove(&a.token) else {
                continue;
            };
            if p.state.get() != Hook::Waiting {
                continue;
            }
            let Some(asked) = p.asked.borrow_mut().take() else {
                continue;
            };
            let c = &self.node.config;
            let failure_allows = c.hooks.failure_allows();
            let open_channels = c.auth.channel_access == "open";
            if a.result.is_err() {
                self.metrics().hook_failures.inc();
            }
            let mut decision = admit(asked, a.result, failure_allows, open_channels);
            if let Admission::Open { identity, .. } = &decision {
                let ban = self.engine.borrow().server_ban(&identity.user, now_ms());
                if let Some(why) = ban {
                    decision = Admission::Refuse {
                        code: ErrorCode::Forbidden,
                        reason: format!("banned: {why}"),
                    };
                }
            }
            match decision {
                Admission::Open {
                    identity,
                    subscribe,
                } => self.open_hooked(&p, identity, subscribe),
                Admission::Refuse { code, reason } => {
                    if code == ErrorCode::Unavailable {
                        tracing::debug!(%reason, "connect hook failed");
                    } else {
                        self.metrics().hook_rejected.inc();
                    }
                    refuse(self, &p, code, &reason);
                }
            }
        }
    }

    fn open_hooked(&self, p: &PendingConnect, identity: Identity, subscribe: Vec<String>) {
        let io = p.io.borrow().clone();
        let io = &io;
        let recover = p.recover.borrow_mut().take();
        let SessionParts { protocol, device } = p.session;
        let id = open_connection(self, io, protocol, device, identity, p.ack, recover);
        p.state.set(Hook::Opened(id));
        if p.via == Via::Upgrade && self.node.config.max_connections_per_user == 0 {
            // (With a per-user cap, the user's home releases it.)
            io.release();
        }
        let held = std::mem::take(&mut *p.held.borrow_mut());
        let mut outbox = self.outbox.borrow_mut();
        let mut scratch = self.scratch.borrow_mut();
        let mut engine = self.engine.borrow_mut();
        let now = now_ms();
        engine.subscribe_at_connect(id, subscribe, now, &mut *outbox);
        for (text, mut payload) in held {
            engine.handle_frame(id, text, &mut payload, &mut scratch, now, &mut *outbox);
        }
        drop(engine);
        outbox.flush();
    }
}

/// Refuses a held connection as its way of authenticating expects.
fn refuse(shard: &Shard, p: &PendingConnect, code: ErrorCode, reason: &str) {
    shard.metrics().auth_failures.inc();
    p.state.set(Hook::Refused);
    p.held.borrow_mut().clear();
    let io = p.io.borrow().clone();
    let io = &io;
    let close_code = match code {
        ErrorCode::Forbidden => close::BANNED,
        ErrorCode::Unavailable => close::TRY_AGAIN_LATER,
        _ => close::UNAUTHORIZED,
    };
    match p.via {
        Via::Upgrade => {
            let status = match code {
                ErrorCode::Forbidden => 403,
                ErrorCode::Unavailable => 503,
                _ => 401,
            };
            let http = handshake::http_response(status, "", "text/plain", reason.as_bytes());
            io.refuse(bytes::Bytes::from(http), close_code, reason);
        }
        Via::Auth => {
            let msg = ServerMessage::error(p.ack, code, reason);
            io.push_data(&crate::protocol::encode_frame(p.session.protocol, &msg));
            io.close(close_code, short(reason));
        }
        Via::SocketIo => {
            let name = match code {
                ErrorCode::Forbidden => "forbidden",
                ErrorCode::Unavailable => "unavailable",
                _ => "unauthorized",
            };
            let msgpack = p.session.protocol == crate::protocol::Protocol::SocketIoMsgpack;
            io.push_data(&socketio::connect_error_frame(
                "/",
                Some(name),
                reason,
                msgpack,
            ));
        }
    }
}

/// A close reason fits a control frame (123 bytes).
fn short(reason: &str) -> &str {
    let mut end = reason.len().min(120);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}
