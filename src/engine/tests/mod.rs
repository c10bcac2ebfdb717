//! The engine of several shards driven in memory: a mesh of queues, a
//! recording outbound queue per connection, and a clock that is a number.
//! This file is the harness ([`Sim`] and the helpers that read what a
//! connection received); the tests are in a file per topic, the random
//! sequences and their invariants in `sequences.rs` and
//! `chat_sequences.rs`.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use super::*;
use crate::protocol::json;

#[derive(Clone, Default)]
struct Recorder {
    /// What the connection speaks (its frames are read back with it).
    protocol: Rc<std::cell::Cell<Option<Protocol>>>,
    frames: Rc<RefCell<Vec<Bytes>>>,
    refuse: Rc<std::cell::Cell<bool>>,
    /// The close code, once the engine closed the connection.
    closed: Rc<std::cell::Cell<Option<u16>>>,
    /// The user's home shard took the connection.
    admitted: Rc<std::cell::Cell<bool>>,
}

impl Outbound for Recorder {
    fn push(&self, frame: &Bytes) -> bool {
        if self.refuse.get() {
            return false;
        }
        self.frames.borrow_mut().push(frame.clone());
        true
    }

    fn close(&self, code: u16, _reason: &str) {
        self.closed.set(Some(code));
    }

    fn admitted(&self) {
        self.admitted.set(true);
    }

    fn refused(&self, _reason: &str) {
        self.closed.set(Some(crate::ws::close::POLICY_VIOLATION));
    }
}

impl Recorder {
    fn take(&self) -> Vec<ServerMessage> {
        // A queued buffer may hold more than one frame (Socket.IO's
        // CONNECT answer and `ready`).
        let mut frames = Vec::new();
        for f in self.frames.borrow_mut().drain(..) {
            let mut at = 0;
            while at < f.len() {
                let h = crate::ws::frame::parse_header(&f[at..]).unwrap().unwrap();
                let end = at + h.header_len + h.payload_len as usize;
                frames.push(f.slice(at..end));
                at = end;
            }
        }
        frames
            .into_iter()
            .filter_map(|f| {
                let h = crate::ws::frame::parse_header(&f).unwrap().unwrap();
                let payload = &f[h.header_len..];
                use crate::protocol::{msgpack, socketio};
                match self.protocol.get().unwrap_or(Protocol::Json) {
                    Protocol::Json => Some(json::decode_server(payload).unwrap()),
                    Protocol::Binary => {
                        Some(crate::protocol::binary::decode_server(payload).unwrap())
                    }
                    Protocol::SocketIo => socketio::decode_server(&payload[1..]).unwrap(),
                    Protocol::SocketIoMsgpack => {
                        let text = msgpack::packet_to_text(payload).unwrap();
                        socketio::decode_server(&text).unwrap()
                    }
                }
            })
            .collect()
    }
}

/// The default settings without rate limits (the tests of limits and the
/// random sequences keep them).
fn unlimited() -> Settings {
    let mut rate_limits = limits::RateLimits::default();
    rate_limits.set("*", None).unwrap();
    Settings {
        rate_limits,
        ..Settings::default()
    }
}

#[derive(Default)]
struct Queues(Vec<VecDeque<MeshMsg>>);

impl MeshTx for Queues {
    fn send(&mut self, to: ShardId, msg: MeshMsg) {
        self.0[to as usize].push_back(msg);
    }
}

struct Sim {
    shards: Vec<Engine<Recorder>>,
    mesh: Queues,
    now: u64,
}

impl Sim {
    fn new(n: u16) -> Sim {
        Self::with(n, unlimited())
    }

    fn with(n: u16, settings: Settings) -> Sim {
        Sim {
            shards: (0..n)
                .map(|i| {
                    let mut e = Engine::new(
                        i,
                        n,
                        settings.clone(),
                        Arc::new(ShardMetrics::default()),
                        7 + i as u64,
                    );
                    // A subscription token here is `sub:<user>:<channel>`.
                    e.set_subscription_check(Box::new(|token, user, channel| {
                        if token == format!("sub:{user}:{channel}") {
                            Ok(())
                        } else {
                            Err(format!("bad subscription token `{token}`"))
                        }
                    }));
                    // A connection token here is `tok:<user>:<expiry in s>`,
                    // with `:moderator` for that role.
                    e.set_token_check(Box::new(|token| {
                        let parts: Vec<&str> = token.split(':').collect();
                        match parts[..] {
                            ["tok", user, exp, ref role @ ..] => Ok(crate::access::Identity {
                                user: user.into(),
                                access: Access {
                                    roles: if role == ["moderator"] {
                                        Roles::MODERATOR
                                    } else {
                                        Roles::NONE
                                    },
                                    grants: None,
                                    expires: exp.parse().map_err(|_| "bad expiry".to_owned())?,
                                },
                                token: None,
                            }),
                            _ => Err(format!("invalid token `{token}`")),
                        }
                    }));
                    e
                })
                .collect(),
            // The shards, then the extra endpoints (server API, bridge, ban
            // store, hooks).
            mesh: Queues((0..n + 4).map(|_| VecDeque::new()).collect()),
            now: 1_000,
        }
    }

    fn connect(&mut self, shard: u16, user: &str, protocol: Protocol) -> (ConnRef, Recorder) {
        self.connect_device(shard, user, protocol, DeviceKind::Web)
    }

    fn connect_device(
        &mut self,
        shard: u16,
        user: &str,
        protocol: Protocol,
        device: DeviceKind,
    ) -> (ConnRef, Recorder) {
        self.connect_with(shard, user, protocol, device, Access::default())
    }

    /// A JSON web connection with these roles and grants.
    fn connect_as(&mut self, shard: u16, user: &str, access: Access) -> (ConnRef, Recorder) {
        self.connect_with(shard, user, Protocol::Json, DeviceKind::Web, access)
    }

    fn connect_with(
        &mut self,
        shard: u16,
        user: &str,
        protocol: Protocol,
        device: DeviceKind,
        access: Access,
    ) -> (ConnRef, Recorder) {
        let rec = Recorder::default();
        rec.protocol.set(Some(protocol));
        let member = Member {
            user: user.into(),
            session: SessionId(
                shard as u64,
                user.bytes()
                    .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)),
            ),
            protocol,
        };
        let conn = self.shards[shard as usize].open(
            rec.clone(),
            member,
            device,
            access,
            self.now,
            &mut self.mesh,
        );
        self.settle();
        (ConnRef { shard, conn }, rec)
    }

    /// Delivers mesh messages until every queue is empty.
    fn settle(&mut self) {
        loop {
            let mut moved = false;
            for s in 0..self.shards.len() {
                while let Some(m) = self.mesh.0[s].pop_front() {
                    self.shards[s].handle_mesh(m, self.now, &mut self.mesh);
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn send(&mut self, c: ConnRef, id: Option<u64>, event: ClientEvent) {
        self.shards[c.shard as usize].handle(
            c.conn,
            ClientMessage { id, event },
            self.now,
            &mut self.mesh,
        );
        self.settle();
    }

    /// Sends a frame's payload as the shell does (`text`: a text frame).
    fn send_frame(&mut self, c: ConnRef, text: bool, payload: &[u8]) {
        let mut buf = payload.to_vec();
        self.shards[c.shard as usize].handle_frame(
            c.conn,
            text,
            &mut buf,
            &mut json::Scratch::default(),
            self.now,
            &mut self.mesh,
        );
        self.settle();
    }

    fn join(&mut self, c: ConnRef, channel: &str) {
        self.send(
            c,
            Some(1),
            ClientEvent::ChannelJoin(ChannelJoin {
                channel_id: channel.into(),
                since: None,
                token: None,
            }),
        );
    }

    fn publish(&mut self, c: ConnRef, channel: &str, content: &str) {
        let m = MessageSend {
            channel_id: channel.into(),
            content: content.into(),
            reply_to: None,
            thread_id: None,
            mentions: Vec::new(),
            nonce: None,
        };
        self.send(c, Some(2), ClientEvent::MessageSend(m));
    }

    fn close(&mut self, c: ConnRef) {
        self.shards[c.shard as usize].close(c.conn, self.now, &mut self.mesh);
        self.settle();
    }

    /// Moves the clock on and runs every shard's due deadlines.
    fn advance(&mut self, ms: u64) {
        self.now += ms;
        for s in 0..self.shards.len() {
            self.shards[s].tick(self.now, &mut self.mesh);
        }
        self.settle();
    }
}

fn names(msgs: &[ServerMessage]) -> Vec<String> {
    msgs.iter().map(|m| m.event.name().to_owned()).collect()
}

/// The ack of request `id`.
fn ack_body(msgs: &[ServerMessage], id: u64) -> AckBody {
    msgs.iter()
        .find_map(|m| match &m.event {
            ServerEvent::Ack(a) if m.id == Some(id) => Some(a.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no ack {id} in {msgs:?}"))
}

/// The error code that answered request `id`.
fn error_code(msgs: &[ServerMessage], id: u64) -> ErrorCode {
    msgs.iter()
        .find_map(|m| match &m.event {
            ServerEvent::Error(e) if m.id == Some(id) => Some(e.code),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no error {id} in {msgs:?}"))
}

/// Every event `pick` recognises, in order.
fn picked<T>(msgs: &[ServerMessage], pick: impl Fn(&ServerEvent) -> Option<T>) -> Vec<T> {
    msgs.iter().filter_map(|m| pick(&m.event)).collect()
}

fn contents(msgs: &[ServerMessage]) -> Vec<(u64, String)> {
    msgs.iter()
        .filter_map(|m| match &m.event {
            ServerEvent::MessageNew(n) => Some((n.offset, n.content.clone())),
            _ => None,
        })
        .collect()
}

/// A channel whose owner is `owner` among `n` shards.
fn channel_owned_by(owner: u16, n: u16) -> String {
    (0..)
        .map(|i| format!("room-{i}"))
        .find(|c| owner_of(c, n) == owner)
        .unwrap()
}

fn join_since(channel: &str, offset: u64, epoch: &str) -> ClientEvent {
    ClientEvent::ChannelJoin(ChannelJoin {
        channel_id: channel.into(),
        since: Some(Since {
            offset,
            epoch: epoch.into(),
        }),
        token: None,
    })
}

fn message_ref(channel: &str, id: &str) -> MessageRef {
    MessageRef {
        channel_id: channel.into(),
        message_id: id.into(),
    }
}

/// The epoch of a channel, as the owner numbers it.
fn epoch_of(sim: &Sim, channel: &str) -> String {
    let owner = owner_of(channel, sim.shards.len() as u16) as usize;
    sim.shards[owner].owned[channel].epoch.to_string()
}

fn notifications(msgs: &[ServerMessage]) -> Vec<Notification> {
    picked(msgs, |e| match e {
        ServerEvent::NotificationNew(n) => Some(n.clone()),
        _ => None,
    })
}

fn presence_changes(msgs: &[ServerMessage]) -> Vec<(String, Status, Vec<DeviceKind>)> {
    picked(msgs, |e| match e {
        ServerEvent::PresenceChanged(p) => Some((p.user_id.clone(), p.status, p.devices.clone())),
        _ => None,
    })
}

fn presence_update(status: Option<Status>, custom: Option<Option<&str>>) -> ClientEvent {
    ClientEvent::PresenceUpdate(PresenceUpdate {
        status,
        custom_status: custom.map(|c| c.map(Into::into)),
        activity: None,
        device: None,
    })
}

fn call_events(msgs: &[ServerMessage]) -> Vec<(&'static str, Option<String>)> {
    msgs.iter()
        .filter_map(|m| match &m.event {
            ServerEvent::CallIncoming(c) => Some(("incoming", c.sdp.clone())),
            ServerEvent::CallAnswered(c) => Some(("answered", c.sdp.clone())),
            ServerEvent::CallRejected(c) => Some(("rejected", c.reason.clone())),
            ServerEvent::CallEnded(c) => Some(("ended", c.reason.clone())),
            ServerEvent::CallMissed(c) => Some(("missed", c.reason.clone())),
            ServerEvent::CallIceCandidate(c) => Some(("ice", Some(c.candidate.0.clone()))),
            _ => None,
        })
        .collect()
}

fn initiate(to: &str) -> ClientEvent {
    ClientEvent::CallInitiate(CallInitiate {
        to_user_id: to.into(),
        call_type: CallType::Video,
        sdp: Some("offer".into()),
    })
}

fn call_id(msgs: &[ServerMessage], id: u64) -> String {
    match ack_body(msgs, id) {
        AckBody::Call(c) => c.call_id,
        other => panic!("{other:?}"),
    }
}

// Topics.
mod calls;
mod channels;
mod custom;
mod dm;
mod event_stream;
mod hooks;
mod messages;
mod notifications;
mod presence;
mod receipts;
mod recovery;
mod sessions;
mod socketio_recovery;
mod subscribe;
mod tokens;
mod typing;
mod voice;
// The whole cluster, with an in-memory Redis.
mod cluster;
// Bounds, limits and moderation.
mod safety;
// Random sequences of operations, and what must hold after them.
mod chat_sequences;
mod sequences;
