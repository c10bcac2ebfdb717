//! The bridge's decisions, sans-IO: one [`Core`] per node, between the
//! node's shards (mesh messages) and Redis (operations and pub/sub
//! messages). It reads no clock and touches no socket; the IO loop
//! (`super::io`) and the tests drive it the same way.
//!
//! # Calling contract
//!
//! Inputs, each with the time `now` (ms):
//! - [`Core::connected`], [`Core::connect_failed`], [`Core::lost`]: what
//!   became of the link the core asked for ([`Core::poll_link`]);
//! - [`Core::from_shard`]: a mesh message from a shard;
//! - [`Core::pushed`]: a message Redis published on a followed channel;
//! - [`Core::answered`]: the reply (or fault) of an operation;
//! - [`Core::tick`]: time passed (heartbeats, query deadlines, operations
//!   that take too long, reconnection);
//! - [`Core::flush`]: the end of a round: what was gathered during it
//!   (events of a channel, subscriptions, frames for a node) becomes
//!   operations, one per channel, node or kind.
//!
//! Outputs, polled after every round, in this order: [`Core::poll_link`]
//! (connect, or drop the link), [`Core::poll_op`] (operations to run; the
//! loop sends all of them at once), [`Core::poll_mesh`] (messages to
//! shards); [`Core::next_deadline`] says when to tick next.
//!
//! # What it guarantees
//!
//! - An event a shard asks to sequence is either ordered by Redis (its
//!   sender then gets `Sequenced`), refused by Redis (`Refused`: not
//!   published), never sent because the link was down (`Unsequenced`: the
//!   owner sequences it alone and hands it over later), or sent over a link
//!   that went away before the answer (`Refused`, saying it may still be
//!   published). It is never both sequenced by Redis and given back to be
//!   sequenced alone: a slow Redis does not make two sequencers.
//! - A slow Redis is not a lost Redis: only an operation unanswered for
//!   `link_timeout` (half the node timeout) or a failed connection drops
//!   the link, and a refused command (a full Redis) never does.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use super::keys;
use super::ops::{Fault, Op, Outcome, Reply};
use super::proxy::{Proxies, Remote};
use super::wire::{self, CallWire, CallWireOp, NodeMsg, WireConn};
use crate::engine::cluster::{set_offset, Asker, QueryThen};
use crate::engine::user::NodePresence;
use crate::engine::{
    home_of, in_charge, owner_of, CallCmd, CallOp, ChannelPart, ConnId, ConnRef, FromBridge,
    Incoming, MeshMsg, ModKind, Moderation, NotificationChange, Outgoing, PresenceQuery,
    ResumePoints, SessionId, ShardId, ToBridge,
};
use crate::logs::Throttle;
use crate::metrics::ClusterMetrics;
use crate::protocol::{Conversation, DmMessage, Notification, Protocol, ServerMessage, Status};

/// Reconnection backoff, from the first wait to the last (ms), doubling.
const BACKOFF_MS: (u64, u64) = (100, 5_000);
/// How long a query of a channel's state waits for the other nodes (ms).
const QUERY_TIMEOUT_MS: u64 = 1_000;
/// Operations in flight at most; past it the loop stops taking messages
/// from the shards until answers come back.
const MAX_PENDING: usize = 8_192;

/// How often each node trims the events stream (the consumer groups'
/// reads make room in it).
const STREAM_TRIM_MS: u64 = 1000;

/// What the core needs to know of the node's configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub history_size: usize,
    pub history_ttl_ms: u64,
    pub max_notifications: usize,
    pub notification_ttl_ms: u64,
    pub max_conversations: usize,
    pub node_timeout_ms: u64,
    /// On a Redis Cluster, channels and users use sharded pub/sub.
    pub redis_cluster: bool,
    /// The events stream's key and bound, when it is on.
    pub events_stream: Option<(Arc<str>, u64)>,
}

impl Settings {
    pub fn of(config: &crate::config::Config) -> Settings {
        let s = config.engine_settings();
        Settings {
            history_size: s.history_size,
            history_ttl_ms: s.history_ttl_ms,
            max_notifications: s.max_notifications,
            notification_ttl_ms: s.notification_ttl_ms,
            max_conversations: s.max_conversations,
            node_timeout_ms: config.node_timeout_ms,
            redis_cluster: !config.redis_cluster.is_empty(),
            events_stream: (!config.events_stream.is_empty()).then(|| {
                (
                    config.events_stream.as_str().into(),
                    config.events_stream_max_len,
                )
            }),
        }
    }

    /// How long an operation may go unanswered before the link is dropped.
    pub fn link_timeout_ms(&self) -> u64 {
        (self.node_timeout_ms / 2).clamp(200, 30_000)
    }
}

/// What the loop should do with its link to Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkCmd {
    /// Connect (load the scripts, follow `base`), then call
    /// [`Core::connected`] or [`Core::connect_failed`].
    Connect { base: Vec<(String, bool)> },
    /// Drop the link now (answers still to come are not wanted), then
    /// [`Core::lost`] has been called already.
    Drop,
}

pub type OpId = u64;

enum LinkState {
    /// Waiting to connect again (`was_up`: it had been up).
    Down {
        retry_at: u64,
        backoff: u64,
        was_up: bool,
    },
    Connecting {
        backoff: u64,
        was_up: bool,
    },
    /// Connected: the bans and the first heartbeat are on their way.
    Joining {
        bans: Option<Vec<Moderation>>,
        beat: bool,
        was_up: bool,
    },
    Up,
}

/// What to do with an operation's answer.
enum Pending {
    Subscribed {
        channels: Vec<Arc<str>>,
        users: Vec<Arc<str>>,
    },
    Unsubscribed,
    /// (Boxed as the shards sent them, and sent back so.)
    #[allow(clippy::vec_box)]
    Sequenced {
        outs: Vec<Box<Outgoing>>,
    },
    Loaded {
        channel: Arc<str>,
    },
    /// A publish nobody needs the answer of (relays, frames, parts).
    Published,
    /// Optional events added to the events stream (as many as the stream
    /// had room for).
    Extras(u64),
    Asked(u64),
    CallTo(Box<CallOp>),
    Kept,
    /// A user's presence published: if it did not get through, the user's
    /// home hears it.
    Presence {
        user: Arc<str>,
        last_seen: u64,
    },
    /// A dropped session taken out of Redis, for the connection resuming
    /// it (none: it was here).
    SessionTaken(Option<(ConnRef, u64)>),
    /// This node's connections in a channel, kept: a count of 0 is then
    /// forgotten.
    MembersKept {
        channel: Arc<str>,
        count: u32,
    },
    /// Users just followed: their presence, for their homes.
    Followed(Vec<Arc<str>>),
    PresenceLoaded(Box<PresenceQuery>),
    Reach(Box<CallOp>),
    NotificationsKept(Option<Asker>),
    NotificationsRead {
        user: Arc<str>,
        asker: Option<Asker>,
    },
    ConversationsRead {
        user: Arc<str>,
        limit: usize,
        asker: Asker,
    },
    Moderated {
        token: u64,
        m: Box<Moderation>,
    },
    Bans,
    Beat {
        first: bool,
    },
    Trimmed,
    Leave,
}

/// Who waits for a moderation action's answer, and its request id.
type Waiting = (Option<(ConnRef, Protocol)>, Option<u64>);

/// An item of a channel's batch, in arrival order.
#[allow(clippy::large_enum_variant)] // a round's worth, moved once
enum Item {
    Sequence(Box<Outgoing>),
    Relay(NodeMsg),
    /// An optional event's line for the events stream.
    Extra(Vec<u8>),
}

/// A query of a channel's state waiting for the other nodes' parts.
struct Query {
    channel: Arc<str>,
    parts: Vec<ChannelPart>,
    then: QueryThen,
    /// Parts still expected (unknown until Redis says how many heard it).
    waiting: Option<usize>,
    until: u64,
}

/// How a followed channel stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Follow {
    /// Subscribing; the load follows.
    Subscribing,
    Following,
}

pub struct Core {
    id: u64,
    shards: usize,
    s: Settings,
    metrics: Arc<ClusterMetrics>,
    now: u64,
    rng: u64,
    link: LinkState,
    link_cmds: VecDeque<LinkCmd>,
    ops: VecDeque<(OpId, Op)>,
    next_op: OpId,
    /// Operations not answered yet: when they were sent (None: not yet),
    /// and what their answer is for.
    pending: HashMap<OpId, (Option<u64>, Pending)>,
    mesh: VecDeque<(ShardId, MeshMsg)>,
    /// Gathered during a round (see [`Core::flush`]).
    batches: Vec<(Arc<str>, Vec<Item>)>,
    batch_index: HashMap<Arc<str>, usize>,
    /// Pub/sub channels to follow, or stop following, this round: a name
    /// is in one at most (what a round does and undoes is not sent).
    subscribe: HashSet<String>,
    then_load: Vec<Arc<str>>,
    then_read: Vec<Arc<str>>,
    unsubscribe: HashSet<String>,
    frames: Vec<(u64, Vec<NodeMsg>)>,
    /// Optional events of no channel (direct messages) for the events
    /// stream, this round.
    extras: Vec<Vec<u8>>,
    to_users: HashMap<Arc<str>, Vec<NodeMsg>>,
    followed: HashMap<Arc<str>, Follow>,
    users: HashSet<Arc<str>>,
    /// This node's connections per channel as the shards last said, and
    /// the channels whose count Redis has yet to get (all of them again
    /// after a reconnection).
    member_counts: HashMap<Arc<str>, u32>,
    members_dirty: HashSet<Arc<str>>,
    live: HashSet<u64>,
    /// Nodes taken for gone, and since when (their presence is not read).
    gone: HashMap<u64, u64>,
    proxies: Proxies,
    queries: HashMap<u64, Query>,
    /// Moderation actions of this node on their way through Redis.
    moderation: HashMap<u64, Waiting>,
    next_token: u64,
    next_beat: u64,
    beating: bool,
    /// The events stream: when it is trimmed next, and whether a trim is
    /// on its way.
    next_trim: u64,
    trimming: bool,
    logs: CoreLogs,
}

#[derive(Default)]
struct CoreLogs {
    refused: Throttle,
    unreadable: Throttle,
}

impl Core {
    pub fn new(
        id: u64,
        shards: usize,
        s: Settings,
        metrics: Arc<ClusterMetrics>,
        seed: u64,
    ) -> Core {
        let me = crate::mesh::bridge_endpoint(shards);
        Core {
            id,
            shards,
            s,
            metrics,
            now: 0,
            rng: seed | 1,
            link: LinkState::Down {
                retry_at: 0,
                backoff: BACKOFF_MS.0,
                was_up: false,
            },
            link_cmds: VecDeque::new(),
            ops: VecDeque::new(),
            next_op: 1,
            pending: HashMap::new(),
            mesh: VecDeque::new(),
            batches: Vec::new(),
            batch_index: HashMap::new(),
            subscribe: HashSet::new(),
            then_load: Vec::new(),
            then_read: Vec::new(),
            unsubscribe: HashSet::new(),
            frames: Vec::new(),
            extras: Vec::new(),
            to_users: HashMap::new(),
            followed: HashMap::new(),
            users: HashSet::new(),
            member_counts: HashMap::new(),
            members_dirty: HashSet::new(),
            live: HashSet::new(),
            gone: HashMap::new(),
            proxies: Proxies::new(me),
            queries: HashMap::new(),
            moderation: HashMap::new(),
            next_token: 1,
            next_beat: 0,
            beating: false,
            next_trim: 0,
            trimming: false,
            logs: CoreLogs::default(),
        }
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether the link is up (the shards have been told `Up`).
    pub fn is_up(&self) -> bool {
        matches!(self.link, LinkState::Up)
    }

    /// Whether enough operations are in flight that the loop should stop
    /// taking messages from the shards for now.
    pub fn busy(&self) -> bool {
        self.pending.len() >= MAX_PENDING
    }

    /// Pub/sub channels every node follows, whatever it serves (and
    /// whether they are sharded on a Redis Cluster).
    fn base_subscriptions(&self) -> Vec<(String, bool)> {
        vec![
            (keys::MODERATION.to_string(), false),
            (keys::GONE.to_string(), false),
            (keys::node_channel(self.id), true),
        ]
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: ids only need to differ, not to be secret.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn fresh_epoch(&mut self) -> String {
        format!("{:016x}", self.random())
    }

    // ---------------------------------------------------------------
    // Outputs
    // ---------------------------------------------------------------

    pub fn poll_link(&mut self) -> Option<LinkCmd> {
        if let Some(c) = self.link_cmds.pop_front() {
            return Some(c);
        }
        if let LinkState::Down {
            retry_at,
            backoff,
            was_up,
        } = self.link
        {
            if self.now >= retry_at {
                self.link = LinkState::Connecting { backoff, was_up };
                return Some(LinkCmd::Connect {
                    base: self.base_subscriptions(),
                });
            }
        }
        None
    }

    pub fn poll_op(&mut self) -> Option<(OpId, Op)> {
        let (id, op) = self.ops.pop_front()?;
        if let Some(p) = self.pending.get_mut(&id) {
            p.0 = Some(self.now);
        }
        Some((id, op))
    }

    pub fn poll_mesh(&mut self) -> Option<(ShardId, MeshMsg)> {
        self.mesh.pop_front()
    }

    /// When [`Core::tick`] has something to do next.
    pub fn next_deadline(&self) -> Option<u64> {
        let mut next: Option<u64> = None;
        let mut at = |t: u64| next = Some(next.map_or(t, |n| n.min(t)));
        match self.link {
            LinkState::Down { retry_at, .. } => at(retry_at),
            LinkState::Up if !self.beating => at(self.next_beat),
            _ => {}
        }
        if self.s.events_stream.is_some() && self.is_up() && !self.trimming {
            at(self.next_trim);
        }
        if let Some(q) = self.queries.values().map(|q| q.until).min() {
            at(q);
        }
        if let Some(oldest) = self.pending.values().filter_map(|p| p.0).min() {
            at(oldest + self.s.link_timeout_ms());
        }
        next
    }

    fn op(&mut self, op: Op, then: Pending) -> OpId {
        let id = self.next_op;
        self.next_op += 1;
        self.ops.push_back((id, op));
        self.pending.insert(id, (None, then));
        id
    }

    fn send(&mut self, to: ShardId, msg: FromBridge) {
        self.mesh
            .push_back((to, MeshMsg::FromBridge(Box::new(msg))));
    }

    fn tell_all(&mut self, msg: impl Fn() -> FromBridge) {
        for s in 0..self.shards {
            self.send(s as ShardId, msg());
        }
    }

    fn owner(&self, channel: &str) -> ShardId {
        owner_of(channel, self.shards as u16)
    }

    fn home(&self, user: &str) -> ShardId {
        home_of(user, self.shards as u16)
    }

    // ---------------------------------------------------------------
    // The link
    // ---------------------------------------------------------------

    /// The link asked for is up: the scripts are loaded and the base
    /// channels followed. The bans and a first heartbeat come next; the
    /// shards hear `Up` once both are in.
    pub fn connected(&mut self, now: u64) {
        self.now = now;
        let was_up = match self.link {
            LinkState::Connecting { was_up, .. } => was_up,
            _ => return,
        };
        self.link = LinkState::Joining {
            bans: None,
            beat: false,
            was_up,
        };
        self.op(Op::ReadBans, Pending::Bans);
        self.beat(true);
    }

    pub fn connect_failed(&mut self, why: &str, now: u64) {
        self.now = now;
        if let LinkState::Connecting { backoff, was_up } = self.link {
            if let Some(n) = self.logs.refused.allow(now) {
                tracing::warn!(error = %why, retry_ms = backoff, suppressed = n, "cluster: cannot reach Redis");
            }
            self.link = LinkState::Down {
                retry_at: now + backoff,
                backoff: (backoff * 2).min(BACKOFF_MS.1),
                was_up,
            };
        }
    }

    /// The link went away (the loop found it broken). Everything in flight
    /// gets its answer: sequenced events sent over it may still be
    /// published (their senders are told so), those never sent go back to
    /// their owners to be sequenced alone, and the shards hear `Down`
    /// first.
    pub fn lost(&mut self, why: &str, now: u64) {
        self.now = now;
        let was_up = match self.link {
            LinkState::Up => true,
            LinkState::Joining { was_up, .. } => was_up,
            LinkState::Connecting { .. } => return self.connect_failed(why, now),
            LinkState::Down { .. } => return,
        };
        if was_up {
            tracing::warn!(error = %why, "cluster: lost Redis; channels are sequenced by this node until it is back");
        }
        self.link = LinkState::Down {
            retry_at: now + BACKOFF_MS.0,
            backoff: BACKOFF_MS.0 * 2,
            was_up,
        };
        self.metrics.up.set(0);
        self.metrics.channels.set(0);
        self.beating = false;
        // The shards hear first that the cluster is down, so that they
        // sequence what comes back to them.
        if was_up {
            self.tell_all(|| FromBridge::Down);
        }
        let mut pending: Vec<(OpId, (Option<u64>, Pending))> = self.pending.drain().collect();
        pending.sort_by_key(|(id, _)| *id);
        self.ops.clear();
        for (_, (sent, p)) in pending {
            let fault = Fault::Lost(why.to_string());
            self.settle(p, Err(fault), sent.is_some());
        }
        for (_, items) in std::mem::take(&mut self.batches) {
            for item in items {
                match item {
                    Item::Sequence(out) => self.give_back(out),
                    Item::Extra(_) => self.metrics.stream_skipped.inc(),
                    Item::Relay(_) => {}
                }
            }
        }
        let extras = std::mem::take(&mut self.extras);
        self.metrics.stream_skipped.add(extras.len() as u64);
        self.batch_index.clear();
        self.subscribe.clear();
        self.then_load.clear();
        self.then_read.clear();
        self.unsubscribe.clear();
        self.frames.clear();
        self.to_users.clear();
        self.followed.clear();
        self.users.clear();
        let tokens: Vec<u64> = self.queries.keys().copied().collect();
        for t in tokens {
            self.answer_query(t);
        }
        for (_, (from, ack)) in std::mem::take(&mut self.moderation) {
            if from.is_some() {
                let m = Moderation {
                    kind: ModKind::Kick,
                    user: "".into(),
                    channel: None,
                    reason: None,
                    by: String::new(),
                    at: 0,
                    from,
                    ack,
                };
                let e = "the cluster's Redis went away: try again".to_string();
                let to = from.map_or(0, |(c, _)| c.shard);
                self.send(to, FromBridge::ModerationFailed(Box::new(m), e));
            }
        }
    }

    /// Drops the link because it stopped answering: the loop drops it too.
    fn drop_link(&mut self, why: &str) {
        self.link_cmds.push_back(LinkCmd::Drop);
        let now = self.now;
        self.lost(why, now);
    }

    /// Joins the live nodes once the bans and the first heartbeat are in.
    fn maybe_up(&mut self) {
        let LinkState::Joining {
            bans: Some(_),
            beat: true,
            was_up,
        } = &mut self.link
        else {
            return;
        };
        let was_up = *was_up;
        let LinkState::Joining {
            bans: Some(bans), ..
        } = std::mem::replace(&mut self.link, LinkState::Up)
        else {
            unreachable!("matched above")
        };
        tracing::info!(node = %keys::node_name(self.id), "cluster: connected to Redis");
        if was_up {
            self.metrics.reconnects.inc();
        }
        self.metrics.up.set(1);
        self.next_beat = self.now + self.s.node_timeout_ms / 4;
        self.tell_all(|| FromBridge::Bans(bans.clone()));
        self.tell_all(|| FromBridge::Up);
        // Redis may have lost them (restarted empty), or kept ones that
        // changed meanwhile.
        self.members_dirty = self.member_counts.keys().cloned().collect();
    }

    /// Time passed: operations unanswered too long drop the link, queries
    /// past their second are answered, a heartbeat goes when due.
    pub fn tick(&mut self, now: u64) {
        self.now = now;
        let limit = self.s.link_timeout_ms();
        if let Some(oldest) = self.pending.values().filter_map(|p| p.0).min() {
            if now.saturating_sub(oldest) >= limit {
                let why = format!("Redis did not answer for {limit} ms");
                return self.drop_link(&why);
            }
        }
        let late: Vec<u64> = self
            .queries
            .iter()
            .filter(|(_, q)| q.until <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in late {
            self.answer_query(t);
        }
        if self.is_up() && !self.beating && now >= self.next_beat {
            self.beat(false);
        }
        if let Some((key, _)) = &self.s.events_stream {
            if self.is_up() && !self.trimming && now >= self.next_trim {
                self.trimming = true;
                self.next_trim = now + STREAM_TRIM_MS;
                let key = key.clone();
                self.op(Op::TrimStream { key }, Pending::Trimmed);
            }
        }
    }

    /// The node stops: this node leaves the live nodes (the others take its
    /// users offline at once). Returns the operation to wait for, if the
    /// link is up.
    pub fn leave(&mut self, now: u64) -> Option<OpId> {
        self.now = now;
        if !self.is_up() {
            return None;
        }
        Some(self.op(Op::Leave { node: self.id }, Pending::Leave))
    }

    /// Whether nothing is on its way: no operation waiting for an answer,
    /// no query waiting for parts, nothing gathered.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
            && self.ops.is_empty()
            && self.queries.is_empty()
            && self.batches.is_empty()
            && self.extras.is_empty()
            && self.mesh.is_empty()
    }

    /// Whether an operation is still waiting for its answer.
    pub fn is_pending(&self, op: OpId) -> bool {
        self.pending.contains_key(&op)
    }

    // ---------------------------------------------------------------
    // From the shards
    // ---------------------------------------------------------------

    /// A mesh message from a shard.
    pub fn from_shard(&mut self, msg: MeshMsg, now: u64) {
        self.now = now;
        match msg {
            MeshMsg::ToBridge(m) => match *m {
                // Kept whether Redis is there or not: sent when it is.
                ToBridge::Members { channel, count } => {
                    self.member_counts.insert(channel.clone(), count);
                    self.members_dirty.insert(channel);
                }
                m if self.is_up() => self.handle(m),
                m => self.refuse(m),
            },
            MeshMsg::ToConn { conn, frame } => self.frame_for(conn, frame),
            MeshMsg::ToConns(t) => {
                for conn in t.conns {
                    let frame = self
                        .proxies
                        .get(conn)
                        .and_then(|r| t.frames.get(r.protocol).cloned());
                    if let Some(f) = frame {
                        self.frame_for(conn, f);
                    }
                }
            }
            other => tracing::debug!(?other, "the bridge ignores a mesh message"),
        }
    }

    /// A frame the shards sent a stand-in: for a connection of another node.
    fn frame_for(&mut self, conn: ConnId, frame: bytes::Bytes) {
        if !self.is_up() {
            return;
        }
        let Some(r) = self.proxies.get(conn) else {
            return;
        };
        let msg = NodeMsg::Frame {
            to: wire_conn(r.node, r.conn, r.protocol),
            frame: frame.to_vec(),
        };
        match self.frames.iter_mut().find(|(n, _)| *n == r.node) {
            Some((_, v)) => v.push(msg),
            None => self.frames.push((r.node, vec![msg])),
        }
    }

    fn batch(&mut self, channel: &Arc<str>) -> &mut Vec<Item> {
        let i = match self.batch_index.get(channel) {
            Some(&i) => i,
            None => {
                self.batches.push((channel.clone(), Vec::new()));
                self.batch_index
                    .insert(channel.clone(), self.batches.len() - 1);
                self.batches.len() - 1
            }
        };
        &mut self.batches[i].1
    }

    fn handle(&mut self, m: ToBridge) {
        match m {
            ToBridge::Members { .. } => unreachable!("kept in from_shard"),
            ToBridge::Attach { channel } => match self.followed.get(&channel) {
                Some(Follow::Following) => self.load(channel),
                Some(Follow::Subscribing) => {}
                None => {
                    let name = keys::channel(&channel);
                    if self.unsubscribe.remove(&name) {
                        // Left and taken up again this round: still followed.
                        self.followed.insert(channel.clone(), Follow::Following);
                        self.load(channel);
                    } else {
                        self.followed.insert(channel.clone(), Follow::Subscribing);
                        self.subscribe.insert(name);
                        self.then_load.push(channel);
                    }
                    self.metrics.channels.set(self.followed.len() as u64);
                }
            },
            ToBridge::Detach { channel } => self.shard_detach(channel),
            ToBridge::StreamExtra { channel, line } => {
                if self.s.events_stream.is_none() {
                    return;
                }
                match channel {
                    Some(c) => self.batch(&c).push(Item::Extra(line)),
                    None => self.extras.push(line),
                }
            }
            ToBridge::Sequence(out) => self.shard_sequence(out),
            ToBridge::Relay(out) => self.shard_relay(out),
            ToBridge::FollowUser { user } => self.shard_follow_user(user),
            ToBridge::UnfollowUser { user } => self.shard_unfollow_user(user),
            ToBridge::ToUser { user, msg, except } => self.shard_to_user(user, msg, except),
            ToBridge::KeepSession {
                user,
                session,
                points,
                ttl_ms,
            } => self.shard_keep_session(user, session, points, ttl_ms),
            ToBridge::TakeSession {
                user,
                session,
                asker,
            } => self.shard_take_session(user, session, asker),
            ToBridge::VoiceJoined { user, channel, at } => {
                self.shard_voice_joined(user, channel, at)
            }
            ToBridge::Subscribe {
                user,
                channel,
                join,
            } => {
                let msg = NodeMsg::Subscribe {
                    origin: self.id,
                    channel: channel.to_string(),
                    join,
                };
                self.to_users.entry(user).or_default().push(msg);
            }
            ToBridge::Presence(p) => self.shard_presence(*p),
            ToBridge::LoadPresence(q) => self.shard_load_presence(q),
            ToBridge::Notifications {
                user,
                change,
                keep,
                asker,
            } => self.shard_notifications(user, change, keep, asker),
            ToBridge::LoadNotifications { user, asker } => {
                self.shard_load_notifications(user, asker)
            }
            ToBridge::Conversation {
                user,
                peer,
                msg,
                incoming,
            } => self.shard_conversation(user, peer, msg, incoming),
            ToBridge::LoadConversations { user, limit, asker } => {
                self.shard_load_conversations(user, limit, asker)
            }
            ToBridge::ChannelQuery {
                channel,
                parts,
                then,
            } => self.shard_channel_query(channel, parts, then),
            ToBridge::ChannelPart {
                part,
                origin,
                token,
                ..
            } => self.shard_channel_part(part, origin, token),
            ToBridge::CallTo { node, op } => self.shard_call_to(node, op),
            ToBridge::CallReach(op) => self.shard_call_reach(op),
            ToBridge::Moderate(m) => self.shard_moderate(m),
        }
    }

    /// A shard no longer needs a channel: unfollowed at the end of the round.
    fn shard_detach(&mut self, channel: Arc<str>) {
        if self.followed.remove(&channel).is_some() {
            self.metrics.channels.set(self.followed.len() as u64);
            let name = keys::channel(&channel);
            if self.subscribe.remove(&name) {
                self.then_load.retain(|c| *c != channel);
            } else {
                self.unsubscribe.insert(name);
            }
        }
    }

    /// An event to sequence: gathered with its channel's others of the round.
    fn shard_sequence(&mut self, out: Box<Outgoing>) {
        let channel = out.channel.clone();
        self.batch(&channel).push(Item::Sequence(out));
    }

    /// An event relayed without an offset (typing, member events).
    fn shard_relay(&mut self, out: Box<Outgoing>) {
        let msg = NodeMsg::Event {
            origin: self.id,
            except: out.except.as_deref().map(str::to_string),
            once: out.once,
            msg: out.msg,
        };
        self.batch(&out.channel).push(Item::Relay(msg));
    }

    /// A shard follows a user: subscribed, and the presence read, this round.
    fn shard_follow_user(&mut self, user: Arc<str>) {
        if self.users.insert(user.clone()) {
            let name = keys::user(&user);
            if !self.unsubscribe.remove(&name) {
                self.subscribe.insert(name);
            }
        }
        self.then_read.push(user);
    }

    /// A shard no longer follows a user.
    fn shard_unfollow_user(&mut self, user: Arc<str>) {
        if self.users.remove(&user) {
            let name = keys::user(&user);
            if self.subscribe.remove(&name) {
                self.then_read.retain(|u| *u != user);
            } else {
                self.unsubscribe.insert(name);
            }
        }
    }

    /// An event for a user's devices on other nodes.
    fn shard_to_user(&mut self, user: Arc<str>, msg: ServerMessage, except: Option<ConnRef>) {
        let skip = except
            .and_then(|c| self.proxies.get(c.conn))
            .map(|r| wire_conn(r.node, r.conn, r.protocol));
        let msg = NodeMsg::ToUser {
            origin: self.id,
            skip,
            msg,
        };
        self.to_users.entry(user).or_default().push(msg);
    }

    /// A dropped session kept in Redis, for any node to resume.
    fn shard_keep_session(
        &mut self,
        user: Arc<str>,
        session: SessionId,
        points: ResumePoints,
        ttl_ms: u64,
    ) {
        let op = Op::KeepSession {
            user,
            session: session.to_string(),
            points: kept_points(&points),
            ttl_ms,
        };
        self.op(op, Pending::Kept);
    }

    /// `session:resume`: the session taken from Redis, once.
    fn shard_take_session(
        &mut self,
        user: Arc<str>,
        session: SessionId,
        asker: Option<(ConnRef, u64)>,
    ) {
        let op = Op::TakeSession {
            user,
            session: session.to_string(),
        };
        self.op(op, Pending::SessionTaken(asker));
    }

    /// A user joined a voice channel here: the other nodes hear it.
    fn shard_voice_joined(&mut self, user: Arc<str>, channel: Arc<str>, at: u64) {
        let msg = NodeMsg::VoiceJoined {
            origin: self.id,
            channel: channel.to_string(),
            at,
        };
        self.to_users.entry(user).or_default().push(msg);
    }

    /// This node's part of a user's presence: written and published.
    fn shard_presence(&mut self, p: NodePresence) {
        let offline = p.view.status == Status::Offline && !p.connected;
        let archive = rkyv::to_bytes::<rkyv::rancor::Error>(&p)
            .expect("presence always serializes")
            .to_vec();
        let user: Arc<str> = p.view.user_id.as_str().into();
        let last_seen = p.view.last_seen;
        let payload = wire::payload(&[NodeMsg::Presence(p)]);
        let op = Op::Presence {
            user: user.clone(),
            node: self.id,
            archive,
            offline,
            sharded: self.s.redis_cluster,
            payload,
        };
        self.op(op, Pending::Presence { user, last_seen });
        self.metrics.sent.inc();
    }

    /// Presence of users read from Redis.
    fn shard_load_presence(&mut self, q: Box<PresenceQuery>) {
        let users = q.users.clone();
        self.op(Op::ReadPresence { users }, Pending::PresenceLoaded(q));
    }

    /// A change of a user's notifications: kept in Redis and published.
    fn shard_notifications(
        &mut self,
        user: Arc<str>,
        change: NotificationChange,
        keep: Vec<Notification>,
        asker: Option<Asker>,
    ) {
        let (op, args): (&'static str, Vec<String>) = match &change {
            NotificationChange::New(n) => ("add", field_and_json(std::slice::from_ref(n))),
            NotificationChange::Read(_) => ("set", field_and_json(&keep)),
            NotificationChange::Clear(_) => ("del", keep.iter().map(notification_field).collect()),
            NotificationChange::ClearAll => ("clear", Vec::new()),
        };
        let payload = wire::payload(&[NodeMsg::Notifications {
            origin: self.id,
            change,
        }]);
        let op = Op::Notifications {
            user,
            op,
            sharded: self.s.redis_cluster,
            payload,
            max: self.s.max_notifications,
            ttl_ms: self.s.notification_ttl_ms,
            args,
        };
        self.op(op, Pending::NotificationsKept(asker));
        self.metrics.sent.inc();
    }

    /// A user's notifications read from Redis.
    fn shard_load_notifications(&mut self, user: Arc<str>, asker: Option<Asker>) {
        let op = Op::ReadNotifications { user: user.clone() };
        self.op(op, Pending::NotificationsRead { user, asker });
    }

    /// A direct message's conversation kept in Redis.
    fn shard_conversation(
        &mut self,
        user: Arc<str>,
        peer: Arc<str>,
        msg: Box<DmMessage>,
        incoming: bool,
    ) {
        let json = serde_json::to_string(&msg).expect("messages serialize");
        let op = Op::Conversation {
            user,
            peer,
            timestamp: msg.timestamp,
            json,
            incoming,
            max: self.s.max_conversations,
            ttl_ms: self.s.notification_ttl_ms,
        };
        self.op(op, Pending::Kept);
    }

    /// A user's conversations read from Redis.
    fn shard_load_conversations(&mut self, user: Arc<str>, limit: usize, asker: Asker) {
        let op = Op::ReadConversations { user: user.clone() };
        self.op(op, Pending::ConversationsRead { user, limit, asker });
    }

    /// A query of a channel's state on every node.
    fn shard_channel_query(&mut self, channel: Arc<str>, parts: Vec<ChannelPart>, then: QueryThen) {
        let Some(like) = parts.first().map(|p| p.empty()) else {
            return;
        };
        let token = self.token();
        let payload = wire::payload(&[NodeMsg::Query {
            origin: self.id,
            token,
            like,
        }]);
        let name = keys::channel(&channel);
        self.queries.insert(
            token,
            Query {
                channel,
                parts,
                then,
                waiting: None,
                until: self.now + QUERY_TIMEOUT_MS,
            },
        );
        self.publish(name, payload, true, Pending::Asked(token));
    }

    /// This node's part of another node's channel query.
    fn shard_channel_part(&mut self, part: ChannelPart, origin: u64, token: u64) {
        let payload = wire::payload(&[NodeMsg::Part { token, part }]);
        self.publish(
            keys::node_channel(origin),
            payload,
            true,
            Pending::Published,
        );
    }

    /// A call's operation for the node that holds the call.
    fn shard_call_to(&mut self, node: u64, op: Box<CallOp>) {
        let Some(wire) = call_wire(self.id, &op) else {
            return;
        };
        let payload = wire::payload(&[NodeMsg::Call(wire)]);
        self.publish(keys::node_channel(node), payload, true, Pending::CallTo(op));
        self.metrics.sent.inc();
    }

    /// Whether a callee is connected to another node (its presence says).
    fn shard_call_reach(&mut self, op: Box<CallOp>) {
        let CallCmd::Create { callee, .. } = &op.op else {
            return;
        };
        let users = vec![callee.clone()];
        self.op(Op::ReadPresence { users }, Pending::Reach(op));
    }

    /// A kick, ban or unban: kept in Redis (bans) and published to every node.
    fn shard_moderate(&mut self, m: Box<Moderation>) {
        let token = self.token();
        let op = match m.kind {
            ModKind::Ban { .. } => "ban",
            ModKind::Unban => "unban",
            ModKind::Kick => "kick",
        };
        let json = crate::ban_store::to_json(&m);
        let payload = wire::payload(&[NodeMsg::Moderation {
            origin: self.id,
            token,
            json: json.clone(),
        }]);
        let field = ban_field(&m);
        let op = Op::Moderate {
            field,
            op,
            json,
            payload,
        };
        // Its publication may come back before the answer.
        self.moderation.insert(token, (m.from, m.ack));
        self.op(op, Pending::Moderated { token, m });
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn publish(&mut self, name: String, payload: Vec<u8>, sharded: bool, then: Pending) {
        let sharded = sharded && self.s.redis_cluster;
        self.op(
            Op::Publish {
                name,
                payload,
                sharded,
            },
            then,
        );
    }

    fn load(&mut self, channel: Arc<str>) {
        let fresh_epoch = self.fresh_epoch();
        let op = Op::Load {
            channel: channel.clone(),
            fresh_epoch,
            depth: self.s.history_size,
            ttl_ms: self.s.history_ttl_ms,
        };
        self.op(op, Pending::Loaded { channel });
    }

    fn beat(&mut self, first: bool) {
        self.beating = true;
        let op = Op::Heartbeat {
            node: self.id,
            silent_ms: self.s.node_timeout_ms * 3 / 4,
        };
        self.op(op, Pending::Beat { first });
    }

    /// What a shard asked while Redis is out of reach: a sequenced event
    /// goes back to its owner to be sequenced there, a question is answered
    /// with what this node knows, the rest is redone when Redis is back
    /// (the shards follow their channels and users again on `Up`) or does
    /// not outlive the moment (relayed events).
    fn refuse(&mut self, m: ToBridge) {
        match m {
            ToBridge::StreamExtra { .. } => self.metrics.stream_skipped.inc(),
            ToBridge::Sequence(out) => self.give_back(out),
            ToBridge::Moderate(m) => {
                let why = "the cluster's Redis is unreachable: try again".to_string();
                let to = m.from.map_or(0, |(c, _)| c.shard);
                self.send(to, FromBridge::ModerationFailed(m, why));
            }
            ToBridge::LoadPresence(q) => self.presence_loaded(q, Vec::new()),
            ToBridge::TakeSession {
                asker: Some((conn, gather)),
                ..
            } => {
                let points = None;
                self.send(
                    conn.shard,
                    FromBridge::SessionTaken {
                        conn,
                        gather,
                        points,
                    },
                );
            }
            ToBridge::Presence(p) => {
                let user: Arc<str> = p.view.user_id.as_str().into();
                self.unpublished(user, p.view.last_seen);
            }
            ToBridge::CallReach(op) => {
                let owner = (op.call >> 48) as ShardId;
                self.send(owner, FromBridge::CallReach(op, false));
            }
            ToBridge::CallTo { op, .. } => self.call_gone(op),
            ToBridge::LoadConversations { user, limit, asker } => {
                let home = self.home(&user);
                let msg = FromBridge::ConversationsLoaded {
                    user,
                    limit,
                    conversations: None,
                    asker,
                };
                self.send(home, msg);
            }
            ToBridge::Notifications {
                asker: Some(asker), ..
            } => {
                let to = asker.0.shard;
                self.send(to, FromBridge::NotificationsKept { asker, error: None });
            }
            ToBridge::ChannelQuery {
                channel,
                parts,
                then,
            } => {
                let owner = self.owner(&channel);
                let msg = FromBridge::ChannelAnswer {
                    channel,
                    parts,
                    then,
                };
                self.send(owner, msg);
            }
            ToBridge::LoadNotifications {
                user,
                asker: Some(asker),
            } => {
                let home = self.home(&user);
                let msg = FromBridge::NotificationsLoaded {
                    user,
                    notifications: Vec::new(),
                    asker: Some(asker),
                };
                self.send(home, msg);
            }
            _ => {}
        }
    }

    /// A user's presence that may not have reached Redis: its home
    /// retracts or publishes it again once Redis is back.
    fn unpublished(&mut self, user: Arc<str>, last_seen: u64) {
        let home = self.home(&user);
        self.send(home, FromBridge::Unpublished { user, last_seen });
    }

    /// A sequenced event that never reached Redis goes back to its owner.
    fn give_back(&mut self, out: Box<Outgoing>) {
        self.metrics.failed.inc();
        let owner = self.owner(&out.channel);
        self.send(owner, FromBridge::Unsequenced(out));
    }

    fn call_gone(&mut self, op: Box<CallOp>) {
        let to = op.from.map_or(0, |(c, _)| c.shard);
        self.send(to, FromBridge::CallGone(op));
    }

    fn presence_loaded(&mut self, q: Box<PresenceQuery>, mut views: Vec<Vec<NodePresence>>) {
        views.resize_with(q.users.len(), Vec::new);
        let home = q.users.first().map_or(0, |u| self.home(u));
        self.send(home, FromBridge::PresenceLoaded(q, views));
    }

    /// The end of a round: what was gathered becomes operations, one per
    /// channel (its sequenced events in one script call, its relayed ones
    /// in one publish, in their order), one per node for frames, one per
    /// user for its events, one subscription for every new channel and
    /// user.
    pub fn flush(&mut self, now: u64) {
        self.now = now;
        if !self.is_up() {
            return;
        }
        if !self.subscribe.is_empty() {
            let names = self.subscribe.drain().collect();
            let then = Pending::Subscribed {
                channels: std::mem::take(&mut self.then_load),
                users: std::mem::take(&mut self.then_read),
            };
            let sharded = self.s.redis_cluster;
            self.op(Op::Subscribe { names, sharded }, then);
        } else if !self.then_read.is_empty() || !self.then_load.is_empty() {
            // Followed already: read (or load) at once.
            for channel in std::mem::take(&mut self.then_load) {
                self.load(channel);
            }
            let users = std::mem::take(&mut self.then_read);
            self.op(
                Op::ReadPresence {
                    users: users.clone(),
                },
                Pending::Followed(users),
            );
        }
        for channel in std::mem::take(&mut self.members_dirty) {
            let Some(&count) = self.member_counts.get(&channel) else {
                continue;
            };
            let payload = wire::payload(&[NodeMsg::Members {
                node: self.id,
                count,
            }]);
            let op = Op::Members {
                channel: channel.clone(),
                node: self.id,
                count,
                sharded: self.s.redis_cluster,
                payload,
            };
            self.op(op, Pending::MembersKept { channel, count });
        }
        if !self.unsubscribe.is_empty() {
            let names = self.unsubscribe.drain().collect();
            let sharded = self.s.redis_cluster;
            self.op(Op::Unsubscribe { names, sharded }, Pending::Unsubscribed);
        }
        self.batch_index.clear();
        for (channel, items) in std::mem::take(&mut self.batches) {
            let mut items = items.into_iter().peekable();
            while let Some(first) = items.next() {
                match first {
                    Item::Sequence(out) => {
                        let mut outs = vec![out];
                        while let Some(Item::Sequence(_)) = items.peek() {
                            let Some(Item::Sequence(o)) = items.next() else {
                                unreachable!("peeked")
                            };
                            outs.push(o);
                        }
                        self.sequence(&channel, outs);
                    }
                    Item::Relay(msg) => {
                        let mut msgs = vec![msg];
                        while let Some(Item::Relay(_)) = items.peek() {
                            let Some(Item::Relay(m)) = items.next() else {
                                unreachable!("peeked")
                            };
                            msgs.push(m);
                        }
                        self.metrics.sent.add(msgs.len() as u64);
                        let payload = wire::payload(&msgs);
                        self.publish(keys::channel(&channel), payload, true, Pending::Published);
                    }
                    Item::Extra(line) => {
                        let mut lines = vec![line];
                        while let Some(Item::Extra(_)) = items.peek() {
                            let Some(Item::Extra(l)) = items.next() else {
                                unreachable!("peeked")
                            };
                            lines.push(l);
                        }
                        self.stream_extras(lines);
                    }
                }
            }
        }
        let extras = std::mem::take(&mut self.extras);
        if !extras.is_empty() {
            self.stream_extras(extras);
        }
        for (node, msgs) in std::mem::take(&mut self.frames) {
            let payload = wire::payload(&msgs);
            self.publish(keys::node_channel(node), payload, true, Pending::Published);
        }
        for (user, msgs) in std::mem::take(&mut self.to_users) {
            self.metrics.sent.add(msgs.len() as u64);
            let payload = wire::payload(&msgs);
            self.publish(keys::user(&user), payload, true, Pending::Published);
        }
    }

    /// Optional events added to the events stream, while it has room.
    fn stream_extras(&mut self, lines: Vec<Vec<u8>>) {
        let Some((key, max)) = self.s.events_stream.clone() else {
            return;
        };
        let count = lines.len() as u64;
        self.op(Op::StreamExtras { key, max, lines }, Pending::Extras(count));
    }

    /// One script call for a run of a channel's sequenced events.
    #[allow(clippy::vec_box)]
    fn sequence(&mut self, channel: &Arc<str>, outs: Vec<Box<Outgoing>>) {
        let events = outs
            .iter()
            .map(|o| {
                // A handed-over message has no origin: the node that made
                // it notified its mentions when it sequenced it alone.
                let origin = if o.handed_over.is_some() { 0 } else { self.id };
                let line = self.s.events_stream.as_ref().and_then(|_| {
                    Some(super::ops::StreamEvent {
                        line: crate::engine::history::StreamLine::of(&o.msg)?,
                        // Accepted already, or no one to refuse it to.
                        must: o.handed_over.is_some() || o.reply.is_none(),
                    })
                });
                let msg = NodeMsg::Event {
                    origin,
                    except: None,
                    once: None,
                    msg: o.msg.clone(),
                };
                (wire::encode(&msg), nonce_key(o), line)
            })
            .collect();
        self.metrics.sent.add(outs.len() as u64);
        let fresh_epoch = self.fresh_epoch();
        let op = Op::Sequence {
            channel: channel.clone(),
            fresh_epoch,
            depth: self.s.history_size,
            ttl_ms: self.s.history_ttl_ms,
            sharded: self.s.redis_cluster,
            stream: self.s.events_stream.clone(),
            events,
        };
        self.op(op, Pending::Sequenced { outs });
    }

    // ---------------------------------------------------------------
    // Answers
    // ---------------------------------------------------------------

    /// The reply (or fault) of operation `op`. A fault of a lost link
    /// drops the link; a refused command does not.
    pub fn answered(&mut self, op: OpId, r: Result<Reply, Fault>, now: u64) {
        self.now = now;
        let Some((sent, p)) = self.pending.remove(&op) else {
            return;
        };
        if let Err(Fault::Lost(why)) = &r {
            let why = why.clone();
            self.pending.insert(op, (sent, p));
            return self.drop_link(&why);
        }
        self.settle(p, r, sent.is_some());
        self.maybe_up();
    }

    /// Does what an answer is for. `sent`: the operation reached the link
    /// (a lost link then leaves its outcome unknown).
    fn settle(&mut self, p: Pending, r: Result<Reply, Fault>, sent: bool) {
        match (p, r) {
            (Pending::Subscribed { channels, users }, Ok(_)) => {
                for channel in channels {
                    if let Some(f) = self.followed.get_mut(&channel) {
                        *f = Follow::Following;
                        self.load(channel);
                    }
                }
                if !users.is_empty() {
                    let op = Op::ReadPresence {
                        users: users.clone(),
                    };
                    self.op(op, Pending::Followed(users));
                }
            }
            (Pending::Subscribed { .. }, Err(f)) => {
                // Followed channels are what the shards count on: a link
                // that cannot follow them is no link.
                self.refused("subscribe", &f);
                if matches!(f, Fault::Refused(_)) {
                    self.drop_link("Redis refused to follow channels");
                }
            }
            (Pending::Sequenced { outs }, r) => self.settle_sequenced(outs, r, sent),
            (Pending::Loaded { channel }, r) => self.settle_loaded(channel, r),
            (Pending::Asked(token), r) => self.settle_asked(token, r),
            (Pending::CallTo(op), r) => self.settle_call_to(op, r),
            (Pending::Followed(users), Ok(Reply::Presences(all))) => {
                for (user, fields) in users.into_iter().zip(all) {
                    let views = self.views(&user, fields);
                    if !views.is_empty() {
                        let home = self.home(&user);
                        self.send(home, FromBridge::Presences { user, views });
                    }
                }
            }
            (Pending::PresenceLoaded(q), r) => self.settle_presence_loaded(q, r),
            (Pending::Reach(op), r) => self.settle_reach(op, r),
            (Pending::NotificationsKept(asker), r) => self.settle_notifications_kept(asker, r),
            (Pending::NotificationsRead { user, asker }, r) => {
                self.settle_notifications_read(user, asker, r)
            }
            (Pending::ConversationsRead { user, limit, asker }, r) => {
                self.settle_conversations_read(user, limit, asker, r)
            }
            (Pending::Moderated { .. }, Ok(_)) => {}
            (Pending::Moderated { token, m }, Err(f)) => {
                if self.moderation.remove(&token).is_some() {
                    let why = format!("the cluster's Redis did not take it: {f}");
                    let to = m.from.map_or(0, |(c, _)| c.shard);
                    self.send(to, FromBridge::ModerationFailed(m, why));
                }
            }
            (Pending::Bans, Ok(Reply::Pairs(all))) => {
                let (live, expired) = read_bans(all, self.now);
                if !expired.is_empty() {
                    self.op(Op::DropBans { fields: expired }, Pending::Kept);
                }
                if let LinkState::Joining { bans, .. } = &mut self.link {
                    *bans = Some(live);
                }
            }
            (Pending::Bans, _) => {
                if let LinkState::Joining { bans, .. } = &mut self.link {
                    *bans = Some(Vec::new());
                }
            }
            (Pending::Beat { first }, r) => self.settle_beat(first, r),
            (Pending::Extras(count), r) => match r {
                Ok(Reply::Count(added)) => {
                    let skipped = count.saturating_sub(added.max(0) as u64);
                    self.metrics.stream_skipped.add(skipped);
                }
                Ok(_) => self.unreadable("optional events for the events stream"),
                Err(f) => {
                    self.metrics.stream_skipped.add(count);
                    self.refused("optional events for the events stream", &f);
                }
            },
            (Pending::Trimmed, r) => {
                self.trimming = false;
                match r {
                    Ok(Reply::Trimmed { length, trimmed }) => {
                        self.metrics.stream_length.set(length);
                        self.metrics.stream_trimmed.add(trimmed);
                    }
                    Ok(_) => self.unreadable("a trim of the events stream"),
                    Err(f) => self.refused("trim the events stream", &f),
                }
            }
            (Pending::SessionTaken(asker), r) => self.settle_session_taken(asker, r),
            (Pending::MembersKept { channel, count }, r) => match r {
                Ok(_) if count == 0 => {
                    if self.member_counts.get(&channel) == Some(&0) {
                        self.member_counts.remove(&channel);
                    }
                }
                Ok(_) => {}
                // Sent again on the next change, or all of them after a
                // reconnection.
                Err(f) => self.refused("a member count", &f),
            },
            (Pending::Presence { user, last_seen }, Err(f)) => {
                self.refused("a presence", &f);
                self.unpublished(user, last_seen);
            }
            (Pending::Published | Pending::Unsubscribed | Pending::Kept | Pending::Leave, r) => {
                if let Err(f) = r {
                    self.refused("a command", &f);
                }
            }
            (p, r) => {
                let what = match p {
                    Pending::Followed(_) => "presence of followed users",
                    _ => "an operation",
                };
                if let Err(f) = r {
                    self.refused(what, &f);
                }
            }
        }
    }

    /// Redis ordered a run of a channel's events: each sender gets its
    /// offset; or it did not (never sent: given back to be sequenced
    /// alone; sent and unanswered, or refused: the senders are told).
    #[allow(clippy::vec_box)]
    fn settle_sequenced(&mut self, outs: Vec<Box<Outgoing>>, r: Result<Reply, Fault>, sent: bool) {
        if let Ok(Reply::Sequenced { epoch, results }) = r {
            for (mut out, outcome) in outs.into_iter().zip(results) {
                let (offset, dup) = match outcome {
                    Outcome::New(o) => (o, false),
                    Outcome::Again(o) => (o, true),
                    Outcome::Full => {
                        self.metrics.stream_full.inc();
                        let owner = self.owner(&out.channel);
                        self.send(owner, FromBridge::StreamFull(out));
                        continue;
                    }
                };
                if out.reply.is_none() && out.handed_over.is_none() {
                    continue;
                }
                set_offset(&mut out.msg, &epoch, offset);
                out.duplicate = dup;
                out.epoch = Some(epoch.as_str().into());
                let owner = self.owner(&out.channel);
                self.send(owner, FromBridge::Sequenced(out));
            }
            return;
        }
        let why = match (r, sent) {
            (Err(Fault::Lost(_)), false) => {
                for out in outs {
                    self.give_back(out);
                }
                return;
            }
            (Err(Fault::Lost(e)), true) => format!(
                "the cluster's Redis did not answer ({e}): the message may still be published; send it again with the same nonce to be sure"
            ),
            (Err(Fault::Refused(e)), _) => {
                format!("the cluster's Redis refused the event: {e}")
            }
            (Ok(other), _) => format!("an unexpected answer from Redis: {other:?}"),
        };
        for out in outs {
            self.metrics.failed.inc();
            let owner = self.owner(&out.channel);
            self.send(owner, FromBridge::Refused(out, why.clone()));
        }
    }

    /// A channel's state read from Redis: its owner attaches it; or it
    /// could not be read.
    fn settle_loaded(&mut self, channel: Arc<str>, r: Result<Reply, Fault>) {
        let (offset, epoch, entries, members) = match r {
            Ok(Reply::Loaded {
                offset,
                epoch,
                entries,
                members,
            }) => (offset, epoch, entries, members),
            Ok(other) => {
                self.unreadable("a channel's state");
                tracing::debug!(?other, "an unexpected answer to a load");
                return;
            }
            Err(f) => {
                // Not loaded. Link lost: the owner hears `Down`, and asks
                // again after the next `Up`. Refused (a full Redis): the
                // owner hears so, and asks again later.
                if self.followed.remove(&channel).is_some() {
                    self.metrics.channels.set(self.followed.len() as u64);
                    self.unsubscribe.insert(keys::channel(&channel));
                }
                self.refused("load", &f);
                if let Fault::Refused(e) = f {
                    let owner = self.owner(&channel);
                    let why = format!("the cluster's Redis refused to load the channel: {e}");
                    self.send(owner, FromBridge::AttachFailed { channel, why });
                }
                return;
            }
        };
        if !self.followed.contains_key(&channel) {
            return;
        }
        let mut events = Vec::with_capacity(entries.len());
        // Newest first: give them oldest first.
        for (off, archive) in entries.into_iter().rev() {
            match wire::decode(&archive) {
                Ok(NodeMsg::Event { mut msg, .. }) => {
                    set_offset(&mut msg, &epoch, off);
                    events.push(msg);
                }
                Ok(_) | Err(_) => self.unreadable("a stored event"),
            }
        }
        let members = members
            .iter()
            .filter_map(|(node, n)| Some((keys::parse_node(node)?, *n)))
            .filter(|(node, n)| *node != self.id && *n > 0)
            .collect();
        let owner = self.owner(&channel);
        let msg = FromBridge::Attached {
            channel,
            epoch: epoch.into(),
            offset,
            entries: events,
            members,
        };
        self.send(owner, msg);
    }

    /// Another node's answer to a query this node made.
    fn settle_asked(&mut self, token: u64, r: Result<Reply, Fault>) {
        let heard = match r {
            Ok(Reply::Count(n)) => n.max(0) as usize,
            _ => return self.answer_query(token),
        };
        let followed = self
            .queries
            .get(&token)
            .is_some_and(|q| self.followed.contains_key(&q.channel));
        if let Some(q) = self.queries.get_mut(&token) {
            // This node hears its own query when it follows the
            // channel; it does not answer it.
            q.waiting = Some(heard.saturating_sub(usize::from(followed)));
            if q.parts.len() > q.waiting.unwrap_or(0) {
                self.answer_query(token);
            }
        }
    }

    /// A call's operation sent to the node holding it.
    fn settle_call_to(&mut self, op: Box<CallOp>, r: Result<Reply, Fault>) {
        if !matches!(r, Ok(Reply::Count(n)) if n > 0) {
            self.call_gone(op);
        }
    }

    /// Presence of users read for a query: its answer.
    fn settle_presence_loaded(&mut self, q: Box<PresenceQuery>, r: Result<Reply, Fault>) {
        let views = match r {
            Ok(Reply::Presences(all)) => q
                .users
                .iter()
                .zip(all)
                .map(|(u, fields)| self.views(u, fields))
                .collect(),
            Ok(_) => Vec::new(),
            Err(f) => {
                self.refused("read presence", &f);
                Vec::new()
            }
        };
        self.presence_loaded(q, views);
    }

    /// Whether a callee has a device on another node: the call goes on.
    fn settle_reach(&mut self, op: Box<CallOp>, r: Result<Reply, Fault>) {
        let online = match (r, &op.op) {
            (Ok(Reply::Presences(all)), CallCmd::Create { callee, .. }) => {
                let callee = callee.clone();
                all.into_iter().next().is_some_and(|fields| {
                    self.views(&callee, fields)
                        .iter()
                        .any(|p| p.connected || p.view.status != Status::Offline)
                })
            }
            _ => false,
        };
        let owner = (op.call >> 48) as ShardId;
        self.send(owner, FromBridge::CallReach(op, online));
    }

    /// A notification change written: its asker hears it.
    fn settle_notifications_kept(&mut self, asker: Option<Asker>, r: Result<Reply, Fault>) {
        let error = match r {
            Ok(_) => None,
            Err(f) => {
                self.refused("notifications", &f);
                Some(format!(
                    "kept on this node only, the cluster's Redis did not take it: {f}"
                ))
            }
        };
        if let Some(asker) = asker {
            let to = asker.0.shard;
            self.send(to, FromBridge::NotificationsKept { asker, error });
        }
    }

    /// A user's notifications read from Redis.
    fn settle_notifications_read(
        &mut self,
        user: Arc<str>,
        asker: Option<Asker>,
        r: Result<Reply, Fault>,
    ) {
        let notifications: Vec<Notification> = match r {
            Ok(Reply::Strings(all)) => all
                .iter()
                .filter_map(|j| serde_json::from_str(j).ok())
                .collect(),
            _ => Vec::new(),
        };
        if !notifications.is_empty() || asker.is_some() {
            let home = self.home(&user);
            let msg = FromBridge::NotificationsLoaded {
                user,
                notifications,
                asker,
            };
            self.send(home, msg);
        }
    }

    /// A user's conversations read from Redis.
    fn settle_conversations_read(
        &mut self,
        user: Arc<str>,
        limit: usize,
        asker: Asker,
        r: Result<Reply, Fault>,
    ) {
        let conversations = match r {
            Ok(Reply::Pairs(all)) => Some(read_conversations(all, limit)),
            _ => None,
        };
        let home = self.home(&user);
        let msg = FromBridge::ConversationsLoaded {
            user,
            limit,
            conversations,
            asker,
        };
        self.send(home, msg);
    }

    /// The heartbeat's answer: the live nodes, and those gone.
    fn settle_beat(&mut self, first: bool, r: Result<Reply, Fault>) {
        self.beating = false;
        self.next_beat = self.now + self.s.node_timeout_ms / 4;
        match r {
            Ok(Reply::Beat { new, removed, live }) => self.on_beat(new, removed, live, first),
            Ok(_) => {}
            Err(f) => self.refused("heartbeat", &f),
        }
        if first {
            if let LinkState::Joining { beat, .. } = &mut self.link {
                *beat = true;
            }
        }
    }

    /// A dropped session taken from Redis for `session:resume`.
    fn settle_session_taken(&mut self, asker: Option<(ConnRef, u64)>, r: Result<Reply, Fault>) {
        let Some((conn, gather)) = asker else {
            return;
        };
        let points = match r {
            Ok(Reply::Taken(Some(json))) => {
                let points = taken_points(&json);
                if points.is_none() {
                    self.unreadable("a kept session");
                }
                points
            }
            Ok(_) => None,
            // Out of reach: it cannot be resumed here.
            Err(f) => {
                self.refused("take a session", &f);
                None
            }
        };
        self.send(
            conn.shard,
            FromBridge::SessionTaken {
                conn,
                gather,
                points,
            },
        );
    }

    fn refused(&mut self, what: &str, f: &Fault) {
        if let Fault::Refused(e) = f {
            if let Some(n) = self.logs.refused.allow(self.now) {
                tracing::warn!(error = %e, suppressed = n, "cluster: Redis refused {what}");
            }
        }
    }

    fn unreadable(&mut self, what: &str) {
        if let Some(n) = self.logs.unreadable.allow(self.now) {
            tracing::warn!(suppressed = n, "cluster: {what} that cannot be read");
        }
    }

    /// Other nodes' parts of a user's presence, from Redis's fields (but
    /// this node's and those of nodes taken for gone, whose fields may not
    /// be cleaned up yet).
    fn views(&mut self, user: &str, fields: Vec<(String, Vec<u8>)>) -> Vec<NodePresence> {
        let mut views = Vec::with_capacity(fields.len());
        for (node, archive) in fields {
            let Some(n) = keys::parse_node(&node) else {
                continue;
            };
            if n == self.id || self.gone.contains_key(&n) {
                continue;
            }
            match rkyv::from_bytes::<NodePresence, rkyv::rancor::Error>(&archive) {
                Ok(p) => views.push(p),
                Err(_) => {
                    tracing::debug!(%user, "a presence field that cannot be read");
                    self.unreadable("a presence");
                }
            }
        }
        views
    }

    /// What a heartbeat found: nodes gone since the last one are dropped by
    /// the shards (their users' presence with them); the nodes this one
    /// found silent are cleaned up after and announced. A node that was not
    /// among the live ones although it had joined was taken for gone: it
    /// publishes its users' presence again.
    fn on_beat(&mut self, new: bool, removed: Vec<String>, live: Vec<String>, first: bool) {
        let parse = |v: &[String]| -> HashSet<u64> {
            v.iter().filter_map(|n| keys::parse_node(n)).collect()
        };
        let live = parse(&live);
        let removed_ids = parse(&removed);
        if new && !first {
            tracing::warn!(
                "cluster: the other nodes took this one for gone; publishing its presence again"
            );
            self.tell_all(|| FromBridge::Republish);
            self.members_dirty = self.member_counts.keys().cloned().collect();
        }
        let mut gone: HashSet<u64> = self.live.difference(&live).copied().collect();
        gone.extend(removed_ids.iter().copied());
        gone.remove(&self.id);
        let now = self.now;
        for n in &gone {
            self.gone.entry(*n).or_insert(now);
        }
        let ttl = (10 * self.s.node_timeout_ms).max(600_000);
        self.gone
            .retain(|n, at| !live.contains(n) && now.saturating_sub(*at) < ttl);
        self.live = live;
        for n in removed_ids {
            if n == self.id {
                continue;
            }
            tracing::warn!(node = %keys::node_name(n), "cluster: a node went silent; its users are offline now");
            self.op(Op::ForgetNode { node: n }, Pending::Kept);
        }
        if !gone.is_empty() {
            let gone: Vec<u64> = gone.into_iter().collect();
            self.tell_all(|| FromBridge::NodesGone(gone.clone()));
        }
    }

    /// Answers a query with the parts it has (its own first).
    fn answer_query(&mut self, token: u64) {
        let Some(q) = self.queries.remove(&token) else {
            return;
        };
        let owner = self.owner(&q.channel);
        let msg = FromBridge::ChannelAnswer {
            channel: q.channel,
            parts: q.parts,
            then: q.then,
        };
        self.send(owner, msg);
    }

    // ---------------------------------------------------------------
    // What Redis published
    // ---------------------------------------------------------------

    /// A message published on a channel this node follows.
    pub fn pushed(&mut self, name: &str, payload: &[u8], now: u64) {
        self.now = now;
        if !self.is_up() {
            return;
        }
        let p = match wire::read_payload(payload) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(channel = name, error = %e, "cluster: a payload that is not ours");
                return self.unreadable("a published message");
            }
        };
        if name == keys::MODERATION || name == keys::GONE || name == keys::node_channel(self.id) {
            for m in p.msgs {
                self.for_this_node(m);
            }
        } else if let Some(user) = keys::user_of(name) {
            let user: Arc<str> = user.into();
            for m in p.msgs {
                self.for_user(&user, m);
            }
        } else if let Some(channel) = keys::channel_of(name) {
            let Some((channel, _)) = self.followed.get_key_value(channel) else {
                return;
            };
            let channel = channel.clone();
            for (i, m) in p.msgs.into_iter().enumerate() {
                let offset = if p.offset > 0 { p.offset + i as u64 } else { 0 };
                self.for_channel(&channel, offset, &p.epoch, m);
            }
        }
    }

    fn for_this_node(&mut self, m: NodeMsg) {
        match m {
            NodeMsg::Moderation {
                origin,
                token,
                json,
            } => {
                let mut m = match crate::ban_store::from_json(&json) {
                    Ok(m) => m,
                    Err(_) => return self.unreadable("a moderation action"),
                };
                if origin == self.id {
                    if let Some((from, ack)) = self.moderation.remove(&token) {
                        m.from = from;
                        m.ack = ack;
                    }
                }
                let to = in_charge(&m, self.shards as u16);
                self.mesh.push_back((to, MeshMsg::Moderate(Arc::new(m))));
            }
            NodeMsg::Gone(n) if n == self.id => {
                tracing::warn!("cluster: the other nodes took this one for gone; publishing its presence again");
                self.tell_all(|| FromBridge::Republish);
                self.members_dirty = self.member_counts.keys().cloned().collect();
            }
            NodeMsg::Gone(n) => {
                self.gone.entry(n).or_insert(self.now);
                if self.live.remove(&n) {
                    self.tell_all(|| FromBridge::NodesGone(vec![n]));
                }
            }
            NodeMsg::Part { token, part } => {
                let Some(q) = self.queries.get_mut(&token) else {
                    return;
                };
                q.parts.push(part);
                if q.waiting.is_some_and(|w| q.parts.len() > w) {
                    self.answer_query(token);
                }
            }
            NodeMsg::Frame { to, frame } => {
                if (to.shard as usize) < self.shards && to.node == self.id {
                    let msg = MeshMsg::ToConn {
                        conn: ConnId {
                            slot: to.slot,
                            gen: to.gen,
                        },
                        frame: bytes::Bytes::from(frame),
                    };
                    self.mesh.push_back((to.shard, msg));
                }
            }
            NodeMsg::Call(wire) => {
                self.metrics.received.inc();
                let op = self.call_op(wire);
                let holder = (op.call >> 48) as ShardId;
                let to = if (holder as usize) < self.shards {
                    holder
                } else {
                    self.home(&op.user)
                };
                self.mesh.push_back((to, MeshMsg::CallOp(Box::new(op))));
            }
            _ => self.unreadable("a message for this node"),
        }
    }

    fn for_user(&mut self, user: &Arc<str>, m: NodeMsg) {
        let home = self.home(user);
        match m {
            NodeMsg::Notifications { origin, change } => {
                if origin == self.id {
                    return;
                }
                self.metrics.received.inc();
                let user = user.clone();
                self.send(home, FromBridge::Notifications { user, change });
            }
            NodeMsg::Presence(p) => {
                if p.node == self.id {
                    return;
                }
                self.metrics.received.inc();
                // A node that publishes lives (its heartbeat may come later).
                self.live.insert(p.node);
                self.gone.remove(&p.node);
                let user = user.clone();
                self.send(
                    home,
                    FromBridge::Presences {
                        user,
                        views: vec![p],
                    },
                );
            }
            NodeMsg::Subscribe {
                origin,
                channel,
                join,
            } => {
                if origin != self.id {
                    let msg = FromBridge::Subscribe {
                        user: user.clone(),
                        channel: channel.into(),
                        join,
                    };
                    self.send(home, msg);
                }
            }
            NodeMsg::VoiceJoined {
                origin,
                channel,
                at,
            } => {
                if origin != self.id {
                    let msg = FromBridge::VoiceElsewhere {
                        user: user.clone(),
                        channel: channel.into(),
                        at,
                        node: origin,
                    };
                    self.send(home, msg);
                }
            }
            NodeMsg::ToUser { origin, skip, msg } => {
                if origin == self.id {
                    return;
                }
                self.metrics.received.inc();
                let except = skip.filter(|s| s.node == self.id).map(|s| ConnRef {
                    shard: s.shard,
                    conn: ConnId {
                        slot: s.slot,
                        gen: s.gen,
                    },
                });
                let user = user.clone();
                self.send(
                    home,
                    FromBridge::ToUser {
                        user,
                        msg,
                        except,
                        origin,
                    },
                );
            }
            _ => self.unreadable("a user event"),
        }
    }

    fn for_channel(&mut self, channel: &Arc<str>, offset: u64, epoch: &str, m: NodeMsg) {
        let owner = self.owner(channel);
        match m {
            NodeMsg::Event {
                origin,
                except,
                once,
                mut msg,
            } => {
                self.metrics.received.inc();
                if offset > 0 {
                    set_offset(&mut msg, epoch, offset);
                }
                let inc = Incoming {
                    channel: channel.clone(),
                    offset,
                    epoch: epoch.into(),
                    origin,
                    except: except.map(Into::into),
                    once,
                    msg,
                };
                self.send(owner, FromBridge::Event(Box::new(inc)));
            }
            NodeMsg::Members { node, count } => {
                if node != self.id {
                    let msg = FromBridge::Members {
                        channel: channel.clone(),
                        node,
                        count,
                    };
                    self.send(owner, msg);
                }
            }
            NodeMsg::Query {
                origin,
                token,
                like,
            } => {
                if origin != self.id {
                    let msg = FromBridge::PartWanted {
                        channel: channel.clone(),
                        like,
                        origin,
                        token,
                    };
                    self.send(owner, msg);
                }
            }
            _ => self.unreadable("a channel message"),
        }
    }

    /// A call operation from another node, its asker stood in for here.
    fn call_op(&mut self, w: CallWire) -> CallOp {
        let from = w.from.map(|c| {
            let protocol = Protocol::from_index(c.protocol as usize).unwrap_or(Protocol::Json);
            let r = Remote {
                node: c.node,
                conn: ConnRef {
                    shard: c.shard,
                    conn: ConnId {
                        slot: c.slot,
                        gen: c.gen,
                    },
                },
                protocol,
            };
            (self.proxies.stand_in(r), protocol)
        });
        CallOp {
            call: w.call,
            user: w.user.into(),
            from,
            ack: w.ack,
            op: match w.op {
                CallWireOp::Answer(sdp) => CallCmd::Answer { sdp },
                CallWireOp::Reject(reason) => CallCmd::Reject { reason },
                CallWireOp::End => CallCmd::End,
                CallWireOp::Ice(c) => CallCmd::Ice(crate::protocol::Json(c)),
                CallWireOp::PartyGone => CallCmd::PartyGone,
            },
        }
    }
}

fn wire_conn(node: u64, conn: ConnRef, protocol: Protocol) -> WireConn {
    WireConn {
        node,
        shard: conn.shard,
        slot: conn.conn.slot,
        gen: conn.conn.gen,
        protocol: protocol.index() as u8,
    }
}

/// A call operation for the node that holds the call (`None`: calls are
/// made on the caller's node).
fn call_wire(origin: u64, op: &CallOp) -> Option<CallWire> {
    let wire_op = match &op.op {
        CallCmd::Answer { sdp } => CallWireOp::Answer(sdp.clone()),
        CallCmd::Reject { reason } => CallWireOp::Reject(reason.clone()),
        CallCmd::End => CallWireOp::End,
        CallCmd::Ice(c) => CallWireOp::Ice(c.0.clone()),
        CallCmd::PartyGone => CallWireOp::PartyGone,
        CallCmd::Create { .. } => return None,
    };
    Some(CallWire {
        call: op.call,
        user: op.user.to_string(),
        from: op.from.map(|(c, p)| wire_conn(origin, c, p)),
        ack: op.ack,
        op: wire_op,
    })
}

/// The key that keeps a message from being published twice when sent
/// again: its author and nonce (none without a nonce).
/// What Redis knows a message by, so that it is not published twice: its
/// sender's nonce, or for a handed-over message without one the id it was
/// sequenced under alone (user ids are never empty, so the two cannot meet).
fn nonce_key(out: &Outgoing) -> String {
    match (&out.msg.event, &out.handed_over) {
        (crate::protocol::ServerEvent::MessageNew(m), _) if m.nonce.is_some() => {
            format!("{}\0{}", m.user_id, m.nonce.as_deref().unwrap_or_default())
        }
        (_, Some(id)) => format!("\0h\0{id}"),
        _ => String::new(),
    }
}

/// A notification's field in the user's hash: by age, then id.
pub fn notification_field(n: &Notification) -> String {
    format!("{:016x}.{}", n.created_at, n.notification_id)
}

/// Field and JSON value of each notification, one after the other.
fn field_and_json(ns: &[Notification]) -> Vec<String> {
    ns.iter()
        .flat_map(|n| {
            [
                notification_field(n),
                serde_json::to_string(n).expect("notifications serialize"),
            ]
        })
        .collect()
}

/// A user's conversations as Redis keeps them, most recent first.
pub fn read_conversations(all: Vec<(String, String)>, limit: usize) -> Vec<Conversation> {
    let mut out: Vec<(u64, Conversation)> = all
        .into_iter()
        .filter_map(|(peer, v)| {
            let mut parts = v.splitn(3, ':');
            let unread = parts.next()?.parse().ok()?;
            let at = parts.next()?.parse().ok()?;
            let last_message = serde_json::from_str(parts.next()?).ok()?;
            Some((
                at,
                Conversation {
                    user_id: peer,
                    last_message,
                    unread,
                },
            ))
        })
        .collect();
    out.sort_by_key(|c| std::cmp::Reverse(c.0));
    out.into_iter().take(limit).map(|(_, c)| c).collect()
}

/// The field of a ban in the bans hash.
pub fn ban_field(m: &Moderation) -> String {
    serde_json::json!([&*m.user, m.channel.as_deref()]).to_string()
}

/// The bans in force at `now`, and the fields of expired ones.
pub fn read_bans(all: Vec<(String, String)>, now: u64) -> (Vec<Moderation>, Vec<String>) {
    let (mut live, mut expired) = (Vec::new(), Vec::new());
    for (field, json) in all {
        match crate::ban_store::from_json(&json) {
            Ok(m) => match m.kind {
                ModKind::Ban { until: Some(t) } if t <= now => expired.push(field),
                _ => live.push(m),
            },
            Err(e) => tracing::warn!(%field, error = %e, "cluster: a ban that cannot be read"),
        }
    }
    (live, expired)
}

/// A dropped session's points as Redis keeps them: an array of
/// `[channel, offset, epoch]`, or, with what was queued to a Socket.IO
/// connection, `{"channels": [...], "sent": [[index, offset, joined], ...]}`.
fn kept_points(points: &ResumePoints) -> String {
    let channels: Vec<(&str, u64, &str)> = points
        .channels
        .iter()
        .map(|(c, o, e)| (&**c, *o, &**e))
        .collect();
    let json = if points.sent.is_empty() {
        serde_json::json!(channels)
    } else {
        serde_json::json!({ "channels": channels, "sent": points.sent })
    };
    json.to_string()
}

/// Reads what [`kept_points`] wrote (`None`: not that).
fn taken_points(json: &str) -> Option<ResumePoints> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Kept {
        Channels(Vec<(String, u64, String)>),
        WithSent {
            channels: Vec<(String, u64, String)>,
            sent: Vec<crate::engine::Sent>,
        },
    }
    let (channels, sent) = match serde_json::from_str::<Kept>(json).ok()? {
        Kept::Channels(c) => (c, Vec::new()),
        Kept::WithSent { channels, sent } => (channels, sent),
    };
    let channels = channels
        .into_iter()
        .map(|(c, o, e)| (Arc::from(c), o, Arc::from(e)))
        .collect();
    Some(ResumePoints { channels, sent })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_sessions_read_back_in_either_form() {
        let channels = vec![("c".into(), 4, "e".into())];
        let plain = ResumePoints {
            channels: channels.clone(),
            sent: Vec::new(),
        };
        // The form nodes have always written, for native sessions.
        assert_eq!(kept_points(&plain), r#"[["c",4,"e"]]"#);
        assert_eq!(taken_points(&kept_points(&plain)), Some(plain));
        let socketio = ResumePoints {
            channels,
            sent: vec![(0, 3, true), (0, 4, false)],
        };
        assert_eq!(taken_points(&kept_points(&socketio)), Some(socketio));
        assert_eq!(taken_points("{}"), None);
        assert_eq!(taken_points("[1]"), None);
    }

    #[test]
    fn conversations_read_from_redis_come_latest_first_and_bad_ones_are_skipped() {
        let msg = |id: &str, at: u64| {
            serde_json::json!({
                "messageId": id, "fromUserId": "a", "toUserId": "b",
                "content": "x", "timestamp": at
            })
            .to_string()
        };
        let all = vec![
            ("old".to_string(), format!("0:5:{}", msg("1", 5))),
            ("new".to_string(), format!("3:9:{}", msg("2", 9))),
            ("bad".to_string(), "garbage".to_string()),
        ];
        let got = read_conversations(all, 10);
        let peers: Vec<&str> = got.iter().map(|c| c.user_id.as_str()).collect();
        assert_eq!(peers, ["new", "old"]);
        assert_eq!(got[0].unread, 3);
        assert_eq!(
            read_conversations(Vec::new(), 10),
            Vec::<Conversation>::new()
        );
    }
}
