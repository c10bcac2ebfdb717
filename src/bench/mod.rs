//! `corecast bench`: a load generator for corecast nodes and, with
//! `--protocol raw`, for any WebSocket server that broadcasts a client's text
//! messages to the room named by `?room=NAME`.
//!
//! One thread on monoio drives every connection; reads take whatever the
//! socket holds and parse every frame in it. Latency is measured from a
//! timestamp the publisher writes into each message. Each run prints a
//! progress line every second (stderr), a human summary (stderr) and one
//! JSON line (stdout). Every loop is bounded in time and count.

mod load;
mod report;
mod socketio;

use std::net::IpAddr;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};

pub use report::{percentiles, Latency, Procs};

/// The wire protocol of the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchProtocol {
    /// corecast's JSON protocol (`corecast.json`): tokens, `channel:join`,
    /// `message:send` / `message:new`.
    Json,
    /// corecast's binary protocol (`corecast.bin`), same events.
    Binary,
    /// Any broadcast server: connect to `URL?room=NAME`, send text, every
    /// member of the room (the sender included) receives it.
    Raw,
    /// A Socket.IO 4 server (WebSocket transport) with corecast's event
    /// names: `channel:join` with an ack, `message:send` /
    /// `message:new`; the token goes in the namespace's auth. The URL is
    /// the server's `/socket.io/` path.
    #[value(name = "socketio")]
    SocketIo,
}

impl BenchProtocol {
    pub fn name(self) -> &'static str {
        match self {
            BenchProtocol::Json => "json",
            BenchProtocol::Binary => "binary",
            BenchProtocol::Raw => "raw",
            BenchProtocol::SocketIo => "socketio",
        }
    }
}

/// Options shared by every workload.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// The server's WebSocket URL. Several, comma-separated (the nodes of a
    /// cluster): connection i goes to URL i mod n, so each channel's members
    /// are spread over the nodes.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws", global = true)]
    pub url: String,
    /// Wire protocol.
    #[arg(long, value_enum, default_value_t = BenchProtocol::Json, global = true)]
    pub protocol: BenchProtocol,
    /// HS256 secret to mint each connection's token with (json and binary).
    /// Without it, the development secret of a node started without an auth
    /// key.
    #[arg(
        long,
        env = "CORECAST_AUTH_SECRET",
        global = true,
        hide_env_values = true
    )]
    pub secret: Option<String>,
    /// The server's PID, for its CPU time per delivery and its memory
    /// (read from /proc; same host only). Several, comma-separated: their
    /// CPU time is added up (the memory figure reads the first).
    #[arg(long, global = true, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Message payload size in bytes (the timestamp plus padding).
    #[arg(long, default_value_t = 64, global = true)]
    pub payload: usize,
    /// Connections opened at once while setting up.
    #[arg(long, default_value_t = 64, global = true)]
    pub connect_parallel: usize,
    /// Seconds a connection may take to open, authenticate and join (a
    /// storm against a slow server needs more than the default).
    #[arg(long, default_value_t = 10.0, global = true)]
    pub connect_timeout: f64,
    /// Local addresses to connect from, 127.0.0.1 and up (loopback
    /// targets only; each gives about 28,000 ports). 0 picks enough for
    /// the connection count.
    #[arg(long, default_value_t = 0, global = true)]
    pub source_ips: u32,
    /// IO driver of the load generator.
    #[arg(long, value_enum, default_value_t = Driver::Uring, global = true)]
    pub driver: Driver,
    /// Name prefix of channels/rooms (default: unique per run).
    #[arg(long, global = true)]
    pub prefix: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Driver {
    Uring,
    Epoll,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Workload {
    /// C connections in closed loop: each sends a message to a channel of
    /// its own and waits for it to come back. Reports round trips/s and
    /// round-trip latency.
    Echo {
        /// Connections.
        #[arg(long, short = 'c', default_value_t = 100)]
        connections: usize,
        /// Seconds of load.
        #[arg(long, short = 't', default_value_t = 10.0)]
        duration: f64,
    },
    /// R channels x M members, one extra publisher per channel, an
    /// aggregate publish rate S for T seconds. Reports deliveries/s, loss,
    /// latency percentiles, and the server's CPU time per delivery.
    Fanout {
        #[command(flatten)]
        shape: Shape,
        /// Aggregate publish rate, messages/s (each reaches M members).
        #[arg(long, short = 's', default_value_t = 1000.0)]
        rate: f64,
        /// Seconds of load.
        #[arg(long, short = 't', default_value_t = 10.0)]
        duration: f64,
    },
    /// The fanout load, stepping the publish rate up until a step loses a
    /// message, closes a connection or exceeds the p99 bound; reports the
    /// highest passing delivered rate, then the latency at half of it. A
    /// step that misses only the latency bound while the load generator is
    /// at its core's limit is inconclusive (the queueing may be the load
    /// generator's): it is reported, and the search climbs on.
    Max {
        #[command(flatten)]
        shape: Shape,
        /// Publish rate of the first step, messages/s.
        #[arg(long, default_value_t = 1000.0)]
        start_rate: f64,
        /// Each step multiplies the rate by this.
        #[arg(long, default_value_t = 1.5)]
        factor: f64,
        /// Highest publish rate tried.
        #[arg(long, default_value_t = 1_000_000.0)]
        max_rate: f64,
        /// Seconds per step.
        #[arg(long, default_value_t = 5.0)]
        step_duration: f64,
        /// Seconds of load at the start rate before the first step, not
        /// judged (connections, caches and TCP windows settle); 0 skips it.
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
        /// Most steps, refinements included.
        #[arg(long, default_value_t = 16)]
        max_steps: u32,
        /// A step passes when its p99 latency is at most this (ms).
        #[arg(long, default_value_t = 10.0)]
        p99_bound_ms: f64,
    },
    /// A reconnect storm: N connections, each its own user, each joining
    /// one of R channels (connection i joins channel i mod R), opened
    /// --connect-parallel at a time; reports the time until every one is
    /// joined, and the servers' CPU per connect (with --server-pid).
    Connect {
        /// Connections.
        #[arg(long, short = 'n', default_value_t = 10_000)]
        connections: usize,
        /// Channels.
        #[arg(long, short = 'r', default_value_t = 100)]
        channels: usize,
        /// Seconds to hold them once joined (a connection the server
        /// closes meanwhile is counted).
        #[arg(long, default_value_t = 1.0)]
        hold: f64,
    },
    /// Opens N connections and holds them, then reports the server's RSS
    /// per connection (with --server-pid) and the connect rate.
    Idle {
        /// Connections.
        #[arg(long, short = 'n', default_value_t = 10_000)]
        connections: usize,
        /// Seconds to hold them once open.
        #[arg(long, default_value_t = 5.0)]
        hold: f64,
        /// Members per room: connection i joins room i / ROOM_SIZE, as
        /// users sit in channels (0: no room, the connection alone).
        #[arg(long, default_value_t = 100)]
        room_size: usize,
    },
}

/// Channels x members of the fanout and max workloads.
#[derive(Debug, Clone, Copy, Args)]
pub struct Shape {
    /// Channels (rooms).
    #[arg(long, short = 'r', default_value_t = 10)]
    pub channels: usize,
    /// Receiving members per channel (the publisher comes on top).
    #[arg(long, short = 'm', default_value_t = 100)]
    pub members: usize,
    /// Messages each publisher sends back to back. 1 spreads publishes
    /// evenly over time (every member then receives one message at a time);
    /// larger values model bursty rooms, where a server can coalesce the
    /// frames of a burst into one write per member.
    #[arg(long, default_value_t = 1)]
    pub burst: usize,
}

/// Why a bench could not run.
#[derive(Debug)]
pub struct BenchError(pub String);

impl std::fmt::Display for BenchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BenchError {}

impl From<crate::client::ClientError> for BenchError {
    fn from(e: crate::client::ClientError) -> Self {
        BenchError(e.to_string())
    }
}

/// Runs a workload to the end; JSON lines go to `out`.
pub fn run(
    common: Common,
    workload: Workload,
    out: &mut dyn std::io::Write,
) -> Result<(), BenchError> {
    validate(&common, &workload)?;
    raise_fd_limit(needed_fds(&workload))?;
    let lines = match common.driver {
        Driver::Uring => match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(8192)
            .enable_timer()
            .build()
        {
            Ok(mut rt) => rt.block_on(load::run(common, workload)),
            Err(e) => {
                eprintln!("io_uring unavailable ({e}); using epoll");
                epoll_runtime()?.block_on(load::run(common, workload))
            }
        },
        Driver::Epoll => epoll_runtime()?.block_on(load::run(common, workload)),
    }?;
    for l in lines {
        writeln!(out, "{l}").map_err(|e| BenchError(format!("cannot write results: {e}")))?;
    }
    Ok(())
}

fn epoll_runtime(
) -> Result<monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>>, BenchError> {
    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .map_err(|e| BenchError(format!("cannot start the runtime: {e}")))
}

fn validate(common: &Common, w: &Workload) -> Result<(), BenchError> {
    let mut url: Option<crate::client::Url> = None;
    for u in common.url.split(',') {
        let parsed: crate::client::Url = u.parse()?;
        url.get_or_insert(parsed);
    }
    let url = url.ok_or_else(|| BenchError("--url is empty".into()))?;
    let err = |m: &str| Err(BenchError(m.into()));
    if common.payload < 24 {
        return err("--payload must be at least 24 bytes (it carries the timestamp)");
    }
    if common.payload > 1 << 20 {
        return err("--payload must be at most 1 MiB");
    }
    if common.connect_parallel == 0 {
        return err("--connect-parallel must be at least 1");
    }
    if !(common.connect_timeout > 0.0 && common.connect_timeout <= 3600.0) {
        return err("--connect-timeout must be between 0 and 3600 seconds");
    }
    if common.source_ips > 1 && !is_loopback_host(&url.host) {
        return err("--source-ips needs a loopback target (127.0.0.0/8)");
    }
    let positive = |v: f64| v.is_finite() && v > 0.0;
    match *w {
        Workload::Echo {
            connections,
            duration,
        } => {
            if connections == 0 || !positive(duration) || duration > 3600.0 {
                return err("echo needs --connections >= 1 and 0 < --duration <= 3600");
            }
        }
        Workload::Fanout {
            shape,
            rate,
            duration,
        } => {
            check_shape(shape)?;
            if !positive(rate) || !positive(duration) || duration > 3600.0 {
                return err("fanout needs --rate > 0 and 0 < --duration <= 3600");
            }
        }
        Workload::Max {
            shape,
            start_rate,
            factor,
            max_rate,
            step_duration,
            warmup,
            max_steps,
            p99_bound_ms,
        } => {
            check_shape(shape)?;
            if !(0.0..=600.0).contains(&warmup) {
                return err("--warmup must be between 0 and 600 seconds");
            }
            if !positive(start_rate) || max_rate < start_rate {
                return err("max needs 0 < --start-rate <= --max-rate");
            }
            if !(factor > 1.0 && factor.is_finite()) {
                return err("--factor must be greater than 1");
            }
            if !positive(step_duration) || step_duration > 600.0 || max_steps == 0 {
                return err("max needs 0 < --step-duration <= 600 and --max-steps >= 1");
            }
            if !positive(p99_bound_ms) {
                return err("--p99-bound-ms must be positive");
            }
        }
        Workload::Connect {
            connections,
            channels,
            hold,
        } => {
            if connections == 0 || channels == 0 || !(0.0..=3600.0).contains(&hold) {
                return err(
                    "connect needs --connections >= 1, --channels >= 1 and 0 <= --hold <= 3600",
                );
            }
        }
        Workload::Idle {
            connections, hold, ..
        } => {
            if connections == 0 || !(0.0..=86_400.0).contains(&hold) {
                return err("idle needs --connections >= 1 and 0 <= --hold <= 86400");
            }
        }
    }
    Ok(())
}

fn check_shape(s: Shape) -> Result<(), BenchError> {
    if s.channels == 0 || s.members == 0 || s.burst == 0 {
        return Err(BenchError(
            "--channels, --members and --burst must be at least 1".into(),
        ));
    }
    Ok(())
}

fn is_loopback_host(host: &str) -> bool {
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()) || host == "localhost"
}

fn needed_fds(w: &Workload) -> u64 {
    let conns = match *w {
        Workload::Echo { connections, .. }
        | Workload::Idle { connections, .. }
        | Workload::Connect { connections, .. } => connections,
        Workload::Fanout { shape, .. } | Workload::Max { shape, .. } => {
            shape.channels * (shape.members + 1)
        }
    };
    conns as u64 + 64
}

/// Raises the soft descriptor limit to what `need` asks (up to the hard
/// limit), or says why the run cannot open that many connections.
fn raise_fd_limit(need: u64) -> Result<(), BenchError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Ok(());
        }
        if lim.rlim_cur >= need {
            return Ok(());
        }
        if lim.rlim_max < need {
            return Err(BenchError(format!(
                "this load needs about {need} file descriptors but the hard limit \
                 (RLIMIT_NOFILE) is {}; raise it (see tuning/) or open fewer connections",
                lim.rlim_max
            )));
        }
        lim.rlim_cur = need.max(lim.rlim_cur);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    Ok(())
}

/// How many source addresses `n` connections to `host` need.
pub fn source_ips_for(host: &str, n: usize, asked: u32) -> u32 {
    if asked > 0 {
        asked
    } else if is_loopback_host(host) && n > 25_000 {
        n.div_ceil(25_000) as u32
    } else {
        1
    }
}

/// The timestamp (µs) a publisher put at the start of a message's content.
pub fn parse_stamp(content: &[u8]) -> Option<u64> {
    let digits = content.strip_prefix(b"t")?;
    let mut v: u64 = 0;
    let mut n = 0;
    for &b in digits.iter().take(19) {
        if !b.is_ascii_digit() {
            break;
        }
        v = v * 10 + (b - b'0') as u64;
        n += 1;
    }
    (n > 0).then_some(v)
}

/// A message content of `size` bytes carrying `stamp`.
pub fn make_content(stamp: u64, size: usize) -> String {
    let mut s = format!("t{stamp} ");
    while s.len() < size {
        s.push('x');
    }
    s
}

/// The publish rates `max` tries after `rate`, given whether it passed:
/// geometric steps up, then halving the gap between the best pass and the
/// first failure (at most `refinements` times).
pub fn next_rate(
    best_pass: Option<f64>,
    first_fail: Option<f64>,
    factor: f64,
    max_rate: f64,
    refinements_left: u32,
) -> Option<f64> {
    match (best_pass, first_fail) {
        (Some(p), None) => {
            let r = p * factor;
            (p < max_rate).then_some(r.min(max_rate))
        }
        (Some(p), Some(f)) if refinements_left > 0 && f / p > 1.1 => Some((p + f) / 2.0),
        _ => None,
    }
}

/// What one step of `max` showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    /// Missed only the latency bound while the load generator sat at its
    /// core's limit: its own queueing may be the cause.
    Inconclusive,
    /// Lost messages, closed connections (`closed`) or missed the latency
    /// bound on its own.
    Fail {
        closed: bool,
    },
}

/// `max`'s search over publish rates: geometric steps up from the highest
/// rate that passed (or was inconclusive), then halving the gap to the
/// first failure a few times. A closed connection ends it.
pub struct Search {
    floor: Option<f64>,
    first_fail: Option<f64>,
    refinements: u32,
    factor: f64,
    max_rate: f64,
}

impl Search {
    pub fn new(factor: f64, max_rate: f64) -> Search {
        Search {
            floor: None,
            first_fail: None,
            refinements: 3,
            factor,
            max_rate,
        }
    }

    /// Records what the step at `rate` showed; returns the next rate to
    /// try, or `None` when the search is over.
    pub fn next(&mut self, rate: f64, outcome: Outcome) -> Option<f64> {
        match outcome {
            Outcome::Pass | Outcome::Inconclusive => {
                self.floor = Some(self.floor.map_or(rate, |f| f.max(rate)));
            }
            Outcome::Fail { closed } => {
                self.first_fail = Some(self.first_fail.map_or(rate, |f| f.min(rate)));
                if closed {
                    return None;
                }
                if self.floor.is_some() {
                    self.refinements = self.refinements.saturating_sub(1);
                }
            }
        }
        next_rate(
            self.floor,
            self.first_fail,
            self.factor,
            self.max_rate,
            self.refinements,
        )
    }
}

/// Durations as seconds for the CLI.
pub fn secs(v: f64) -> Duration {
    Duration::from_secs_f64(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        for size in [24, 64, 1000] {
            let c = make_content(1_234_567, size);
            assert_eq!(c.len(), size);
            assert_eq!(parse_stamp(c.as_bytes()), Some(1_234_567));
        }
        assert_eq!(parse_stamp(b"x12"), None);
        assert_eq!(parse_stamp(b"t"), None);
        assert_eq!(
            parse_stamp(b"t99999999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
    }

    #[test]
    fn steps_go_up_then_bisect() {
        assert_eq!(next_rate(Some(1000.0), None, 1.5, 1e6, 2), Some(1500.0));
        assert_eq!(next_rate(Some(1e6), None, 1.5, 1e6, 2), None);
        assert_eq!(next_rate(Some(9e5), None, 1.5, 1e6, 2), Some(1e6));
        assert_eq!(
            next_rate(Some(1000.0), Some(1500.0), 1.5, 1e6, 1),
            Some(1250.0)
        );
        assert_eq!(next_rate(Some(1000.0), Some(1500.0), 1.5, 1e6, 0), None);
        assert_eq!(next_rate(Some(1000.0), Some(1050.0), 1.5, 1e6, 3), None);
        assert_eq!(next_rate(None, Some(1000.0), 1.5, 1e6, 3), None);
    }

    #[test]
    fn the_search_climbs_past_inconclusive_steps() {
        let mut s = Search::new(2.0, 1e6);
        assert_eq!(s.next(100.0, Outcome::Pass), Some(200.0));
        // The load generator saturated: no verdict, keep climbing.
        assert_eq!(s.next(200.0, Outcome::Inconclusive), Some(400.0));
        assert_eq!(s.next(400.0, Outcome::Pass), Some(800.0));
        assert_eq!(s.next(800.0, Outcome::Fail { closed: false }), Some(600.0));
        assert_eq!(s.next(600.0, Outcome::Pass), Some(700.0));
        assert_eq!(s.next(700.0, Outcome::Fail { closed: false }), Some(650.0));
        assert_eq!(s.next(650.0, Outcome::Fail { closed: false }), None);

        // An inconclusive first step is no failure either.
        let mut s = Search::new(1.5, 1e6);
        assert_eq!(s.next(1000.0, Outcome::Inconclusive), Some(1500.0));
        // A closed connection ends the search at once.
        assert_eq!(s.next(1500.0, Outcome::Fail { closed: true }), None);
        // A first step that fails on its own ends it too.
        let mut s = Search::new(1.5, 1e6);
        assert_eq!(s.next(1000.0, Outcome::Fail { closed: false }), None);
    }

    #[test]
    fn source_addresses() {
        assert_eq!(source_ips_for("127.0.0.1", 10_000, 0), 1);
        assert_eq!(source_ips_for("127.0.0.1", 50_000, 0), 2);
        assert_eq!(source_ips_for("127.0.0.1", 50_001, 0), 3);
        assert_eq!(source_ips_for("10.0.0.1", 90_000, 0), 1);
        assert_eq!(source_ips_for("127.0.0.1", 10, 4), 4);
    }

    #[test]
    fn bad_options_are_refused_with_a_reason() {
        let c = Common {
            url: "ws://127.0.0.1:1/ws".into(),
            protocol: BenchProtocol::Json,
            secret: None,
            server_pid: Vec::new(),
            payload: 64,
            connect_parallel: 8,
            connect_timeout: 10.0,
            source_ips: 0,
            driver: Driver::Uring,
            prefix: None,
        };
        let fan = |rate: f64| Workload::Fanout {
            shape: Shape {
                channels: 1,
                members: 1,
                burst: 1,
            },
            rate,
            duration: 1.0,
        };
        assert!(validate(&c, &fan(10.0)).is_ok());
        assert!(validate(&c, &fan(0.0)).unwrap_err().0.contains("--rate"));
        assert!(validate(&c, &fan(f64::NAN)).is_err());
        let bad_url = Common {
            url: "http://x".into(),
            ..c.clone()
        };
        assert!(validate(&bad_url, &fan(1.0))
            .unwrap_err()
            .0
            .contains("ws://"));
        let small = Common {
            payload: 3,
            ..c.clone()
        };
        assert!(validate(&small, &fan(1.0))
            .unwrap_err()
            .0
            .contains("--payload"));
        let remote = Common {
            url: "ws://10.1.1.1:80/".into(),
            source_ips: 2,
            ..c
        };
        assert!(validate(&remote, &fan(1.0))
            .unwrap_err()
            .0
            .contains("loopback"));
    }
}
