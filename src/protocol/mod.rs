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

use bytes::Bytes;

pub use crate::ws::handshake::Protocol;
pub use events::*;

use crate::ws::frame::{FrameBuf, OpCode};

/// Why a client envelope could not be decoded. Answered with `bad_request`
/// (and the ack id when it could be read); the connection stays open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub id: Option<u64>,
    pub message: String,
}

impl DecodeError {
    pub fn new(id: Option<u64>, message: impl Into<String>) -> Self {
        DecodeError {
            id,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DecodeError {}

/// Encodes `msg` as one complete, unmasked WebSocket frame for `protocol`:
/// a text frame of JSON or a binary frame holding an rkyv archive.
pub fn encode_frame(protocol: Protocol, msg: &ServerMessage) -> Bytes {
    let mut f = FrameBuf::with_capacity(128);
    match protocol {
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
}

impl Frames {
    /// Encodes `msg` for the protocols asked for.
    pub fn encode(msg: &ServerMessage, json: bool, binary: bool) -> Frames {
        Frames {
            json: json.then(|| encode_frame(Protocol::Json, msg)),
            binary: binary.then(|| encode_frame(Protocol::Binary, msg)),
        }
    }

    pub fn get(&self, p: Protocol) -> Option<&Bytes> {
        match p {
            Protocol::Json => self.json.as_ref(),
            Protocol::Binary => self.binary.as_ref(),
        }
    }
}
