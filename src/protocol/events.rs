//! Every event the engine speaks, as plain Rust types shared by both codecs.
//! Field names are camelCase on the JSON wire.

use serde::{Deserialize, Serialize};

macro_rules! wire_type {
    ($(#[$m:meta])* pub struct $name:ident { $($body:tt)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
        #[serde(rename_all = "camelCase")]
        pub struct $name { $($body)* }
    };
}

wire_type! {
    /// `auth`: the first message of a client that did not authenticate in the handshake.
    pub struct Auth { pub token: String }
}

wire_type! {
    /// `channel:join` and `channel:leave`.
    pub struct ChannelRef { pub channel_id: String }
}

wire_type! {
    /// `message:send`.
    pub struct MessageSend {
        pub channel_id: String,
        pub content: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub reply_to: Option<String>,
    }
}

/// An event sent by a client.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ClientEvent {
    Auth(Auth),
    Heartbeat,
    ChannelJoin(ChannelRef),
    ChannelLeave(ChannelRef),
    MessageSend(MessageSend),
    /// An event name this engine does not implement (answered `unsupported`).
    Unsupported(String),
}

impl ClientEvent {
    pub fn name(&self) -> &str {
        match self {
            ClientEvent::Auth(_) => "auth",
            ClientEvent::Heartbeat => "heartbeat",
            ClientEvent::ChannelJoin(_) => "channel:join",
            ClientEvent::ChannelLeave(_) => "channel:leave",
            ClientEvent::MessageSend(_) => "message:send",
            ClientEvent::Unsupported(name) => name,
        }
    }
}

/// A client envelope: the event and its optional ack id.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ClientMessage {
    pub id: Option<u64>,
    pub event: ClientEvent,
}

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
    /// The ack of `channel:join`: where the channel's sequence stands.
    pub struct JoinAck {
        pub channel_id: String,
        /// Offset of the last message published before the join.
        pub offset: u64,
        /// Identifies this incarnation of the channel's offsets.
        pub epoch: String,
        /// Connections in the channel, this one included.
        pub members: u32,
    }
}

wire_type! {
    /// The ack of `message:send`: what the server assigned.
    pub struct SendAck {
        pub message_id: String,
        pub channel_id: String,
        pub offset: u64,
        pub timestamp: u64,
    }
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

/// The `d` of an `ack`.
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
    Empty(Empty),
}

wire_type! {
    /// `message:new`.
    pub struct MessageNew {
        pub message_id: String,
        pub channel_id: String,
        pub user_id: String,
        pub content: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub reply_to: Option<String>,
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
    /// `heartbeat:ack`.
    pub struct HeartbeatAck { pub timestamp: u64 }
}

/// An event sent by the server.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ServerEvent {
    Ready(Ready),
    Ack(AckBody),
    Error(ErrorBody),
    HeartbeatAck(HeartbeatAck),
    MessageNew(MessageNew),
    MemberJoined(MemberEvent),
    MemberLeft(MemberEvent),
}

impl ServerEvent {
    pub fn name(&self) -> &'static str {
        match self {
            ServerEvent::Ready(_) => "ready",
            ServerEvent::Ack(_) => "ack",
            ServerEvent::Error(_) => "error",
            ServerEvent::HeartbeatAck(_) => "heartbeat:ack",
            ServerEvent::MessageNew(_) => "message:new",
            ServerEvent::MemberJoined(_) => "channel:member_joined",
            ServerEvent::MemberLeft(_) => "channel:member_left",
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
