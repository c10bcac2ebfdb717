//! Cluster mode: several nodes serve one product through Redis. Each
//! node's bridge thread is an endpoint of its mesh; the engine's side is
//! `engine::cluster`.
//!
//! - [`core`]: every decision of the bridge, sans-IO: typed messages from
//!   the shards and from Redis in, Redis operations and mesh messages out,
//!   time as an argument.
//! - [`io`]: the thread's loop on the `redis` crate (tokio current-thread):
//!   runs the core's operations (one pipeline per round on one Redis) and
//!   feeds it answers and published messages.
//! - [`ops`]: the operations and their replies, typed.
//! - [`wire`]: the node-to-node message and its one codec.
//! - [`keys`]: every Redis key and pub/sub channel, with the table of what
//!   each holds and how it is bounded.
//! - [`link`]: a connection to one Redis or to a Redis Cluster (sharded
//!   pub/sub).
//! - [`proxy`]: connections of other nodes, stood in for here (calls).
//! - `scripts/`: the Lua scripts, one file each.

pub mod core;
pub mod io;
pub mod keys;
pub mod link;
pub mod ops;
pub mod proxy;
pub mod wire;

use std::time::Duration;

pub use io::spawn;

use crate::engine::Moderation;

/// The cluster's bans, read before the shards start (so that a node does
/// not let a banned user in while its bridge connects).
pub fn initial_bans(one: &str, cluster: &[String]) -> Result<Vec<Moderation>, String> {
    const TIMEOUT: Duration = Duration::from_secs(3);
    let all: Vec<(String, String)> = if cluster.is_empty() {
        let client = redis::Client::open(one).map_err(|e| e.to_string())?;
        let mut conn = client
            .get_connection_with_timeout(TIMEOUT)
            .map_err(|e| e.to_string())?;
        conn.set_read_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        redis::cmd("HGETALL")
            .arg(keys::BANS)
            .query(&mut conn)
            .map_err(|e| e.to_string())?
    } else {
        let client = redis::cluster::ClusterClientBuilder::new(cluster.to_vec())
            .connection_timeout(TIMEOUT)
            .response_timeout(TIMEOUT)
            .build()
            .map_err(|e| e.to_string())?;
        let mut conn = client.get_connection().map_err(|e| e.to_string())?;
        redis::cmd("HGETALL")
            .arg(keys::BANS)
            .query(&mut conn)
            .map_err(|e| e.to_string())?
    };
    Ok(core::read_bans(all, crate::clock::now_ms()).0)
}
