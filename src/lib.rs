//! corecast: a thread-per-core WebSocket engine for chat-style applications.
//!
//! # Layout
//! From pure to effectful (a module names only those above it; the
//! `hygiene` tests hold the order and that the engine touches no IO):
//! - [`ws`]: RFC 6455 codec (handshake, frames, messages), sans-IO.
//! - [`protocol`]: the `{t, id, d}` envelope in JSON and binary (rkyv).
//! - [`access`]: who may join which channel and message whom, from claims.
//! - [`admission`]: per-shard socket caps and per-IP handshake limits.
//! - [`livekit`]: LiveKit access tokens for voice rooms.
//! - [`metrics`]: counters and the Prometheus text.
//! - [`engine`]: one shard's state (connections, channels, owner-shard
//!   sequencing, fan-out), sans-IO, driven by events and a clock value.
//! - [`mesh`]: bounded lock-free queues between shards and the extra
//!   endpoints (server API, cluster bridge, ban store), with doorbells.
//! - [`auth`]: JWT verification and minting, with its configuration.
//! - [`config`]: configuration from defaults, file, environment and flags.
//! - [`clock`]: the wall clock and randomness, read by the IO shells only.
//! - [`signal`]: wake-ups between the tasks of one thread.
//! - [`logs`]: log lines that could repeat without end, throttled.
//! - [`node`]: what the shards of one process share (config, metrics, mesh).
//! - [`bans`]: the ban file of a single node, written on a thread of its
//!   own (a mesh endpoint).
//! - [`cluster`]: the bridge to Redis, its decisions sans-IO in `core`.
//! - [`doctor`]: what a host lacks for a connection target.
//! - [`http`]: plain HTTP on the client port (health, readiness, metrics)
//!   and the server API's listener for the application backend ([`http::api`]).
//! - [`shard`]: one core's IO: sockets, timers, the io_uring and epoll
//!   drivers.
//! - [`server`]: start-up (listeners, threads, signals) and shutdown.
//! - [`client`]: the Rust client (sans-IO framing plus a monoio connection),
//!   used by `corecast bench`.
//! - [`bench`]: `corecast bench`, the load generator.

pub mod access;
pub mod admission;
pub mod auth;
pub mod bans;
pub mod bench;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod doctor;
pub mod engine;
pub mod http;
pub mod livekit;
pub mod logs;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod server;
pub mod shard;
pub mod signal;

pub use corecast_client as client;
pub use corecast_protocol::{protocol, ws};
