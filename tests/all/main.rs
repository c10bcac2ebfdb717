//! The integration tests, in one binary: each module starts real servers
//! (and redis-servers) on free ports of 127.0.0.1 and talks to them over
//! real sockets. (`tests/alloc.rs` is a binary of its own: it counts
//! allocations with its own global allocator.)

mod common;

mod abuse;
mod api;
mod bench;
mod channels;
mod chat;
mod cluster;
mod cluster_faults;
mod connect_hook;
mod events_stream;
mod history;
mod hooks;
mod hygiene;
mod safety;
mod subscribe;
mod tokens;
mod webhook;
mod websocket;
