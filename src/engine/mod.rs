//! The state of one shard, sans-IO: connections, channel membership, and the
//! channels this shard owns. No sockets, no clock reads, no runtime.
//!
//! # Ownership
//! - A connection belongs to the shard that accepted it, for its whole life.
//! - Each channel has an **owner shard** ([`owner_of`]): it sequences the
//!   channel's messages (offsets), counts members per shard and protocol, and
//!   sends each event once to every shard that has members.
//! - Every shard keeps the local member list of each channel and appends the
//!   owner's frames to those members' outbound queues.
//!
//! # Calling contract
//! The shell drives an [`Engine`] with these inputs, in any order:
//! - [`Engine::open`] when a connection has authenticated, [`Engine::close`]
//!   when it is gone;
//! - [`Engine::handle`] for each decoded client message;
//! - [`Engine::handle_mesh`] for each message from another shard's mesh queue.
//!
//! Each takes `now_ms` (wall-clock milliseconds, for message timestamps) and
//! a [`MeshTx`] to which the engine hands messages for other shards. Frames
//! for local connections go straight to their [`Outbound`] queue. A publish
//! therefore costs one encoding per protocol in use, one mesh message per
//! shard with members, and one refcount increment per recipient.

pub mod chunked;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::metrics::ShardMetrics;
use crate::protocol::*;
pub use chunked::ChunkedVec;

pub type ShardId = u16;

/// A connection's slot on its shard; the generation tells a reused slot apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub slot: u32,
    pub gen: u32,
}

/// A connection anywhere in the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnRef {
    pub shard: ShardId,
    pub conn: ConnId,
}

/// A connection's outbound queue, as the engine sees it.
pub trait Outbound {
    /// Queues a frame. Returns false when the connection refused it (it is
    /// closing, or it was too slow and is being closed).
    fn push(&self, frame: &Bytes) -> bool;
}

/// Where the engine sends messages for other shards.
pub trait MeshTx {
    fn send(&mut self, to: ShardId, msg: MeshMsg);
}

/// What crosses between shards. Everything is owned or refcounted: no
/// shared mutable state. The hot variant, `Deliver`, is kept inline (a
/// channel name and two refcounted frames); rarer, larger ones are boxed so
/// that queue slots stay small.
#[derive(Debug)]
pub enum MeshMsg {
    /// To the owner: a connection asks to join.
    Join(Box<Join>),
    /// From the owner: the join is sequenced; deliveries follow from here.
    Joined(Box<Joined>),
    /// To the owner: a connection left (or closed).
    Leave(Box<Leave>),
    /// To the owner: a message to sequence and fan out.
    Publish(Box<Publish>),
    /// From the owner: an event for every local member of the channel.
    Deliver { channel: Arc<str>, frames: Frames },
    /// A frame for one local connection (an ack or an error).
    ToConn { conn: ConnId, frame: Bytes },
}

#[derive(Debug)]
pub struct Join {
    pub channel: Arc<str>,
    pub from: ConnRef,
    pub member: Member,
    pub ack: Option<u64>,
}

#[derive(Debug)]
pub struct Joined {
    pub channel: Arc<str>,
    pub conn: ConnId,
    pub member: Member,
    pub ack: Option<u64>,
    pub offset: u64,
    pub epoch: Arc<str>,
    pub members: u32,
}

#[derive(Debug)]
pub struct Leave {
    pub channel: Arc<str>,
    pub from: ConnRef,
    pub member: Member,
}

#[derive(Debug)]
pub struct Publish {
    pub channel: Arc<str>,
    pub from: ConnRef,
    pub member: Member,
    pub ack: Option<u64>,
    pub content: String,
    pub reply_to: Option<String>,
}

/// Who a connection is, as carried in membership messages.
#[derive(Debug, Clone)]
pub struct Member {
    pub user: Arc<str>,
    pub session: SessionId,
    pub protocol: Protocol,
}

/// A session's id: a random number and a per-shard counter, shown as 32
/// hex digits. Kept as integers so that a connection holds no string for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub u64, pub u64);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}{:016x}", self.0, self.1)
    }
}

/// Limits that keep per-connection state bounded.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_channels_per_connection: usize,
    pub max_content_chars: usize,
    pub max_channel_id_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_channels_per_connection: 256,
            max_content_chars: 4000,
            max_channel_id_bytes: 128,
        }
    }
}

/// The owner shard of a channel: FNV-1a of its id, stable across processes.
pub fn owner_of(channel: &str, shards: u16) -> ShardId {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in channel.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % shards.max(1) as u64) as ShardId
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JoinState {
    /// Sent to the owner; the ack id tells overlapping joins apart.
    Pending(Option<u64>),
    Joined,
}

/// A connection known to the engine.
pub struct Conn<O> {
    pub out: O,
    pub member: Member,
    channels: Vec<(Arc<str>, JoinState)>,
}

struct Slot<O> {
    gen: u32,
    conn: Option<Conn<O>>,
}

#[derive(Debug, Clone, Copy)]
struct LocalMember {
    conn: ConnId,
    protocol: Protocol,
}

/// A channel this shard owns.
struct Owned {
    /// Offset of the last message sequenced (0: none yet).
    offset: u64,
    epoch: Arc<str>,
    /// Members per shard: `[json, binary]`.
    per_shard: Vec<[u32; 2]>,
}

impl Owned {
    fn total(&self) -> u32 {
        self.per_shard.iter().map(|c| c[0] + c[1]).sum()
    }
    fn protocols(&self) -> (bool, bool) {
        self.per_shard
            .iter()
            .fold((false, false), |(j, b), c| (j || c[0] > 0, b || c[1] > 0))
    }
}

fn proto_index(p: Protocol) -> usize {
    match p {
        Protocol::Json => 0,
        Protocol::Binary => 1,
    }
}

pub struct Engine<O> {
    shard: ShardId,
    shards: u16,
    limits: Limits,
    metrics: Arc<ShardMetrics>,
    slots: ChunkedVec<Slot<O>>,
    free: Vec<u32>,
    local: HashMap<Arc<str>, Vec<LocalMember>>,
    owned: HashMap<Arc<str>, Owned>,
    rng: u64,
}

impl<O: Outbound> Engine<O> {
    /// `seed` feeds the generator of channel epochs (any value; tests fix it).
    pub fn new(
        shard: ShardId,
        shards: u16,
        limits: Limits,
        metrics: Arc<ShardMetrics>,
        seed: u64,
    ) -> Self {
        Engine {
            shard,
            shards,
            limits,
            metrics,
            slots: ChunkedVec::default(),
            free: Vec::new(),
            local: HashMap::new(),
            owned: HashMap::new(),
            rng: seed | 1,
        }
    }

    /// Registers an authenticated connection.
    pub fn open(&mut self, out: O, member: Member) -> ConnId {
        let conn = Conn {
            out,
            member,
            channels: Vec::new(),
        };
        match self.free.pop() {
            Some(slot) => {
                let s = &mut self.slots[slot as usize];
                s.conn = Some(conn);
                ConnId { slot, gen: s.gen }
            }
            None => {
                let slot = self.slots.push(Slot {
                    gen: 0,
                    conn: Some(conn),
                });
                ConnId {
                    slot: slot as u32,
                    gen: 0,
                }
            }
        }
    }

    pub fn conn(&self, id: ConnId) -> Option<&Conn<O>> {
        self.slots
            .get(id.slot as usize)
            .filter(|s| s.gen == id.gen)
            .and_then(|s| s.conn.as_ref())
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn<O>> {
        self.slots
            .get_mut(id.slot as usize)
            .filter(|s| s.gen == id.gen)
            .and_then(|s| s.conn.as_mut())
    }

    /// Number of open connections known to the engine.
    pub fn connections(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Forgets a connection: leaves its channels (telling their owners).
    pub fn close(&mut self, id: ConnId, now_ms: u64, tx: &mut impl MeshTx) {
        let Some(slot) = self
            .slots
            .get_mut(id.slot as usize)
            .filter(|s| s.gen == id.gen)
        else {
            return;
        };
        let Some(conn) = slot.conn.take() else { return };
        slot.gen = slot.gen.wrapping_add(1);
        self.free.push(id.slot);
        for (channel, state) in conn.channels {
            // A pending join is undone when its `Joined` finds the connection gone.
            if state == JoinState::Joined {
                self.remove_local(&channel, id);
                self.tell_owner_left(id, channel, conn.member.clone(), now_ms, tx);
            }
        }
    }

    /// Tells a channel's owner that one of this shard's connections left.
    fn tell_owner_left(
        &mut self,
        id: ConnId,
        channel: Arc<str>,
        member: Member,
        now_ms: u64,
        tx: &mut impl MeshTx,
    ) {
        let from = self.here(id);
        let owner = owner_of(&channel, self.shards);
        self.route(
            owner,
            MeshMsg::Leave(Box::new(Leave {
                channel,
                from,
                member,
            })),
            now_ms,
            tx,
        );
    }

    fn here(&self, conn: ConnId) -> ConnRef {
        ConnRef {
            shard: self.shard,
            conn,
        }
    }

    fn reply(&self, id: ConnId, msg: &ServerMessage) {
        if let Some(c) = self.conn(id) {
            let frame = encode_frame(c.member.protocol, msg);
            if !c.out.push(&frame) {
                self.metrics.queue_drops.inc();
            }
        }
    }

    fn error(&self, id: ConnId, ack: Option<u64>, code: ErrorCode, message: impl Into<String>) {
        self.reply(id, &ServerMessage::error(ack, code, message));
    }

    fn check_channel_id(&self, channel: &str) -> Result<(), String> {
        if channel.is_empty() || channel.len() > self.limits.max_channel_id_bytes {
            return Err(format!(
                "`channelId` must be 1 to {} bytes",
                self.limits.max_channel_id_bytes
            ));
        }
        if !channel.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("`channelId` must be printable ASCII without spaces".into());
        }
        Ok(())
    }

    /// Handles a decoded message from a local, authenticated connection.
    pub fn handle(&mut self, id: ConnId, msg: ClientMessage, now_ms: u64, tx: &mut impl MeshTx) {
        let ack = msg.id;
        match msg.event {
            ClientEvent::Heartbeat => self.reply(
                id,
                &ServerMessage {
                    id: ack,
                    event: ServerEvent::HeartbeatAck(HeartbeatAck { timestamp: now_ms }),
                },
            ),
            ClientEvent::Auth(_) => {
                self.error(id, ack, ErrorCode::BadRequest, "already authenticated")
            }
            ClientEvent::ChannelJoin(ChannelJoin { channel_id, .. }) => {
                self.join(id, ack, channel_id, now_ms, tx)
            }
            ClientEvent::ChannelLeave(ChannelRef { channel_id }) => {
                self.leave(id, ack, &channel_id, now_ms, tx)
            }
            ClientEvent::MessageSend(m) => self.send(id, ack, m, now_ms, tx),
            other @ ClientEvent::Unsupported(_) | other => self.error(
                id,
                ack,
                ErrorCode::Unsupported,
                format!("unsupported event `{}`", other.name()),
            ),
        }
    }

    fn join(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        channel_id: String,
        now_ms: u64,
        tx: &mut impl MeshTx,
    ) {
        if let Err(e) = self.check_channel_id(&channel_id) {
            return self.error(id, ack, ErrorCode::BadRequest, e);
        }
        let max = self.limits.max_channels_per_connection;
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        if conn.channels.iter().any(|(c, _)| **c == *channel_id) {
            return self.error(
                id,
                ack,
                ErrorCode::BadRequest,
                format!("already in channel `{channel_id}`"),
            );
        }
        if conn.channels.len() >= max {
            return self.error(
                id,
                ack,
                ErrorCode::TooLarge,
                format!("at most {max} channels per connection"),
            );
        }
        let channel: Arc<str> = channel_id.into();
        conn.channels
            .push((channel.clone(), JoinState::Pending(ack)));
        let member = conn.member.clone();
        let from = self.here(id);
        let owner = owner_of(&channel, self.shards);
        self.route(
            owner,
            MeshMsg::Join(Box::new(Join {
                channel,
                from,
                member,
                ack,
            })),
            now_ms,
            tx,
        );
    }

    fn leave(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        channel_id: &str,
        now_ms: u64,
        tx: &mut impl MeshTx,
    ) {
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        let Some(pos) = conn.channels.iter().position(|(c, _)| **c == *channel_id) else {
            return self.error(
                id,
                ack,
                ErrorCode::NotFound,
                format!("not in channel `{channel_id}`"),
            );
        };
        let (channel, state) = conn.channels.swap_remove(pos);
        let member = conn.member.clone();
        if state == JoinState::Joined {
            self.remove_local(&channel, id);
            self.tell_owner_left(id, channel, member, now_ms, tx);
        }
        self.reply(id, &ServerMessage::ack(ack, AckBody::Empty(Empty {})));
    }

    fn send(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        m: MessageSend,
        now_ms: u64,
        tx: &mut impl MeshTx,
    ) {
        let max = self.limits.max_content_chars;
        if m.content.len() > max && m.content.chars().count() > max {
            return self.error(
                id,
                ack,
                ErrorCode::TooLarge,
                format!("`content` is longer than {max} characters"),
            );
        }
        let Some(conn) = self.conn(id) else { return };
        let Some((channel, _)) = conn
            .channels
            .iter()
            .find(|(c, s)| **c == *m.channel_id && *s == JoinState::Joined)
        else {
            return self.error(
                id,
                ack,
                ErrorCode::Forbidden,
                format!("join `{}` before sending to it", m.channel_id),
            );
        };
        let msg = MeshMsg::Publish(Box::new(Publish {
            channel: channel.clone(),
            from: self.here(id),
            member: conn.member.clone(),
            ack,
            content: m.content,
            reply_to: m.reply_to,
        }));
        let owner = owner_of(&m.channel_id, self.shards);
        self.route(owner, msg, now_ms, tx);
    }

    fn route(&mut self, to: ShardId, msg: MeshMsg, now_ms: u64, tx: &mut impl MeshTx) {
        if to == self.shard {
            self.handle_mesh(msg, now_ms, tx);
        } else {
            tx.send(to, msg);
        }
    }

    fn remove_local(&mut self, channel: &str, id: ConnId) {
        if let Some(list) = self.local.get_mut(channel) {
            if let Some(pos) = list.iter().position(|m| m.conn == id) {
                list.swap_remove(pos);
            }
            if list.is_empty() {
                self.local.remove(channel);
            }
        }
    }

    fn next_epoch(&mut self) -> Arc<str> {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        format!("{:016x}", z ^ (z >> 31)).into()
    }

    /// Sends one event to every shard with members of an owned channel.
    fn fan_out(
        &mut self,
        channel: &Arc<str>,
        msg: &ServerMessage,
        now_ms: u64,
        tx: &mut impl MeshTx,
    ) {
        let Some(owned) = self.owned.get(channel) else {
            return;
        };
        let (json, binary) = owned.protocols();
        let frames = Frames::encode(msg, json, binary);
        let targets: Vec<ShardId> = owned
            .per_shard
            .iter()
            .enumerate()
            .filter(|(_, c)| c[0] + c[1] > 0)
            .map(|(s, _)| s as ShardId)
            .collect();
        for shard in targets {
            let d = MeshMsg::Deliver {
                channel: channel.clone(),
                frames: frames.clone(),
            };
            self.route(shard, d, now_ms, tx);
        }
    }

    /// Handles a message from another shard (or routed to this one).
    pub fn handle_mesh(&mut self, msg: MeshMsg, now_ms: u64, tx: &mut impl MeshTx) {
        match msg {
            MeshMsg::Join(j) => {
                let Join {
                    channel,
                    from,
                    member,
                    ack,
                } = *j;
                if !self.owned.contains_key(&channel) {
                    let epoch = self.next_epoch();
                    self.owned.insert(
                        channel.clone(),
                        Owned {
                            offset: 0,
                            epoch,
                            per_shard: vec![[0, 0]; self.shards as usize],
                        },
                    );
                }
                let event = ServerMessage::event(ServerEvent::MemberJoined(MemberEvent {
                    channel_id: channel.to_string(),
                    user_id: member.user.to_string(),
                    session_id: member.session.to_string(),
                }));
                // Existing members hear of the join before the joiner's first delivery.
                self.fan_out(&channel, &event, now_ms, tx);
                let owned = self.owned.get_mut(&channel).expect("inserted above");
                owned.per_shard[from.shard as usize][proto_index(member.protocol)] += 1;
                let joined = MeshMsg::Joined(Box::new(Joined {
                    channel,
                    conn: from.conn,
                    member,
                    ack,
                    offset: owned.offset,
                    epoch: owned.epoch.clone(),
                    members: owned.total(),
                }));
                self.route(from.shard, joined, now_ms, tx);
            }
            MeshMsg::Joined(j) => {
                let Joined {
                    channel,
                    conn: id,
                    member,
                    ack,
                    offset,
                    epoch,
                    members,
                } = *j;
                let body = AckBody::Join(JoinAck {
                    channel_id: channel.to_string(),
                    offset,
                    epoch: epoch.to_string(),
                    members,
                    recovered: None,
                });
                let pending = self.conn_mut(id).and_then(|c| {
                    c.channels
                        .iter_mut()
                        .find(|(ch, s)| *ch == channel && *s == JoinState::Pending(ack))
                        .map(|entry| entry.1 = JoinState::Joined)
                });
                match pending {
                    Some(()) => {
                        self.local
                            .entry(channel.clone())
                            .or_default()
                            .push(LocalMember {
                                conn: id,
                                protocol: member.protocol,
                            });
                        self.reply(id, &ServerMessage::ack(ack, body));
                    }
                    None => {
                        // Closed or left while the join was in flight: the
                        // join did happen (answer it if anyone is there to
                        // hear), then undo it.
                        if ack.is_some() {
                            self.reply(id, &ServerMessage::ack(ack, body));
                        }
                        self.tell_owner_left(id, channel, member, now_ms, tx);
                    }
                }
            }
            MeshMsg::Leave(l) => {
                let Leave {
                    channel,
                    from,
                    member,
                } = *l;
                let Some(owned) = self.owned.get_mut(&channel) else {
                    return;
                };
                let count = &mut owned.per_shard[from.shard as usize][proto_index(member.protocol)];
                *count = count.saturating_sub(1);
                if owned.total() == 0 {
                    self.owned.remove(&channel);
                    return;
                }
                let event = ServerMessage::event(ServerEvent::MemberLeft(MemberEvent {
                    channel_id: channel.to_string(),
                    user_id: member.user.to_string(),
                    session_id: member.session.to_string(),
                }));
                self.fan_out(&channel, &event, now_ms, tx);
            }
            MeshMsg::Publish(p) => {
                let Publish {
                    channel,
                    from,
                    member,
                    ack,
                    content,
                    reply_to,
                } = *p;
                let Some(owned) = self.owned.get_mut(&channel) else {
                    let msg = ServerMessage::error(
                        ack,
                        ErrorCode::NotFound,
                        format!("channel `{channel}` has no members"),
                    );
                    let frame = encode_frame(member.protocol, &msg);
                    return self.route(
                        from.shard,
                        MeshMsg::ToConn {
                            conn: from.conn,
                            frame,
                        },
                        now_ms,
                        tx,
                    );
                };
                owned.offset += 1;
                let offset = owned.offset;
                let message_id = format!("{}-{offset}", owned.epoch);
                self.metrics.messages_published.inc();
                let ack_frame = encode_frame(
                    member.protocol,
                    &ServerMessage::ack(
                        ack,
                        AckBody::Send(SendAck {
                            message_id: message_id.clone(),
                            channel_id: channel.to_string(),
                            offset,
                            timestamp: now_ms,
                            nonce: None,
                            duplicate: false,
                        }),
                    ),
                );
                self.route(
                    from.shard,
                    MeshMsg::ToConn {
                        conn: from.conn,
                        frame: ack_frame,
                    },
                    now_ms,
                    tx,
                );
                let event = ServerMessage::event(ServerEvent::MessageNew(MessageNew {
                    message_id,
                    channel_id: channel.to_string(),
                    user_id: member.user.to_string(),
                    content,
                    reply_to,
                    thread_id: None,
                    mentions: Vec::new(),
                    nonce: None,
                    offset,
                    timestamp: now_ms,
                }));
                self.fan_out(&channel, &event, now_ms, tx);
            }
            MeshMsg::Deliver { channel, frames } => {
                let Some(list) = self.local.get(&channel) else {
                    return;
                };
                let mut delivered = 0;
                let mut dropped = 0;
                for m in list {
                    let (Some(frame), Some(conn)) = (frames.get(m.protocol), self.conn(m.conn))
                    else {
                        continue;
                    };
                    if conn.out.push(frame) {
                        delivered += 1;
                    } else {
                        dropped += 1;
                    }
                }
                self.metrics.deliveries.add(delivered);
                self.metrics.queue_drops.add(dropped);
            }
            MeshMsg::ToConn { conn, frame } => {
                if let Some(c) = self.conn(conn) {
                    if !c.out.push(&frame) {
                        self.metrics.queue_drops.inc();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
