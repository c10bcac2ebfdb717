//! RFC 6455 wire codec, sans-IO: pure functions and state machines over byte
//! slices. Nothing here touches a socket, a clock or a runtime; the shard
//! feeds bytes in and writes the bytes that come out.
//!
//! - [`handshake`]: the HTTP/1.1 upgrade request and its responses.
//! - [`frame`]: frame headers, masking, and encoding of server frames.
//! - [`decoder`]: message assembly (fragments, control frames, UTF-8, limits).
//! - [`close`]: close codes and close payloads.

pub mod close;
pub mod decoder;
pub mod frame;
pub mod handshake;

pub use decoder::{Decoder, Message};
pub use frame::OpCode;

/// A violation of RFC 6455 by the peer. Each variant maps to the close code
/// the server answers with ([`WsError::close_code`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsError {
    /// A client frame without the mask bit (RFC 6455 §5.1).
    Unmasked,
    /// A server frame with the mask bit (seen by clients; RFC 6455 §5.1).
    MaskedFromServer,
    /// RSV1-3 set without a negotiated extension.
    RsvSet,
    /// Opcodes 3-7 and 11-15 are reserved.
    ReservedOpcode(u8),
    /// Control frames carry at most 125 bytes.
    ControlTooLong,
    /// Control frames must not be fragmented.
    FragmentedControl,
    /// A continuation frame with no message in progress.
    UnexpectedContinuation,
    /// A new data frame while a fragmented message is in progress.
    ExpectedContinuation,
    /// The 64-bit length has its most significant bit set.
    BadLength,
    /// A close payload of one byte.
    BadClosePayload,
    /// A close code that must not appear on the wire.
    InvalidCloseCode(u16),
    /// Text (or a close reason) that is not UTF-8.
    InvalidUtf8,
    /// A message larger than the configured limit.
    MessageTooBig { limit: usize },
}

impl WsError {
    /// The close code the server sends for this error.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::InvalidUtf8 => close::INVALID_PAYLOAD,
            WsError::MessageTooBig { .. } => close::MESSAGE_TOO_BIG,
            _ => close::PROTOCOL_ERROR,
        }
    }

    /// A short reason for the close frame and the logs.
    pub fn reason(&self) -> &'static str {
        match self {
            WsError::Unmasked => "client frames must be masked",
            WsError::MaskedFromServer => "server frames must not be masked",
            WsError::RsvSet => "reserved bits set",
            WsError::ReservedOpcode(_) => "reserved opcode",
            WsError::ControlTooLong => "control frame longer than 125 bytes",
            WsError::FragmentedControl => "fragmented control frame",
            WsError::UnexpectedContinuation => "continuation without a message in progress",
            WsError::ExpectedContinuation => "new message before the previous one finished",
            WsError::BadLength => "invalid payload length",
            WsError::BadClosePayload => "close payload of one byte",
            WsError::InvalidCloseCode(_) => "invalid close code",
            WsError::InvalidUtf8 => "invalid UTF-8",
            WsError::MessageTooBig { .. } => "message too big",
        }
    }
}

impl std::fmt::Display for WsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WsError::ReservedOpcode(op) => write!(f, "reserved opcode {op:#x}"),
            WsError::InvalidCloseCode(c) => write!(f, "invalid close code {c}"),
            WsError::MessageTooBig { limit } => write!(f, "message larger than {limit} bytes"),
            other => f.write_str(other.reason()),
        }
    }
}

impl std::error::Error for WsError {}
