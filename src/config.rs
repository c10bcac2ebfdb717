//! Configuration: defaults, then a TOML file, then `CORECAST_*` environment
//! variables, then command-line flags (each later source wins).

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::auth::{AuthConfig, AuthConfigError};

/// Everything `corecast serve` can be told. Field names are the TOML keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (WebSocket and HTTP on one port).
    pub listen: String,
    /// Number of shards; 0 means one per available core.
    pub shards: usize,
    /// `auto` (io_uring, falling back to epoll), `io_uring` or `epoll`.
    pub io_driver: String,
    /// Largest message accepted, in bytes (close 1009 beyond it).
    pub max_message_size: usize,
    /// Largest message a connection may send before it has authenticated
    /// (its `auth`), in bytes (close 1009 beyond it).
    pub max_unauthenticated_message_size: usize,
    /// Bytes a shard may hold buffered for connections that have not
    /// authenticated yet (request heads, partial frames); past it the
    /// connection whose buffer grew is closed (1013, or 503 during the
    /// handshake).
    pub max_preauth_bytes_per_shard: usize,
    /// Serve `/echo`, which echoes every message (for conformance suites).
    pub echo_endpoint: bool,
    /// Where Socket.IO clients connect (Engine.IO 4's WebSocket transport);
    /// empty turns Socket.IO off.
    pub socketio_path: String,
    /// Serve `/engine.io/` and `/socket.io/` as the official Engine.IO and
    /// Socket.IO protocol suites expect (echoes, not corecast's events).
    pub socketio_conformance: bool,
    /// Allowed `Origin` values; empty allows any.
    pub allowed_origins: Vec<String>,
    /// How an upgrade refused for its token, a ban or a limit is answered:
    /// `http` (the status and the reason in the body), `websocket` (the
    /// upgrade is accepted and closed at once with a 4xxx code and the
    /// reason, which a browser can read), or `auto` (`websocket` for
    /// requests with an `Origin` header, as browsers send, `http` for the
    /// others).
    pub upgrade_refusals: String,
    /// Largest HTTP request head, in bytes (431 beyond it).
    pub max_header_bytes: usize,
    /// Time for a new socket to send a complete upgrade request.
    pub handshake_timeout_ms: u64,
    /// Time for an unauthenticated connection to send `auth`.
    pub auth_timeout_ms: u64,
    /// A connection quiet for this long is pinged.
    pub ping_interval_ms: u64,
    /// A pinged connection silent for this long is closed.
    pub ping_timeout_ms: u64,
    /// Time the peer has to answer our close frame before the socket is shut.
    pub close_timeout_ms: u64,
    /// Time graceful shutdown waits for connections to close.
    pub shutdown_timeout_ms: u64,
    /// Frames a connection may have queued before it counts as too slow.
    pub outbound_queue_frames: usize,
    /// Bytes a connection may have queued before it counts as too slow.
    pub outbound_queue_bytes: usize,
    /// How long a connection's frames may wait so that more of them leave
    /// in one send (0: send at the end of the round that queued them).
    /// Trades latency for CPU under heavy fan-out; control frames never
    /// wait.
    pub write_delay_ms: u64,
    /// Capacity of each shard-to-shard queue, in messages.
    pub mesh_queue_capacity: usize,
    pub max_channels_per_connection: usize,
    /// From this many connections in a channel, its joins and leaves are
    /// not broadcast (0: always).
    pub large_channel_members: u32,
    /// Longest `message:send` content, in characters.
    pub max_content_chars: usize,
    /// Events (and messages) each channel keeps for history and recovery.
    pub history_size: usize,
    /// And for how long, in milliseconds.
    pub history_ttl_ms: u64,
    /// A typing indicator not refreshed for this long stops.
    pub typing_timeout_ms: u64,
    /// A user whose last connection dropped looks unchanged this long.
    pub presence_grace_ms: u64,
    /// How long a dropped session can be taken over with `session:resume`
    /// (0: never).
    pub resume_window_ms: u64,
    /// `auth:expiring` goes out this long before a connection's token
    /// expires.
    pub token_refresh_ahead_ms: u64,
    /// A connection whose token expired without `auth:refresh` is closed
    /// (4001) this long after the expiry.
    pub token_expiry_grace_ms: u64,
    /// The application's own events: names or `*` patterns (`game:*`) that
    /// pass through to a channel without being kept; empty: none.
    pub custom_events: Vec<String>,
    /// Largest `data` of an application's event, in bytes of JSON.
    pub max_custom_event_bytes: usize,
    /// A call not answered in this time is missed.
    pub call_ring_timeout_ms: u64,
    /// Notifications kept per user (the oldest go first).
    pub max_notifications: usize,
    /// And for how long.
    pub notification_ttl_ms: u64,
    /// Notifications the node keeps waiting, all users together; past it
    /// new ones reach devices online but are not kept.
    pub max_stored_notifications: usize,
    /// Of those, at most this many made by one user (mentions, missed
    /// calls).
    pub max_notifications_per_sender: usize,
    /// Direct-message conversations listed per user.
    pub max_conversations: usize,
    /// Presence subscriptions per connection.
    pub max_presence_subscriptions: usize,
    /// LiveKit server and key for voice tokens; without it `voice:join`
    /// answers without a token.
    pub livekit: Option<crate::livekit::LiveKit>,
    /// `text` or `json`.
    pub log_format: String,
    /// Where bans are kept across restarts (JSON lines; empty: in memory
    /// only).
    pub ban_file: String,
    /// Where a single node keeps its channels' history across restarts
    /// (JSON lines; empty: in memory only). Not used in a cluster.
    pub history_file: String,
    /// Rate limits per user and event, over the defaults: event name (or
    /// `default` for events without their own, or `*` for all) to
    /// `COUNT/DURATION` (`30/60s`, `5/500ms`) or `off`. `*` applies first.
    pub rate_limits: std::collections::BTreeMap<String, String>,
    /// Rate-limit refusals (less one per accepted event) after which a
    /// connection is closed with 1008; 0: never.
    pub rate_limit_strikes: u32,
    /// Sockets one shard holds at most, handshakes included (503 beyond;
    /// 0: no cap).
    pub max_connections_per_shard: usize,
    /// Upgrade requests per second from one address (429 beyond; 0: off).
    pub max_handshakes_per_ip: u32,
    /// Connections from one address (429 beyond; 0: off).
    pub max_connections_per_ip: u32,
    /// Connections of one user across the node (429 beyond, or close 1008
    /// when it authenticated with `auth`; 0: off).
    pub max_connections_per_user: u32,
    /// Proxies (addresses or address/prefix) whose `X-Forwarded-For` names
    /// the client for the per-IP limits.
    pub trusted_proxies: Vec<String>,
    /// Address of the server API for the application backend (keep it
    /// private); it runs only when `api_keys` has a key.
    pub api_listen: String,
    /// Keys the server API accepts (at least 16 bytes each; two during a
    /// rotation).
    pub api_keys: Vec<String>,
    /// Cluster mode: the Redis server the nodes share
    /// (`redis://host:port/db`, `rediss://` for TLS); empty: a single node.
    pub redis: String,
    /// Cluster mode on a Redis Cluster: some of its nodes' URLs (the rest
    /// are discovered); channels and users use sharded pub/sub.
    pub redis_cluster: Vec<String>,
    /// Cluster mode: a node that stops refreshing its liveness in Redis is
    /// taken for gone by the others within this time, and its users go
    /// offline everywhere.
    pub node_timeout_ms: u64,
    /// Cluster mode (one Redis): the Redis stream every sequenced channel
    /// event is added to, in the same step that orders it, for the
    /// application backend to read with a consumer group (empty: none).
    pub events_stream: String,
    /// Entries the stream holds at most: past it new channel events are
    /// refused with `unavailable` until consumer groups have read (and
    /// the nodes trimmed) older ones.
    pub events_stream_max_len: u64,
    /// The optional kinds the event stream also carries, beside the
    /// sequenced channel events: `members` (joins and leaves),
    /// `receipts` (read markers), `dms` (direct messages); empty: none.
    pub events_include: Vec<String>,
    pub auth: AuthConfig,
    /// The event stream to the application backend (see `docs/BACKEND.md`).
    pub webhook: WebhookConfig,
    /// Questions to the application backend before acting (see
    /// `docs/BACKEND.md`).
    pub hooks: HooksConfig,
}

/// `[hooks]`: what the node asks the application backend before it acts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HooksConfig {
    /// Where a client's message is POSTed before it is sequenced (empty:
    /// no publish hook).
    pub publish_url: String,
    /// The channels (names or `*` patterns) whose messages it sees.
    pub publish_channels: Vec<String>,
    /// Where a client's `rpc` is POSTed (empty: `rpc` is unsupported).
    pub rpc_url: String,
    /// Where each connection is POSTed before it is opened: the backend
    /// decides who it is, its roles and grants, and which channels it joins
    /// at once (empty: no connect hook).
    pub connect_url: String,
    /// What the connect hook follows: `jwt` (the token is verified first,
    /// and the backend sees its user) or `backend` (the token is not
    /// verified here: the backend reads it and names the user).
    pub connect_auth: String,
    /// The HMAC-SHA256 key of each request's `X-Corecast-Signature` (at
    /// least 16 bytes).
    pub secret: String,
    /// A question not answered in this time fails (see `on_failure`).
    pub timeout_ms: u64,
    /// Questions asked at once, node-wide (threads).
    pub concurrency: usize,
    /// Questions one shard waits for at most; past it new ones are refused
    /// with `unavailable`.
    pub max_waiting: usize,
    /// What a failed question does: `refuse` (the client gets
    /// `unavailable`) or `allow` (the message goes on as sent).
    pub on_failure: String,
}

impl Default for HooksConfig {
    fn default() -> Self {
        HooksConfig {
            publish_url: String::new(),
            publish_channels: vec!["*".into()],
            rpc_url: String::new(),
            connect_url: String::new(),
            connect_auth: "jwt".into(),
            secret: String::new(),
            timeout_ms: 2000,
            concurrency: 16,
            max_waiting: 1000,
            on_failure: "refuse".into(),
        }
    }
}

impl HooksConfig {
    pub fn enabled(&self) -> bool {
        !self.publish_url.is_empty() || !self.rpc_url.is_empty() || !self.connect_url.is_empty()
    }

    /// Whether a question the backend did not answer lets its message or
    /// connection go on (`on_failure = allow`).
    pub fn failure_allows(&self) -> bool {
        self.on_failure == "allow"
    }

    /// Whether connection tokens go to the backend unverified.
    pub fn backend_auth(&self) -> bool {
        !self.connect_url.is_empty() && self.connect_auth == "backend"
    }
}

/// `[webhook]`: sequenced channel events delivered to the application
/// backend as signed, batched HTTP POSTs, through a durable outbox on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where events are POSTed (`http://host:port/path`); empty: off.
    pub url: String,
    /// The HMAC-SHA256 key of the `X-Corecast-Signature` header (at least
    /// 16 bytes).
    pub secret: String,
    /// The outbox: events wait here until the backend took them.
    pub outbox_dir: String,
    /// Bytes the outbox holds at most; when it is full, new messages are
    /// refused with `unavailable` until the backend takes some.
    pub outbox_max_bytes: u64,
    /// Events per POST at most.
    pub batch_events: usize,
    /// A POST not answered in this time is failed, and tried again.
    pub timeout_ms: u64,
    /// The longest wait between two tries (the wait doubles from 100 ms).
    pub retry_max_ms: u64,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            url: String::new(),
            secret: String::new(),
            outbox_dir: "corecast-outbox".into(),
            outbox_max_bytes: 1 << 30,
            batch_events: 1000,
            timeout_ms: 10_000,
            retry_max_ms: 30_000,
        }
    }
}

impl WebhookConfig {
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }
}

impl Default for Config {
    fn default() -> Self {
        // The engine's limits and durations have one source of defaults.
        let e = crate::engine::Settings::default();
        Config {
            listen: "0.0.0.0:8080".into(),
            shards: 0,
            io_driver: "auto".into(),
            max_message_size: 1 << 20,
            // An `auth` message carries one token, and a token that fits in
            // an 8 KiB request head fits in this.
            max_unauthenticated_message_size: 16 << 10,
            // 1,000 connections at that limit, per core.
            max_preauth_bytes_per_shard: 16 << 20,
            echo_endpoint: false,
            // Where `io(url)` looks by default.
            socketio_path: "/socket.io/".into(),
            socketio_conformance: false,
            allowed_origins: vec![],
            // Browsers cannot read an HTTP refusal; other clients can.
            upgrade_refusals: "auto".into(),
            // Browsers send 0.5-2 KiB; 8 KiB leaves room for large cookies.
            max_header_bytes: 8192,
            handshake_timeout_ms: 10_000,
            auth_timeout_ms: 10_000,
            // Below the 30-60 s idle timeouts of common load balancers.
            ping_interval_ms: 25_000,
            ping_timeout_ms: 20_000,
            close_timeout_ms: 3_000,
            shutdown_timeout_ms: 10_000,
            // About 4 s of a busy channel at 1,000 msgs/s; frames are shared,
            // so the bytes bound is logical, not memory per connection.
            outbound_queue_frames: 4096,
            outbound_queue_bytes: 16 << 20,
            // Off: latency first. See docs/BENCHMARKS.md for what a few
            // milliseconds buy under heavy fan-out.
            write_delay_ms: 0,
            // Slots are allocated up front (N² queues of 48 bytes a
            // slot); a full queue spills into the sender's outbox, so this
            // bounds memory, not throughput.
            mesh_queue_capacity: 4096,
            max_channels_per_connection: e.max_channels_per_connection,
            large_channel_members: e.large_channel_members,
            max_content_chars: e.max_content_chars,
            history_size: e.history_size,
            history_ttl_ms: e.history_ttl_ms,
            typing_timeout_ms: e.typing_timeout_ms,
            presence_grace_ms: e.presence_grace_ms,
            resume_window_ms: e.resume_window_ms,
            token_refresh_ahead_ms: e.token_refresh_ahead_ms,
            token_expiry_grace_ms: e.token_expiry_grace_ms,
            custom_events: Vec::new(),
            max_custom_event_bytes: e.max_custom_event_bytes,
            call_ring_timeout_ms: e.call_ring_timeout_ms,
            max_notifications: e.max_notifications,
            notification_ttl_ms: e.notification_ttl_ms,
            max_stored_notifications: e.max_stored_notifications,
            max_notifications_per_sender: e.max_notifications_per_sender,
            max_conversations: e.max_conversations,
            max_presence_subscriptions: e.max_subscriptions,
            livekit: None,
            log_format: "text".into(),
            ban_file: "corecast-bans.jsonl".into(),
            history_file: "corecast-history.jsonl".into(),
            rate_limits: Default::default(),
            rate_limit_strikes: e.rate_limit_strikes,
            // About 1.5 GB of state at the measured 400-500 B per idle
            // connection plus the kernel's share, per core.
            max_connections_per_shard: 100_000,
            max_handshakes_per_ip: 100,
            max_connections_per_ip: 1_000,
            max_connections_per_user: e.max_connections_per_user,
            trusted_proxies: Vec::new(),
            api_listen: "127.0.0.1:8081".into(),
            api_keys: Vec::new(),
            redis: String::new(),
            redis_cluster: Vec::new(),
            node_timeout_ms: 30_000,
            events_stream: String::new(),
            events_stream_max_len: 1_000_000,
            events_include: Vec::new(),
            auth: AuthConfig::default(),
            webhook: WebhookConfig::default(),
            hooks: HooksConfig::default(),
        }
    }
}

/// A Redis URL without its password, for logs and `check-config`.
pub fn without_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:<hidden>{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// A configuration that cannot be used, with the reason.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl From<AuthConfigError> for ConfigError {
    fn from(e: AuthConfigError) -> Self {
        ConfigError(e.0)
    }
}

/// Flags of `corecast serve` and `corecast check-config`; each also reads
/// its `CORECAST_*` environment variable.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, env = "CORECAST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 0.0.0.0:8080].
    #[arg(long, env = "CORECAST_LISTEN")]
    pub listen: Option<String>,
    /// Number of shards (one per core when unset).
    #[arg(long, env = "CORECAST_SHARDS")]
    pub shards: Option<usize>,
    /// auto, io_uring or epoll.
    #[arg(long, env = "CORECAST_IO_DRIVER")]
    pub io_driver: Option<String>,
    /// Largest message accepted, in bytes [default: 1048576].
    #[arg(long, env = "CORECAST_MAX_MESSAGE_SIZE")]
    pub max_message_size: Option<usize>,
    /// Largest message before authentication, in bytes [default: 16384].
    #[arg(long, env = "CORECAST_MAX_UNAUTHENTICATED_MESSAGE_SIZE")]
    pub max_unauthenticated_message_size: Option<usize>,
    /// Bytes buffered per shard for connections not yet authenticated
    /// [default: 16777216].
    #[arg(long, env = "CORECAST_MAX_PREAUTH_BYTES_PER_SHARD")]
    pub max_preauth_bytes_per_shard: Option<usize>,
    /// Serve /echo (for conformance suites).
    #[arg(long, env = "CORECAST_ECHO_ENDPOINT")]
    pub echo_endpoint: bool,
    /// Where Socket.IO clients connect; empty turns Socket.IO off
    /// [default: /socket.io/].
    #[arg(long, env = "CORECAST_SOCKETIO_PATH")]
    pub socketio_path: Option<String>,
    /// Serve /engine.io/ and /socket.io/ as the official Engine.IO and
    /// Socket.IO protocol suites expect; sets their settings (1,000,000-byte
    /// messages, pings every 300 ms with a 200 ms timeout, 1 s to connect)
    /// unless given.
    #[arg(long, env = "CORECAST_SOCKETIO_CONFORMANCE")]
    pub socketio_conformance: bool,
    /// Allowed Origin values, comma-separated.
    #[arg(long, env = "CORECAST_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    /// How refused upgrades are answered: auto, http or websocket
    /// [default: auto].
    #[arg(long, env = "CORECAST_UPGRADE_REFUSALS")]
    pub upgrade_refusals: Option<String>,
    #[arg(long, env = "CORECAST_PING_INTERVAL_MS")]
    pub ping_interval_ms: Option<u64>,
    #[arg(long, env = "CORECAST_PING_TIMEOUT_MS")]
    pub ping_timeout_ms: Option<u64>,
    #[arg(long, env = "CORECAST_HANDSHAKE_TIMEOUT_MS")]
    pub handshake_timeout_ms: Option<u64>,
    #[arg(long, env = "CORECAST_AUTH_TIMEOUT_MS")]
    pub auth_timeout_ms: Option<u64>,
    #[arg(long, env = "CORECAST_CLOSE_TIMEOUT_MS")]
    pub close_timeout_ms: Option<u64>,
    #[arg(long, env = "CORECAST_SHUTDOWN_TIMEOUT_MS")]
    pub shutdown_timeout_ms: Option<u64>,
    #[arg(long, env = "CORECAST_OUTBOUND_QUEUE_FRAMES")]
    pub outbound_queue_frames: Option<usize>,
    #[arg(long, env = "CORECAST_OUTBOUND_QUEUE_BYTES")]
    pub outbound_queue_bytes: Option<usize>,
    /// Let a connection's frames wait this long to share a send [default: 0].
    #[arg(long, env = "CORECAST_WRITE_DELAY_MS")]
    pub write_delay_ms: Option<u64>,
    #[arg(long, env = "CORECAST_MAX_HEADER_BYTES")]
    pub max_header_bytes: Option<usize>,
    #[arg(long, env = "CORECAST_HISTORY_SIZE")]
    pub history_size: Option<usize>,
    #[arg(long, env = "CORECAST_HISTORY_TTL_MS")]
    pub history_ttl_ms: Option<u64>,
    #[arg(long, env = "CORECAST_TYPING_TIMEOUT_MS")]
    pub typing_timeout_ms: Option<u64>,
    #[arg(long, env = "CORECAST_PRESENCE_GRACE_MS")]
    pub presence_grace_ms: Option<u64>,
    #[arg(long, env = "CORECAST_RESUME_WINDOW_MS")]
    pub resume_window_ms: Option<u64>,
    #[arg(long, env = "CORECAST_TOKEN_REFRESH_AHEAD_MS")]
    pub token_refresh_ahead_ms: Option<u64>,
    #[arg(long, env = "CORECAST_TOKEN_EXPIRY_GRACE_MS")]
    pub token_expiry_grace_ms: Option<u64>,
    /// The application's own events: names or `*` patterns, comma-separated.
    #[arg(long, env = "CORECAST_CUSTOM_EVENTS", value_delimiter = ',')]
    pub custom_events: Option<Vec<String>>,
    #[arg(long, env = "CORECAST_MAX_CUSTOM_EVENT_BYTES")]
    pub max_custom_event_bytes: Option<usize>,
    #[arg(long, env = "CORECAST_CALL_RING_TIMEOUT_MS")]
    pub call_ring_timeout_ms: Option<u64>,
    #[arg(long, env = "CORECAST_NOTIFICATION_TTL_MS")]
    pub notification_ttl_ms: Option<u64>,
    /// Notifications kept waiting on the node [default: 100000].
    #[arg(long, env = "CORECAST_MAX_STORED_NOTIFICATIONS")]
    pub max_stored_notifications: Option<usize>,
    /// Of those, made by one user [default: 1000].
    #[arg(long, env = "CORECAST_MAX_NOTIFICATIONS_PER_SENDER")]
    pub max_notifications_per_sender: Option<usize>,
    /// LiveKit server URL given to clients with voice tokens.
    #[arg(long, env = "CORECAST_LIVEKIT_URL")]
    pub livekit_url: Option<String>,
    #[arg(long, env = "CORECAST_LIVEKIT_API_KEY")]
    pub livekit_api_key: Option<String>,
    #[arg(long, env = "CORECAST_LIVEKIT_API_SECRET", hide_env_values = true)]
    pub livekit_api_secret: Option<String>,
    /// text or json.
    #[arg(long, env = "CORECAST_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// JWT algorithm: HS256, RS256 or ES256.
    #[arg(long, env = "CORECAST_AUTH_ALGORITHM")]
    pub auth_algorithm: Option<String>,
    /// HS256 secret.
    #[arg(long, env = "CORECAST_AUTH_SECRET", hide_env_values = true)]
    pub auth_secret: Option<String>,
    /// PEM public key for RS256/ES256.
    #[arg(long, env = "CORECAST_AUTH_PUBLIC_KEY_FILE")]
    pub auth_public_key_file: Option<PathBuf>,
    #[arg(long, env = "CORECAST_AUTH_ISSUER")]
    pub auth_issuer: Option<String>,
    #[arg(long, env = "CORECAST_AUTH_AUDIENCE")]
    pub auth_audience: Option<String>,
    /// grants (the token's `channels` claim or a subscription token) or
    /// open (any channel without a claim) [default: grants].
    #[arg(long, env = "CORECAST_AUTH_CHANNEL_ACCESS")]
    pub auth_channel_access: Option<String>,
    /// Where the event stream is POSTed (http://host:port/path); '' is off.
    #[arg(long, env = "CORECAST_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// The key that signs each POST (HMAC-SHA256, at least 16 bytes).
    #[arg(long, env = "CORECAST_WEBHOOK_SECRET")]
    pub webhook_secret: Option<String>,
    /// Where events wait for the backend [default: corecast-outbox].
    #[arg(long, env = "CORECAST_WEBHOOK_OUTBOX_DIR")]
    pub webhook_outbox_dir: Option<String>,
    /// Bytes the outbox holds before new messages are refused
    /// [default: 1073741824].
    #[arg(long, env = "CORECAST_WEBHOOK_OUTBOX_MAX_BYTES")]
    pub webhook_outbox_max_bytes: Option<u64>,
    /// Where a client's message is POSTed before it is sequenced ('' is
    /// off).
    #[arg(long, env = "CORECAST_HOOKS_PUBLISH_URL")]
    pub hooks_publish_url: Option<String>,
    /// The channels whose messages the publish hook sees, comma-separated
    /// [default: *].
    #[arg(long, env = "CORECAST_HOOKS_PUBLISH_CHANNELS", value_delimiter = ',')]
    pub hooks_publish_channels: Option<Vec<String>>,
    /// Where a client's rpc is POSTed ('' is off: rpc is unsupported).
    #[arg(long, env = "CORECAST_HOOKS_RPC_URL")]
    pub hooks_rpc_url: Option<String>,
    /// Where each connection is POSTed before it opens ('' is off).
    #[arg(long, env = "CORECAST_HOOKS_CONNECT_URL")]
    pub hooks_connect_url: Option<String>,
    /// jwt (verify the token, then ask the connect hook) or backend (the
    /// connect hook reads the token) [default: jwt].
    #[arg(long, env = "CORECAST_HOOKS_CONNECT_AUTH")]
    pub hooks_connect_auth: Option<String>,
    /// The key that signs each hook's request (at least 16 bytes).
    #[arg(long, env = "CORECAST_HOOKS_SECRET", hide_env_values = true)]
    pub hooks_secret: Option<String>,
    /// refuse or allow a message the backend did not answer for
    /// [default: refuse].
    #[arg(long, env = "CORECAST_HOOKS_ON_FAILURE")]
    pub hooks_on_failure: Option<String>,
    /// Milliseconds a hook's answer may take [default: 2000].
    #[arg(long, env = "CORECAST_HOOKS_TIMEOUT_MS")]
    pub hooks_timeout_ms: Option<u64>,
    /// Where bans are kept across restarts; '' keeps them in memory only
    /// [default: corecast-bans.jsonl].
    #[arg(long, env = "CORECAST_BAN_FILE")]
    pub ban_file: Option<String>,
    /// Where a single node keeps its channels' history across restarts;
    /// '' keeps it in memory only [default: corecast-history.jsonl].
    #[arg(long, env = "CORECAST_HISTORY_FILE")]
    pub history_file: Option<String>,
    /// A rate limit, EVENT=COUNT/DURATION or EVENT=off (EVENT may be
    /// `default` or `*`); repeat or separate with commas.
    #[arg(
        long = "rate-limit",
        env = "CORECAST_RATE_LIMITS",
        value_delimiter = ','
    )]
    pub rate_limits: Vec<String>,
    /// Refusals after which a client is closed with 1008 [default: 10].
    #[arg(long, env = "CORECAST_RATE_LIMIT_STRIKES")]
    pub rate_limit_strikes: Option<u32>,
    /// Sockets per shard (0: no cap) [default: 100000].
    #[arg(long, env = "CORECAST_MAX_CONNECTIONS_PER_SHARD")]
    pub max_connections_per_shard: Option<usize>,
    /// Upgrade requests per second per address (0: off) [default: 100].
    #[arg(long, env = "CORECAST_MAX_HANDSHAKES_PER_IP")]
    pub max_handshakes_per_ip: Option<u32>,
    /// Connections per address (0: off) [default: 1000].
    #[arg(long, env = "CORECAST_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<u32>,
    /// Connections per user (0: off) [default: 10].
    #[arg(long, env = "CORECAST_MAX_CONNECTIONS_PER_USER")]
    pub max_connections_per_user: Option<u32>,
    /// Proxies whose X-Forwarded-For is believed (comma-separated
    /// addresses or address/prefix).
    #[arg(long, env = "CORECAST_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<String>>,
    /// Address of the server API [default: 127.0.0.1:8081].
    #[arg(long, env = "CORECAST_API_LISTEN")]
    pub api_listen: Option<String>,
    /// Keys of the server API (comma-separated); without one it does not run.
    #[arg(
        long = "api-key",
        env = "CORECAST_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Option<Vec<String>>,
    /// Cluster mode: the Redis server the nodes share, e.g.
    /// redis://127.0.0.1:6379 (without it the node stands alone).
    #[arg(long, env = "CORECAST_REDIS", hide_env_values = true)]
    pub redis: Option<String>,
    /// Cluster mode on a Redis Cluster: some of its nodes (comma-separated
    /// URLs), e.g. redis://10.0.0.1:6379,redis://10.0.0.2:6379.
    #[arg(
        long,
        env = "CORECAST_REDIS_CLUSTER",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub redis_cluster: Option<Vec<String>>,
    /// Cluster mode: how soon the other nodes take a silent node for gone
    /// (and its users offline) [default: 30000].
    #[arg(long, env = "CORECAST_NODE_TIMEOUT_MS")]
    pub node_timeout_ms: Option<u64>,
    /// From this many connections in a channel, its joins and leaves are
    /// not broadcast; 0: always [default: 500].
    #[arg(long, env = "CORECAST_LARGE_CHANNEL_MEMBERS")]
    pub large_channel_members: Option<u32>,
    /// Cluster mode: the Redis stream of sequenced channel events for the
    /// backend ('' is none) [default: none].
    #[arg(long, env = "CORECAST_EVENTS_STREAM")]
    pub events_stream: Option<String>,
    /// Entries the events stream holds before new channel events are
    /// refused [default: 1000000].
    #[arg(long, env = "CORECAST_EVENTS_STREAM_MAX_LEN")]
    pub events_stream_max_len: Option<u64>,
    /// The optional kinds the event stream also carries, comma-separated:
    /// members, receipts, dms [default: none].
    #[arg(long, env = "CORECAST_EVENTS_INCLUDE", value_delimiter = ',')]
    pub events_include: Option<Vec<String>>,
}

impl ConfigArgs {
    /// Builds the effective configuration and checks it.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut c = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
                toml::from_str(&text)
                    .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?
            }
            None => Config::default(),
        };
        if self.socketio_conformance {
            c.socketio_conformance = true;
            c.socketio_path = "/socket.io/".into();
            c.max_message_size = 1_000_000;
            c.ping_interval_ms = 300;
            c.ping_timeout_ms = 200;
            c.auth_timeout_ms = 1000;
        }
        macro_rules! set {
            ($($field:ident),*) => { $(if let Some(v) = &self.$field { c.$field = v.clone(); })* };
        }
        set!(
            listen,
            shards,
            io_driver,
            max_message_size,
            max_unauthenticated_message_size,
            max_preauth_bytes_per_shard,
            allowed_origins,
            upgrade_refusals,
            socketio_path,
            ping_interval_ms,
            ping_timeout_ms,
            handshake_timeout_ms,
            auth_timeout_ms,
            close_timeout_ms,
            shutdown_timeout_ms,
            outbound_queue_frames,
            outbound_queue_bytes,
            write_delay_ms,
            max_header_bytes,
            history_size,
            history_ttl_ms,
            typing_timeout_ms,
            presence_grace_ms,
            resume_window_ms,
            token_refresh_ahead_ms,
            token_expiry_grace_ms,
            custom_events,
            max_custom_event_bytes,
            call_ring_timeout_ms,
            notification_ttl_ms,
            max_stored_notifications,
            max_notifications_per_sender,
            log_format,
            ban_file,
            history_file,
            rate_limit_strikes,
            max_connections_per_shard,
            max_handshakes_per_ip,
            max_connections_per_ip,
            max_connections_per_user,
            trusted_proxies,
            api_listen,
            api_keys,
            redis,
            redis_cluster,
            node_timeout_ms,
            large_channel_members,
            events_stream,
            events_stream_max_len,
            events_include
        );
        for rule in &self.rate_limits {
            let (event, spec) = rule.split_once('=').ok_or_else(|| {
                ConfigError(format!("--rate-limit `{rule}`: use EVENT=COUNT/DURATION"))
            })?;
            c.rate_limits
                .insert(event.trim().into(), spec.trim().into());
        }
        match (
            &self.livekit_url,
            &self.livekit_api_key,
            &self.livekit_api_secret,
        ) {
            (None, None, None) => {}
            (Some(url), Some(key), Some(secret)) => {
                c.livekit = Some(crate::livekit::LiveKit {
                    url: url.clone(),
                    api_key: key.clone(),
                    api_secret: secret.clone(),
                    token_ttl_s: c.livekit.as_ref().map_or(600, |l| l.token_ttl_s),
                })
            }
            _ => {
                return Err(ConfigError(
                    "--livekit-url, --livekit-api-key and --livekit-api-secret go together".into(),
                ))
            }
        }
        if self.echo_endpoint {
            c.echo_endpoint = true;
        }
        if let Some(v) = &self.auth_algorithm {
            c.auth.algorithm = v.clone();
        }
        if let Some(v) = &self.auth_secret {
            c.auth.secret = Some(v.clone());
        }
        if let Some(v) = &self.auth_public_key_file {
            c.auth.public_key_file = Some(v.clone());
        }
        if let Some(v) = &self.auth_issuer {
            c.auth.issuer = Some(v.clone());
        }
        if let Some(v) = &self.auth_audience {
            c.auth.audience = Some(v.clone());
        }
        if let Some(v) = &self.auth_channel_access {
            c.auth.channel_access = v.clone();
        }
        if let Some(v) = &self.webhook_url {
            c.webhook.url = v.clone();
        }
        if let Some(v) = &self.webhook_secret {
            c.webhook.secret = v.clone();
        }
        if let Some(v) = &self.webhook_outbox_dir {
            c.webhook.outbox_dir = v.clone();
        }
        if let Some(v) = self.webhook_outbox_max_bytes {
            c.webhook.outbox_max_bytes = v;
        }
        if let Some(v) = &self.hooks_publish_url {
            c.hooks.publish_url = v.clone();
        }
        if let Some(v) = &self.hooks_publish_channels {
            c.hooks.publish_channels = v.clone();
        }
        if let Some(v) = &self.hooks_secret {
            c.hooks.secret = v.clone();
        }
        if let Some(v) = &self.hooks_rpc_url {
            c.hooks.rpc_url = v.clone();
        }
        if let Some(v) = &self.hooks_connect_url {
            c.hooks.connect_url = v.clone();
        }
        if let Some(v) = &self.hooks_connect_auth {
            c.hooks.connect_auth = v.clone();
        }
        if let Some(v) = &self.hooks_on_failure {
            c.hooks.on_failure = v.clone();
        }
        if let Some(v) = self.hooks_timeout_ms {
            c.hooks.timeout_ms = v;
        }
        c.validate()?;
        Ok(c)
    }
}

impl Config {
    fn validate_webhook(&self) -> Result<(), ConfigError> {
        let w = &self.webhook;
        if !w.enabled() {
            return Ok(());
        }
        crate::http_client::Url::parse(&w.url)
            .map_err(|e| ConfigError(format!("webhook.url: {e}")))?;
        if w.secret.len() < 16 {
            return Err(ConfigError(
                "webhook.secret: give a key of at least 16 bytes to sign the POSTs".into(),
            ));
        }
        if self.cluster_mode() {
            // The nodes deliver the events stream, one at a time.
            if self.events_stream.is_empty() {
                return Err(ConfigError(
                    "webhook: in a cluster the nodes deliver the events stream: set events_stream too".into(),
                ));
            }
        } else if w.outbox_dir.is_empty() {
            return Err(ConfigError(
                "webhook.outbox_dir: the event stream needs a directory".into(),
            ));
        }
        if w.outbox_max_bytes < 1 << 20 {
            return Err(ConfigError(
                "webhook.outbox_max_bytes must be at least 1048576".into(),
            ));
        }
        if w.batch_events == 0 || w.timeout_ms == 0 || w.retry_max_ms < 100 {
            return Err(ConfigError(
                "webhook: batch_events and timeout_ms must be at least 1, retry_max_ms at least 100"
                    .into(),
            ));
        }
        Ok(())
    }

    fn validate_hooks(&self) -> Result<(), ConfigError> {
        let h = &self.hooks;
        if !["refuse", "allow"].contains(&h.on_failure.as_str()) {
            return Err(ConfigError(format!(
                "hooks.on_failure must be refuse or allow, not `{}`",
                h.on_failure
            )));
        }
        if !["jwt", "backend"].contains(&h.connect_auth.as_str()) {
            return Err(ConfigError(format!(
                "hooks.connect_auth must be jwt or backend, not `{}`",
                h.connect_auth
            )));
        }
        if h.connect_auth == "backend" && h.connect_url.is_empty() {
            return Err(ConfigError(
                "hooks.connect_auth = backend needs hooks.connect_url: without it nothing would check the tokens".into(),
            ));
        }
        if !h.enabled() {
            return Ok(());
        }
        let urls = [
            ("publish_url", &h.publish_url),
            ("rpc_url", &h.rpc_url),
            ("connect_url", &h.connect_url),
        ];
        for (name, url) in urls {
            if !url.is_empty() {
                crate::http_client::Url::parse(url)
                    .map_err(|e| ConfigError(format!("hooks.{name}: {e}")))?;
            }
        }
        self.publish_hook_patterns()?;
        if h.secret.len() < 16 {
            return Err(ConfigError(
                "hooks.secret: give a key of at least 16 bytes to sign the hooks' requests".into(),
            ));
        }
        if h.timeout_ms == 0 || h.concurrency == 0 || h.max_waiting == 0 {
            return Err(ConfigError(
                "hooks: timeout_ms, concurrency and max_waiting must be at least 1".into(),
            ));
        }
        if h.concurrency > 1024 {
            return Err(ConfigError("hooks.concurrency: at most 1024".into()));
        }
        Ok(())
    }

    /// The channels the publish hook sees (none: it is off).
    pub fn publish_hook_patterns(&self) -> Result<Option<crate::access::Patterns>, ConfigError> {
        if self.hooks.publish_url.is_empty() {
            return Ok(None);
        }
        crate::access::Patterns::new("hooks.publish_channels", &self.hooks.publish_channels)
            .map(Some)
            .map_err(ConfigError)
    }

    fn validate_events_stream(&self) -> Result<(), ConfigError> {
        if self.events_stream.is_empty() {
            return Ok(());
        }
        if self.redis.is_empty() {
            return Err(ConfigError(
                "events_stream: a cluster on one Redis (`redis`) keeps it; on a Redis Cluster it is not supported yet, and a single node has webhooks".into(),
            ));
        }
        if self.events_stream_max_len < 100 {
            return Err(ConfigError(
                "events_stream_max_len must be at least 100".into(),
            ));
        }
        Ok(())
    }

    /// The optional kinds of `events_include`, checked: each one known,
    /// and somewhere to send them (a single node's webhooks, a cluster's
    /// events stream).
    pub fn stream_extras(&self) -> Result<crate::engine::event_stream::Extras, ConfigError> {
        let extras = crate::engine::event_stream::Extras::parse(&self.events_include)
            .map_err(|e| ConfigError(format!("events_include: {e}")))?;
        if extras.any() {
            let stream = if self.cluster_mode() {
                !self.events_stream.is_empty()
            } else {
                self.webhook.enabled()
            };
            if !stream {
                return Err(ConfigError(
                    "events_include: the event stream is off: set webhook.url (a single node) or events_stream (a cluster)".into(),
                ));
            }
        }
        Ok(extras)
    }

    /// The `custom_events` patterns (none when the list is empty).
    pub fn custom_event_patterns(&self) -> Result<Option<crate::access::Patterns>, ConfigError> {
        if self.custom_events.is_empty() {
            return Ok(None);
        }
        crate::access::Patterns::new("custom_events", &self.custom_events)
            .map(Some)
            .map_err(ConfigError)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        self.custom_event_patterns()?;
        if !["auto", "io_uring", "epoll"].contains(&self.io_driver.as_str()) {
            return Err(ConfigError(format!(
                "io_driver must be auto, io_uring or epoll, not `{}`",
                self.io_driver
            )));
        }
        if !["auto", "http", "websocket"].contains(&self.upgrade_refusals.as_str()) {
            return Err(ConfigError(format!(
                "upgrade_refusals must be auto, http or websocket, not `{}`",
                self.upgrade_refusals
            )));
        }
        if !["text", "json"].contains(&self.log_format.as_str()) {
            return Err(ConfigError(format!(
                "log_format must be text or json, not `{}`",
                self.log_format
            )));
        }
        if self.max_message_size < 125 {
            return Err(ConfigError(
                "max_message_size must be at least 125 bytes".into(),
            ));
        }
        if self.max_unauthenticated_message_size < 125 {
            return Err(ConfigError(
                "max_unauthenticated_message_size must be at least 125 bytes".into(),
            ));
        }
        if self.max_preauth_bytes_per_shard < 64 << 10 {
            return Err(ConfigError(
                "max_preauth_bytes_per_shard must be at least 65536 bytes".into(),
            ));
        }
        if self.outbound_queue_frames == 0 || self.mesh_queue_capacity == 0 {
            return Err(ConfigError("queue bounds must be at least 1".into()));
        }
        self.rate_limits()?;
        self.trusted_proxies()?;
        if let Some(k) = self.api_keys.iter().find(|k| k.len() < 16) {
            return Err(ConfigError(format!(
                "api_keys: a key of {} bytes is too short (at least 16)",
                k.len()
            )));
        }
        if !self.api_keys.is_empty() {
            self.api_addr()?;
        }
        if !self.redis.is_empty() {
            redis::Client::open(self.redis.as_str()).map_err(|e| {
                ConfigError(format!("redis: `{}` is not a Redis URL: {e}", self.redis))
            })?;
        }
        if !self.redis_cluster.is_empty() {
            if !self.redis.is_empty() {
                return Err(ConfigError(
                    "redis and redis_cluster: give one (a single Redis, or a Redis Cluster)".into(),
                ));
            }
            for url in &self.redis_cluster {
                redis::Client::open(url.as_str()).map_err(|e| {
                    ConfigError(format!(
                        "redis_cluster: `{}` is not a Redis URL: {e}",
                        without_password(url)
                    ))
                })?;
            }
        }
        if !(400..=3_600_000).contains(&self.node_timeout_ms) {
            return Err(ConfigError(format!(
                "node_timeout_ms must be between 400 and 3600000, not {}",
                self.node_timeout_ms
            )));
        }
        if self.rate_limit_strikes > 250 {
            return Err(ConfigError(format!(
                "rate_limit_strikes must be at most 250, not {}",
                self.rate_limit_strikes
            )));
        }
        if !self.socketio_path.is_empty() && !self.socketio_path.starts_with('/') {
            return Err(ConfigError(format!(
                "socketio_path must start with `/` (or be empty to turn Socket.IO off), not `{}`",
                self.socketio_path
            )));
        }
        if self.shards > 1024 {
            return Err(ConfigError("at most 1024 shards".into()));
        }
        if self.write_delay_ms > 1000 {
            return Err(ConfigError(format!(
                "write_delay_ms must be at most 1000, not {}",
                self.write_delay_ms
            )));
        }
        for (name, v) in [
            ("ping_interval_ms", self.ping_interval_ms),
            ("ping_timeout_ms", self.ping_timeout_ms),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("auth_timeout_ms", self.auth_timeout_ms),
            ("close_timeout_ms", self.close_timeout_ms),
            ("history_ttl_ms", self.history_ttl_ms),
            ("typing_timeout_ms", self.typing_timeout_ms),
            ("call_ring_timeout_ms", self.call_ring_timeout_ms),
            ("notification_ttl_ms", self.notification_ttl_ms),
            ("max_notifications", self.max_notifications as u64),
            (
                "max_stored_notifications",
                self.max_stored_notifications as u64,
            ),
            (
                "max_notifications_per_sender",
                self.max_notifications_per_sender as u64,
            ),
            ("max_conversations", self.max_conversations as u64),
        ] {
            if v == 0 {
                return Err(ConfigError(format!("{name} must be positive")));
            }
        }
        if let Some(lk) = &self.livekit {
            if lk.url.is_empty() || lk.api_key.is_empty() || lk.api_secret.len() < 16 {
                return Err(ConfigError(
                    "livekit needs a url, an api_key and an api_secret of at least 16 characters"
                        .into(),
                ));
            }
        }
        crate::auth::Verifier::from_config(&self.auth)?;
        self.validate_webhook()?;
        self.validate_events_stream()?;
        self.stream_extras()?;
        self.validate_hooks()?;
        Ok(())
    }

    /// What the engine of each shard is configured with.
    /// `trusted_proxies`, parsed.
    pub fn trusted_proxies(&self) -> Result<Vec<crate::admission::Net>, ConfigError> {
        self.trusted_proxies
            .iter()
            .map(|p| {
                crate::admission::Net::parse(p)
                    .map_err(|e| ConfigError(format!("trusted_proxies: {e}")))
            })
            .collect()
    }

    pub fn admission_limits(&self) -> crate::admission::Limits {
        crate::admission::Limits {
            max_connections_per_shard: self.max_connections_per_shard,
            max_handshakes_per_ip: self.max_handshakes_per_ip,
            max_connections_per_ip: self.max_connections_per_ip,
        }
    }

    /// The effective rate limits: the defaults, then `rate_limits`.
    pub fn rate_limits(&self) -> Result<crate::engine::limits::RateLimits, ConfigError> {
        use crate::engine::limits::{Limit, RateLimits};
        let mut r = RateLimits::default();
        for (event, spec) in &self.rate_limits {
            let limit = Limit::parse(spec).map_err(|e| ConfigError(format!("rate_limits: {e}")))?;
            r.set(event, limit)
                .map_err(|e| ConfigError(format!("rate_limits: {e}")))?;
        }
        Ok(r)
    }

    pub fn engine_settings(&self) -> crate::engine::Settings {
        crate::engine::Settings {
            rate_limits: self.rate_limits().expect("checked by validate"),
            rate_limit_strikes: self.rate_limit_strikes,
            max_connections_per_user: self.max_connections_per_user,
            max_channels_per_connection: self.max_channels_per_connection,
            large_channel_members: self.large_channel_members,
            max_content_chars: self.max_content_chars,
            history_size: self.history_size,
            history_ttl_ms: self.history_ttl_ms,
            typing_timeout_ms: self.typing_timeout_ms,
            presence_grace_ms: self.presence_grace_ms,
            resume_window_ms: self.resume_window_ms,
            token_refresh_ahead_ms: self.token_refresh_ahead_ms,
            token_expiry_grace_ms: self.token_expiry_grace_ms,
            custom_events: self.custom_event_patterns().expect("checked by validate"),
            stream_extras: self.stream_extras().expect("checked by validate"),
            max_custom_event_bytes: self.max_custom_event_bytes,
            publish_hook: self.publish_hook_patterns().expect("checked by validate"),
            max_hook_waiting: self.hooks.max_waiting,
            hook_failure_allows: self.hooks.failure_allows(),
            rpc_hook: !self.hooks.rpc_url.is_empty(),
            call_ring_timeout_ms: self.call_ring_timeout_ms,
            max_notifications: self.max_notifications,
            notification_ttl_ms: self.notification_ttl_ms,
            max_stored_notifications: self.max_stored_notifications,
            max_notifications_per_sender: self.max_notifications_per_sender,
            max_conversations: self.max_conversations,
            max_subscriptions: self.max_presence_subscriptions,
            livekit: self.livekit.clone(),
            ..crate::engine::Settings::default()
        }
    }

    /// Where the server API listens, when it runs.
    /// Whether the node is part of a cluster (a Redis or a Redis Cluster
    /// is given).
    pub fn cluster_mode(&self) -> bool {
        !self.redis.is_empty() || !self.redis_cluster.is_empty()
    }

    /// The cluster's Redis for logs, without passwords.
    pub fn redis_shown(&self) -> String {
        if self.redis_cluster.is_empty() {
            without_password(&self.redis)
        } else {
            self.redis_cluster
                .iter()
                .map(|u| without_password(u))
                .collect::<Vec<_>>()
                .join(",")
        }
    }

    pub fn api_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.api_listen.parse().map_err(|e| {
            ConfigError(format!(
                "api_listen `{}` is not an address:port: {e}",
                self.api_listen
            ))
        })
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.parse().map_err(|e| {
            ConfigError(format!(
                "listen `{}` is not an address:port: {e}",
                self.listen
            ))
        })
    }

    /// The number of shards to run.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            without_password("redis://user:secret@host:6379/0"),
            "redis://user:<hidden>@host:6379/0"
        );
        assert_eq!(without_password("redis://host:6379"), "redis://host:6379");
    }

    #[test]
    fn file_then_flags() {
        let dir = std::env::temp_dir().join(format!("corecast-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\nshards = 3\n[auth]\nsecret = \"s3cret-s3cret-s3cret\"\n",
        )
        .unwrap();
        let args = ConfigArgs {
            config: Some(path.clone()),
            shards: Some(2),
            ..Default::default()
        };
        let c = args.load().unwrap();
        assert_eq!(c.listen, "127.0.0.1:9000");
        assert_eq!(c.shards, 2);
        assert_eq!(c.auth.secret.as_deref(), Some("s3cret-s3cret-s3cret"));
        std::fs::write(&path, "listne = 1\n").unwrap();
        let e = args.load().unwrap_err().0;
        assert!(e.contains("listne"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_values_are_named() {
        let c = Config {
            io_driver: "kqueue".into(),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().0.contains("io_driver"));
        let c = Config {
            listen: "nowhere".into(),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().0.contains("listen"));
        let c = Config {
            write_delay_ms: 5000,
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().0.contains("write_delay_ms"));
        let hooks = |connect_url: &str, connect_auth: &str| Config {
            hooks: HooksConfig {
                connect_url: connect_url.into(),
                connect_auth: connect_auth.into(),
                secret: "0123456789abcdef".into(),
                ..HooksConfig::default()
            },
            ..Config::default()
        };
        let e = hooks("", "backend").validate().unwrap_err().0;
        assert!(e.contains("needs hooks.connect_url"), "{e}");
        let e = hooks("http://127.0.0.1:9/c", "oauth")
            .validate()
            .unwrap_err()
            .0;
        assert!(e.contains("connect_auth must be jwt or backend"), "{e}");
        let e = hooks("https://example.com/c", "jwt")
            .validate()
            .unwrap_err()
            .0;
        assert!(e.contains("hooks.connect_url"), "{e}");
        assert!(hooks("http://127.0.0.1:9/c", "backend").validate().is_ok());
        let c = Config {
            redis: "redis://127.0.0.1:6379".into(),
            redis_cluster: vec!["redis://127.0.0.1:7000".into()],
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().0.contains("redis_cluster"));
        let c = Config {
            redis_cluster: vec!["redis://u:secret@127.0.0.1:7000".into(), "nope://x".into()],
            ..Config::default()
        };
        let e = c.validate().unwrap_err().0;
        assert!(e.contains("nope://x") && !e.contains("secret"), "{e}");
        let c = Config {
            node_timeout_ms: 10,
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().0.contains("node_timeout_ms"));
    }
}
