//! Node start-up and shutdown: listeners, shard threads, readiness.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use socket2::{Domain, Socket, Type};

use crate::auth::Verifier;
use crate::ban_store::BanStore;
use crate::config::{Config, ConfigError};
use crate::mesh::Mesh;
use crate::node::Node;

/// A running node.
pub struct Server {
    pub node: Arc<Node>,
    pub local_addr: SocketAddr,
    /// Where the server API listens (when it runs).
    pub api_addr: Option<SocketAddr>,
    threads: Vec<JoinHandle<std::io::Result<()>>>,
}

#[derive(Debug)]
pub enum StartError {
    Config(ConfigError),
    Io(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Config(e) => write!(f, "configuration: {e}"),
            StartError::Io(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for StartError {}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// SO_REUSEPORT would let this node silently share a port with another
/// process (a stale server, a second copy): refuse to start instead.
fn ensure_port_free(addr: SocketAddr) -> Result<(), StartError> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, None)
        .map_err(|e| StartError::Io(e.to_string()))?;
    let _ = probe.set_reuse_address(true);
    probe.bind(&addr.into()).map_err(|e| {
        StartError::Io(format!(
            "cannot listen on {addr}: {e} (is another server running on this port?)"
        ))
    })?;
    probe.listen(1).map_err(|e| {
        StartError::Io(format!(
            "cannot listen on {addr}: {e} (is another server running on this port?)"
        ))
    })
}

/// Binds the listeners and starts one thread per shard.
pub fn start(config: Config) -> Result<Server, StartError> {
    config.validate().map_err(StartError::Config)?;
    let verifier = Verifier::from_config(&config.auth).map_err(|e| StartError::Config(e.into()))?;
    let shards = config.shard_count();
    let addr = config.listen_addr().map_err(StartError::Config)?;
    ensure_port_free(addr)?;
    let first = reuseport_listener(addr)
        .map_err(|e| StartError::Io(format!("cannot listen on {addr}: {e}")))?;
    // With port 0 the first bind picks the port; the other shards join it.
    let local_addr = first
        .local_addr()
        .map_err(|e| StartError::Io(e.to_string()))?;
    let mut listeners = vec![first];
    for _ in 1..shards {
        listeners.push(
            reuseport_listener(local_addr)
                .map_err(|e| StartError::Io(format!("cannot listen on {local_addr}: {e}")))?,
        );
    }
    let (ban_store, initial_bans) = if config.cluster_mode() {
        // The cluster keeps the bans in Redis; the bridge reloads them each
        // time it connects.
        match crate::cluster::initial_bans(&config.redis, &config.redis_cluster) {
            Ok(bans) => (None, bans),
            Err(e) => {
                tracing::error!(redis = %config.redis_shown(), error = %e,
                    "cluster: cannot read the bans from Redis; starting without them until Redis is reachable");
                (None, Vec::new())
            }
        }
    } else if config.ban_file.is_empty() {
        tracing::warn!("ban_file is empty: bans last until the node stops");
        (None, Vec::new())
    } else {
        let (store, bans) = BanStore::open(
            std::path::Path::new(&config.ban_file),
            crate::clock::now_ms(),
        )
        .map_err(StartError::Io)?;
        (Some(store), bans)
    };
    // A single node keeps its channels' history in a file of its own.
    let (history_store, initial_history) =
        if config.cluster_mode() || config.history_file.is_empty() {
            (None, Vec::new())
        } else {
            let keep = crate::history_store::Keep {
                events: config.history_size,
                ttl_ms: config.history_ttl_ms,
            };
            let path = std::path::Path::new(&config.history_file);
            let (store, records) =
                crate::history_store::HistoryStore::open(path, keep, crate::clock::now_ms())
                    .map_err(StartError::Io)?;
            if !records.is_empty() {
                tracing::info!(file = %path.display(), events = records.len(), "history loaded");
            }
            (Some(store), records)
        };
    // The event stream waits for the backend in an outbox on disk.
    let (outbox, outbox_reader) = if config.webhook.enabled() && !config.cluster_mode() {
        let dir = std::path::Path::new(&config.webhook.outbox_dir);
        let (outbox, reader) =
            crate::event_outbox::Outbox::open(dir, config.webhook.outbox_max_bytes)
                .map_err(StartError::Io)?;
        let waiting = outbox.state().waiting();
        if waiting > 0 {
            tracing::info!(dir = %dir.display(), bytes = waiting, "outbox: events wait for the backend");
        }
        (Some(outbox), Some(reader))
    } else {
        (None, None)
    };
    // Extra endpoints: the server API's thread, the cluster's bridge, the
    // ban store (numbered by `crate::mesh`).
    let (mesh, bells) = Mesh::new(
        shards,
        crate::mesh::EXTRA_ENDPOINTS,
        config.mesh_queue_capacity,
    )
    .map_err(|e| StartError::Io(e.to_string()))?;
    // The server API listens on an address of its own, bound before any
    // thread starts so that a taken port fails the start.
    let api_listener = if config.api_keys.is_empty() || config.api_listen.is_empty() {
        None
    } else {
        let addr = config.api_addr().map_err(StartError::Config)?;
        let l = std::net::TcpListener::bind(addr)
            .map_err(|e| StartError::Io(format!("cannot listen on {addr} (api_listen): {e}")))?;
        l.set_nonblocking(true)
            .map_err(|e| StartError::Io(e.to_string()))?;
        Some(l)
    };
    let api_addr = api_listener.as_ref().and_then(|l| l.local_addr().ok());
    let nofile = crate::node::raise_nofile();
    let budget = crate::node::Budget::new(nofile, shards, api_listener.is_some());
    tracing::info!(
        open_file_limit = nofile,
        client_sockets = budget.sockets,
        api_connections = budget.api_connections,
        "socket budget"
    );
    let mut node = Node::new(config, verifier, mesh);
    node.budget = budget;
    node.ban_store = ban_store
        .is_some()
        .then(|| crate::mesh::store_endpoint(shards));
    node.initial_bans = initial_bans;
    node.event_store =
        (history_store.is_some() || outbox.is_some()).then(|| crate::mesh::store_endpoint(shards));
    node.event_stream = outbox.as_ref().map(|o| {
        Arc::new(crate::event_outbox::EventStream {
            outbox: o.state().clone(),
            metrics: Default::default(),
        })
    });
    let mut parts: Vec<Vec<_>> = (0..shards).map(|_| Vec::new()).collect();
    for r in initial_history {
        let owner = crate::engine::owner_of(&r.channel, shards as u16);
        parts[owner as usize].push(r);
    }
    node.initial_history = std::sync::Mutex::new(parts);
    if node.config.cluster_mode() {
        let id = crate::clock::random_u64();
        node.cluster = Some((id, Arc::default()));
        if node.config.webhook.enabled() {
            node.webhook_relay = Some(Arc::default());
        }
    }
    let node = Arc::new(node);
    let mut bells = bells.into_iter();
    let shard_bells: Vec<_> = bells.by_ref().take(shards).collect();
    let api_bell = bells.next().expect("the mesh has the API's endpoint");
    let bridge_bell = bells.next().expect("the mesh has the bridge's endpoint");
    let store_bell = bells.next().expect("the mesh has the ban store's endpoint");
    let hooks_bell = bells.next().expect("the mesh has the hooks' endpoint");
    let mut threads = Vec::with_capacity(shards + 2);
    if let (Some(stream), Some(reader)) = (&node.event_stream, outbox_reader) {
        let t = crate::webhook::spawn(
            node.clone(),
            stream.clone(),
            reader,
            node.config.webhook.clone(),
        )
        .map_err(|e| StartError::Io(format!("cannot start the webhook thread: {e}")))?;
        threads.push(t);
    }
    if let (Some(m), Some((id, _))) = (&node.webhook_relay, &node.cluster) {
        let c = &node.config;
        let t = crate::webhook_relay::spawn(
            node.clone(),
            m.clone(),
            c.webhook.clone(),
            c.redis.clone(),
            c.events_stream.clone(),
            *id,
        )
        .map_err(|e| StartError::Io(format!("cannot start the webhook thread: {e}")))?;
        threads.push(t);
    }
    if ban_store.is_some() || history_store.is_some() || outbox.is_some() {
        let stores = crate::ban_store::Stores {
            bans: ban_store,
            history: history_store,
            outbox,
        };
        let t = crate::ban_store::spawn(node.clone(), stores, store_bell)
            .map_err(|e| StartError::Io(format!("cannot start the store's thread: {e}")))?;
        threads.push(t);
    }
    if node.config.hooks.enabled() {
        let t = crate::hooks::spawn(node.clone(), hooks_bell, node.config.hooks.clone())
            .map_err(|e| StartError::Io(format!("cannot start the hooks' threads: {e}")))?;
        threads.extend(t);
    }
    if node.cluster.is_some() {
        let t = crate::cluster::spawn(node.clone(), bridge_bell)
            .map_err(|e| StartError::Io(format!("cannot start the cluster bridge: {e}")))?;
        threads.push(t);
    }
    if let Some(l) = api_listener {
        let t = crate::http::api::spawn(node.clone(), l, api_bell)
            .map_err(|e| StartError::Io(format!("cannot start the API thread: {e}")))?;
        threads.push(t);
    }
    for (id, (listener, bell)) in listeners.into_iter().zip(shard_bells).enumerate() {
        let node = node.clone();
        let t = std::thread::Builder::new()
            .name(format!("corecast-shard-{id}"))
            .spawn(move || {
                let r = crate::shard::run(id, node.clone(), listener, bell);
                if let Err(e) = &r {
                    tracing::error!(shard = id, error = %e, "shard failed");
                    // A node missing a shard would drop that shard's share of
                    // connections: stop the whole node instead.
                    node.begin_drain();
                }
                r
            })
            .map_err(|e| StartError::Io(format!("cannot start shard thread: {e}")))?;
        threads.push(t);
    }
    Ok(Server {
        node,
        local_addr,
        api_addr,
        threads,
    })
}

impl Server {
    /// Starts graceful shutdown (what SIGTERM does).
    pub fn shutdown(&self) {
        self.node.begin_drain();
    }

    /// Waits for every shard to stop.
    pub fn wait(self) -> Result<(), StartError> {
        let mut result = Ok(());
        for t in self.threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(StartError::Io(format!("shard failed: {e}"))),
                Err(_) => result = Err(StartError::Io("a shard thread panicked".into())),
            }
        }
        result
    }
}
