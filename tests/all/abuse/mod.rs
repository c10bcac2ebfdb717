//! Abuse, organised by class: what an attacker or a careless operator can
//! do to a node, over real sockets against the real binary, each test
//! asserting what does not depend on the machine's speed (memory and
//! queue bounds, close codes, counts, order), and that a well-behaved
//! client on the same shard keeps being served.
//!
//! - `memory`: every byte queued for a peer counts against its bounds;
//!   memory follows the bytes received, not the lengths announced.
//! - `preauth`: what a connection may do before it authenticates.
//! - `tokens`: every claim the configuration names is required.
//! - `rate_limits`: malformed input costs tokens and strikes.
//! - `restarts`: a clean exit leaves the port free.
//! - `refusals`: refusals a browser can read.
//! - `sockets`: every accepted socket counts from the accept on; the file
//!   limit keeps headroom; idle sockets do not lock the server API out.
//! - `notifications`: mentions obey grants; stored notifications are
//!   bounded.
//! - `http`: ambiguous request framing is refused.

mod http;
mod memory;
mod notifications;
mod preauth;
mod rate_limits;
mod refusals;
mod restarts;
mod sockets;
mod tokens;
