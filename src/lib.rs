//! corecast: a thread-per-core WebSocket engine for chat-style applications.
//!
//! # Public surface
//! - [`ws`] and [`protocol`]: the wire formats (the `corecast-protocol`
//!   crate): the RFC 6455 codec and the `{t, id, d}` envelope in JSON and
//!   binary, sans-IO.
//! - [`client`]: the Rust client (the `corecast-client` crate).
//! - [`config`]: configuration from defaults, file, environment and flags.
//! - [`auth`]: JWT verification and minting, with its configuration.
//! - [`server`]: start a node, shut it down.
//!
//! # Internals
//! In `internals` (hidden: for the binary, the tests, the benches and the
//! fuzz targets), from pure to effectful; a module names only those above
//! it (the `hygiene` tests hold the order and that the engine touches no
//! IO):
//! - `access`: who may join which channel and message whom, from claims.
//! - `admission`: per-shard socket caps and per-IP handshake limits.
//! - `livekit`: LiveKit access tokens for voice rooms.
//! - `metrics`: counters and the Prometheus text.
//! - `engine`: one shard's state, sans-IO, driven by events and a clock
//!   value: routing tables (`connection`, `owner`, `home`) and a file per
//!   feature (`messages`, `members`, `typing`, `receipts`, `presence`,
//!   `dm`, `notifications`, `voice`, `calls`, `sessions`, `moderation`).
//! - `mesh`: bounded lock-free queues between shards and the extra
//!   endpoints (server API, cluster bridge, ban store), with doorbells.
//! - `clock`: the wall clock and randomness, read by the IO shells only.
//! - `signal`: wake-ups between the tasks of one thread.
//! - `logs`: log lines that could repeat without end, throttled.
//! - `node`: what the shards of one process share (config, metrics, mesh).
//! - `ban_store`: the ban file of a single node, written on a thread of its
//!   own (a mesh endpoint), which also writes the history file.
//! - `history_store`: the history file of a single node (channel events
//!   that survive a restart).
//! - `http_client`: the blocking HTTP/1.1 client the node calls the
//!   application backend with.
//! - `hooks`: questions to the application backend (the publish hook),
//!   asked by a pool of threads at a mesh endpoint of their own.
//! - `event_outbox`, `webhook`: the event stream to the application
//!   backend: sequenced events wait on disk, and a thread of its own POSTs
//!   them in signed batches.
//! - `cluster`: the bridge to Redis, its decisions sans-IO in `core`.
//! - `doctor`: what a host lacks for a connection target.
//! - `http`: plain HTTP on the client port (health, readiness, metrics)
//!   and the server API's listener for the application backend.
//! - `shard`: one core's IO: the session of a connection, the io_uring and
//!   epoll drivers, the buffer ring, the outbox.
//! - `bench`: `corecast bench`, the load generator.

// The public surface: the wire formats and the Rust client (crates of
// their own), configuration, tokens, and the server to start.
pub mod auth;
pub mod config;
pub mod server;

pub use corecast_client as client;
pub use corecast_protocol::{protocol, ws};

/// The node's internals, for the `corecast` binary, the tests, the benches
/// and the fuzz targets: not part of the library's API, and free to change.
#[doc(hidden)]
pub mod internals;

// Inside the crate they keep their short paths (`crate::engine`, ...).
use internals::{
    access, admission, ban_store, clock, cluster, doctor, engine, event_outbox, history_store,
    hooks, http, http_client, livekit, logs, mesh, metrics, node, shard, signal, webhook,
    webhook_relay,
};
