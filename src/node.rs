//! What all shards of one process share, read-mostly: configuration, the
//! token verifier, each shard's metrics, the mesh, and the node's lifecycle.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};

use crate::admission::{Admission, Net};
use crate::auth::Verifier;
use crate::config::Config;
use crate::engine::Moderation;
use crate::mesh::Mesh;
use crate::metrics::ShardMetrics;

/// Line buffers kept for each shard: about a poll's worth of events at
/// 25,000 a second (see `crate::ban_store`).
const LINE_POOL: usize = 256;

const STARTING: u8 = 0;
const READY: u8 = 1;
const DRAINING: u8 = 2;

pub struct Node {
    pub config: Config,
    pub verifier: Verifier,
    /// The mesh endpoint that makes bans durable (none: in memory only).
    pub ban_store: Option<crate::engine::ShardId>,
    /// The bans in force at start-up, for each shard's table.
    pub initial_bans: Vec<Moderation>,
    /// The mesh endpoint that keeps sequenced events on disk: the history
    /// file and the event stream's outbox (none: neither is on).
    pub event_store: Option<crate::engine::ShardId>,
    /// Each shard's line buffers, handed back by the store once written.
    pub line_pools: Vec<Arc<crate::engine::history::LinePool>>,
    /// The event stream to the application backend, when it is on.
    pub event_stream: Option<Arc<crate::event_outbox::EventStream>>,
    /// In a cluster, webhooks from the events stream: their figures.
    pub webhook_relay: Option<Arc<crate::event_outbox::WebhookMetrics>>,
    /// The history read at start-up, by owner shard; each shard takes its
    /// part when it starts.
    pub initial_history: std::sync::Mutex<Vec<Vec<crate::engine::history::Record>>>,
    /// Per-IP and per-shard connection limits.
    pub admission: Admission,
    pub trusted_proxies: Vec<Net>,
    /// Said once: requests carry `X-Forwarded-For` from an untrusted peer.
    pub forwarded_warned: std::sync::atomic::AtomicBool,
    pub metrics: Vec<Arc<ShardMetrics>>,
    pub mesh: Mesh,
    /// Cluster mode: this node's id and the bridge's figures.
    pub cluster: Option<(u64, Arc<crate::metrics::ClusterMetrics>)>,
    /// Sockets open on the shards' listeners, node-wide, from accept to
    /// close (handshakes and refusals included).
    sockets: AtomicUsize,
    /// How many of those the node may hold: its open-file limit less what
    /// it keeps for itself ([`Budget`]).
    pub budget: Budget,
    state: AtomicU8,
    started: AtomicUsize,
    drivers: Vec<OnceLock<&'static str>>,
}

/// How the node shares its open-file limit. A socket accepted past
/// `sockets` is refused at once (503), so the node never runs out of
/// descriptors: its own files, the server API and Redis keep theirs, and
/// `accept` never fails for want of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Client sockets on the shards' listeners.
    pub sockets: usize,
    /// Connections of the server API.
    pub api_connections: usize,
}

impl Budget {
    /// Most connections the server API serves at once.
    pub const API_MAX: usize = 1024;

    /// The budget within an open-file limit of `nofile`, for `shards`
    /// shards: 64 descriptors plus 16 per shard kept for the node's own
    /// use (rings, mesh doorbells, logs, ban file, Redis), an eighth of
    /// the rest (at most [`Budget::API_MAX`]) for the server API when it
    /// runs, and the rest for clients.
    pub fn new(nofile: u64, shards: usize, api: bool) -> Budget {
        let nofile = usize::try_from(nofile).unwrap_or(usize::MAX);
        let rest = nofile.saturating_sub(64 + 16 * shards);
        let api_connections = if api {
            (rest / 8).clamp(1, Self::API_MAX)
        } else {
            0
        };
        Budget {
            sockets: rest.saturating_sub(api_connections).max(1),
            api_connections,
        }
    }
}

/// Keeps the kernel from backing the process's memory with transparent
/// huge pages, which count a connection's few hundred bytes in 2 MiB pages
/// (about 10 MB more at start and 300 B more per idle connection, measured
/// in docs/BENCHMARKS.md); the allocator does not ask for them either
/// (mimalloc built with `no_thp`). Returns whether the kernel took it.
pub fn small_pages() -> bool {
    // SAFETY: prctl(PR_SET_THP_DISABLE) takes integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0 }
}

/// Has the allocator give the system the memory it holds free now, this
/// thread's and its arenas', at once rather than when it next allocates
/// (see `shard::give_back`).
pub fn give_back_memory() {
    // SAFETY: mi_collect takes no pointer and may run on any thread.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Raises the soft open-file limit to the hard one and returns it.
pub fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write one rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                r.rlim_cur = r.rlim_max;
            }
        }
    }
    r.rlim_cur
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
            event_store: None,
            line_pools: (0..n)
                .map(|_| Arc::new(crate::engine::history::LinePool::new(LINE_POOL)))
                .collect(),
            event_stream: None,
            webhook_relay: None,
            initial_history: Default::default(),
            admission,
            trusted_proxies,
            forwarded_warned: Default::default(),
            metrics: (0..n).map(|_| Arc::new(ShardMetrics::default())).collect(),
            mesh,
            cluster: None,
            sockets: AtomicUsize::new(0),
            budget: Budget::new(u64::MAX, n, false),
            state: AtomicU8::new(STARTING),
            started: AtomicUsize::new(0),
            drivers: (0..n).map(|_| OnceLock::new()).collect(),
        }
    }

    pub fn shards(&self) -> usize {
        self.metrics.len()
    }

    /// Counts a socket accepted by a shard; false when it is past the
    /// node's socket budget (it is still counted until closed).
    pub fn socket_opened(&self) -> bool {
        self.sockets.fetch_add(1, Relaxed) < self.budget.sockets
    }

    pub fn socket_closed(&self) {
        self.sockets.fetch_sub(1, Relaxed);
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

    /// For an extra endpoint's thread (the store's, the hooks'), when it
    /// found its queues empty: parks it and waits on its doorbell `bell`
    /// (blocking, with a read timeout) until a message may have come.
    /// False when the doorbell is closed (the node is gone).
    pub fn wait_for_mesh(
        &self,
        me: crate::engine::ShardId,
        bell: &mut std::os::unix::net::UnixStream,
    ) -> std::io::Result<bool> {
        use std::io::{ErrorKind, Read};
        if !self.mesh.park(me) {
            return Ok(true);
        }
        let mut buf = [0u8; 64];
        let r = bell.read(&mut buf);
        self.mesh.unpark(me);
        match r {
            Ok(0) => Ok(false),
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    /// Sends `msg` from an extra endpoint's thread to a shard, waiting
    /// while its queue is full (not once the node drains).
    pub fn send_waiting(
        &self,
        me: crate::engine::ShardId,
        to: crate::engine::ShardId,
        mut msg: crate::engine::MeshMsg,
    ) {
        while let Err(back) = self.mesh.send(me, to, msg) {
            if self.is_draining() {
                return;
            }
            msg = back;
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }

    pub fn metrics_text(&self) -> String {
        let mut out = crate::metrics::render(&self.metrics, self.io_driver(), self.is_ready());
        if let Some((_, m)) = &self.cluster {
            crate::metrics::render_cluster(&mut out, m);
        }
        if let Some(s) = &self.event_stream {
            crate::event_outbox::render(&mut out, s);
        }
        if let Some(m) = &self.webhook_relay {
            crate::event_outbox::render_relay(&mut out, m);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Budget;

    #[test]
    fn the_budget_keeps_headroom_below_the_file_limit() {
        let b = Budget::new(4096, 2, true);
        assert_eq!(b.api_connections, (4096 - 96) / 8);
        assert_eq!(b.sockets + b.api_connections + 96, 4096);
        let big = Budget::new(1 << 20, 16, true);
        assert_eq!(big.api_connections, Budget::API_MAX);
        assert_eq!(Budget::new(4096, 2, false).sockets, 4096 - 96);
        // A tiny limit still admits something.
        assert!(Budget::new(10, 4, true).sockets >= 1);
    }
}
