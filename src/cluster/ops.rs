//! What the bridge's core asks of Redis ([`Op`]), and what comes back
//! ([`Reply`], or a [`Fault`]). The IO loop turns each operation into
//! commands (many of them in one pipeline per round) and each answer into a
//! reply; it decides nothing.

use std::sync::Arc;

/// An operation on Redis, with everything it needs.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Follow pub/sub channels (sharded ones with `SSUBSCRIBE` on a Redis
    /// Cluster). Answered with `Done` once Redis confirmed them all.
    Subscribe {
        names: Vec<String>,
        sharded: bool,
    },
    Unsubscribe {
        names: Vec<String>,
        sharded: bool,
    },
    /// The `sequence` script on one channel: each event's archive, its
    /// nonce key (empty: none) and, with the events stream on, its line
    /// for the stream. Answered with `Sequenced`.
    Sequence {
        channel: Arc<str>,
        fresh_epoch: String,
        depth: usize,
        ttl_ms: u64,
        sharded: bool,
        /// The events stream's key and bound, when it is on.
        stream: Option<(Arc<str>, u64)>,
        events: Vec<(Vec<u8>, String, Option<StreamEvent>)>,
    },
    /// The `load` script. Answered with `Loaded`.
    Load {
        channel: Arc<str>,
        fresh_epoch: String,
        depth: usize,
        ttl_ms: u64,
    },
    /// `PUBLISH` (`SPUBLISH` when sharded on a Redis Cluster). Answered
    /// with `Count`: how many subscribers heard it.
    Publish {
        name: String,
        payload: Vec<u8>,
        sharded: bool,
    },
    /// The `members` script (this node's connections in a channel), and
    /// the node's set of channels.
    Members {
        channel: Arc<str>,
        node: u64,
        count: u32,
        sharded: bool,
        payload: Vec<u8>,
    },
    /// The `presence` script (this node's part of a user's presence), and
    /// the node's set of users.
    Presence {
        user: Arc<str>,
        node: u64,
        archive: Vec<u8>,
        offline: bool,
        sharded: bool,
        payload: Vec<u8>,
    },
    /// Every node's part of these users' presence (`HGETALL` each).
    /// Answered with `Presences`, one list per user.
    ReadPresence {
        users: Vec<Arc<str>>,
    },
    /// The `notifications` script.
    Notifications {
        user: Arc<str>,
        op: &'static str,
        sharded: bool,
        payload: Vec<u8>,
        max: usize,
        ttl_ms: u64,
        args: Vec<String>,
    },
    /// A user's notifications (`HVALS`). Answered with `Strings`.
    ReadNotifications {
        user: Arc<str>,
    },
    /// The `conversation` script.
    Conversation {
        user: Arc<str>,
        peer: Arc<str>,
        timestamp: u64,
        json: String,
        incoming: bool,
        max: usize,
        ttl_ms: u64,
    },
    /// A user's conversations (`HGETALL`). Answered with `Pairs`.
    ReadConversations {
        user: Arc<str>,
    },
    /// A dropped session, for any node to resume (`SET` with an expiry).
    KeepSession {
        user: Arc<str>,
        session: String,
        points: String,
        ttl_ms: u64,
    },
    /// Takes a dropped session (`GETDEL`): only one node resumes it.
    /// Answered with `Taken`.
    TakeSession {
        user: Arc<str>,
        session: String,
    },
    /// The `moderate` script.
    Moderate {
        field: String,
        op: &'static str,
        json: String,
        payload: Vec<u8>,
    },
    /// The bans (`HGETALL`). Answered with `Pairs`.
    ReadBans,
    /// Removes expired bans.
    DropBans {
        fields: Vec<String>,
    },
    /// The `stream_extras` script: optional events added to the events
    /// stream while it holds fewer than `max` entries. Answered with
    /// `Count`: how many went in.
    StreamExtras {
        key: Arc<str>,
        max: u64,
        lines: Vec<Vec<u8>>,
    },
    /// The `trim_stream` script: the events stream trimmed up to what
    /// every consumer group has read. Answered with `Trimmed`.
    TrimStream {
        key: Arc<str>,
    },
    /// The `heartbeat` script: node `node`, silent past `silent_ms`.
    /// Answered with `Beat`.
    Heartbeat {
        node: u64,
        silent_ms: u64,
    },
    /// Removes a gone node's parts (its users' presence fields, its
    /// channels' member counts) and tells every node (`cc:gone`).
    ForgetNode {
        node: u64,
    },
    /// Node `node` stops: out of the live nodes, then `ForgetNode` for it.
    Leave {
        node: u64,
    },
}

impl Op {
    /// What the operation touches, for ordering: operations with the same
    /// key run in the order the core issued them (on a Redis Cluster,
    /// those with different keys run side by side). `None`: anywhere.
    pub fn order_key(&self) -> Option<&str> {
        use super::keys;
        match self {
            Op::Subscribe { .. } | Op::Unsubscribe { .. } | Op::Heartbeat { .. } => None,
            Op::TrimStream { key } | Op::StreamExtras { key, .. } => Some(key),
            Op::Sequence { channel, .. }
            | Op::Load { channel, .. }
            | Op::Members { channel, .. } => Some(channel),
            Op::Publish { name, .. } => Some(
                keys::channel_of(name)
                    .or(keys::user_of(name))
                    .unwrap_or(name),
            ),
            Op::Presence { user, .. }
            | Op::Notifications { user, .. }
            | Op::KeepSession { user, .. }
            | Op::TakeSession { user, .. }
            | Op::ReadNotifications { user }
            | Op::Conversation { user, .. }
            | Op::ReadConversations { user } => Some(user),
            Op::ReadPresence { users } => users.first().map(|u| &**u),
            Op::Moderate { .. } | Op::ReadBans | Op::DropBans { .. } => Some(keys::BANS),
            Op::ForgetNode { .. } | Op::Leave { .. } => Some(keys::NODES),
        }
    }
}

/// A sequenced event's entry in the events stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEvent {
    pub line: crate::engine::history::StreamLine,
    /// Added even when the stream is full: it was accepted already (an
    /// event sequenced alone while Redis was away, handed over).
    pub must: bool,
}

/// What became of one event of a `Sequence`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Sequenced at this offset.
    New(u64),
    /// A message sent again: the first one's offset (not published twice).
    Again(u64),
    /// Refused: the events stream is full.
    Full,
}

/// What an operation came back with.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Done,
    /// A publish: how many subscribers heard it.
    Count(i64),
    /// The events stream's length after a trim, and what was trimmed.
    Trimmed {
        length: u64,
        trimmed: u64,
    },
    /// The channel's epoch, and what became of each event.
    Sequenced {
        epoch: String,
        results: Vec<Outcome>,
    },
    /// A channel's state: its offset, epoch, recent events (offset and
    /// archive, newest first) and each node's connections.
    Loaded {
        offset: u64,
        epoch: String,
        entries: Vec<(u64, Vec<u8>)>,
        members: Vec<(String, u32)>,
    },
    /// Per user, each node's field (node id, archive).
    Presences(Vec<Vec<(String, Vec<u8>)>>),
    Strings(Vec<String>),
    Pairs(Vec<(String, String)>),
    /// What a `GETDEL` took.
    Taken(Option<String>),
    /// A heartbeat: whether this node was new among the live ones, the
    /// silent ones it removed, the live ones.
    Beat {
        new: bool,
        removed: Vec<String>,
        live: Vec<String>,
    },
}

/// Why an operation did not come back with a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The link went away: the operation may or may not have run.
    Lost(String),
    /// Redis answered with an error (a full Redis, a script that failed):
    /// the link is fine.
    Refused(String),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Lost(e) => write!(f, "the link to Redis went away: {e}"),
            Fault::Refused(e) => write!(f, "Redis refused it: {e}"),
        }
    }
}
