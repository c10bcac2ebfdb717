//! What all shards of one process share, read-mostly: configuration, the
//! token verifier, each shard's metrics, the mesh, and the node's lifecycle.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};

use crate::admission::{Admission, Net};
use crate::auth::Verifier;
use crate::bans::BanStore;
use crate::config::Config;
use crate::engine::Moderation;
use crate::mesh::Mesh;
use crate::metrics::ShardMetrics;

const STARTING: u8 = 0;
const READY: u8 = 1;
const DRAINING: u8 = 2;

pub struct Node {
    pub config: Config,
    pub verifier: Verifier,
    /// Where bans are made durable (none: in memory only).
    pub ban_store: Option<Arc<BanStore>>,
    /// The bans in force at start-up, for each shard's table.
    pub initial_bans: Vec<Moderation>,
    /// Per-IP and per-shard connection limits.
    pub admission: Admission,
    pub trusted_proxies: Vec<Net>,
    /// Said once: requests carry `X-Forwarded-For` from an untrusted peer.
    pub forwarded_warned: std::sync::atomic::AtomicBool,
    pub metrics: Vec<Arc<ShardMetrics>>,
    pub mesh: Mesh,
    /// Cluster mode: this node's id and the bridge's figures.
    pub cluster: Option<(u64, Arc<crate::metrics::ClusterMetrics>)>,
    state: AtomicU8,
    started: AtomicUsize,
    drivers: Vec<OnceLock<&'static str>>,
}

impl Node {
    pub fn new(config: Config, verifier: Verifier, mesh: Mesh) -> Node {
        let n = mesh.shards();
        let capacity = n.saturating_mul(config.max_connections_per_shard);
        let admission = Admission::new(config.admission_limits(), capacity);
        let trusted_proxies = config.trusted_proxies().unwrap_or_default();
        Node {
            config,
            verifier,
            ban_store: None,
            initial_bans: Vec::new(),
            admission,
            trusted_proxies,
            forwarded_warned: Default::default(),
            metrics: (0..n).map(|_| Arc::new(ShardMetrics::default())).collect(),
            mesh,
            cluster: None,
            state: AtomicU8::new(STARTING),
            started: AtomicUsize::new(0),
            drivers: (0..n).map(|_| OnceLock::new()).collect(),
        }
    }

    pub fn shards(&self) -> usize {
        self.metrics.len()
    }

    /// Called by each shard once it accepts connections; the last one makes
    /// the node ready.
    pub fn shard_started(&self, shard: usize, driver: &'static str) {
        let _ = self.drivers[shard].set(driver);
        if self.started.fetch_add(1, SeqCst) + 1 == self.shards() {
            let _ = self.state.compare_exchange(STARTING, READY, SeqCst, SeqCst);
        }
    }

    pub fn is_ready(&self) -> bool {
        self.state.load(SeqCst) == READY
    }

    pub fn is_draining(&self) -> bool {
        self.state.load(SeqCst) == DRAINING
    }

    pub fn state_name(&self) -> &'static str {
        match self.state.load(SeqCst) {
            STARTING => "starting",
            READY => "ready",
            _ => "draining",
        }
    }

    /// Starts graceful shutdown: `/ready` turns 503 and every shard is woken
    /// to close its connections with 1001.
    pub fn begin_drain(&self) {
        self.state.store(DRAINING, SeqCst);
        for s in 0..self.mesh.endpoints() {
            self.mesh.ring(s as u16);
        }
    }

    /// The IO driver in use: `io_uring`, `epoll`, or `mixed`.
    pub fn io_driver(&self) -> &'static str {
        let mut names = self.drivers.iter().filter_map(|d| d.get().copied());
        match names.next() {
            None => "starting",
            Some(first) => {
                if names.all(|n| n == first) {
                    first
                } else {
                    "mixed"
                }
            }
        }
    }

    pub fn metrics_text(&self) -> String {
        let mut out = crate::metrics::render(&self.metrics, self.io_driver(), self.is_ready());
        if let Some((_, m)) = &self.cluster {
            crate::metrics::render_cluster(&mut out, m);
        }
        out
    }
}
