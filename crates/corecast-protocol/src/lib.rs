//! corecast's wire formats, sans-IO: no sockets, no runtime, no clock.
//!
//! - [`ws`]: the RFC 6455 codec (the upgrade handshake and every HTTP
//!   response, frames, masking, message assembly, close codes).
//! - [`protocol`]: the `{t, id, d}` envelope of every event, in JSON and in
//!   binary (rkyv), and the frames that carry it.
//!
//! The server (`corecast`) and the Rust client (`corecast-client`) share
//! them.

#![forbid(unsafe_code)]

pub mod protocol;
pub mod ws;
