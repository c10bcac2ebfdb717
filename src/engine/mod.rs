//! The state of one shard, sans-IO: its connections, the channels it owns,
//! the users it is home to, and the calls those users receive. No sockets,
//! no clock reads, no runtime.
//!
//! # Ownership
//! - A **connection** belongs to the shard that accepted it, for its whole
//!   life. That shard keeps the connection's channel memberships and
//!   presence subscriptions, and each channel's local member list.
//! - Each **channel** has an owner shard ([`owner_of`]). It sequences the
//!   channel's events (offsets), keeps their log for recovery and the
//!   messages for history, edits, reactions and receipts, counts members
//!   per shard and per user, and holds typing and voice state. It sends
//!   each event once to every shard that has members.
//! - Each **user** has a home shard ([`home_of`], the same hash). It knows
//!   the user's devices on every shard and aggregates their presence, keeps
//!   the presence subscribers, notifications, direct-message conversations,
//!   the user's voice channel, the calls the user placed and receives, and
//!   sessions waiting to be resumed.
//!
//! # Calling contract
//! The shell drives an [`Engine`] with these inputs, in any order:
//! - [`Engine::open`] when a connection has authenticated, [`Engine::close`]
//!   when it is gone;
//! - [`Engine::handle`] for each decoded client message;
//! - [`Engine::handle_mesh`] for each message from another shard's queue;
//! - [`Engine::tick`] once [`Engine::next_deadline`] has passed.
//!
//! Each takes `now` (wall-clock milliseconds: message timestamps and
//! deadlines) and a [`MeshTx`] to which the engine hands messages for other
//! shards. Frames for local connections go straight to their [`Outbound`]
//! queue. A publish costs one encoding per protocol in use, one mesh message
//! per shard with members, and one refcount increment per recipient.

#![forbid(unsafe_code)]

pub mod bans;
pub mod channel;
pub mod chunked;
pub mod limits;
pub mod notifications;
pub mod timers;
pub mod user;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::access::{Access, Grants, Roles};
use crate::livekit::LiveKit;
use crate::metrics::ShardMetrics;
use crate::protocol::*;
use channel::{apply_voice, Link, Owned, Participant, Typing};
pub use chunked::ChunkedVec;
use cluster::{QueryThen, Reply};
use timers::{Timer, Timers};
use user::{Detached, Device, Kept, NodePresence, UserState};

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

    /// Closes the connection with a close frame (after what is queued).
    fn close(&self, code: u16, reason: &str);

    /// The user's home shard took the connection: what is queued may go
    /// (a shell may hold a new connection's first frames until then).
    fn admitted(&self);

    /// The user's home shard refused the connection (the user holds too
    /// many): the engine has forgotten it; the shell refuses the upgrade if
    /// it still can, or closes with 1008.
    fn refused(&self, reason: &str);
}

/// Where the engine sends messages for other shards.
pub trait MeshTx {
    fn send(&mut self, to: ShardId, msg: MeshMsg);
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

impl std::str::FromStr for SessionId {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(());
        }
        let hi = u64::from_str_radix(&s[..16], 16).map_err(|_| ())?;
        let lo = u64::from_str_radix(&s[16..], 16).map_err(|_| ())?;
        Ok(SessionId(hi, lo))
    }
}

/// The default of [`Settings::large_channel_members`] (see
/// docs/BENCHMARKS.md, "Join storms").
pub const LARGE_CHANNEL_MEMBERS: u32 = 500;

/// Bounds and timings of the engine's state (each configurable; see
/// `Config`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_channels_per_connection: usize,
    /// From this many connections in a channel (on every node), its joins
    /// and leaves are not broadcast (`channel:get_members` still lists
    /// them); 0: always broadcast.
    pub large_channel_members: u32,
    pub max_content_chars: usize,
    pub max_channel_id_bytes: usize,
    /// Events (and messages) a channel keeps for recovery and history.
    pub history_size: usize,
    /// And for how long.
    pub history_ttl_ms: u64,
    /// Most messages one `channel:get_history` returns.
    pub max_history_page: u32,
    pub typing_timeout_ms: u64,
    /// How long a user whose last connection dropped still looks as before.
    pub presence_grace_ms: u64,
    /// How long a dropped session can be resumed (0: never).
    pub resume_window_ms: u64,
    /// How long before its token expires a connection is sent
    /// `auth:expiring`.
    pub token_refresh_ahead_ms: u64,
    /// How long after its token expired a connection that did not refresh
    /// it is closed.
    pub token_expiry_grace_ms: u64,
    /// The names of the application's own events (none: no such event).
    pub custom_events: Option<crate::access::Patterns>,
    /// The optional kinds the event stream also carries.
    pub stream_extras: event_stream::Extras,
    /// Largest `data` of an application's event, in bytes of JSON.
    pub max_custom_event_bytes: usize,
    /// Channels whose messages the publish hook sees first (none: off).
    pub publish_hook: Option<crate::access::Patterns>,
    /// Questions to the backend one shard waits for at most; past it new
    /// ones are refused with `unavailable`.
    pub max_hook_waiting: usize,
    /// When the backend cannot answer (down, slow, a bad answer): `true`
    /// lets the message through, `false` refuses it (`unavailable`).
    pub hook_failure_allows: bool,
    /// `rpc` goes to the backend (`hooks.rpc_url`); otherwise it is
    /// `unsupported`.
    pub rpc_hook: bool,
    pub call_ring_timeout_ms: u64,
    pub max_notifications: usize,
    pub notification_ttl_ms: u64,
    /// Notifications the node keeps waiting at most, all users together
    /// (each home shard takes its share).
    pub max_stored_notifications: usize,
    /// Of those, at most this many made by one sender (mentions, missed
    /// calls).
    pub max_notifications_per_sender: usize,
    pub max_conversations: usize,
    /// Presence subscriptions one connection may hold.
    pub max_subscriptions: usize,
    pub livekit: Option<LiveKit>,
    /// Per user and event.
    pub rate_limits: limits::RateLimits,
    /// Refusals (less one per accepted event) after which a connection is
    /// closed with 1008 (0: never).
    pub rate_limit_strikes: u32,
    /// Connections of one user, counted by its home shard (0: no limit).
    pub max_connections_per_user: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_channels_per_connection: 256,
            large_channel_members: LARGE_CHANNEL_MEMBERS,
            max_content_chars: 4000,
            max_channel_id_bytes: 128,
            // A day of a busy channel's last thousand events.
            history_size: 1000,
            history_ttl_ms: 24 * 3600 * 1000,
            max_history_page: 100,
            typing_timeout_ms: 8000,
            // Long enough for a page reload or a network switch.
            presence_grace_ms: 5000,
            resume_window_ms: 120_000,
            token_refresh_ahead_ms: 60_000,
            token_expiry_grace_ms: 0,
            custom_events: None,
            stream_extras: event_stream::Extras::default(),
            max_custom_event_bytes: 4096,
            publish_hook: None,
            max_hook_waiting: 1000,
            hook_failure_allows: false,
            rpc_hook: false,
            call_ring_timeout_ms: 30_000,
            max_notifications: 100,
            notification_ttl_ms: 7 * 24 * 3600 * 1000,
            // About 35 MB at the ~350 bytes of a mention notification.
            max_stored_notifications: 100_000,
            // Ten times the notifications one user keeps.
            max_notifications_per_sender: 1_000,
            max_conversations: 100,
            max_subscriptions: 1000,
            livekit: None,
            rate_limits: limits::RateLimits::default(),
            rate_limit_strikes: 10,
            max_connections_per_user: 10,
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

/// The home shard of a user (the same hash as channels).
pub fn home_of(user: &str, shards: u16) -> ShardId {
    owner_of(user, shards)
}

/// Longest user id, message id, thread id, nonce, emoji, status text.
const MAX_ID_CHARS: usize = 128;
const MAX_MENTIONS: usize = 100;
const MAX_EMOJI_BYTES: usize = 64;
const MAX_REACTIONS_PER_MESSAGE: usize = 50;
const MAX_SDP_BYTES: usize = 32 * 1024;

// ---------------------------------------------------------------------------
// What crosses between shards
// ---------------------------------------------------------------------------

/// What crosses between shards. Everything is owned or refcounted: no
/// shared mutable state. The hot variant, `Deliver`, is kept inline; the
/// rest are boxed so that queue slots stay small.
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
    /// From the owner: an event for every local member of the channel
    /// (`offset` is 0 for events that are not sequenced).
    Deliver {
        channel: Arc<str>,
        /// Shared by every shard the event goes to (one allocation per
        /// event, and a small mesh slot).
        frames: Arc<Frames>,
        offset: u64,
    },
    /// The same, skipping the connections of one user (typing).
    DeliverExcept(Box<DeliverExcept>),
    /// A frame for one local connection (an ack, an error, an event).
    ToConn { conn: ConnId, frame: Bytes },
    /// One event for several local connections.
    ToConns(Box<ToConns>),
    /// To the owner: an operation of a member on a channel.
    ChannelOp(Box<ChannelOp>),
    /// To a user's home shard.
    UserOp(Box<UserOp>),
    /// To the shard that owns a call.
    CallOp(Box<CallOp>),
    /// To a home shard: the presence of these users (and subscribe to it).
    Presence(Box<PresenceQuery>),
    /// To a home shard: a connection no longer follows these users.
    Unsubscribe(Box<Unsubscribe>),
    /// Back to the shard that asked: part of a gathered answer.
    Gathered(Box<Gathered>),
    /// A kick (to the shard in charge: the user's home, or the channel's
    /// owner), or a ban or unban (to every shard, which all keep the table).
    Moderate(Arc<Moderation>),
    /// From a channel's owner: take the user's connections out of the
    /// channel.
    Evict(Arc<Moderation>),
    /// From a user's home: close this connection of the user.
    Disconnect {
        conn: ConnId,
        moderation: Arc<Moderation>,
    },
    /// From the server API thread: a request of the application backend,
    /// to the shard that carries it out (which answers `from`).
    Api(Box<ApiCall>),
    /// From a user's home, for each new connection: whether it was taken
    /// (a user holds at most `max_connections_per_user`).
    Admission { conn: ConnId, refused: bool },
    /// From a user's home: the user's connections are on this many shards
    /// (each takes that share of the user's rate limits; 0: none here).
    Spread { user: Arc<str>, shards: u16 },
    /// From a shard to its node's bridge (cluster mode).
    ToBridge(Box<ToBridge>),
    /// From the bridge to a shard.
    FromBridge(Box<FromBridge>),
    /// From a shard to the ban store: make this ban or unban durable, then
    /// answer `from`.
    StoreBan {
        from: ShardId,
        moderation: Box<Moderation>,
    },
    /// From an owner shard to the store: a sequenced event's line for
    /// the history file (see `history`).
    KeepHistory(Box<Vec<u8>>),
    /// From a shard to the store: an optional event's line for the
    /// outbox only (see `event_stream::Extras`).
    KeepEvent(Box<Vec<u8>>),
    /// From a shard to the hooks endpoint: a question for the application
    /// backend (see `hooks`).
    HookCall(Box<hooks::HookCall>),
    /// From the hooks endpoint: the backend's answer.
    HookAnswer(Box<hooks::HookAnswer>),
    /// From a user's home to a connection's shard: the server joins it to
    /// a channel or takes it out (see `subscribe`).
    ServerJoin(Box<subscribe::ServerJoin>),
    /// From the ban store: the ban is on disk (`error`: it is not, and
    /// must not take effect).
    BanStored {
        moderation: Box<Moderation>,
        error: Option<String>,
    },
    /// To the shard that holds a Socket.IO long-polling session: a socket
    /// whose request names it, accepted by another shard (the shell serves
    /// it; the engine never sees it).
    Adopt(Box<Adoption>),
}

/// A socket changing shards: its descriptor, the bytes read from it, and
/// what it counts against its address.
#[derive(Debug)]
pub struct Adoption {
    pub fd: std::os::fd::OwnedFd,
    pub bytes: Vec<u8>,
    pub ip: crate::admission::Slots,
}

/// A request of the server API. Answers go to `from` (the API thread's
/// endpoint) as `ToConn` frames carrying an `ack` or an `error` with id
/// `id`, like a client's.
#[derive(Debug)]
pub struct ApiCall {
    pub from: ConnRef,
    pub id: u64,
    pub op: ApiOp,
}

#[derive(Debug)]
pub enum ApiOp {
    /// To the channel's owner: a message from `user`, sequenced and kept
    /// like any other (the channel need not have members).
    Publish {
        user: String,
        send: MessageSend,
        meta: Option<Json>,
    },
    /// To the user's home: a notification, delivered now or kept.
    Notify {
        user: String,
        kind: String,
        data: Option<Json>,
    },
    /// To any shard: a kick, ban or unban (`by` names who asked).
    Moderate(Moderation),
    /// To the channel's owner: its members.
    Members { channel: String },
    /// To the channel's owner, or to the user's home: an application's
    /// own event, not kept.
    Emit {
        name: String,
        to: EmitTo,
        data: Option<Json>,
    },
    /// To the user's home: its connections join `channel` (or leave it).
    Subscribe {
        user: String,
        channel: String,
        join: bool,
    },
}

/// Where `POST /api/emit` sends its event.
#[derive(Debug, Clone)]
pub enum EmitTo {
    Channel(String),
    User(String),
}

/// A moderation action.
#[derive(Debug, Clone)]
pub struct Moderation {
    pub kind: ModKind,
    pub user: Arc<str>,
    /// The channel, or `None` for the whole server.
    pub channel: Option<Arc<str>>,
    pub reason: Option<String>,
    /// Who did it: a moderator's user id, or what the server API named.
    pub by: String,
    /// When (milliseconds).
    pub at: u64,
    /// Who asked, answered by the shard in charge.
    pub from: Option<(ConnRef, Protocol)>,
    pub ack: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModKind {
    Kick,
    /// Until a time (milliseconds), or until lifted.
    Ban {
        until: Option<u64>,
    },
    Unban,
}

#[derive(Debug)]
pub struct Join {
    pub channel: Arc<str>,
    pub from: ConnRef,
    pub member: Member,
    pub ack: Option<u64>,
    pub since: Option<Since>,
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
    pub recovered: Option<bool>,
    /// The events missed since the join's `since`, encoded for the joiner.
    pub replay: Vec<Bytes>,
    /// Set when the owner refused the join (the user is banned from it,
    /// or the cluster's Redis refused to load the channel).
    pub refused: Option<(ErrorCode, String)>,
}

#[derive(Debug)]
pub struct Leave {
    pub channel: Arc<str>,
    pub from: ConnRef,
    pub member: Member,
    /// Set when a server-wide kick or ban closed the connection.
    pub moderation: Option<Arc<Moderation>>,
}

#[derive(Debug)]
pub struct Publish {
    pub channel: Arc<str>,
    pub from: ConnRef,
    pub member: Member,
    pub ack: Option<u64>,
    pub send: MessageSend,
    /// The application backend's metadata (the publish hook's rewrite,
    /// the server API's publish); a client cannot set it.
    pub meta: Option<Json>,
}

#[derive(Debug)]
pub struct DeliverExcept {
    pub channel: Arc<str>,
    pub frames: Arc<Frames>,
    pub except: Arc<str>,
}

#[derive(Debug)]
pub struct ToConns {
    pub conns: Vec<ConnId>,
    pub frames: Frames,
}

#[derive(Debug)]
pub struct ChannelOp {
    pub channel: Arc<str>,
    pub from: ConnRef,
    pub member: Member,
    pub ack: Option<u64>,
    pub op: ChanCmd,
}

/// Who asked a channel's owner: a [`ChannelOp`] without its command.
pub(super) struct ChanReq {
    pub channel: Arc<str>,
    pub from: ConnRef,
    pub member: Member,
    pub ack: Option<u64>,
}

impl ChanReq {
    /// The channel, the connection to answer, its member, the request id.
    pub fn parts(self) -> (Arc<str>, ConnRef, Member, Option<u64>) {
        (self.channel, self.from, self.member, self.ack)
    }
}

/// `not_found` for a message the channel's history does not hold.
pub(super) fn not_in_history(ack: Option<u64>, id: &str) -> ServerMessage {
    err(
        ack,
        ErrorCode::NotFound,
        format!("message `{id}` is not in the channel's history"),
    )
}

/// What a member asks of a channel's owner.
#[derive(Debug)]
pub enum ChanCmd {
    Edit {
        message_id: String,
        content: String,
    },
    Delete {
        message_id: String,
        /// Sent by a moderator, who may delete others' messages.
        moderator: bool,
    },
    React(MessageReact),
    History(GetHistory),
    Members,
    TypingStart,
    TypingStop,
    TypingActive,
    Delivered {
        message_id: String,
    },
    MarkRead {
        message_id: String,
    },
    ReadReceipts {
        message_id: String,
    },
    /// From the user's home shard, which keeps one voice channel per user;
    /// `seq` names this join (see `UserCmd::VoiceGone`).
    VoiceJoin {
        seq: u64,
    },
    VoiceLeave,
    VoiceUpdate(VoiceUpdate),
    VoiceParticipants,
    /// An application's own event, to every member.
    Custom {
        name: String,
        data: Option<Json>,
    },
}

#[derive(Debug)]
pub struct UserOp {
    pub user: Arc<str>,
    /// The connection it comes from (replies go there), if any.
    pub from: Option<(ConnRef, Protocol)>,
    pub ack: Option<u64>,
    pub op: UserCmd,
}

/// Who asked a user's home shard: a [`UserOp`] without its command.
pub(super) struct UserReq {
    pub user: Arc<str>,
    pub from: Option<(ConnRef, Protocol)>,
    pub ack: Option<u64>,
}

impl UserReq {
    /// The user, the connection to answer, the request id.
    pub fn parts(self) -> (Arc<str>, Option<(ConnRef, Protocol)>, Option<u64>) {
        (self.user, self.from, self.ack)
    }
}

/// What a user's home shard is asked or told.
#[derive(Debug)]
pub enum UserCmd {
    Online {
        session: SessionId,
        device: DeviceKind,
    },
    /// The connection is gone; with its channels when it may be resumed.
    Offline {
        resume: Option<ResumePoints>,
    },
    Update(PresenceUpdate),
    Heartbeat,
    DmSend(DmSend),
    DmDeliver(DmMessage),
    Conversations {
        limit: Option<u32>,
    },
    Notify {
        kind: String,
        data: Option<Json>,
        /// Who made it (a mention's author, a missed call's caller).
        from: Option<Arc<str>>,
    },
    NotificationsPending,
    NotificationsRead(Vec<String>),
    NotificationClear(String),
    NotificationClearAll,
    Delivery(MessageDelivery),
    VoiceJoin {
        channel: Arc<str>,
    },
    VoiceLeave,
    VoiceUpdate(VoiceUpdate),
    CallInitiate(CallInitiate),
    /// The user was removed from this channel's voice room: from what its
    /// join `seq` put there. (A later join may be on its way to the owner:
    /// the home keeps that one.)
    VoiceGone {
        channel: Arc<str>,
        seq: u64,
    },
    /// A call this user placed is over.
    CallDone {
        call: u64,
    },
    Resume {
        session: SessionId,
        gather: u64,
    },
}

#[derive(Debug)]
pub struct CallOp {
    pub call: u64,
    /// Who asks, from which connection.
    pub user: Arc<str>,
    pub from: Option<(ConnRef, Protocol)>,
    pub ack: Option<u64>,
    pub op: CallCmd,
}

#[derive(Debug)]
pub enum CallCmd {
    Create {
        callee: Arc<str>,
        call_type: CallType,
        sdp: Option<String>,
        /// In a cluster, whether the callee is connected to another node
        /// (`None`: not asked yet).
        elsewhere: Option<bool>,
    },
    Answer {
        sdp: Option<String>,
    },
    Reject {
        reason: Option<String>,
    },
    End,
    Ice(Json),
    /// The caller's connection, or the callee's that answered, is gone.
    PartyGone,
}

#[derive(Debug)]
pub struct PresenceQuery {
    pub gather: u64,
    pub from: ConnRef,
    pub protocol: Protocol,
    pub users: Vec<Arc<str>>,
    pub subscribe: bool,
}

#[derive(Debug)]
pub struct Unsubscribe {
    pub subscriber: ConnRef,
    pub users: Vec<Arc<str>>,
}

/// A dropped session's channels: each with the last offset its shard
/// delivered and the channel's epoch; for a Socket.IO connection, also
/// what was queued to it, in order (see `recovery`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResumePoints {
    pub channels: Vec<(Arc<str>, u64, Arc<str>)>,
    pub sent: Vec<Sent>,
}

/// An event queued to a Socket.IO connection: the channel (its index in
/// [`ResumePoints::channels`]), the offset, and whether it is the
/// connection's join (its events of the channel come after the offset).
pub type Sent = (u16, u64, bool);

#[derive(Debug)]
pub struct Gathered {
    pub gather: u64,
    pub part: GatherPart,
}

#[derive(Debug)]
pub enum GatherPart {
    Presences(Vec<PresenceView>),
    /// The channels of a detached session, or `None` when there is none.
    Resume(Option<ResumePoints>),
}

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

/// Where a connection's membership of a channel stands. One word: a join
/// is pending only until its owner answers, so what it waits with is
/// boxed, and a membership entry stays 24 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum JoinState {
    /// Sent to the owner.
    Pending(Box<PendingJoin>),
    Joined,
}

/// A join sent to the owner: the ack id tells overlapping joins apart, a
/// gather collects the joins of a resumed session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PendingJoin {
    pub(super) ack: Option<u64>,
    pub(super) gather: Option<u64>,
}

/// A connection known to the engine.
pub struct Conn<O> {
    pub out: O,
    pub member: Member,
    device: DeviceKind,
    roles: Roles,
    /// Rate-limit refusals, less one per accepted event.
    strikes: u8,
    /// When its token expires (seconds since the epoch; 0: never).
    expires: u32,
    /// It was sent `auth:expiring` for that expiry.
    warned: bool,
    /// Channels and subscriptions, made on the first of either: an idle
    /// connection has neither.
    links: Option<Box<Links>>,
}

/// 40 bytes: a connection in channels pays for its list of them, and the
/// rarer presence subscriptions are boxed apart.
#[derive(Default)]
pub(super) struct Links {
    pub(super) channels: Vec<(Arc<str>, JoinState)>,
    // A thin pointer: a `Vec` would make every member's links 16 bytes
    // larger.
    #[allow(clippy::box_collection)]
    pub(super) subscriptions: Option<Box<Vec<Arc<str>>>>,
    /// What the connection may reach, when its token restricts it (here
    /// rather than in the slot: most connections that have grants also
    /// join channels, and those without pay nothing).
    pub(super) grants: Option<Arc<Grants>>,
}

impl<O> Conn<O> {
    /// May this connection join `channel` without a subscription token?
    pub(super) fn granted(&self, channel: &str) -> bool {
        Grants::channel(self.grants(), channel)
    }

    fn grants(&self) -> Option<&Grants> {
        self.links.as_ref().and_then(|l| l.grants.as_deref())
    }

    /// May it message or call `user` directly?
    pub(super) fn may_reach_user(&self, user: &str) -> bool {
        Grants::user(self.grants(), user)
    }

    pub(super) fn channels(&self) -> &[(Arc<str>, JoinState)] {
        self.links.as_ref().map_or(&[], |l| &l.channels)
    }

    pub(super) fn subscriptions(&self) -> &[Arc<str>] {
        self.links
            .as_ref()
            .and_then(|l| l.subscriptions.as_deref())
            .map_or(&[], |s| s)
    }

    pub(super) fn links(&mut self) -> &mut Links {
        self.links.get_or_insert_with(Default::default)
    }
}

pub(super) struct Slot<O> {
    gen: u32,
    conn: Option<Conn<O>>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct LocalMember {
    conn: ConnId,
    protocol: Protocol,
}

/// A channel as this shard sees it: its local members, and the last offset
/// delivered here (what a dropped member had been sent, for resume).
pub(super) struct LocalChannel {
    members: Vec<LocalMember>,
    offset: u64,
    epoch: Arc<str>,
}

struct Call {
    caller: Arc<str>,
    caller_conn: ConnRef,
    caller_protocol: Protocol,
    callee: Arc<str>,
    call_type: CallType,
    /// The device that answered (ringing while `None`).
    answered: Option<(ConnRef, Protocol)>,
    ring_until: u64,
}

/// An answer being assembled from several shards' replies.
struct Gather {
    conn: ConnId,
    ack: Option<u64>,
    waiting: usize,
    kind: GatherKind,
}

pub(super) enum GatherKind {
    Presences {
        order: Vec<Arc<str>>,
        got: Vec<PresenceView>,
    },
    /// Asking the home shard for the session's channels.
    ResumeLookup {
        session: SessionId,
        positions: Vec<Position>,
        /// A Socket.IO reconnection's (answered with `ready`, not an ack).
        recovery: Option<Box<Recovery>>,
    },
    /// Joining them again.
    ResumeJoins {
        session: SessionId,
        channels: Vec<ResumedChannel>,
        recovery: Option<Box<Recovery>>,
    },
}

pub(super) fn encode_for(targets: impl Iterator<Item = Protocol>, msg: &ServerMessage) -> Frames {
    let mut wanted = [false; Protocol::COUNT];
    for p in targets {
        wanted[p.index()] = true;
    }
    Frames::encode(msg, wanted)
}

/// Pushes onto a list that stays short for most connections (their
/// channels): room for one more at a time up to
/// four, then doubling as usual. A first push does not reserve four.
pub(super) fn push_small<T>(v: &mut Vec<T>, x: T) {
    if v.len() == v.capacity() && v.len() < 4 {
        v.reserve_exact(1);
    }
    v.push(x);
}

pub(super) fn ev(event: ServerEvent) -> ServerMessage {
    ServerMessage::event(event)
}

pub(super) fn ack_of(id: Option<u64>, body: AckBody) -> ServerMessage {
    ServerMessage::ack(id, body)
}

pub(super) fn empty_ack(id: Option<u64>) -> ServerMessage {
    ack_of(id, AckBody::Empty(Empty {}))
}

pub(super) fn err(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> ServerMessage {
    ServerMessage::error(id, code, message)
}

/// Checks an id (user, message, nonce…): 1 to 128 characters, no control
/// characters. The error names `field`.
pub fn check_id(field: &str, v: &str) -> Result<(), String> {
    let too_long = v.len() > MAX_ID_CHARS && v.chars().count() > MAX_ID_CHARS;
    if v.is_empty() || too_long || v.chars().any(char::is_control) {
        return Err(format!(
            "`{field}` must be 1 to {MAX_ID_CHARS} characters without control characters"
        ));
    }
    Ok(())
}

/// A call id: 16 hex digits (the holding shard in the top 16 bits).
pub fn parse_call_id(s: &str) -> Option<u64> {
    if s.len() != 16 {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

pub fn call_id_str(id: u64) -> String {
    format!("{id:016x}")
}

/// Counts of one shard's state (see [`Engine::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub channels: usize,
    pub online_users: usize,
    pub bans: usize,
}

/// Checks a subscription token: `(token, user, channel)`.
pub type SubscriptionCheck = Box<dyn Fn(&str, &str, &str) -> Result<(), String>>;
/// Verifies a connection token (for `auth:refresh`): its user and access,
/// or why not.
pub type TokenCheck = Box<dyn Fn(&str) -> Result<crate::access::Identity, String>>;

pub struct Engine<O> {
    /// Without one, subscription tokens are refused.
    subscriptions: Option<SubscriptionCheck>,
    /// Without one, `auth:refresh` is refused.
    token_check: Option<TokenCheck>,
    /// The scan of connections' tokens is on (some connection's expires).
    token_scan: bool,
    /// The mesh endpoint that makes bans durable before they take effect
    /// (none: they last as long as the process).
    ban_store: Option<ShardId>,
    bans: bans::Bans,
    limiter: limits::Limiter,
    /// Users this shard is home to that have at least one connection.
    online_users: usize,
    grant_sets: std::collections::HashSet<Arc<Grants>>,
    grant_sets_kept: usize,
    shard: ShardId,
    shards: u16,
    s: Settings,
    metrics: Arc<ShardMetrics>,
    slots: ChunkedVec<Slot<O>>,
    free: Vec<u32>,
    local: HashMap<Arc<str>, LocalChannel>,
    owned: HashMap<Arc<str>, Owned>,
    /// Boxed: every online user has one, and a map stores its values inline.
    users: HashMap<Arc<str>, Box<UserState>>,
    /// What the home users' stored notifications count against.
    notes: notifications::Ledger,
    calls: HashMap<u64, Call>,
    gathers: HashMap<u64, Gather>,
    timers: Timers,
    rng: u64,
    /// Ids this shard mints (DMs, notifications, calls, gathers).
    instance: u64,
    counter: u64,
    /// Cluster mode: the bridge, and whether it reaches Redis.
    cluster: Option<cluster::ClusterLink>,
    /// What this shard queued to Socket.IO members, for their recovery.
    sent: recovery::SentLog,
    /// The mesh endpoint that keeps sequenced events on disk (single
    /// node): the history file and the event stream's outbox.
    event_store: Option<(ShardId, Arc<history::LinePool>)>,
    /// The event stream's gate (when it is on).
    backlog: Option<Arc<event_stream::Backlog>>,
    /// Questions out to the application backend.
    hooks: hooks::Hooks,
}

impl<O: Outbound> Engine<O> {
    /// `seed` feeds the generator of channel epochs and ids (any value;
    /// tests fix it).
    pub fn new(
        shard: ShardId,
        shards: u16,
        settings: Settings,
        metrics: Arc<ShardMetrics>,
        seed: u64,
    ) -> Self {
        let mut e = Engine {
            subscriptions: None,
            token_check: None,
            token_scan: false,
            ban_store: None,
            bans: bans::Bans::default(),
            limiter: limits::Limiter::default(),
            online_users: 0,
            grant_sets: Default::default(),
            grant_sets_kept: 0,
            shard,
            shards,
            s: settings,
            metrics,
            slots: ChunkedVec::default(),
            free: Vec::new(),
            local: HashMap::new(),
            owned: HashMap::new(),
            users: HashMap::new(),
            notes: notifications::Ledger::default(),
            calls: HashMap::new(),
            gathers: HashMap::new(),
            timers: Timers::default(),
            rng: seed | 1,
            cluster: None,
            sent: Default::default(),
            event_store: None,
            backlog: None,
            hooks: hooks::Hooks::default(),
            instance: 0,
            counter: 0,
        };
        e.instance = e.random();
        e
    }

    pub fn settings(&self) -> &Settings {
        &self.s
    }

    /// Sets how subscription tokens (in `channel:join`) are verified.
    pub fn set_subscription_check(&mut self, check: SubscriptionCheck) {
        self.subscriptions = Some(check);
    }

    pub fn set_token_check(&mut self, check: TokenCheck) {
        self.token_check = Some(check);
    }

    fn random(&mut self) -> u64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn next_id(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    /// An id no other shard or restart mints: `<prefix><instance>.<n>`.
    fn mint_id(&mut self, prefix: &str) -> String {
        let n = self.next_id();
        format!("{prefix}{:08x}{:04x}.{n}", self.instance as u32, self.shard)
    }

    fn next_epoch(&mut self) -> Arc<str> {
        format!("{:016x}", self.random()).into()
    }

    // -- connections -------------------------------------------------------

    /// Registers an authenticated connection and tells its user's home shard.
    pub fn open(
        &mut self,
        out: O,
        member: Member,
        device: DeviceKind,
        access: Access,
        now: u64,
        tx: &mut impl MeshTx,
    ) -> ConnId {
        let user = member.user.clone();
        let (session, protocol) = (member.session, member.protocol);
        let links = access.grants.map(|g| {
            Box::new(Links {
                grants: Some(self.intern(g)),
                ..Links::default()
            })
        });
        let conn = Conn {
            out,
            member,
            device,
            roles: access.roles,
            strikes: 0,
            expires: access.expires,
            warned: false,
            links,
        };
        let id = match self.free.pop() {
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
        };
        self.watch_token(access.expires, now);
        let from = Some((self.here(id), protocol));
        self.send_user_op(
            user,
            from,
            None,
            UserCmd::Online { session, device },
            now,
            tx,
        );
        id
    }

    /// One shared copy of each distinct set of grants on this shard (many
    /// users' tokens carry the same claims).
    fn intern(&mut self, g: Arc<Grants>) -> Arc<Grants> {
        if let Some(known) = self.grant_sets.get(&*g) {
            return known.clone();
        }
        if self.grant_sets.len() >= 2 * self.grant_sets_kept.max(64) {
            // Forget the sets no connection holds any more.
            self.grant_sets.retain(|s| Arc::strong_count(s) > 1);
            self.grant_sets_kept = self.grant_sets.len();
        }
        self.grant_sets.insert(g.clone());
        g
    }

    pub fn conn(&self, id: ConnId) -> Option<&Conn<O>> {
        self.slots
            .get(id.slot as usize)
            .filter(|s| s.gen == id.gen)
            .and_then(|s| s.conn.as_ref())
    }

    /// Gives a connection another outbound side (a Socket.IO session
    /// upgraded from long-polling to WebSocket): everything for it goes
    /// there from now on.
    pub fn replace_out(&mut self, id: ConnId, out: O) {
        if let Some(c) = self.conn_mut(id) {
            c.out = out;
        }
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn<O>> {
        self.slots
            .get_mut(id.slot as usize)
            .filter(|s| s.gen == id.gen)
            .and_then(|s| s.conn.as_mut())
    }

    /// Bytes of the engine's slot of one connection (without what it
    /// points to).
    pub fn slot_size() -> usize {
        std::mem::size_of::<Slot<O>>()
    }

    /// Number of open connections known to the engine.
    pub fn connections(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// What this shard holds: channels it owns, users it is home to that
    /// have a connection, bans in its table (also kept in the shard's
    /// gauges as they change).
    pub fn stats(&self) -> Stats {
        Stats {
            channels: self.owned.len(),
            online_users: self.online_users,
            bans: self.bans.len(),
        }
    }

    /// Forgets a connection: leaves its channels, drops its subscriptions,
    /// and tells its user's home shard (which keeps the session for resume).
    pub fn close(&mut self, id: ConnId, now: u64, tx: &mut impl MeshTx) {
        self.close_conn(id, None, true, now, tx);
    }

    /// Forgets a connection; after a kick or ban (`moderation`), the
    /// session cannot be resumed and the owners of its channels are told
    /// why it left.
    pub(super) fn close_conn(
        &mut self,
        id: ConnId,
        moderation: Option<&Arc<Moderation>>,
        resumable: bool,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
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
        self.hooks_closed(id);
        let mut resume = ResumePoints::default();
        let links = conn.links.map(|l| *l).unwrap_or_default();
        for (_, state) in &links.channels {
            // A resume still rejoining has no one left to answer.
            if let JoinState::Pending(p) = state {
                if let Some(g) = p.gather {
                    self.gathers.remove(&g);
                }
            }
        }
        for (channel, state) in links.channels {
            // A pending join is undone when its `Joined` finds the connection gone.
            if state == JoinState::Joined {
                if let Some(l) = self.local.get(&channel) {
                    resume
                        .channels
                        .push((channel.clone(), l.offset, l.epoch.clone()));
                }
                self.remove_local(&channel, id);
                let m = moderation.cloned();
                self.tell_owner_left(id, channel, conn.member.clone(), m, now, tx);
            }
        }
        let subscriptions = links.subscriptions.map(|s| *s).unwrap_or_default();
        self.unsubscribe_all(id, subscriptions, now, tx);
        let resumable = self.s.resume_window_ms > 0 && resumable;
        if resumable && conn.member.protocol.is_socketio() {
            resume.sent = self.sent.tail(id, &resume.channels);
        }
        let resume = resumable.then_some(resume);
        let from = Some((self.here(id), conn.member.protocol));
        self.send_user_op(
            conn.member.user,
            from,
            None,
            UserCmd::Offline { resume },
            now,
            tx,
        );
    }

    fn on_admission(&mut self, id: ConnId, refused: bool, now: u64, tx: &mut impl MeshTx) {
        let Some(conn) = self.conn(id) else { return };
        if !refused {
            return conn.out.admitted();
        }
        let i = crate::admission::Refusal::TooManyForUser.index();
        self.metrics.refused[i].inc();
        let max = self.s.max_connections_per_user;
        let why = format!("too many connections for this user (at most {max})");
        self.error(id, None, ErrorCode::Forbidden, why.as_str());
        if let Some(conn) = self.conn(id) {
            conn.out.refused(&why);
        }
        self.close_conn(id, None, false, now, tx);
    }

    fn unsubscribe_all(
        &mut self,
        id: ConnId,
        users: Vec<Arc<str>>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let subscriber = self.here(id);
        for (shard, users) in self.by_home(users) {
            self.route(
                shard,
                MeshMsg::Unsubscribe(Box::new(Unsubscribe { subscriber, users })),
                now,
                tx,
            );
        }
    }

    /// Groups users by home shard.
    fn by_home(&self, users: Vec<Arc<str>>) -> Vec<(ShardId, Vec<Arc<str>>)> {
        let mut groups: Vec<(ShardId, Vec<Arc<str>>)> = Vec::new();
        for u in users {
            let home = home_of(&u, self.shards);
            match groups.iter_mut().find(|(s, _)| *s == home) {
                Some((_, g)) => g.push(u),
                None => groups.push((home, vec![u])),
            }
        }
        groups
    }

    fn tell_owner_left(
        &mut self,
        id: ConnId,
        channel: Arc<str>,
        member: Member,
        moderation: Option<Arc<Moderation>>,
        now: u64,
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
                moderation,
            })),
            now,
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
            // (Socket.IO: a success nobody asked an ack for is not sent.)
            if !frame.is_empty() && !c.out.push(&frame) {
                self.metrics.queue_drops.inc();
            }
        }
    }

    fn error(&self, id: ConnId, ack: Option<u64>, code: ErrorCode, message: impl Into<String>) {
        self.reply(id, &err(ack, code, message));
    }

    /// Answers whoever asked, if anyone did (a request from the mesh
    /// carries its asker when it wants an answer).
    fn answer(
        &mut self,
        asker: Option<(ConnRef, Protocol)>,
        msg: &ServerMessage,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if let Some((to, protocol)) = asker {
            self.send_to(to, protocol, msg, now, tx);
        }
    }

    /// Sends `msg` to a connection on any shard, encoded for its protocol.
    fn send_to(
        &mut self,
        to: ConnRef,
        protocol: Protocol,
        msg: &ServerMessage,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let frame = encode_frame(protocol, msg);
        if frame.is_empty() {
            return;
        }
        self.route(
            to.shard,
            MeshMsg::ToConn {
                conn: to.conn,
                frame,
            },
            now,
            tx,
        );
    }

    /// Sends `msg` to several connections on any shards: encoded once per
    /// protocol, one mesh message per shard.
    fn send_to_all(
        &mut self,
        targets: &[(ConnRef, Protocol)],
        msg: &ServerMessage,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if targets.is_empty() {
            return;
        }
        let frames = encode_for(targets.iter().map(|t| t.1), msg);
        let mut groups: Vec<(ShardId, Vec<ConnId>)> = Vec::new();
        for (c, _) in targets {
            match groups.iter_mut().find(|(s, _)| *s == c.shard) {
                Some((_, g)) => g.push(c.conn),
                None => groups.push((c.shard, vec![c.conn])),
            }
        }
        for (shard, conns) in groups {
            let m = MeshMsg::ToConns(Box::new(ToConns {
                conns,
                frames: frames.clone(),
            }));
            self.route(shard, m, now, tx);
        }
    }

    fn route(&mut self, to: ShardId, msg: MeshMsg, now: u64, tx: &mut impl MeshTx) {
        if to == self.shard {
            self.handle_mesh(msg, now, tx);
        } else {
            tx.send(to, msg);
        }
    }

    fn remove_local(&mut self, channel: &str, id: ConnId) {
        if let Some(l) = self.local.get_mut(channel) {
            if let Some(pos) = l.members.iter().position(|m| m.conn == id) {
                l.members.swap_remove(pos);
            }
            if l.members.is_empty() {
                self.local.remove(channel);
            }
        }
    }

    // -- deadlines ---------------------------------------------------------

    /// When [`Engine::tick`] should next run.
    pub fn next_deadline(&self) -> Option<u64> {
        self.timers.next()
    }

    /// Runs what is due: typing expiry, presence grace periods, resume
    /// windows, notification expiry, ringing calls, channel history.
    pub fn tick(&mut self, now: u64, tx: &mut impl MeshTx) {
        while let Some(t) = self.timers.pop_due(now) {
            match t {
                Timer::Typing { channel } => self.expire_typing(&channel, now, tx),
                Timer::ChannelGc { channel } => self.channel_gc(&channel, now, tx),
                Timer::ClusterRetry { channel } => self.cluster_retry(&channel, now, tx),
                Timer::User { user } => self.user_timer(&user, now, tx),
                Timer::CallRing { call } => self.ring_out(call, now, tx),
                Timer::Bans => {
                    self.bans.prune(now);
                    self.metrics.bans.set(self.bans.len() as u64);
                }
                Timer::RateSweep => self.rate_sweep(now),
                Timer::Tokens => self.tokens_timer(now, tx),
            }
        }
    }

    // -- mesh --------------------------------------------------------------

    /// Handles a message from another shard (or routed to this one).
    pub fn handle_mesh(&mut self, msg: MeshMsg, now: u64, tx: &mut impl MeshTx) {
        match msg {
            MeshMsg::Join(j) => self.channel_join(*j, now, tx),
            MeshMsg::Joined(j) => self.on_joined(*j, now, tx),
            MeshMsg::Leave(l) => self.channel_leave(*l, now, tx),
            MeshMsg::Publish(p) => self.message_send(*p, now, tx),
            MeshMsg::Deliver {
                channel,
                frames,
                offset,
            } => self.deliver(&channel, &frames, offset, None),
            MeshMsg::DeliverExcept(d) => self.deliver(&d.channel, &d.frames, 0, Some(&d.except)),
            MeshMsg::ToConn { conn, frame } => {
                if let Some(c) = self.conn(conn) {
                    if !c.out.push(&frame) {
                        self.metrics.queue_drops.inc();
                    }
                }
            }
            MeshMsg::ToConns(t) => {
                for id in &t.conns {
                    if let Some(c) = self.conn(*id) {
                        if let Some(f) = t.frames.get(c.member.protocol) {
                            if !c.out.push(f) {
                                self.metrics.queue_drops.inc();
                            }
                        }
                    }
                }
            }
            MeshMsg::ChannelOp(op) => self.on_channel_op(*op, now, tx),
            MeshMsg::UserOp(op) => self.on_user_op(*op, now, tx),
            MeshMsg::CallOp(op) => self.on_call_op(*op, now, tx),
            MeshMsg::Presence(q) => self.presence_query(*q, None, now, tx),
            MeshMsg::Unsubscribe(u) => {
                for user in &u.users {
                    if let Some(st) = self.users.get_mut(user) {
                        st.more().subscribers.retain(|(c, _)| *c != u.subscriber);
                    }
                    self.maintain_user(user, now, tx);
                }
            }
            MeshMsg::Gathered(g) => self.on_gathered(*g, now, tx),
            MeshMsg::Moderate(m) => self.on_moderate(m, now, tx),
            MeshMsg::Evict(m) => self.on_evict(&m, now, tx),
            MeshMsg::Disconnect { conn, moderation } => self.disconnect(conn, &moderation, now, tx),
            MeshMsg::Spread { user, shards } => self.limiter.set_spread(&user, shards),
            MeshMsg::Admission { conn, refused } => self.on_admission(conn, refused, now, tx),
            MeshMsg::Api(call) => self.on_api(*call, now, tx),
            MeshMsg::FromBridge(m) => self.on_cluster(*m, now, tx),
            MeshMsg::BanStored { moderation, error } => {
                self.ban_stored(*moderation, error, now, tx)
            }
            MeshMsg::ToBridge(m) => {
                tracing::debug!(?m, "a shard ignores a message meant for the bridge")
            }
            MeshMsg::StoreBan { moderation, .. } => {
                tracing::debug!(
                    ?moderation,
                    "a shard ignores a message meant for the ban store"
                )
            }
            MeshMsg::KeepHistory(_) | MeshMsg::KeepEvent(_) => {
                tracing::debug!("a shard ignores a message meant for the store")
            }
            MeshMsg::HookAnswer(a) => self.on_hook_answer(*a, now, tx),
            MeshMsg::ServerJoin(j) => self.on_server_join(*j, now, tx),
            MeshMsg::HookCall(_) => {
                tracing::debug!("a shard ignores a message meant for the hooks")
            }
            MeshMsg::Adopt(_) => {
                tracing::debug!("the engine drops a socket meant for the shell (it closes)")
            }
        }
    }

    fn deliver(
        &mut self,
        channel: &Arc<str>,
        frames: &Frames,
        offset: u64,
        except: Option<&Arc<str>>,
    ) {
        let Some(l) = self.local.get(channel) else {
            return;
        };
        let mut delivered = 0;
        let mut dropped = 0;
        for m in &l.members {
            let (Some(frame), Some(conn)) = (frames.get(m.protocol), self.conn(m.conn)) else {
                continue;
            };
            if except.is_some_and(|u| *conn.member.user == **u) {
                continue;
            }
            if conn.out.push(frame) {
                delivered += 1;
            } else {
                dropped += 1;
            }
        }
        self.metrics.deliveries.add(delivered);
        self.metrics.queue_drops.add(dropped);
        self.log_sent(channel, frames, offset);
        if offset > 0 {
            // What this shard's members have been sent, for resume.
            if let Some(l) = self.local.get_mut(channel) {
                l.offset = offset;
            }
        }
    }
}

pub(super) fn check_presence(p: &PresenceUpdate) -> Result<(), String> {
    if p.status == Some(Status::Offline) {
        return Err("`status` cannot be `offline`: set `invisible` to appear offline".into());
    }
    if let Some(Some(c)) = &p.custom_status {
        if c.chars().count() > MAX_ID_CHARS {
            return Err(format!(
                "`customStatus` is longer than {MAX_ID_CHARS} characters"
            ));
        }
    }
    if let Some(Some(a)) = &p.activity {
        for (field, v) in [
            ("activity.type", Some(&a.kind)),
            ("activity.name", Some(&a.name)),
            ("activity.details", a.details.as_ref()),
        ] {
            if v.is_some_and(|v| v.chars().count() > MAX_ID_CHARS) {
                return Err(format!(
                    "`{field}` is longer than {MAX_ID_CHARS} characters"
                ));
            }
        }
    }
    Ok(())
}

// Roles: which shard does what (routing tables).
mod connection;
mod home;
mod owner;
// Features: one handler per event, named after it.
mod api;
mod calls;
pub mod connect_hook;
mod custom;
mod dm;
pub mod event_stream;
mod gather;
pub mod history;
pub mod hooks;
mod members;
mod messages;
mod moderation;
mod presence;
mod recovery;
mod subscribe;
mod tokens;
pub use recovery::Recovery;
mod receipts;
mod sessions;
mod typing;
mod voice;
// The cluster's side of every feature.
pub mod cluster;
pub use cluster::{ChannelPart, FromBridge, Incoming, NotificationChange, Outgoing, ToBridge};
pub use moderation::{in_charge, MAX_BAN_MS, MAX_REASON_CHARS};
mod rate;

#[cfg(test)]
mod tests;
