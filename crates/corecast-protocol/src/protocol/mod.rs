//! The envelope `{t, id, d}` and its two encodings.
//!
//! One set of Rust types ([`ClientMessage`], [`ServerMessage`]) describes every
//! event; [`json`] encodes them as `{"t":"<event>","id":N,"d":{...}}` (parsed
//! in place with simd-json) and [`binary`] as rkyv archives (validated before
//! access). Both codecs agree: a property test checks that any message
//! survives a round trip through either and decodes to the same value.
//! [`encode_frame`] turns a server message into a complete WebSocket frame,
//! which is what the engine queues (encoded once, shared by every recipient).

pub mod binary;
pub mod events;
pub mod json;
pub mod msgpack;
pub mod socketio;

use bytes::Bytes;

pub use crate::ws::handshake::Protocol;
pub use events::*;

use crate::ws::frame::{FrameBuf, OpCode};

/// Why a client envelope could not be decoded. Answered with its `code`
/// (`bad_request`, or `too_large` for a list past its bound) and the ack id
/// when it could be read; the connection stays open. It still costs a rate
/// token, from the bucket of the event it names ([`DecodeError::bucket`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub id: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
    /// The event named by `t` ([`ClientEvent::index`] numbering), when the
    /// envelope got that far.
    pub event: Option<usize>,
}

impl DecodeError {
    pub fn new(id: Option<u64>, message: impl Into<String>) -> Self {
        DecodeError {
            id,
            code: ErrorCode::BadRequest,
            message: message.into(),
            event: None,
        }
    }

    pub fn too_large(id: Option<u64>, message: impl Into<String>) -> Self {
        DecodeError {
            code: ErrorCode::TooLarge,
            ..Self::new(id, message)
        }
    }

    /// A frame of the wrong kind for the connection's protocol.
    pub fn wrong_frame(p: Protocol) -> Self {
        match p {
            Protocol::Json => DecodeError::new(None, "corecast.json takes text frames"),
            Protocol::Binary => DecodeError::new(None, "corecast.bin takes binary frames"),
            Protocol::SocketIo => DecodeError::new(
                None,
                "binary frames are attachments, and no request takes any",
            ),
            Protocol::SocketIoMsgpack => {
                DecodeError::new(None, "socket.io-msgpack-parser packets are binary")
            }
        }
    }

    /// The rate-limit bucket the message is charged to: its event's, or
    /// the default one (that of events the server does not know) when the
    /// event could not be read.
    pub fn bucket(&self) -> usize {
        self.event.unwrap_or(CLIENT_EVENT_NAMES.len())
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DecodeError {}

/// Encodes `msg` as one complete, unmasked WebSocket frame for `protocol`:
/// a text frame of JSON or a binary frame holding an rkyv archive (for
/// Socket.IO, see [`socketio::encode_frame`]: possibly none or two).
pub fn encode_frame(protocol: Protocol, msg: &ServerMessage) -> Bytes {
    encode_frame_at(protocol, msg, None)
}

/// [`encode_frame`] for an event sequenced at `at` (Socket.IO frames carry
/// its recovery offset; the native ones carry the offset in the event).
pub fn encode_frame_at(
    protocol: Protocol,
    msg: &ServerMessage,
    at: Option<socketio::Seq>,
) -> Bytes {
    let mut f = FrameBuf::with_capacity(128);
    match protocol {
        Protocol::SocketIo => socketio::encode_frame(msg, at),
        Protocol::SocketIoMsgpack => socketio::encode_msgpack_frame(msg, at),
        Protocol::Json => {
            json::encode_server(msg, f.payload());
            f.finish(OpCode::Text)
        }
        Protocol::Binary => {
            binary::encode_server(msg, f.payload());
            f.finish(OpCode::Binary)
        }
    }
}

/// The same event encoded for each protocol, each at most once. Fan-out
/// encodes only the protocols its recipients speak.
#[derive(Debug, Clone, Default)]
pub struct Frames {
    pub json: Option<Bytes>,
    pub binary: Option<Bytes>,
    pub socketio: Option<Bytes>,
    pub socketio_msgpack: Option<Bytes>,
}

impl Frames {
    /// Encodes `msg` for the protocols in `wanted` (by [`Protocol::index`]).
    pub fn encode(msg: &ServerMessage, wanted: [bool; Protocol::COUNT]) -> Frames {
        Frames::encode_at(msg, wanted, None)
    }

    /// [`Frames::encode`] for an event sequenced at `at`.
    pub fn encode_at(
        msg: &ServerMessage,
        wanted: [bool; Protocol::COUNT],
        at: Option<socketio::Seq>,
    ) -> Frames {
        let enc = |p: Protocol| wanted[p.index()].then(|| encode_frame_at(p, msg, at));
        Frames {
            json: enc(Protocol::Json),
            binary: enc(Protocol::Binary),
            socketio: enc(Protocol::SocketIo),
            socketio_msgpack: enc(Protocol::SocketIoMsgpack),
        }
    }

    pub fn get(&self, p: Protocol) -> Option<&Bytes> {
        match p {
            Protocol::Json => self.json.as_ref(),
            Protocol::Binary => self.binary.as_ref(),
            Protocol::SocketIo => self.socketio.as_ref(),
            Protocol::SocketIoMsgpack => self.socketio_msgpack.as_ref(),
        }
    }

    /// The frame of `p`, encoded or not yet.
    pub fn slot(&mut self, p: Protocol) -> &mut Option<Bytes> {
        match p {
            Protocol::Json => &mut self.json,
            Protocol::Binary => &mut self.binary,
            Protocol::SocketIo => &mut self.socketio,
            Protocol::SocketIoMsgpack => &mut self.socketio_msgpack,
        }
    }
}
