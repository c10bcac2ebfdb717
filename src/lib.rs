//! corecast: a thread-per-core WebSocket engine for chat-style applications.
//!
//! # Layout
//! From pure to effectful:
//! - [`ws`]: RFC 6455 codec (handshake, frames, messages), sans-IO.
//! - [`protocol`]: the `{t, id, d}` envelope in JSON and binary (rkyv).
//! - [`engine`]: one shard's state (connections, channels, owner-shard
//!   sequencing, fan-out), sans-IO, driven by events and a clock value.
//! - [`mesh`]: bounded lock-free queues between shards, with doorbells.
//! - [`shard`]: the monoio runtime of one core: sockets, timers, tasks.
//! - [`node`]: what the shards of one process share (config, metrics, mesh).
//! - [`server`]: start-up (listeners, threads, signals) and shutdown.
//! - [`config`], [`auth`], [`metrics`]: configuration, JWT, counters.
//! - [`logs`]: log lines that could repeat without end, throttled.
//! - [`doctor`]: what a host lacks for a connection target.
//! - [`bench`]: `corecast bench`, the load generator.
//! - [`client`]: the Rust client (sans-IO framing plus a monoio connection),
//!   used by `corecast bench`.

pub mod access;
pub mod admission;
pub mod api;
pub mod auth;
pub mod bans;
pub mod bench;
pub mod client;
pub mod cluster;
pub mod config;
pub mod doctor;
pub mod engine;
pub mod logs;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod server;
pub mod shard;
pub mod ws;
