//! The workloads, on one monoio thread.

use std::cell::{Cell, RefCell};
use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use serde_json::{json, Value};

use super::report::{
    self, histogram, percentiles, progress, progress_done, si, us, CpuUse, Procs,
    LOADGEN_BOUND_SHARE,
};
use super::{
    make_content, parse_stamp, secs, source_ips_for, BenchError, BenchProtocol, Common, Outcome,
    Search, Shape, Workload,
};
use crate::client::{Client, ConnectOptions, FrameReader, Masker, Url};
use crate::protocol::{
    binary, ArchivedServerEvent, ArchivedServerMessage, ChannelJoin, ClientEvent, ClientMessage,
    MessageSend, Protocol,
};
use crate::signal::Signal;
use crate::ws::OpCode;

/// Read buffer of a connection under load, and of an idle one.
const LOAD_READ: usize = 64 * 1024;
const IDLE_READ: usize = 256;

struct Ctx {
    common: Common,
    /// The nodes; connection i goes to `urls[i % len]`.
    urls: Vec<Url>,
    sources: u32,
    /// Time base of the timestamps in messages.
    epoch: Instant,
    prefix: String,
    auth: crate::config::AuthConfig,
}

impl Ctx {
    fn stamp(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn source(&self, i: usize) -> Option<IpAddr> {
        (self.sources > 1).then(|| {
            let k = (i as u32 % self.sources) + 1;
            IpAddr::V4(Ipv4Addr::new(127, 0, (k >> 8) as u8, k as u8))
        })
    }

    fn room(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// Connects connection `i`, in `room` when given.
    async fn open(&self, i: usize, room: Option<&str>) -> Result<Conn, BenchError> {
        let p = self.common.protocol;
        let url = &self.urls[i % self.urls.len()];
        if p == BenchProtocol::SocketIo {
            let now = jsonwebtoken::get_current_timestamp();
            let token = crate::auth::mint(&self.auth, &format!("bench-{i}"), 86_400, None, now)
                .map_err(|e| BenchError(format!("cannot mint a token: {e}")))?;
            let room = room.map(|r| self.room(r));
            let (stream, reader) = super::socketio::open(
                url,
                self.source(i),
                &token,
                room.as_deref(),
                secs(self.common.connect_timeout),
            )
            .await
            .map_err(|e| BenchError(format!("connection {i}: {e}")))?;
            return Ok(Conn { stream, reader });
        }
        let mut opts = match p {
            BenchProtocol::Raw => {
                ConnectOptions::new(url.with_query("room", &self.room(room.unwrap_or("idle"))))
            }
            BenchProtocol::Json | BenchProtocol::Binary | BenchProtocol::SocketIo => {
                let now = jsonwebtoken::get_current_timestamp();
                let token = crate::auth::mint(&self.auth, &format!("bench-{i}"), 86_400, None, now)
                    .map_err(|e| BenchError(format!("cannot mint a token: {e}")))?;
                let o = ConnectOptions::new(url.clone()).token(token);
                if p == BenchProtocol::Binary {
                    o.protocol(Protocol::Binary)
                } else {
                    o
                }
            }
        };
        opts.source_ip = self.source(i);
        opts.timeout = secs(self.common.connect_timeout);
        let mut c = Client::connect(&opts)
            .await
            .map_err(|e| BenchError(format!("connection {i}: {e}")))?;
        if let (Some(r), true) = (room, p != BenchProtocol::Raw) {
            c.call(ClientEvent::ChannelJoin(ChannelJoin::new(self.room(r))))
                .await
                .map_err(|e| BenchError(format!("connection {i}: channel:join: {e}")))?;
        }
        let (stream, reader) = c.into_parts();
        Ok(Conn { stream, reader })
    }

    /// One publish as a masked frame appended to `out`.
    fn publish(&self, out: &mut Vec<u8>, masker: &mut Masker, room: &str, stamp: u64) {
        let content = make_content(stamp, self.common.payload);
        match self.common.protocol {
            BenchProtocol::Raw => masker.append(out, OpCode::Text, content.as_bytes()),
            BenchProtocol::SocketIo => {
                super::socketio::publish(out, masker, &self.room(room), &content)
            }
            p => {
                let msg = ClientMessage {
                    id: None,
                    event: ClientEvent::MessageSend(MessageSend::new(self.room(room), content)),
                };
                if p == BenchProtocol::Json {
                    let mut payload = Vec::with_capacity(128 + self.common.payload);
                    crate::protocol::json::encode_client(&msg, &mut payload);
                    masker.append(out, OpCode::Text, &payload);
                } else {
                    masker.append(out, OpCode::Binary, &binary::encode_client(&msg));
                }
            }
        }
    }
}

struct Conn {
    stream: TcpStream,
    reader: FrameReader,
}

/// The timestamp of a delivered message, or `None` for any other frame.
fn stamp_of(p: BenchProtocol, payload: &[u8]) -> Option<u64> {
    match p {
        BenchProtocol::Raw => parse_stamp(payload),
        BenchProtocol::SocketIo => parse_stamp(super::socketio::content_of(payload)?),
        BenchProtocol::Json => {
            const NEW: &[u8] = br#"{"t":"message:new""#;
            const CONTENT: &[u8] = br#""content":""#;
            if !payload.starts_with(NEW) {
                return None;
            }
            let at = memchr::memmem::find(&payload[NEW.len()..], CONTENT)?;
            parse_stamp(&payload[NEW.len() + at + CONTENT.len()..])
        }
        BenchProtocol::Binary => {
            let m = rkyv::access::<ArchivedServerMessage, rkyv::rancor::Error>(payload).ok()?;
            match &m.event {
                ArchivedServerEvent::MessageNew(n) => parse_stamp(n.content.as_bytes()),
                _ => None,
            }
        }
    }
}

/// What the readers of a load saw.
struct Stats {
    counting: Cell<bool>,
    delivered: Cell<u64>,
    hist: RefCell<Histogram<u64>>,
    /// Connections that ended while the run still needed them.
    closed: Cell<u64>,
    first_close: RefCell<Option<String>>,
}

impl Stats {
    fn new() -> Rc<Stats> {
        Rc::new(Stats {
            counting: Cell::new(false),
            delivered: Cell::new(0),
            hist: RefCell::new(histogram()),
            closed: Cell::new(0),
            first_close: RefCell::new(None),
        })
    }

    fn reset(&self) {
        self.delivered.set(0);
        self.hist.borrow_mut().reset();
    }

    /// Counts a message stamped `sent` that arrived at `now`.
    fn delivery(&self, sent: u64, now: u64) {
        self.delivered.set(self.delivered.get() + 1);
        let _ = self
            .hist
            .borrow_mut()
            .record(now.saturating_sub(sent).max(1));
    }

    fn lost_connection(&self, why: String) {
        self.closed.set(self.closed.get() + 1);
        self.first_close.borrow_mut().get_or_insert(why);
    }
}

/// Bytes waiting to be written on a connection, and the task writing them.
#[derive(Default)]
struct Out {
    buf: RefCell<Vec<u8>>,
    ready: Signal,
}

impl Out {
    fn push(&self, f: impl FnOnce(&mut Vec<u8>)) {
        f(&mut self.buf.borrow_mut());
        self.ready.set();
    }
}

async fn writer(mut wr: OwnedWriteHalf<TcpStream>, out: Rc<Out>) {
    let mut spare = Vec::new();
    loop {
        out.ready.wait().await;
        out.ready.clear();
        std::mem::swap(&mut spare, &mut out.buf.borrow_mut());
        if spare.is_empty() {
            continue;
        }
        let (r, b) = wr.write_all(spare).await;
        spare = b;
        spare.clear();
        if r.is_err() {
            return;
        }
    }
}

/// Reads everything a connection receives: counts stamped messages (while
/// `stats.counting`, when `count`), answers pings, notes an unexpected end.
async fn reader(
    mut rd: OwnedReadHalf<TcpStream>,
    mut frames: FrameReader,
    out: Rc<Out>,
    stats: Rc<Stats>,
    ctx: Rc<Ctx>,
    count: bool,
    read_size: usize,
) {
    let p = ctx.common.protocol;
    let mut masker = Masker::new();
    loop {
        let mut pong = Vec::new();
        let now = ctx.stamp();
        loop {
            match frames.next() {
                Ok(Some(f)) => match f.opcode {
                    OpCode::Text
                        if p == BenchProtocol::SocketIo && super::socketio::is_ping(f.payload) =>
                    {
                        masker.append(&mut pong, OpCode::Text, b"3")
                    }
                    OpCode::Text | OpCode::Binary if count && stats.counting.get() => {
                        if let Some(sent) = stamp_of(p, f.payload) {
                            stats.delivery(sent, now);
                        }
                    }
                    OpCode::Ping => masker.append(&mut pong, OpCode::Pong, f.payload),
                    OpCode::Close => {
                        let (code, reason) = crate::ws::close::parse(f.payload);
                        stats.lost_connection(format!(
                            "closed by the server: {} {reason}",
                            code.map_or("-".into(), |c| c.to_string())
                        ));
                        return;
                    }
                    _ => {}
                },
                Ok(None) => break,
                Err(e) => {
                    stats.lost_connection(format!("protocol error from the server: {e}"));
                    return;
                }
            }
        }
        if !pong.is_empty() {
            out.push(|b| b.extend_from_slice(&pong));
        }
        if let Err(why) = read_more(&mut rd, &mut frames, read_size).await {
            stats.lost_connection(why);
            return;
        }
    }
}

/// Reads what the socket holds into `frames` (at least `size` bytes of room);
/// an end of stream or a read error comes back as the reason.
async fn read_more<R: AsyncReadRent>(
    rd: &mut R,
    frames: &mut FrameReader,
    size: usize,
) -> Result<(), String> {
    let buf = frames.take_buf(size);
    let (len, cap) = (buf.len(), buf.capacity());
    let (r, buf) = rd.read(buf.slice_mut(len..cap)).await;
    frames.put_buf(buf.into_inner());
    match r {
        Ok(0) => Err("connection closed by the server".into()),
        Err(e) => Err(format!("read error: {e}")),
        Ok(_) => Ok(()),
    }
}

/// Starts the reader and writer tasks of a connection; returns its outbox.
fn start(conn: Conn, stats: Rc<Stats>, ctx: Rc<Ctx>, count: bool, read_size: usize) -> Rc<Out> {
    let (rd, wr) = conn.stream.into_split();
    let out = Rc::new(Out::default());
    monoio::spawn(reader(
        rd,
        conn.reader,
        out.clone(),
        stats,
        ctx,
        count,
        read_size,
    ));
    monoio::spawn(writer(wr, out.clone()));
    out
}

/// Opens connections `0..n` (at most `connect_parallel` at a time), with
/// a progress line; `room(i)` names the room of connection `i`.
async fn open_all(
    ctx: &Rc<Ctx>,
    n: usize,
    room: Rc<dyn Fn(usize) -> Option<String>>,
    what: &str,
) -> Result<Vec<Conn>, BenchError> {
    let slots: Rc<RefCell<Vec<Option<Conn>>>> =
        Rc::new(RefCell::new((0..n).map(|_| None).collect()));
    let next = Rc::new(Cell::new(0usize));
    let done = Rc::new(Cell::new(0usize));
    let failed: Rc<RefCell<Option<BenchError>>> = Rc::new(RefCell::new(None));
    let workers = ctx.common.connect_parallel.min(n);
    let mut handles = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (ctx, slots, next, done, failed, room) = (
            ctx.clone(),
            slots.clone(),
            next.clone(),
            done.clone(),
            failed.clone(),
            room.clone(),
        );
        handles.push(monoio::spawn(async move {
            loop {
                let i = next.get();
                if i >= n || failed.borrow().is_some() {
                    return;
                }
                next.set(i + 1);
                match ctx.open(i, room(i).as_deref()).await {
                    Ok(c) => {
                        slots.borrow_mut()[i] = Some(c);
                        done.set(done.get() + 1);
                    }
                    Err(e) => {
                        failed.borrow_mut().get_or_insert(e);
                        return;
                    }
                }
            }
        }));
    }
    let t0 = Instant::now();
    let ticker = {
        let (done, failed) = (done.clone(), failed.clone());
        let what = what.to_string();
        async move {
            let mut ticks = 0u32;
            while done.get() < n && failed.borrow().is_none() {
                monoio::time::sleep(Duration::from_millis(100)).await;
                ticks += 1;
                if ticks % 10 == 0 {
                    progress(&format!(
                        "{what}: {} of {n} connections open ({}/s)",
                        done.get(),
                        si(done.get() as f64 / t0.elapsed().as_secs_f64())
                    ));
                }
            }
        }
    };
    let ticker = monoio::spawn(ticker);
    for h in handles {
        h.await;
    }
    ticker.await;
    progress_done();
    if let Some(e) = failed.borrow_mut().take() {
        return Err(BenchError(format!(
            "{e} (after opening {} of {n} connections)",
            done.get()
        )));
    }
    let conns = slots.borrow_mut().drain(..).flatten().collect::<Vec<_>>();
    Ok(conns)
}

pub async fn run(common: Common, workload: Workload) -> Result<Vec<Value>, BenchError> {
    let urls = common
        .url
        .split(',')
        .map(|u| u.parse::<Url>())
        .collect::<Result<Vec<_>, _>>()?;
    // Fail before opening anything when a host does not resolve.
    for u in &urls {
        u.resolve()?;
    }
    let url = &urls[0];
    let conns = match workload {
        Workload::Echo { connections, .. }
        | Workload::Idle { connections, .. }
        | Workload::Connect { connections, .. } => connections,
        Workload::Fanout { shape, .. } | Workload::Max { shape, .. } => {
            shape.channels * (shape.members + 1)
        }
    };
    let sources = source_ips_for(&url.host, conns, common.source_ips);
    let auth = crate::config::AuthConfig {
        secret: common.secret.clone(),
        ..Default::default()
    };
    let prefix = common.prefix.clone().unwrap_or_else(|| {
        format!(
            "bench{}-{}",
            std::process::id(),
            crate::client::new_key()[..6].replace(['/', '+'], "x")
        )
    });
    let ctx = Rc::new(Ctx {
        common,
        urls,
        sources,
        epoch: Instant::now(),
        prefix,
        auth,
    });
    match workload {
        Workload::Echo {
            connections,
            duration,
        } => echo(&ctx, connections, secs(duration))
            .await
            .map(|v| vec![v]),
        Workload::Fanout {
            shape,
            rate,
            duration,
        } => {
            let load = Fanout::open(&ctx, shape).await?;
            let r = load.step(rate, secs(duration), "fanout").await;
            let line = r.json(&ctx, "fanout", shape);
            r.print("fanout", &ctx);
            Ok(vec![line])
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
            let load = Fanout::open(&ctx, shape).await?;
            let bound_us = (p99_bound_ms * 1000.0) as u64;
            let mut lines = vec![];
            if warmup > 0.0 {
                let r = load.step(start_rate, secs(warmup), "max warm-up").await;
                r.print("max warm-up (not judged)", &ctx);
                lines.push(r.json(&ctx, "max-warmup", shape));
            }
            let mut best: Option<StepResult> = None;
            let mut search = Search::new(factor, max_rate);
            let mut stop = String::from("reached --max-rate");
            let mut rate = start_rate;
            for step in 1..=max_steps {
                let r = load
                    .step(rate, secs(step_duration), &format!("max step {step}"))
                    .await;
                let verdict = r.verdict(bound_us);
                let outcome = match &verdict {
                    None => Outcome::Pass,
                    Some(_) if r.latency_only_fault() && r.loadgen_bound() => Outcome::Inconclusive,
                    Some(_) => Outcome::Fail {
                        closed: r.closed > 0,
                    },
                };
                let mut line = r.json(&ctx, "max-step", shape);
                line["step"] = json!(step);
                line["pass"] = json!(verdict.is_none());
                line["inconclusive"] = json!(outcome == Outcome::Inconclusive);
                if let Some(v) = &verdict {
                    line["fail"] = json!(v);
                }
                lines.push(line);
                r.print(&format!("max step {step}"), &ctx);
                match (outcome, verdict) {
                    (Outcome::Inconclusive, Some(v)) => eprintln!(
                        "max step {step}: inconclusive ({v} while the load generator was at its limit); going on"
                    ),
                    (Outcome::Fail { .. }, Some(v)) => stop = v,
                    _ => {
                        if best.as_ref().is_none_or(|b| r.rate > b.rate) {
                            best = Some(r);
                        }
                    }
                }
                match search.next(rate, outcome) {
                    Some(n) => rate = n,
                    None => break,
                }
                if step == max_steps {
                    stop = "reached --max-steps".into();
                }
            }
            let mut half = None;
            if let (Some(b), true) = (&best, load.stats.closed.get() == 0) {
                let r = load
                    .step(b.rate / 2.0, secs(step_duration), "max: half rate")
                    .await;
                r.print("max: at half the sustained rate", &ctx);
                half = Some(r);
            }
            let mut line = json!({
                "workload": "max",
                "target": ctx.common.url,
                "protocol": ctx.common.protocol.name(),
                "channels": shape.channels,
                "members": shape.members,
                "burst": shape.burst,
                "p99_bound_us": bound_us,
                "stopped_by": stop,
            });
            match &best {
                Some(b) => {
                    line["sustained_rate"] = json!(b.rate);
                    line["sustained_deliveries_per_s"] = json!(b.deliveries_per_s());
                    line["latency_us"] = json!(b.latency);
                    line["server_cpu_us_per_delivery"] = json!(b.cpu_per_delivery_us());
                    line["loadgen_bound"] = json!(b.loadgen_bound());
                    eprintln!(
                        "max: sustained {} deliveries/s ({} publishes/s) with p99 {}{}; stopped: {stop}",
                        si(b.deliveries_per_s()),
                        si(b.rate),
                        us(b.latency.p99),
                        if b.loadgen_bound() {
                            " (the load generator was at its limit there: the server did at least this well)"
                        } else {
                            ""
                        }
                    );
                }
                None => eprintln!("max: no step passed; stopped: {stop}"),
            }
            if let Some(h) = &half {
                line["half_rate"] = json!(h.rate);
                line["half_rate_latency_us"] = json!(h.latency);
                line["half_rate_loss"] = json!(h.loss());
            }
            lines.push(line);
            Ok(lines)
        }
        Workload::Idle {
            connections,
            hold,
            room_size,
        } => idle(&ctx, connections, secs(hold), room_size)
            .await
            .map(|v| vec![v]),
        Workload::Connect {
            connections,
            channels,
            hold,
        } => connect(&ctx, connections, channels, secs(hold))
            .await
            .map(|v| vec![v]),
    }
}

/// Channels with their members and publishers, connected and joined.
struct Fanout {
    ctx: Rc<Ctx>,
    shape: Shape,
    stats: Rc<Stats>,
    publishers: Vec<Rc<Out>>,
    pub_stats: Rc<Stats>,
}

struct StepResult {
    rate: f64,
    seconds: f64,
    published: u64,
    expected: u64,
    delivered: u64,
    closed: u64,
    first_close: Option<String>,
    latency: report::Latency,
    cpu: CpuUse,
}

impl StepResult {
    fn deliveries_per_s(&self) -> f64 {
        self.delivered as f64 / self.seconds
    }

    fn loss(&self) -> u64 {
        self.expected.saturating_sub(self.delivered)
    }

    fn loadgen_bound(&self) -> bool {
        self.cpu.loadgen_core_share >= LOADGEN_BOUND_SHARE
    }

    /// Whether latency is the only criterion of `max` this step misses.
    fn latency_only_fault(&self) -> bool {
        self.closed == 0 && self.loss() == 0
    }

    fn cpu_per_delivery_us(&self) -> Option<f64> {
        self.cpu
            .server_cpu_s
            .map(|s| s * 1e6 / self.delivered.max(1) as f64)
    }

    /// Why the step fails `max`'s criteria, if it does.
    fn verdict(&self, p99_bound_us: u64) -> Option<String> {
        if self.closed > 0 {
            return Some(format!(
                "{} connections closed ({})",
                self.closed,
                self.first_close.as_deref().unwrap_or("")
            ));
        }
        if self.loss() > 0 {
            return Some(format!("{} messages lost", self.loss()));
        }
        if self.latency.p99 > p99_bound_us {
            return Some(format!("p99 {} above the bound", us(self.latency.p99)));
        }
        None
    }

    fn json(&self, ctx: &Ctx, workload: &str, shape: Shape) -> Value {
        json!({
            "workload": workload,
            "target": ctx.common.url,
            "protocol": ctx.common.protocol.name(),
            "channels": shape.channels,
            "members": shape.members,
            "burst": shape.burst,
            "payload": ctx.common.payload,
            "rate": self.rate,
            "seconds": self.seconds,
            "published": self.published,
            "expected": self.expected,
            "delivered": self.delivered,
            "deliveries_per_s": self.deliveries_per_s().round(),
            "loss": self.loss(),
            "closed_connections": self.closed,
            "latency_us": self.latency,
            "server_cpu_s": self.cpu.server_cpu_s,
            "server_cpu_us_per_delivery": self.cpu_per_delivery_us(),
            "server_core_share": self.cpu.server_core_share,
            "loadgen_core_share": self.cpu.loadgen_core_share,
            "loadgen_bound": self.loadgen_bound(),
        })
    }

    fn print(&self, what: &str, _ctx: &Ctx) {
        let l = &self.latency;
        eprintln!(
            "{what}: {} publishes/s for {:.1} s -> {} deliveries/s; lost {} of {}; closed {}\n  latency p50 {} p90 {} p99 {} p99.9 {} max {}\n  server CPU {}; load generator {:.0}% of a core{}",
            si(self.rate),
            self.seconds,
            si(self.deliveries_per_s()),
            self.loss(),
            self.expected,
            self.closed,
            us(l.p50),
            us(l.p90),
            us(l.p99),
            us(l.p999),
            us(l.max),
            match self.cpu_per_delivery_us() {
                Some(c) => format!("{c:.3} µs per delivery ({:.0}% of a core)", self.cpu.server_core_share.unwrap_or(0.0) * 100.0),
                None => "not measured (give --server-pid)".into(),
            },
            self.cpu.loadgen_core_share * 100.0,
            if self.loadgen_bound() {
                " -- BOUND BY THE LOAD GENERATOR: these figures are a floor"
            } else {
                ""
            }
        );
    }
}

impl Fanout {
    async fn open(ctx: &Rc<Ctx>, shape: Shape) -> Result<Fanout, BenchError> {
        let Shape {
            channels, members, ..
        } = shape;
        let subs = channels * members;
        let conns = open_all(
            ctx,
            subs,
            Rc::new(move |i| Some(format!("ch{}", i / members))),
            "members",
        )
        .await?;
        let stats = Stats::new();
        for c in conns {
            start(c, stats.clone(), ctx.clone(), true, LOAD_READ);
        }
        let pubs = open_all(
            ctx,
            channels,
            Rc::new(|c| Some(format!("ch{c}"))),
            "publishers",
        )
        .await?;
        let pub_stats = Stats::new();
        let publishers = pubs
            .into_iter()
            .map(|c| start(c, pub_stats.clone(), ctx.clone(), false, LOAD_READ))
            .collect();
        // Let the announcements of the joins drain before measuring.
        monoio::time::sleep(Duration::from_millis(500)).await;
        eprintln!(
            "{channels} channels x {members} members open, {channels} publishers ({} connections)",
            subs + channels
        );
        Ok(Fanout {
            ctx: ctx.clone(),
            shape,
            stats,
            publishers,
            pub_stats,
        })
    }

    /// Publishes at `rate` for `dur`, then waits (bounded) for the last
    /// deliveries.
    async fn step(&self, rate: f64, dur: Duration, label: &str) -> StepResult {
        let ctx = &self.ctx;
        let stats = &self.stats;
        stats.reset();
        stats.counting.set(true);
        let channels = self.shape.channels;
        let burst = self.shape.burst;
        let mut maskers: Vec<Masker> = (0..channels).map(|_| Masker::new()).collect();
        let procs = Procs::start(&ctx.common.server_pid);
        let t0 = Instant::now();
        let mut published = 0u64;
        let mut next_report = Duration::from_secs(1);
        let mut last = (Duration::ZERO, 0u64);
        let cap = (rate * dur.as_secs_f64()).ceil() as u64;
        while t0.elapsed() < dur && stats.closed.get() == 0 && self.pub_stats.closed.get() == 0 {
            // Whole rounds of `burst` messages per channel.
            let round = (burst * channels) as u64;
            let due = ((t0.elapsed().as_secs_f64() * rate) as u64 / round * round).min(cap);
            while published < due {
                let c = ((published / burst as u64) % channels as u64) as usize;
                let stamp = ctx.stamp();
                self.publishers[c]
                    .push(|b| ctx.publish(b, &mut maskers[c], &format!("ch{c}"), stamp));
                published += 1;
            }
            let e = t0.elapsed();
            if e >= next_report {
                let d = stats.delivered.get();
                let h = stats.hist.borrow();
                progress(&format!(
                    "{label}: {:>3.0}/{:.0} s  published {}  delivered {} ({}/s)  p99 {}",
                    e.as_secs_f64(),
                    dur.as_secs_f64(),
                    published,
                    d,
                    si((d - last.1) as f64 / (e - last.0).as_secs_f64()),
                    us(h.value_at_quantile(0.99)),
                ));
                last = (e, d);
                next_report += Duration::from_secs(1);
            }
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
        let seconds = t0.elapsed().as_secs_f64();
        let mut cpu = procs.finish();
        let expected = published * self.shape.members as u64;
        // Wait for what is in flight: until everything arrived, or nothing
        // arrived for a second, or five seconds passed.
        let drain = Instant::now();
        let mut seen = (stats.delivered.get(), Instant::now());
        while stats.delivered.get() < expected
            && drain.elapsed() < Duration::from_secs(5)
            && seen.1.elapsed() < Duration::from_secs(1)
        {
            monoio::time::sleep(Duration::from_millis(5)).await;
            if stats.delivered.get() != seen.0 {
                seen = (stats.delivered.get(), Instant::now());
            }
        }
        // Server CPU covers the drain too (it is still delivering then).
        cpu.server_cpu_s = procs.finish().server_cpu_s;
        stats.counting.set(false);
        progress_done();
        // Pause between steps so that one step's backlog does not spill
        // into the next.
        monoio::time::sleep(Duration::from_millis(300)).await;
        let closed = stats.closed.get() + self.pub_stats.closed.get();
        let first_close = stats
            .first_close
            .borrow()
            .clone()
            .or_else(|| self.pub_stats.first_close.borrow().clone());
        StepResult {
            rate,
            seconds,
            published,
            expected,
            delivered: stats.delivered.get(),
            closed,
            first_close,
            latency: percentiles(&stats.hist.borrow()),
            cpu,
        }
    }
}

async fn echo(ctx: &Rc<Ctx>, n: usize, dur: Duration) -> Result<Value, BenchError> {
    let conns = open_all(ctx, n, Rc::new(|i| Some(format!("echo{i}"))), "echo").await?;
    monoio::time::sleep(Duration::from_millis(200)).await;
    let stats = Stats::new();
    stats.counting.set(true);
    let deadline = Instant::now() + dur;
    let procs = Procs::start(&ctx.common.server_pid);
    let t0 = Instant::now();
    let mut handles = vec![];
    for (i, c) in conns.into_iter().enumerate() {
        let (ctx, stats) = (ctx.clone(), stats.clone());
        handles.push(monoio::spawn(async move {
            if let Err(e) = echo_loop(&ctx, c, i, &stats, deadline).await {
                stats.lost_connection(e);
            }
        }));
    }
    let ticker = {
        let stats = stats.clone();
        monoio::spawn(async move {
            let mut last = 0;
            while Instant::now() + Duration::from_secs(1) < deadline {
                monoio::time::sleep(Duration::from_secs(1)).await;
                let d = stats.delivered.get();
                progress(&format!(
                    "echo: {:>3.0} s  {} round trips ({}/s)  p99 {}",
                    t0.elapsed().as_secs_f64(),
                    d,
                    si((d - last) as f64),
                    us(stats.hist.borrow().value_at_quantile(0.99))
                ));
                last = d;
            }
        })
    };
    for h in handles {
        h.await;
    }
    ticker.await;
    progress_done();
    let seconds = t0.elapsed().as_secs_f64();
    let cpu = procs.finish();
    let trips = stats.delivered.get();
    let lat = percentiles(&stats.hist.borrow());
    let per_s = trips as f64 / seconds;
    let cpu_per = cpu.server_cpu_s.map(|s| s * 1e6 / trips.max(1) as f64);
    let bound = cpu.loadgen_core_share >= LOADGEN_BOUND_SHARE;
    eprintln!(
        "echo: {n} connections, {trips} round trips in {seconds:.1} s = {}/s; closed {}\n  latency p50 {} p90 {} p99 {} p99.9 {} max {}\n  server CPU {}; load generator {:.0}% of a core{}",
        si(per_s),
        stats.closed.get(),
        us(lat.p50),
        us(lat.p90),
        us(lat.p99),
        us(lat.p999),
        us(lat.max),
        cpu_per.map_or("not measured (give --server-pid)".into(), |c| format!("{c:.2} µs per round trip")),
        cpu.loadgen_core_share * 100.0,
        if bound { " -- BOUND BY THE LOAD GENERATOR" } else { "" }
    );
    Ok(json!({
        "workload": "echo",
        "target": ctx.common.url,
        "protocol": ctx.common.protocol.name(),
        "connections": n,
        "payload": ctx.common.payload,
        "seconds": seconds,
        "round_trips": trips,
        "round_trips_per_s": per_s.round(),
        "closed_connections": stats.closed.get(),
        "first_close": *stats.first_close.borrow(),
        "latency_us": lat,
        "server_cpu_us_per_round_trip": cpu_per,
        "server_core_share": cpu.server_core_share,
        "loadgen_core_share": cpu.loadgen_core_share,
        "loadgen_bound": bound,
    }))
}

/// One echo connection: send, wait for the message to come back, repeat.
async fn echo_loop(
    ctx: &Ctx,
    c: Conn,
    i: usize,
    stats: &Stats,
    deadline: Instant,
) -> Result<(), String> {
    let Conn {
        mut stream,
        mut reader,
    } = c;
    let mut masker = Masker::new();
    let room = format!("echo{i}");
    let p = ctx.common.protocol;
    let mut out = Vec::with_capacity(256);
    while Instant::now() < deadline {
        let sent = ctx.stamp();
        out.clear();
        ctx.publish(&mut out, &mut masker, &room, sent);
        let (r, b) = stream.write_all(out).await;
        out = b;
        r.map_err(|e| format!("write error: {e}"))?;
        loop {
            let mut pong = Vec::new();
            let mut back = false;
            while let Some(f) = reader.next().map_err(|e| format!("protocol error: {e}"))? {
                match f.opcode {
                    OpCode::Text | OpCode::Binary if stamp_of(p, f.payload) == Some(sent) => {
                        stats.delivery(sent, ctx.stamp());
                        back = true;
                    }
                    OpCode::Ping => masker.append(&mut pong, OpCode::Pong, f.payload),
                    OpCode::Close => return Err("closed by the server".into()),
                    _ => {}
                }
            }
            if !pong.is_empty() {
                let (r, _) = stream.write_all(pong).await;
                r.map_err(|e| format!("write error: {e}"))?;
            }
            if back {
                break;
            }
            read_more(&mut stream, &mut reader, LOAD_READ).await?;
        }
    }
    Ok(())
}

/// A reconnect storm: every connection opens, authenticates and joins its
/// channel, `--connect-parallel` at a time.
async fn connect(
    ctx: &Rc<Ctx>,
    n: usize,
    channels: usize,
    hold: Duration,
) -> Result<Value, BenchError> {
    let procs = Procs::start(&ctx.common.server_pid);
    let t0 = Instant::now();
    let conns = open_all(
        ctx,
        n,
        Rc::new(move |i| Some(format!("storm{}", i % channels))),
        "connect",
    )
    .await?;
    let joined_s = t0.elapsed().as_secs_f64();
    let cpu = procs.finish();
    let stats = Stats::new();
    for c in conns {
        start(c, stats.clone(), ctx.clone(), false, IDLE_READ);
    }
    monoio::time::sleep(hold).await;
    let per_connect_us = cpu.server_cpu_s.map(|s| s * 1e6 / n as f64);
    eprintln!(
        "connect: {n} connections over {} node(s) joined {channels} channels in {joined_s:.2} s ({}/s), {} parallel; server CPU {}; load generator {:.0}% of its core; {} closed while held",
        ctx.urls.len(),
        si(n as f64 / joined_s),
        ctx.common.connect_parallel,
        per_connect_us.map_or("not measured (give --server-pid)".to_string(), |u| format!("{u:.1} µs per connect")),
        cpu.loadgen_core_share * 100.0,
        stats.closed.get()
    );
    Ok(json!({
        "workload": "connect",
        "target": ctx.common.url,
        "protocol": ctx.common.protocol.name(),
        "connections": n,
        "channels": channels,
        "connect_parallel": ctx.common.connect_parallel,
        "joined_seconds": joined_s,
        "connects_per_s": (n as f64 / joined_s).round(),
        "server_cpu_s": cpu.server_cpu_s,
        "server_cpu_us_per_connect": per_connect_us,
        "loadgen_core_share": cpu.loadgen_core_share,
        "closed_connections": stats.closed.get(),
    }))
}

async fn idle(
    ctx: &Rc<Ctx>,
    n: usize,
    hold: Duration,
    room_size: usize,
) -> Result<Value, BenchError> {
    let pid = ctx.common.server_pid.first().copied();
    let server_before = pid.and_then(|p| report::rss_bytes(Some(p)));
    let own_before = report::rss_bytes(None);
    if pid.is_some() && server_before.is_none() {
        return Err(BenchError(format!(
            "cannot read /proc/{}/status: is the server on this host?",
            pid.unwrap_or(0)
        )));
    }
    let procs = Procs::start(&ctx.common.server_pid);
    let t0 = Instant::now();
    let room = move |i: usize| (room_size > 0).then(|| format!("idle{}", i / room_size));
    let conns = open_all(ctx, n, Rc::new(room), "idle").await?;
    let open_s = t0.elapsed().as_secs_f64();
    // What opening cost each side: the open time is the load generator's
    // when it was the busier one.
    let cpu = procs.finish();
    let per_open_us = cpu.server_cpu_s.map(|s| s * 1e6 / n as f64);
    let stats = Stats::new();
    for c in conns {
        start(c, stats.clone(), ctx.clone(), false, IDLE_READ);
    }
    eprintln!(
        "idle: {n} connections open in {open_s:.2} s ({}/s) from {} source address(es); server CPU {}; load generator {:.0}% of its core; holding {:.0} s",
        si(n as f64 / open_s),
        ctx.sources,
        per_open_us.map_or("not measured".to_string(), |u| format!("{u:.1} µs per connection opened")),
        cpu.loadgen_core_share * 100.0,
        hold.as_secs_f64()
    );
    // Let the server settle, then read its memory; keep holding.
    let settle = hold.min(Duration::from_secs(2));
    monoio::time::sleep(settle).await;
    let server_after = pid.and_then(|p| report::rss_bytes(Some(p)));
    let own_after = report::rss_bytes(None);
    let end = Instant::now() + hold.saturating_sub(settle);
    while Instant::now() < end && stats.closed.get() == 0 {
        let left = end.saturating_duration_since(Instant::now());
        progress(&format!(
            "idle: holding {n} connections, {:.0} s left, {} closed",
            left.as_secs_f64(),
            stats.closed.get()
        ));
        monoio::time::sleep(left.min(Duration::from_secs(1))).await;
    }
    progress_done();
    let per = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => Some((b as f64 - a as f64) / n as f64),
        _ => None,
    };
    let server_per = per(server_before, server_after);
    let own_per = per(own_before, own_after);
    eprintln!(
        "idle: {n} connections held; closed {}{}\n  server RSS {}\n  load generator RSS {:.0} bytes per connection",
        stats.closed.get(),
        stats
            .first_close
            .borrow()
            .as_ref()
            .map_or(String::new(), |w| format!(" (first: {w})")),
        match (server_before, server_after, server_per) {
            (Some(a), Some(b), Some(p)) => format!(
                "{:.1} MB -> {:.1} MB = {p:.0} bytes per connection",
                a as f64 / 1e6,
                b as f64 / 1e6
            ),
            _ => "not measured (give --server-pid)".into(),
        },
        own_per.unwrap_or(0.0)
    );
    Ok(json!({
        "workload": "idle",
        "target": ctx.common.url,
        "protocol": ctx.common.protocol.name(),
        "connections": n,
        "room_size": room_size,
        "source_ips": ctx.sources,
        "open_seconds": open_s,
        "connects_per_s": (n as f64 / open_s).round(),
        "open_server_cpu_s": cpu.server_cpu_s,
        "server_cpu_us_per_open": per_open_us,
        "open_loadgen_core_share": cpu.loadgen_core_share,
        "closed_connections": stats.closed.get(),
        "server_rss_before": server_before,
        "server_rss_after": server_after,
        "server_rss_bytes_per_connection": server_per.map(f64::round),
        "loadgen_rss_bytes_per_connection": own_per.map(f64::round),
    }))
}
