//! The node's internals, for the `corecast` binary, the tests, the benches
//! and the fuzz targets: not part of the library's API, and free to change.
//! Each lives in its own file under `src/` (the crate names them by their
//! short paths, `crate::engine` and so on).

#[path = "access.rs"]
pub mod access;
#[path = "admission.rs"]
pub mod admission;
#[path = "ban_store.rs"]
pub mod ban_store;
#[path = "bench/mod.rs"]
pub mod bench;
#[path = "clock.rs"]
pub mod clock;
#[path = "cluster/mod.rs"]
pub mod cluster;
#[path = "doctor.rs"]
pub mod doctor;
#[path = "engine/mod.rs"]
pub mod engine;
#[path = "event_outbox.rs"]
pub mod event_outbox;
#[path = "history_store.rs"]
pub mod history_store;
#[path = "hooks.rs"]
pub mod hooks;
#[path = "http/mod.rs"]
pub mod http;
#[path = "http_client.rs"]
pub mod http_client;
#[path = "livekit.rs"]
pub mod livekit;
#[path = "logs.rs"]
pub mod logs;
#[path = "mesh.rs"]
pub mod mesh;
#[path = "metrics.rs"]
pub mod metrics;
#[path = "node.rs"]
pub mod node;
#[path = "shard/mod.rs"]
pub mod shard;
#[path = "signal.rs"]
pub mod signal;
#[path = "webhook.rs"]
pub mod webhook;
#[path = "webhook_relay.rs"]
pub mod webhook_relay;
