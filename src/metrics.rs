//! Counters of one shard. Each shard writes only its own [`ShardMetrics`]
//! (relaxed atomic stores, no contention); `/metrics` reads all of them.

#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::ws::handshake::HandshakeError;

/// A counter written by one thread and read by any.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        // Single writer: a load and a store avoid the locked read-modify-write.
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }
    #[inline]
    pub fn inc(&self) {
        self.add(1)
    }
    #[inline]
    pub fn sub(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_sub(n), Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
    /// For gauges written by one thread.
    pub fn set(&self, n: u64) {
        self.0.store(n, Relaxed);
    }
}

/// Everything one shard counts. Padded so shards never share a cache line.
#[repr(align(128))]
#[derive(Default, Debug)]
pub struct ShardMetrics {
    pub connections: Counter,
    pub connections_total: Counter,
    pub frames_in: Counter,
    pub bytes_in: Counter,
    pub frames_out: Counter,
    pub bytes_out: Counter,
    pub writes: Counter,
    pub deliveries: Counter,
    pub messages_published: Counter,
    pub queue_drops: Counter,
    pub slow_consumer_closes: Counter,
    pub keepalive_closes: Counter,
    /// Times the shard gave the allocator's free memory back after a burst.
    pub memory_returns: Counter,
    /// Receive buffers the io_uring loop's ring offers (2 KiB each).
    pub receive_buffers: Counter,
    pub protocol_errors: Counter,
    /// Sockets handed to the shard that holds their Socket.IO session.
    pub socketio_handovers: Counter,
    /// Socket.IO reconnections given their session back (`socket.recovered`).
    pub socketio_recovered: Counter,
    /// Socket.IO reconnections that asked for their session and got a new one.
    pub socketio_not_recovered: Counter,
    /// Connections closed because their token expired.
    pub token_expiries: Counter,
    pub auth_failures: Counter,
    pub mesh_messages_in: Counter,
    pub handshake_failures: [Counter; HandshakeError::ALL.len()],
    pub handshake_timeouts: Counter,
    pub rate_limited: Counter,
    /// Questions to the application backend's hooks.
    pub hook_calls: Counter,
    /// Messages the publish hook rejected.
    pub hook_rejected: Counter,
    /// Questions without a usable answer (backend down, slow, a bad
    /// answer).
    pub hook_failures: Counter,
    /// Questions not asked: the shard waited for too many.
    pub hook_refused: Counter,
    pub rate_limit_closes: Counter,
    /// Connections refused, by [`crate::admission::Refusal::index`].
    pub refused: [Counter; 4],
    /// Channels this shard owns (gauge).
    pub channels: Counter,
    /// Users this shard is home to that are connected (gauge).
    pub online_users: Counter,
    /// Bans in force (gauge; every shard holds them all).
    pub bans: Counter,
    /// Sequenced channel events that did not follow the last one applied
    /// (cluster mode: events lost between Redis and this node).
    pub cluster_gaps: Counter,
    /// Client messages that were not valid events (answered with an error,
    /// charged a rate token and a strike).
    pub malformed: Counter,
    /// Notifications this shard keeps waiting, or made for other nodes and
    /// not expired yet (gauge).
    pub notifications_stored: Counter,
    /// Notifications not kept: the node's or their sender's bound was
    /// reached (devices online still got them).
    pub notifications_dropped: Counter,
    /// Bytes buffered for connections not authenticated yet (gauge).
    pub preauth_bytes: Counter,
    /// Connections closed because the shard's pre-authentication buffer
    /// budget was spent.
    pub preauth_closes: Counter,
}

/// The bridge's figures (cluster mode).
#[derive(Default)]
pub struct ClusterMetrics {
    /// 1 while the bridge reaches Redis (gauge).
    pub up: Counter,
    /// Connections to Redis made again after a loss.
    pub reconnects: Counter,
    /// Channel events this node sent to the cluster.
    pub sent: Counter,
    /// Channel events this node received from the cluster.
    pub received: Counter,
    /// Events that could not be sent (Redis unreachable): sequenced here.
    pub failed: Counter,
    /// Channels this node follows (gauge).
    pub channels: Counter,
    /// Round trips to Redis: rounds of operations sent at once.
    pub rounds: Counter,
    /// Operations sent to Redis (many to a round).
    pub ops: Counter,
    /// Channel events refused because the events stream was full.
    pub stream_full: Counter,
    /// Entries in the events stream, at the last trim (gauge).
    pub stream_length: Counter,
    /// Entries trimmed from the events stream once every consumer group
    /// had read them.
    pub stream_trimmed: Counter,
    /// Optional events (`events_include`) not added to the events stream:
    /// it was full, or Redis out of reach.
    pub stream_skipped: Counter,
}

/// Appends the bridge's figures to [`render`]'s text.
pub fn render_cluster(out: &mut String, m: &ClusterMetrics) {
    let series: [(&str, &str, &str, &Counter); 12] = [
        (
            "cluster_up",
            "gauge",
            "1 while the node reaches Redis.",
            &m.up,
        ),
        (
            "cluster_reconnects_total",
            "counter",
            "Connections to Redis made again after a loss.",
            &m.reconnects,
        ),
        (
            "cluster_sent_total",
            "counter",
            "Channel events sent to the other nodes through Redis.",
            &m.sent,
        ),
        (
            "cluster_received_total",
            "counter",
            "Channel events received from Redis.",
            &m.received,
        ),
        (
            "cluster_failed_total",
            "counter",
            "Sequenced events Redis could not take (sequenced by this node instead).",
            &m.failed,
        ),
        (
            "cluster_channels",
            "gauge",
            "Channels this node follows in Redis.",
            &m.channels,
        ),
        (
            "cluster_rounds_total",
            "counter",
            "Round trips to Redis (each carries every operation of a round).",
            &m.rounds,
        ),
        (
            "cluster_ops_total",
            "counter",
            "Operations sent to Redis (scripts, publishes, reads; many to a round).",
            &m.ops,
        ),
        (
            "events_stream_length",
            "gauge",
            "Entries in the events stream at this node's last trim.",
            &m.stream_length,
        ),
        (
            "events_stream_trimmed_total",
            "counter",
            "Entries this node trimmed from the events stream once every consumer group had read them.",
            &m.stream_trimmed,
        ),
        (
            "events_stream_refused_total",
            "counter",
            "Channel events refused (unavailable) because the events stream was full.",
            &m.stream_full,
        ),
        (
            "events_stream_skipped_total",
            "counter",
            "Optional events (events_include) not added: the events stream was full, or Redis out of reach.",
            &m.stream_skipped,
        ),
    ];
    for (name, kind, help, c) in series {
        let _ = writeln!(out, "# HELP corecast_{name} {help}");
        let _ = writeln!(out, "# TYPE corecast_{name} {kind}");
        let _ = writeln!(out, "corecast_{name} {}", c.get());
    }
}

/// Renders all shards' metrics in the Prometheus text format.
pub fn render(shards: &[std::sync::Arc<ShardMetrics>], io_driver: &str, ready: bool) -> String {
    let mut out = String::with_capacity(4096);
    let _ = writeln!(
        out,
        "# HELP corecast_info Static information about this node."
    );
    let _ = writeln!(out, "# TYPE corecast_info gauge");
    let _ = writeln!(
        out,
        "corecast_info{{version=\"{}\",io_driver=\"{io_driver}\",shards=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        shards.len()
    );
    let _ = writeln!(
        out,
        "# HELP corecast_ready 1 when the node accepts connections."
    );
    let _ = writeln!(out, "# TYPE corecast_ready gauge");
    let _ = writeln!(out, "corecast_ready {}", ready as u8);
    type Get = fn(&ShardMetrics) -> &Counter;
    let series: [(&str, &str, &str, Get); 36] = [
        ("connections", "gauge", "Open WebSocket connections.", |m| {
            &m.connections
        }),
        (
            "connections_total",
            "counter",
            "WebSocket connections accepted.",
            |m| &m.connections_total,
        ),
        ("frames_in_total", "counter", "Frames received.", |m| {
            &m.frames_in
        }),
        (
            "bytes_in_total",
            "counter",
            "Bytes received on WebSocket connections.",
            |m| &m.bytes_in,
        ),
        ("frames_out_total", "counter", "Frames written.", |m| {
            &m.frames_out
        }),
        ("bytes_out_total", "counter", "Bytes written.", |m| {
            &m.bytes_out
        }),
        (
            "writes_total",
            "counter",
            "Send operations (frames_out_total / writes_total: frames per send).",
            |m| &m.writes,
        ),
        (
            "deliveries_total",
            "counter",
            "Frames queued to a connection.",
            |m| &m.deliveries,
        ),
        (
            "messages_published_total",
            "counter",
            "Messages sequenced by this shard as channel owner.",
            |m| &m.messages_published,
        ),
        (
            "queue_drops_total",
            "counter",
            "Frames refused by a full or closing outbound queue.",
            |m| &m.queue_drops,
        ),
        (
            "slow_consumer_closes_total",
            "counter",
            "Connections closed for exceeding their outbound queue bound.",
            |m| &m.slow_consumer_closes,
        ),
        (
            "keepalive_closes_total",
            "counter",
            "Connections closed for not answering pings.",
            |m| &m.keepalive_closes,
        ),
        (
            "receive_buffers",
            "gauge",
            "Receive buffers (2 KiB each) the shard's io_uring ring offers the kernel: 64 at first, doubled when a round drains it, at most 1,024.",
            |m| &m.receive_buffers,
        ),
        (
            "memory_returns_total",
            "counter",
            "Times the shard gave the memory a burst left free back to the system.",
            |m| &m.memory_returns,
        ),
        (
            "protocol_errors_total",
            "counter",
            "Connections closed for violating RFC 6455, or Engine.IO's or Socket.IO's packet format.",
            |m| &m.protocol_errors,
        ),
        (
            "socketio_handovers_total",
            "counter",
            "Socket.IO requests (long-polling, or an upgrade) handed to the shard that holds their session.",
            |m| &m.socketio_handovers,
        ),
        (
            "socketio_recovered_total",
            "counter",
            "Socket.IO reconnections that recovered their session: every missed event replayed (socket.recovered).",
            |m| &m.socketio_recovered,
        ),
        (
            "socketio_not_recovered_total",
            "counter",
            "Socket.IO reconnections that asked to recover their session and started a new one.",
            |m| &m.socketio_not_recovered,
        ),
        (
            "token_expiries_total",
            "counter",
            "Connections closed (4001) because their token expired without an auth:refresh.",
            |m| &m.token_expiries,
        ),
        (
            "auth_failures_total",
            "counter",
            "Failed authentications.",
            |m| &m.auth_failures,
        ),
        (
            "handshake_timeouts_total",
            "counter",
            "Sockets closed for not completing the handshake in time.",
            |m| &m.handshake_timeouts,
        ),
        (
            "rate_limited_total",
            "counter",
            "Client events refused by a rate limit.",
            |m| &m.rate_limited,
        ),
        (
            "hook_calls_total",
            "counter",
            "Questions asked of the application backend's hooks.",
            |m| &m.hook_calls,
        ),
        (
            "hook_rejected_total",
            "counter",
            "Messages the publish hook rejected.",
            |m| &m.hook_rejected,
        ),
        (
            "hook_failures_total",
            "counter",
            "Hook questions without a usable answer (the backend down, slow, or answering badly).",
            |m| &m.hook_failures,
        ),
        (
            "hook_refused_total",
            "counter",
            "Hook questions not asked because the shard already waited for max_waiting (unavailable).",
            |m| &m.hook_refused,
        ),
        (
            "rate_limit_closes_total",
            "counter",
            "Connections closed (1008) for going on past their rate limits.",
            |m| &m.rate_limit_closes,
        ),
        (
            "channels",
            "gauge",
            "Channels owned by the shard (members, or history still kept).",
            |m| &m.channels,
        ),
        (
            "online_users",
            "gauge",
            "Connected users whose home is the shard.",
            |m| &m.online_users,
        ),
        (
            "bans",
            "gauge",
            "Bans in force (each shard holds all of them).",
            |m| &m.bans,
        ),
        (
            "cluster_gaps_total",
            "counter",
            "Channel events from Redis that did not follow the last one (lost on the way).",
            |m| &m.cluster_gaps,
        ),
        (
            "malformed_total",
            "counter",
            "Client messages that were not valid events (each charged a rate token and a strike).",
            |m| &m.malformed,
        ),
        (
            "notifications_stored",
            "gauge",
            "Notifications kept waiting by the shard's home users (or made for other nodes, until they expire).",
            |m| &m.notifications_stored,
        ),
        (
            "notifications_dropped_total",
            "counter",
            "Notifications not kept: the node's or the sender's bound was reached (devices online still got them).",
            |m| &m.notifications_dropped,
        ),
        (
            "preauth_bytes",
            "gauge",
            "Bytes buffered for connections that have not authenticated yet.",
            |m| &m.preauth_bytes,
        ),
        (
            "preauth_closes_total",
            "counter",
            "Connections closed because the shard's pre-authentication buffer budget was spent.",
            |m| &m.preauth_closes,
        ),
    ];
    for (name, kind, help, get) in series {
        let _ = writeln!(out, "# HELP corecast_{name} {help}");
        let _ = writeln!(out, "# TYPE corecast_{name} {kind}");
        for (i, m) in shards.iter().enumerate() {
            let _ = writeln!(out, "corecast_{name}{{shard=\"{i}\"}} {}", get(m).get());
        }
    }
    let _ = writeln!(
        out,
        "# HELP corecast_connections_refused_total Connections refused by a connection limit, by reason."
    );
    let _ = writeln!(out, "# TYPE corecast_connections_refused_total counter");
    for r in crate::admission::Refusal::ALL {
        let total: u64 = shards.iter().map(|m| m.refused[r.index()].get()).sum();
        let _ = writeln!(
            out,
            "corecast_connections_refused_total{{reason=\"{}\"}} {total}",
            r.reason()
        );
    }
    let _ = writeln!(
        out,
        "# HELP corecast_handshake_failures_total Refused upgrade requests, by reason."
    );
    let _ = writeln!(out, "# TYPE corecast_handshake_failures_total counter");
    for e in HandshakeError::ALL {
        let total: u64 = shards
            .iter()
            .map(|m| m.handshake_failures[e.index()].get())
            .sum();
        let _ = writeln!(
            out,
            "corecast_handshake_failures_total{{reason=\"{}\"}} {total}",
            e.reason()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_shard_and_reason() {
        let shards = [
            std::sync::Arc::new(ShardMetrics::default()),
            std::sync::Arc::new(ShardMetrics::default()),
        ];
        shards[1].deliveries.add(42);
        shards[0].handshake_failures[HandshakeError::BadKey.index()].inc();
        let text = render(&shards, "io_uring", true);
        assert!(text.contains("corecast_deliveries_total{shard=\"1\"} 42"));
        assert!(text.contains("corecast_handshake_failures_total{reason=\"bad_key\"} 1"));
        assert!(text.contains("io_driver=\"io_uring\""));
        assert!(text.contains("corecast_ready 1"));
    }
}
