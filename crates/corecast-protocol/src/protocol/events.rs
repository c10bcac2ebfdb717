//! Every event the engine speaks, as plain Rust types shared by both codecs.
//! Field names are camelCase on the JSON wire; ids that a JavaScript client
//! must compare (messages, calls, notifications, sessions) are strings.

use serde::{Deserialize, Serialize};

macro_rules! wire_type {
    ($(#[$m:meta])* pub struct $name:ident { $($body:tt)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
        #[serde(rename_all = "camelCase")]
        pub struct $name { $($body)* }
    };
}

/// An ack body: like [`wire_type!`], but refusing unknown fields, so that a
/// client can tell the bodies of `ack` apart by their fields alone.
macro_rules! ack_type {
    ($(#[$m:meta])* pub struct $name:ident { $($body:tt)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        pub struct $name { $($body)* }
    };
}

macro_rules! wire_enum {
    ($(#[$m:meta])* pub enum $name:ident { $($variant:ident => $text:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
        pub enum $name { $(#[serde(rename = $text)] $variant),* }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),* }
            }

            pub fn parse(s: &str) -> Option<$name> {
                match s { $($text => Some($name::$variant),)* _ => None }
            }
        }
    };
}

/// A JSON value carried opaquely (WebRTC ICE candidates, notification data):
/// raw JSON text on the JSON wire, a string in the binary protocol.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Json(pub String);

impl Serialize for Json {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match serde_json::value::RawValue::from_string(self.0.clone()) {
            Ok(raw) => raw.serialize(s),
            Err(_) => serde_json::Value::Null.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    // Through a `Value` (not a raw slice) so that it also works inside the
    // untagged `AckBody`; the text comes back compact.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Ok(Json(v.to_string()))
    }
}

// ---------------------------------------------------------------------------
// Client payloads
// ---------------------------------------------------------------------------

wire_type! {
    /// An application's own event (a name the server's `custom_events`
    /// patterns allow, e.g. `game:move`), to a channel the connection is
    /// in; `data` is any JSON, relayed as it is.
    pub struct CustomSend {
        pub channel_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub data: Option<Json>,
    }
}

wire_type! {
    /// `rpc`: a call of `method` (1 to 128 characters) on the application
    /// backend, with any JSON `data`; the backend's answer comes in the ack.
    pub struct RpcCall {
        pub method: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub data: Option<Json>,
    }
}

wire_type! {
    /// An application's own event as its recipients get it: from a
    /// channel member (`channelId`, `userId`), or from the server API
    /// (to a channel, or to a user's devices: no `userId`).
    pub struct CustomEvent {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub channel_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub user_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub data: Option<Json>,
    }
}

wire_type! {
    /// `auth`: the first message of a client that did not authenticate in the handshake.
    pub struct Auth { pub token: String }
}

wire_type! {
    /// Where a client stands in a channel: the last offset it saw, in that epoch.
    pub struct Since { pub offset: u64, pub epoch: String }
}

wire_type! {
    /// A channel position given to `session:resume`.
    pub struct Position { pub channel_id: String, pub offset: u64, pub epoch: String }
}

wire_type! {
    /// `session:resume`: take over a dropped session within the resume window.
    pub struct SessionResume {
        pub session_id: String,
        /// What the client last saw per channel; without it, the server
        /// replays from what it last queued to the dropped connection.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub positions: Vec<Position>,
    }
}

wire_type! {
    /// `channel:join`, optionally recovering what was missed since a position.
    pub struct ChannelJoin {
        pub channel_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub since: Option<Since>,
        /// A subscription token from the application backend, for a
        /// channel the connection token does not grant.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub token: Option<String>,
    }
}

wire_type! {
    /// A channel: `channel:leave`, `channel:get_members`, `typing:*`,
    /// `voice:join`, `voice:get_participants`.
    pub struct ChannelRef { pub channel_id: String }
}

wire_type! {
    /// `channel:get_history`: up to `limit` messages before offset `before`.
    pub struct GetHistory {
        pub channel_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub limit: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub before: Option<u64>,
    }
}

wire_type! {
    /// `message:send`.
    pub struct MessageSend {
        pub channel_id: String,
        pub content: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub reply_to: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub thread_id: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub mentions: Vec<String>,
        /// Chosen by the client, echoed back; a resent nonce is not published twice.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub nonce: Option<String>,
    }
}

impl MessageSend {
    /// A plain message: no reply, thread, mentions or nonce.
    pub fn new(channel_id: impl Into<String>, content: impl Into<String>) -> Self {
        MessageSend {
            channel_id: channel_id.into(),
            content: content.into(),
            reply_to: None,
            thread_id: None,
            mentions: Vec::new(),
            nonce: None,
        }
    }
}

impl ChannelJoin {
    /// A join without recovery.
    pub fn new(channel_id: impl Into<String>) -> Self {
        ChannelJoin {
            channel_id: channel_id.into(),
            since: None,
            token: None,
        }
    }
}

wire_type! {
    /// `moderation:kick_user`: out of a channel, or (without `channelId`)
    /// off the server: every connection of the user is closed.
    pub struct KickUser {
        pub user_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub channel_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub reason: Option<String>,
    }
}

wire_type! {
    /// `moderation:ban_user`: a kick that lasts, from a channel or the
    /// server, for `durationMs` or (without it) until lifted.
    pub struct BanUser {
        pub user_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub channel_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub duration_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub reason: Option<String>,
    }
}

wire_type! {
    /// `message:edit`.
    pub struct MessageEdit { pub channel_id: String, pub message_id: String, pub content: String }
}

wire_type! {
    /// A message: `message:delete`, `message:delivered`, `message:mark_read`,
    /// `message:get_read_receipts`.
    pub struct MessageRef { pub channel_id: String, pub message_id: String }
}

wire_enum! {
    /// Whether a reaction is added or removed.
    pub enum ReactAction { Add => "add", Remove => "remove" }
}

wire_type! {
    /// `message:react`.
    pub struct MessageReact {
        pub channel_id: String,
        pub message_id: String,
        pub emoji: String,
        pub action: ReactAction,
    }
}

wire_type! {
    /// `dm:send`.
    pub struct DmSend {
        pub to_user_id: String,
        pub content: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub nonce: Option<String>,
    }
}

wire_type! {
    /// `dm:get_conversations`.
    pub struct Limit {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub limit: Option<u32>,
    }
}

wire_enum! {
    /// A presence status. `offline` is only ever reported, never set.
    pub enum Status {
        Online => "online",
        Idle => "idle",
        Dnd => "dnd",
        Invisible => "invisible",
        Offline => "offline",
    }
}

impl Status {
    /// How available a status is: the most available device wins.
    pub fn availability(self) -> u8 {
        match self {
            Status::Online => 4,
            Status::Idle => 3,
            Status::Dnd => 2,
            Status::Invisible => 1,
            Status::Offline => 0,
        }
    }
}

wire_enum! {
    /// The kind of device a connection runs on.
    pub enum DeviceKind {
        Desktop => "desktop",
        Mobile => "mobile",
        Web => "web",
    }
}

wire_type! {
    /// What a user is doing: `{"type": "playing", "name": "Chess", "details": "…"}`.
    pub struct Activity {
        #[serde(rename = "type")]
        pub kind: String,
        pub name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub details: Option<String>,
    }
}

wire_type! {
    /// `presence:update`: every field optional; `customStatus` and `activity`
    /// are cleared with `null`.
    pub struct PresenceUpdate {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub status: Option<Status>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub custom_status: Option<Option<String>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub activity: Option<Option<Activity>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub device: Option<DeviceKind>,
    }
}

wire_type! {
    /// `presence:subscribe`, `presence:unsubscribe`, `presence:get_bulk`.
    pub struct UserIds { pub user_ids: Vec<String> }
}

wire_type! {
    /// `voice:update`: the fields to change.
    #[derive(Default)]
    pub struct VoiceUpdate {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub muted: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub deafened: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub speaking: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub video: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub screen_share: Option<bool>,
    }
}

wire_enum! {
    /// What a call carries.
    pub enum CallType { Audio => "audio", Video => "video" }
}

wire_type! {
    /// `call:initiate`.
    pub struct CallInitiate {
        pub to_user_id: String,
        pub call_type: CallType,
        /// The caller's session description, relayed as is.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub sdp: Option<String>,
    }
}

wire_type! {
    /// `call:answer`.
    pub struct CallAnswer {
        pub call_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub sdp: Option<String>,
    }
}

wire_type! {
    /// `call:reject`.
    pub struct CallReject {
        pub call_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub reason: Option<String>,
    }
}

wire_type! {
    /// `call:end`.
    pub struct CallRef { pub call_id: String }
}

wire_type! {
    /// `call:ice_candidate`, both ways: the candidate is relayed as is.
    pub struct CallIce { pub call_id: String, pub candidate: Json }
}

wire_type! {
    /// `notification:read`.
    pub struct NotificationIds { pub notification_ids: Vec<String> }
}

wire_type! {
    /// `notification:clear`.
    pub struct NotificationRef { pub notification_id: String }
}

/// An event sent by a client.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ClientEvent {
    Auth(Auth),
    Heartbeat,
    SessionResume(SessionResume),
    ChannelJoin(ChannelJoin),
    ChannelLeave(ChannelRef),
    ChannelGetHistory(GetHistory),
    ChannelGetMembers(ChannelRef),
    MessageSend(MessageSend),
    MessageEdit(MessageEdit),
    MessageDelete(MessageRef),
    MessageReact(MessageReact),
    MessageDelivered(MessageRef),
    MessageMarkRead(MessageRef),
    MessageGetReadReceipts(MessageRef),
    DmSend(DmSend),
    DmGetConversations(Limit),
    PresenceUpdate(PresenceUpdate),
    PresenceSubscribe(UserIds),
    PresenceUnsubscribe(UserIds),
    PresenceGetBulk(UserIds),
    PresenceHeartbeat,
    TypingStart(ChannelRef),
    TypingStop(ChannelRef),
    TypingGetActive(ChannelRef),
    VoiceJoin(ChannelRef),
    VoiceLeave,
    VoiceUpdate(VoiceUpdate),
    VoiceGetParticipants(ChannelRef),
    CallInitiate(CallInitiate),
    CallAnswer(CallAnswer),
    CallReject(CallReject),
    CallEnd(CallRef),
    CallIceCandidate(CallIce),
    NotificationGetPending,
    NotificationRead(NotificationIds),
    NotificationClear(NotificationRef),
    NotificationClearAll,
    ModerationKickUser(KickUser),
    ModerationBanUser(BanUser),
    /// `auth:refresh`: a new connection token before the current one expires.
    AuthRefresh(Auth),
    /// `rpc`: a call to the application backend, answered in the ack.
    Rpc(RpcCall),
    /// An event name the server does not implement, to a channel: the
    /// application's own event when `custom_events` allows the name
    /// (answered `unsupported` otherwise).
    Custom(String, CustomSend),
    /// An event name this engine does not implement (answered `unsupported`).
    Unsupported(String),
}

/// The name of each client event, by [`ClientEvent::index`].
pub const CLIENT_EVENT_NAMES: [&str; 41] = [
    "auth",
    "heartbeat",
    "session:resume",
    "channel:join",
    "channel:leave",
    "channel:get_history",
    "channel:get_members",
    "message:send",
    "message:edit",
    "message:delete",
    "message:react",
    "message:delivered",
    "message:mark_read",
    "message:get_read_receipts",
    "dm:send",
    "dm:get_conversations",
    "presence:update",
    "presence:subscribe",
    "presence:unsubscribe",
    "presence:get_bulk",
    "presence:heartbeat",
    "typing:start",
    "typing:stop",
    "typing:get_active",
    "voice:join",
    "voice:leave",
    "voice:update",
    "voice:get_participants",
    "call:initiate",
    "call:answer",
    "call:reject",
    "call:end",
    "call:ice_candidate",
    "notification:get_pending",
    "notification:read",
    "notification:clear",
    "notification:clear_all",
    "moderation:kick_user",
    "moderation:ban_user",
    "auth:refresh",
    "rpc",
];

impl ClientEvent {
    /// The event's position in [`CLIENT_EVENT_NAMES`]; an unsupported
    /// event has the position after the last.
    pub fn index(&self) -> usize {
        use ClientEvent::*;
        match self {
            Auth(_) => 0,
            Heartbeat => 1,
            SessionResume(_) => 2,
            ChannelJoin(_) => 3,
            ChannelLeave(_) => 4,
            ChannelGetHistory(_) => 5,
            ChannelGetMembers(_) => 6,
            MessageSend(_) => 7,
            MessageEdit(_) => 8,
            MessageDelete(_) => 9,
            MessageReact(_) => 10,
            MessageDelivered(_) => 11,
            MessageMarkRead(_) => 12,
            MessageGetReadReceipts(_) => 13,
            DmSend(_) => 14,
            DmGetConversations(_) => 15,
            PresenceUpdate(_) => 16,
            PresenceSubscribe(_) => 17,
            PresenceUnsubscribe(_) => 18,
            PresenceGetBulk(_) => 19,
            PresenceHeartbeat => 20,
            TypingStart(_) => 21,
            TypingStop(_) => 22,
            TypingGetActive(_) => 23,
            VoiceJoin(_) => 24,
            VoiceLeave => 25,
            VoiceUpdate(_) => 26,
            VoiceGetParticipants(_) => 27,
            CallInitiate(_) => 28,
            CallAnswer(_) => 29,
            CallReject(_) => 30,
            CallEnd(_) => 31,
            CallIceCandidate(_) => 32,
            NotificationGetPending => 33,
            NotificationRead(_) => 34,
            NotificationClear(_) => 35,
            NotificationClearAll => 36,
            ModerationKickUser(_) => 37,
            ModerationBanUser(_) => 38,
            AuthRefresh(_) => 39,
            Rpc(_) => 40,
            // Charged as any event the server does not know.
            Custom(..) | Unsupported(_) => CLIENT_EVENT_NAMES.len(),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            ClientEvent::Unsupported(name) | ClientEvent::Custom(name, _) => name,
            other => CLIENT_EVENT_NAMES[other.index()],
        }
    }
}

/// A client envelope: the event and its optional ack id.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ClientMessage {
    pub id: Option<u64>,
    pub event: ClientEvent,
}

// ---------------------------------------------------------------------------
// Server payloads
// ---------------------------------------------------------------------------

wire_type! {
    /// `ready`: sent once the connection is authenticated.
    pub struct Ready {
        pub user_id: String,
        pub session_id: String,
        pub shard: u32,
        /// How often the server pings a quiet connection, in milliseconds.
        pub heartbeat_interval_ms: u64,
    }
}

/// Stable, machine-readable error codes.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    RateLimited,
    TooLarge,
    Unsupported,
    Internal,
    /// The server cannot take it now (its backlog to the application
    /// backend is full); `retry_after_ms` says when to try again.
    Unavailable,
}

wire_type! {
    /// `error`: a typed refusal of a client event.
    pub struct ErrorBody {
        pub code: ErrorCode,
        pub message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub retry_after_ms: Option<u64>,
    }
}

wire_type! {
    /// `message:new`, and a message of `channel:get_history`.
    pub struct MessageNew {
        pub message_id: String,
        pub channel_id: String,
        pub user_id: String,
        pub content: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub reply_to: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub thread_id: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub mentions: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub nonce: Option<String>,
        pub offset: u64,
        pub timestamp: u64,
        /// What the application backend attached (a JSON object): set by
        /// the publish hook or the server API, never by a client. Last, so
        /// that nothing in it comes before the fields the events stream
        /// fills in.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub meta: Option<Json>,
    }
}

wire_type! {
    /// `message:edited`.
    pub struct MessageEdited {
        pub message_id: String,
        pub channel_id: String,
        pub user_id: String,
        pub content: String,
        pub offset: u64,
        pub edited_at: u64,
    }
}

wire_type! {
    /// `message:deleted`.
    pub struct MessageDeleted {
        pub message_id: String,
        pub channel_id: String,
        /// Who deleted it.
        pub user_id: String,
        pub offset: u64,
        pub timestamp: u64,
    }
}

wire_type! {
    /// `message:reaction`: a reaction added or removed, and the new count.
    pub struct MessageReaction {
        pub message_id: String,
        pub channel_id: String,
        pub user_id: String,
        pub emoji: String,
        pub action: ReactAction,
        pub count: u32,
        pub offset: u64,
        pub timestamp: u64,
    }
}

wire_type! {
    /// `message:delivery`, to a message's author: `userId` received it.
    pub struct MessageDelivery {
        pub message_id: String,
        pub channel_id: String,
        pub user_id: String,
        pub timestamp: u64,
    }
}

wire_type! {
    /// `message:read_receipt`: `userId` has read the channel up to `messageId`.
    pub struct ReadReceipt {
        pub channel_id: String,
        pub user_id: String,
        pub message_id: String,
        pub offset: u64,
        pub timestamp: u64,
    }
}

wire_type! {
    /// `channel:member_joined` and `channel:member_left`.
    pub struct MemberEvent {
        pub channel_id: String,
        pub user_id: String,
        pub session_id: String,
    }
}

wire_type! {
    /// `dm:new` (to the recipient's devices) and `dm:sent` (to the sender's
    /// other devices).
    pub struct DmMessage {
        pub message_id: String,
        pub from_user_id: String,
        pub to_user_id: String,
        pub content: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub nonce: Option<String>,
        pub timestamp: u64,
    }
}

wire_type! {
    /// A user's presence as others see it: `presence:changed` and the
    /// answers of `presence:get_bulk` and `presence:subscribe`.
    pub struct PresenceView {
        pub user_id: String,
        pub status: Status,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub custom_status: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub activity: Option<Activity>,
        /// Kinds of the devices that are visible (empty when offline).
        pub devices: Vec<DeviceKind>,
        /// When the user was last connected (ms; now while online).
        pub last_seen: u64,
    }
}

wire_type! {
    /// `typing:user_start` and `typing:user_stop`.
    pub struct TypingEvent { pub channel_id: String, pub user_id: String }
}

wire_type! {
    /// The state of a voice participant.
    #[derive(Default, Copy)]
    pub struct VoiceState {
        pub muted: bool,
        pub deafened: bool,
        pub speaking: bool,
        pub video: bool,
        pub screen_share: bool,
    }
}

wire_type! {
    /// A voice participant.
    pub struct VoiceParticipant { pub user_id: String, pub state: VoiceState }
}

wire_type! {
    /// `voice:user_joined`, `voice:state_update` (with the state) and
    /// `voice:user_left`.
    pub struct VoiceEvent {
        pub channel_id: String,
        pub user_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub state: Option<VoiceState>,
    }
}

wire_type! {
    /// `call:incoming`, to every device of the callee.
    pub struct CallIncoming {
        pub call_id: String,
        pub from_user_id: String,
        pub call_type: CallType,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub sdp: Option<String>,
    }
}

wire_type! {
    /// `call:answered`, `call:rejected`, `call:ended` and `call:missed`:
    /// what happened to a call, by whom (`userId`) and why.
    pub struct CallEvent {
        pub call_id: String,
        pub user_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub reason: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub sdp: Option<String>,
    }
}

wire_type! {
    /// `call:ice_candidate` relayed from the other party.
    pub struct CallIceRelay { pub call_id: String, pub from_user_id: String, pub candidate: Json }
}

wire_type! {
    /// A notification: `notification:new`, and `notification:get_pending`.
    pub struct Notification {
        pub notification_id: String,
        /// `mention`, `missed_call`, or a type set by the application backend.
        pub kind: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub data: Option<Json>,
        pub read: bool,
        pub created_at: u64,
        pub expires_at: u64,
    }
}

wire_type! {
    /// `heartbeat:ack`.
    pub struct HeartbeatAck { pub timestamp: u64 }
}

// ---------------------------------------------------------------------------
// Ack bodies
// ---------------------------------------------------------------------------

ack_type! {
    /// The ack of `channel:join`: where the channel's sequence stands.
    pub struct JoinAck {
        pub channel_id: String,
        /// Offset of the last event sequenced before the join.
        pub offset: u64,
        /// Identifies this incarnation of the channel's offsets.
        pub epoch: String,
        /// Connections in the channel, this one included.
        pub members: u32,
        /// With `since`: whether the missed events follow (`true`), or the
        /// gap was older than the channel's history (`false`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub recovered: Option<bool>,
    }
}

ack_type! {
    /// The ack of `message:send`: what the server assigned.
    pub struct SendAck {
        pub message_id: String,
        pub channel_id: String,
        pub offset: u64,
        pub timestamp: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub nonce: Option<String>,
        /// The nonce was seen before: this is the first publication's ack.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pub duplicate: bool,
    }
}

ack_type! {
    /// The ack of `message:edit`, `message:delete` and `message:react`:
    /// the offset of the event it caused.
    pub struct EventAck { pub channel_id: String, pub message_id: String, pub offset: u64 }
}

wire_type! {
    /// A reaction of a message in `channel:get_history`.
    pub struct ReactionCount { pub emoji: String, pub count: u32, pub user_ids: Vec<String> }
}

wire_type! {
    /// A message in `channel:get_history`: as published, then edited and reacted to.
    pub struct HistoryMessage {
        #[serde(flatten)]
        pub message: MessageNew,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub edited_at: Option<u64>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub reactions: Vec<ReactionCount>,
    }
}

ack_type! {
    /// The ack of `channel:get_history`, oldest first.
    pub struct HistoryAck {
        pub channel_id: String,
        pub messages: Vec<HistoryMessage>,
        /// Older messages remain in the channel's history.
        pub has_more: bool,
    }
}

wire_type! {
    /// A member in `channel:get_members`.
    pub struct MemberInfo { pub user_id: String, pub connections: u32 }
}

ack_type! {
    /// The ack of `channel:get_members`.
    pub struct MembersAck { pub channel_id: String, pub members: Vec<MemberInfo> }
}

wire_type! {
    /// A reader in `message:get_read_receipts`.
    pub struct Reader { pub user_id: String, pub timestamp: u64 }
}

ack_type! {
    /// The ack of `message:get_read_receipts`: who has read up to the message.
    pub struct ReadReceiptsAck {
        pub channel_id: String,
        pub message_id: String,
        pub readers: Vec<Reader>,
    }
}

ack_type! {
    /// The ack of `dm:send`.
    pub struct DmAck {
        pub message_id: String,
        pub to_user_id: String,
        pub timestamp: u64,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pub duplicate: bool,
    }
}

wire_type! {
    /// A conversation in `dm:get_conversations`: the other user and the last message.
    pub struct Conversation { pub user_id: String, pub last_message: DmMessage, pub unread: u32 }
}

ack_type! {
    /// The ack of `dm:get_conversations`, most recent first.
    pub struct ConversationsAck { pub conversations: Vec<Conversation> }
}

ack_type! {
    /// The ack of `presence:get_bulk` and `presence:subscribe`.
    pub struct PresencesAck { pub presences: Vec<PresenceView> }
}

ack_type! {
    /// The ack of `typing:get_active`.
    pub struct TypingAck { pub channel_id: String, pub user_ids: Vec<String> }
}

ack_type! {
    /// The ack of `voice:join` (with a LiveKit token when configured) and
    /// `voice:get_participants`.
    pub struct VoiceAck {
        pub channel_id: String,
        pub participants: Vec<VoiceParticipant>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub token: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub server_url: Option<String>,
    }
}

ack_type! {
    /// The ack of `call:initiate`.
    pub struct CallAck { pub call_id: String }
}

ack_type! {
    /// The ack of `notification:get_pending`, oldest first.
    pub struct NotificationsAck { pub notifications: Vec<Notification> }
}

wire_type! {
    /// A channel restored by `session:resume`.
    pub struct ResumedChannel {
        pub channel_id: String,
        pub recovered: bool,
        pub offset: u64,
        pub epoch: String,
    }
}

ack_type! {
    /// The ack of `auth:refresh`: when the new token expires (ms since the
    /// epoch).
    pub struct RefreshAck { pub expires_at: u64 }
}

ack_type! {
    /// The ack of `rpc`: what the backend answered (`null` when nothing).
    pub struct RpcAck { pub data: Json }
}

ack_type! {
    /// The ack of `session:resume`.
    pub struct ResumeAck { pub session_id: String, pub channels: Vec<ResumedChannel> }
}

/// The ack of events that return nothing but success.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// The `d` of an `ack`. Every body refuses unknown fields and no two have
/// the same fields, so a client that does not remember what it asked can
/// still tell them apart.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(untagged)]
pub enum AckBody {
    Send(SendAck),
    Join(JoinAck),
    Event(EventAck),
    History(HistoryAck),
    Members(MembersAck),
    ReadReceipts(ReadReceiptsAck),
    Dm(DmAck),
    Conversations(ConversationsAck),
    Presences(PresencesAck),
    Typing(TypingAck),
    Voice(VoiceAck),
    Call(CallAck),
    Notifications(NotificationsAck),
    Resume(ResumeAck),
    Refresh(RefreshAck),
    Rpc(RpcAck),
    Empty(Empty),
}

wire_type! {
    /// `moderation:kicked` and `moderation:banned` (to the user), and
    /// `moderation:user_kicked` and `moderation:user_banned` (to the
    /// channel's members). `by` is the moderator's user id (or what the
    /// server API named); `until` ends a ban (absent: until lifted).
    pub struct ModerationEvent {
        pub user_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub channel_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub reason: Option<String>,
        pub by: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub until: Option<u64>,
    }
}

wire_type! {
    /// `auth:expiring`: the connection's token expires at `expiresAt` (ms
    /// since the epoch); send `auth:refresh` with a new one before then.
    pub struct AuthExpiring { pub expires_at: u64 }
}

/// The names of the server's own events (an application's events take
/// other names).
pub const SERVER_EVENT_NAMES: [&str; 34] = [
    "ready",
    "ack",
    "error",
    "heartbeat:ack",
    "channel:member_joined",
    "channel:member_left",
    "message:new",
    "message:edited",
    "message:deleted",
    "message:reaction",
    "message:delivery",
    "message:read_receipt",
    "dm:new",
    "dm:sent",
    "presence:changed",
    "typing:user_start",
    "typing:user_stop",
    "voice:user_joined",
    "voice:user_left",
    "voice:state_update",
    "call:incoming",
    "call:answered",
    "call:rejected",
    "call:ended",
    "call:missed",
    "call:ice_candidate",
    "notification:new",
    "moderation:kicked",
    "moderation:banned",
    "moderation:user_kicked",
    "moderation:user_banned",
    "auth:expiring",
    "channel:joined",
    "channel:left",
];

/// An event sent by the server.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ServerEvent {
    Ready(Ready),
    Ack(AckBody),
    Error(ErrorBody),
    HeartbeatAck(HeartbeatAck),
    MemberJoined(MemberEvent),
    MemberLeft(MemberEvent),
    MessageNew(MessageNew),
    MessageEdited(MessageEdited),
    MessageDeleted(MessageDeleted),
    MessageReaction(MessageReaction),
    MessageDelivery(MessageDelivery),
    MessageReadReceipt(ReadReceipt),
    DmNew(DmMessage),
    DmSent(DmMessage),
    PresenceChanged(PresenceView),
    TypingUserStart(TypingEvent),
    TypingUserStop(TypingEvent),
    VoiceUserJoined(VoiceEvent),
    VoiceUserLeft(VoiceEvent),
    VoiceStateUpdate(VoiceEvent),
    CallIncoming(CallIncoming),
    CallAnswered(CallEvent),
    CallRejected(CallEvent),
    CallEnded(CallEvent),
    CallMissed(CallEvent),
    CallIceCandidate(CallIceRelay),
    NotificationNew(Notification),
    ModerationKicked(ModerationEvent),
    ModerationBanned(ModerationEvent),
    ModerationUserKicked(ModerationEvent),
    ModerationUserBanned(ModerationEvent),
    AuthExpiring(AuthExpiring),
    /// An application's own event, named by it.
    Custom(String, CustomEvent),
    /// `channel:joined`: the server joined this connection to a channel
    /// (the application backend's `POST /api/subscribe`); as a join's ack.
    ChannelJoined(JoinAck),
    /// `channel:left`: the server took this connection out of a channel
    /// (`POST /api/unsubscribe`).
    ChannelLeft(ChannelRef),
}

impl ServerEvent {
    pub fn name(&self) -> &str {
        use ServerEvent::*;
        match self {
            Custom(name, _) => name,
            Ready(_) => "ready",
            Ack(_) => "ack",
            Error(_) => "error",
            HeartbeatAck(_) => "heartbeat:ack",
            MemberJoined(_) => "channel:member_joined",
            MemberLeft(_) => "channel:member_left",
            MessageNew(_) => "message:new",
            MessageEdited(_) => "message:edited",
            MessageDeleted(_) => "message:deleted",
            MessageReaction(_) => "message:reaction",
            MessageDelivery(_) => "message:delivery",
            MessageReadReceipt(_) => "message:read_receipt",
            DmNew(_) => "dm:new",
            DmSent(_) => "dm:sent",
            PresenceChanged(_) => "presence:changed",
            TypingUserStart(_) => "typing:user_start",
            TypingUserStop(_) => "typing:user_stop",
            VoiceUserJoined(_) => "voice:user_joined",
            VoiceUserLeft(_) => "voice:user_left",
            VoiceStateUpdate(_) => "voice:state_update",
            CallIncoming(_) => "call:incoming",
            CallAnswered(_) => "call:answered",
            CallRejected(_) => "call:rejected",
            CallEnded(_) => "call:ended",
            CallMissed(_) => "call:missed",
            CallIceCandidate(_) => "call:ice_candidate",
            NotificationNew(_) => "notification:new",
            ModerationKicked(_) => "moderation:kicked",
            ModerationBanned(_) => "moderation:banned",
            ModerationUserKicked(_) => "moderation:user_kicked",
            ModerationUserBanned(_) => "moderation:user_banned",
            AuthExpiring(_) => "auth:expiring",
            ChannelJoined(_) => "channel:joined",
            ChannelLeft(_) => "channel:left",
        }
    }
}

/// A server envelope.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ServerMessage {
    pub id: Option<u64>,
    pub event: ServerEvent,
}

impl ServerMessage {
    pub fn event(event: ServerEvent) -> Self {
        ServerMessage { id: None, event }
    }

    pub fn ack(id: Option<u64>, body: AckBody) -> Self {
        ServerMessage {
            id,
            event: ServerEvent::Ack(body),
        }
    }

    pub fn error(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> Self {
        ServerMessage {
            id,
            event: ServerEvent::Error(ErrorBody {
                code,
                message: message.into(),
                retry_after_ms: None,
            }),
        }
    }
}
