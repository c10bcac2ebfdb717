//! The IO shell of one shard: a monoio runtime pinned to one core.
//!
//! A shard runs four kinds of task, all on its own thread:
//! - the **accept loop** on its own SO_REUSEPORT listener;
//! - one **connection task** per socket: handshake (or a plain HTTP
//!   request), then the read loop that decodes frames and feeds the engine,
//!   plus that connection's **writer** ([`conn::writer`]);
//! - the **mesh drain**: pops messages from other shards in batches, feeds
//!   them to the engine, and parks on the doorbell when there are none;
//! - the **sweep**: pings quiet connections, closes unresponsive and
//!   unauthenticated ones, shuts sockets whose close handshake timed out.
//!
//! The engine and the outbox sit in `RefCell`s; a borrow never spans an
//! `await`, and only this thread touches them.

pub mod conn;
pub mod sync;
mod uring;

#[doc(hidden)]
pub use uring::fuzz_session;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::{TcpListener, TcpStream};
use monoio::{LegacyDriver, RuntimeBuilder};

use crate::access::Identity;
use crate::admission::{self, Refusal, Slots};
use crate::clock::{now_ms, random_u64};
use crate::engine::{ConnId, Engine, Member, MeshMsg, MeshTx, SessionId, ShardId};
use crate::logs::Throttle;
use crate::metrics::ShardMetrics;
use crate::node::Node;
use crate::protocol::{
    self, binary, json, AckBody, ClientEvent, DecodeError, DeviceKind, Empty, ErrorCode, Protocol,
    Ready, ServerEvent, ServerMessage,
};
use crate::ws::handshake::{self, HandshakeConfig, Request, Upgrade};
use crate::ws::{close, frame, Decoder, Message, OpCode};
use conn::{ConnIo, Outq, State, NEVER};
use sync::{yield_now, Signal};

/// Mesh messages a shard may hold back (queues full) before its connections
/// stop reading: TCP then pushes back on the clients.
const OUTBOX_HIGH: usize = 65_536;
/// Mesh messages taken from each source per drain round before other
/// tasks get a turn.
const DRAIN_BATCH: usize = 4096;
/// Empty drain rounds (yielding to other tasks) before parking: a short spin
/// keeps hand-offs under a microsecond when traffic is steady.
const SPIN_ROUNDS: u32 = 16;

/// Messages for other shards that did not fit their queue yet.
pub struct Outbox {
    node: Arc<Node>,
    me: ShardId,
    pending: Vec<VecDeque<MeshMsg>>,
    backlog: usize,
    dirty: Vec<ShardId>,
}

impl MeshTx for Outbox {
    fn send(&mut self, to: ShardId, msg: MeshMsg) {
        let q = &mut self.pending[to as usize];
        if q.is_empty() {
            match self.node.mesh.try_push(self.me, to, msg) {
                Ok(()) => return self.mark(to),
                Err(m) => q.push_back(m),
            }
        } else {
            q.push_back(msg);
        }
        self.backlog += 1;
    }
}

impl Outbox {
    fn mark(&mut self, to: ShardId) {
        if !self.dirty.contains(&to) {
            self.dirty.push(to);
        }
    }

    /// Moves held-back messages into their queues and rings each receiver
    /// that got something, once.
    fn flush(&mut self) {
        if self.backlog > 0 {
            for to in 0..self.pending.len() {
                while let Some(m) = self.pending[to].pop_front() {
                    match self.node.mesh.try_push(self.me, to as ShardId, m) {
                        Ok(()) => {
                            self.backlog -= 1;
                            self.mark(to as ShardId);
                        }
                        Err(m) => {
                            self.pending[to].push_front(m);
                            break;
                        }
                    }
                }
            }
        }
        for to in self.dirty.drain(..) {
            self.node.mesh.wake(to);
        }
    }
}

/// Every connection past its handshake, for the sweep and for shutdown.
#[derive(Default)]
struct Registry {
    slots: Vec<Option<Rc<ConnIo>>>,
    free: Vec<usize>,
    live: usize,
}

impl Registry {
    fn insert(&mut self, io: Rc<ConnIo>) -> usize {
        self.live += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(io);
                i
            }
            None => {
                self.slots.push(Some(io));
                self.slots.len() - 1
            }
        }
    }

    fn remove(&mut self, i: usize) {
        if self.slots[i].take().is_some() {
            self.live -= 1;
            self.free.push(i);
        }
    }
}

pub struct Shard {
    pub id: ShardId,
    node: Arc<Node>,
    engine: RefCell<Engine<Rc<ConnIo>>>,
    outbox: RefCell<Outbox>,
    /// The outbound side every connection shares: frame arena, clock base.
    outq: Rc<Outq>,
    registry: RefCell<Registry>,
    scratch: RefCell<json::Scratch>,
    handshake: HandshakeConfig,
    draining: Signal,
    stop: Signal,
    session_counter: Cell<u64>,
    /// Open sockets, handshakes included (the epoll driver's count; the
    /// io_uring loop keeps its own).
    sockets: Cell<usize>,
    /// Bytes buffered for connections not authenticated yet (request
    /// heads, partial frames), within `max_preauth_bytes_per_shard`.
    preauth_bytes: Cell<usize>,
    logs: ShardLogs,
}

/// The log lines of a shard that could repeat without end, throttled.
#[derive(Default)]
struct ShardLogs {
    accept: Throttle,
    submit: Throttle,
    bell: Throttle,
}

/// Counts a socket of the epoll driver while it lives: in its shard, in
/// the node's budget, and against its address until its session takes
/// that over.
struct SocketCount {
    shard: Rc<Shard>,
    within_budget: bool,
    ip: Slots,
}

impl SocketCount {
    fn new(shard: &Rc<Shard>) -> SocketCount {
        shard.sockets.set(shard.sockets.get() + 1);
        SocketCount {
            shard: shard.clone(),
            within_budget: shard.node.socket_opened(),
            ip: Slots::default(),
        }
    }
}

impl Drop for SocketCount {
    fn drop(&mut self) {
        let s = &self.shard;
        s.sockets.set(s.sockets.get() - 1);
        s.node.socket_closed();
        s.node.admission.release_ip(std::mem::take(&mut self.ip));
    }
}

impl Shard {
    fn metrics(&self) -> &ShardMetrics {
        &self.node.metrics[self.id as usize]
    }

    fn new(id: usize, node: Arc<Node>) -> Rc<Shard> {
        let n = node.shards();
        let mut engine = Engine::new(
            id as ShardId,
            n as u16,
            node.config.engine_settings(),
            node.metrics[id].clone(),
            random_u64(),
        );
        let verifier = node.clone();
        engine.set_subscription_check(Box::new(move |token, user, channel| {
            verifier.verifier.check_subscription(token, user, channel)
        }));
        engine.load_bans(node.initial_bans.iter().cloned(), now_ms());
        if let Some(store) = node.ban_store {
            engine.set_ban_store(store);
        }
        if let Some((node_id, _)) = &node.cluster {
            engine.set_cluster(crate::mesh::bridge_endpoint(n), *node_id);
        }
        Rc::new(Shard {
            id: id as ShardId,
            engine: RefCell::new(engine),
            outbox: RefCell::new(Outbox {
                node: node.clone(),
                me: id as ShardId,
                pending: (0..node.mesh.endpoints())
                    .map(|_| VecDeque::new())
                    .collect(),
                backlog: 0,
                dirty: Vec::new(),
            }),
            registry: RefCell::new(Registry::default()),
            outq: Outq::new(node.clone(), id),
            scratch: RefCell::new(json::Scratch::default()),
            handshake: HandshakeConfig {
                allowed_origins: node.config.allowed_origins.clone(),
                max_header_bytes: node.config.max_header_bytes,
            },
            draining: Signal::default(),
            stop: Signal::default(),
            session_counter: Cell::new(0),
            sockets: Cell::new(0),
            preauth_bytes: Cell::new(0),
            logs: ShardLogs::default(),
            node,
        })
    }

    /// A connection not authenticated yet now buffers `after` bytes instead
    /// of `before`. False when that grew the shard's total past
    /// `max_preauth_bytes_per_shard`: the caller closes the connection,
    /// which gives its bytes back.
    fn preauth_change(&self, before: usize, after: usize) -> bool {
        if before == after {
            return true;
        }
        let total = self.preauth_bytes.get() - before + after;
        self.preauth_bytes.set(total);
        let m = self.metrics();
        m.preauth_bytes.set(total as u64);
        if after > before && total > self.node.config.max_preauth_bytes_per_shard {
            m.preauth_closes.inc();
            tracing::debug!(
                shard = self.id,
                preauth_bytes = total,
                "closed a connection: too many bytes buffered before authentication"
            );
            return false;
        }
        true
    }

    fn new_session_id(&self) -> SessionId {
        let n = self.session_counter.get() + 1;
        self.session_counter.set(n);
        SessionId(random_u64(), n)
    }
}

/// Runs shard `id` on the current thread until the node has drained.
pub fn run(
    id: usize,
    node: Arc<Node>,
    listener: std::net::TcpListener,
    bell: StdUnixStream,
) -> std::io::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if let Err(e) = monoio::utils::bind_to_cpu_set([id % cores]) {
        tracing::warn!(shard = id, error = ?e, "could not pin shard to its core");
    }
    let driver = node.config.io_driver.clone();
    let (listener, bell) = if driver == "epoll" {
        (listener, bell)
    } else {
        match uring::run(id, node.clone(), listener, bell) {
            Ok(result) => return result,
            Err((e, listener, bell)) if driver == "auto" => {
                tracing::warn!(shard = id, error = %e, "io_uring is unavailable; falling back to epoll");
                (listener, bell)
            }
            Err((e, ..)) => return Err(e),
        }
    };
    let mut rt = RuntimeBuilder::<LegacyDriver>::new()
        .enable_timer()
        .build()?;
    rt.block_on(shard_main(id, node, listener, bell, "epoll"))
}

async fn shard_main(
    id: usize,
    node: Arc<Node>,
    listener: std::net::TcpListener,
    bell: StdUnixStream,
    driver: &'static str,
) -> std::io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    let bell = monoio::net::UnixStream::from_std(bell)?;
    let shard = Shard::new(id, node);
    monoio::spawn(drain_mesh(shard.clone(), bell));
    monoio::spawn(sweep(shard.clone()));
    monoio::spawn(engine_timers(shard.clone()));
    monoio::spawn(accept_loop(shard.clone(), listener));
    shard.node.shard_started(id, driver);
    tracing::info!(shard = id, io_driver = driver, "shard started");

    shard.draining.wait().await;
    let live = shard.registry.borrow().live;
    tracing::info!(
        shard = id,
        connections = live,
        "draining: closing connections with 1001"
    );
    for io in shard.registry.borrow().slots.iter().flatten() {
        io.close(close::GOING_AWAY, "server shutting down");
    }
    let deadline = Instant::now() + Duration::from_millis(shard.node.config.shutdown_timeout_ms);
    while shard.registry.borrow().live > 0 && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    for io in shard.registry.borrow().slots.iter().flatten() {
        io.abort();
    }
    shard.stop.set();
    tracing::info!(shard = id, "shard stopped");
    Ok(())
}

async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    loop {
        monoio::select! {
            _ = shard.stop.wait() => break,
            res = listener.accept() => match res {
                Ok((stream, _addr)) => {
                    let _ = stream.set_nodelay(true);
                    monoio::spawn(serve_socket(shard.clone(), stream));
                }
                Err(e) => {
                    if let Some(suppressed) = shard.logs.accept.allow(shard.outq.now_ms()) {
                        tracing::warn!(shard = shard.id, error = %e, suppressed, "accept failed");
                    }
                    monoio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

async fn drain_mesh(shard: Rc<Shard>, mut bell: monoio::net::UnixStream) {
    let node = shard.node.clone();
    let me = shard.id;
    let mut buf = vec![0u8; 64];
    let mut idle = 0u32;
    loop {
        let got = shard.drain_mesh();
        if node.is_draining() && !shard.draining.is_set() {
            shard.draining.set();
        }
        if shard.stop.is_set() {
            return;
        }
        if got > 0 {
            idle = 0;
            yield_now().await;
            continue;
        }
        if shard.outbox.borrow().backlog > 0 {
            monoio::time::sleep(Duration::from_micros(50)).await;
            continue;
        }
        if idle < SPIN_ROUNDS {
            idle += 1;
            yield_now().await;
            continue;
        }
        idle = 0;
        if !node.mesh.park(me) {
            continue;
        }
        let (res, b) = bell.read(buf).await;
        buf = b;
        node.mesh.unpark(me);
        if !matches!(res, Ok(n) if n > 0) {
            return;
        }
    }
}

async fn sweep(shard: Rc<Shard>) {
    let tick = shard.sweep_tick();
    let ping = frame::encode(OpCode::Ping, b"");
    loop {
        monoio::time::sleep(tick).await;
        if shard.stop.is_set() {
            return;
        }
        let now = shard.outq.now_ms();
        for io in shard.registry.borrow().slots.iter().flatten() {
            shard.check_keepalive(io, now, &ping);
        }
    }
}

/// Runs the engine's deadlines (epoll driver; the io_uring loop checks them
/// every round). Wakes at the next deadline, or every 100 ms to notice new
/// ones.
async fn engine_timers(shard: Rc<Shard>) {
    loop {
        let wait = shard
            .engine_wait()
            .unwrap_or(Duration::from_millis(100))
            .clamp(Duration::from_millis(1), Duration::from_millis(100));
        monoio::time::sleep(wait).await;
        if shard.stop.is_set() {
            return;
        }
        shard.tick_engine();
    }
}

async fn write_and_close(mut stream: TcpStream, response: Vec<u8>) {
    let (_, _) = stream.write_all(response).await;
    let _ = stream.shutdown().await;
}

/// Why no request head came.
enum HeadError {
    /// The peer went away or missed the deadline.
    Gone,
    Invalid(handshake::HandshakeError),
    /// The shard's budget for bytes of unauthenticated connections is spent.
    Busy,
}

/// Reads the request head within the handshake deadline.
async fn read_request(
    shard: &Shard,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    held: &mut PreAuth,
) -> Result<(Request, usize), HeadError> {
    let cfg = &shard.handshake;
    let deadline = Duration::from_millis(shard.node.config.handshake_timeout_ms);
    let read = async {
        loop {
            if buf.capacity() - buf.len() < 512 {
                buf.reserve(2048);
            }
            if !held.set(buf.capacity()) {
                return Err(HeadError::Busy);
            }
            let (len, cap) = (buf.len(), buf.capacity());
            let owned = std::mem::take(buf);
            let (res, slice) = stream.read(owned.slice_mut(len..cap)).await;
            *buf = slice.into_inner();
            match res {
                Ok(0) | Err(_) => return Err(HeadError::Gone),
                Ok(_) => {}
            }
            match handshake::parse_request(buf, cfg) {
                Ok(None) => continue,
                Ok(Some(r)) => return Ok(r),
                Err(e) => return Err(HeadError::Invalid(e)),
            }
        }
    };
    match monoio::time::timeout(deadline, read).await {
        Ok(r) => r,
        Err(_) => {
            shard.metrics().handshake_timeouts.inc();
            Err(HeadError::Gone)
        }
    }
}

/// The bytes an epoll connection holds before it has authenticated, counted
/// in its shard's budget while it lives.
struct PreAuth {
    shard: Rc<Shard>,
    held: usize,
}

impl PreAuth {
    fn new(shard: &Rc<Shard>) -> PreAuth {
        PreAuth {
            shard: shard.clone(),
            held: 0,
        }
    }

    /// Counts `n` bytes instead of what was counted; false when that spent
    /// the shard's budget.
    fn set(&mut self, n: usize) -> bool {
        let ok = self.shard.preauth_change(self.held, n);
        self.held = n;
        ok
    }
}

impl Drop for PreAuth {
    fn drop(&mut self) {
        self.shard.preauth_change(self.held, 0);
    }
}

/// What to do with a parsed request.
enum Routed {
    /// Answer, then close (plain HTTP requests and refusals).
    Reply(Vec<u8>),
    /// Switch protocols: write the 101 response, then speak WebSocket.
    Accept(Box<Accepted>),
}

impl Shard {
    /// Decides on a complete request: plain HTTP, refusal, or upgrade (with
    /// the user when the request carried a valid token).
    /// `ip` holds what the socket counts against its address (from the
    /// accept); an accepted upgrade takes it into its session.
    fn route(&self, req: Request, peer: IpAddr, ip: &mut Slots) -> Routed {
        let up = match req {
            Request::Plain(p) => return Routed::Reply(plain_http(&self.node, &p.method, &p.path)),
            Request::Upgrade(up) => up,
        };
        let echo = match up.path.as_str() {
            "/" | "/ws" => false,
            "/echo" if self.node.config.echo_endpoint => true,
            _ => {
                return Routed::Reply(handshake::http_response(
                    404,
                    "",
                    "text/plain",
                    b"not_found",
                ))
            }
        };
        if self.node.is_draining() {
            let http = handshake::http_response(503, "", "text/plain", b"draining");
            return self.refuse_upgrade(&up, http, close::GOING_AWAY, "draining");
        }
        let device = match up.device.as_deref() {
            None => DeviceKind::Web,
            Some(d) => match DeviceKind::parse(d) {
                Some(k) => k,
                None => {
                    return Routed::Reply(handshake::http_response(
                        400,
                        "",
                        "text/plain",
                        b"bad_device: device must be desktop, mobile or web",
                    ))
                }
            },
        };
        let node = &self.node;
        if up.forwarded_for.is_some()
            && node.trusted_proxies.is_empty()
            && !node.forwarded_warned.swap(true, Relaxed)
        {
            tracing::warn!(
                "upgrade requests carry X-Forwarded-For but trusted_proxies is empty: per-IP limits count the proxy's address"
            );
        }
        let client = admission::client_ip(peer, up.forwarded_for.as_deref(), &node.trusted_proxies);
        if let Err(refusal) = node.admission.admit_upgrade(client, ip, now_ms()) {
            self.metrics().refused[refusal.index()].inc();
            return self.refuse_upgrade(&up, refusal.response(), close::TOO_MANY, refusal.reason());
        }
        let refuse = |status: u16, code: u16, reason: &str| {
            let http = handshake::http_response(status, "", "text/plain", reason.as_bytes());
            self.refuse_upgrade(&up, http, code, reason)
        };
        let token = up.bearer.as_deref().or(up.query_token.as_deref());
        let user = match (token, echo) {
            (Some(t), false) => match node.verifier.identify(t) {
                Ok(identity) => {
                    let ban = self.engine.borrow().server_ban(&identity.user, now_ms());
                    if let Some(why) = ban {
                        self.metrics().auth_failures.inc();
                        return refuse(403, close::BANNED, &format!("banned: {why}"));
                    }
                    Some(identity)
                }
                Err(e) => {
                    self.metrics().auth_failures.inc();
                    tracing::debug!(shard = self.id, error = %e, "handshake token refused");
                    return refuse(401, close::UNAUTHORIZED, &e.0);
                }
            },
            _ => None,
        };
        let response = handshake::accept_response(&up);
        Routed::Accept(Box::new(Accepted {
            websocket_refusals: self.websocket_refusals(&up),
            up,
            echo,
            user,
            device,
            response,
            ip: std::mem::take(ip),
        }))
    }

    /// Whether refusals of this upgrade take the WebSocket form (see
    /// `upgrade_refusals`): by default, for browsers, which cannot read an
    /// HTTP refusal and would see only 1006.
    fn websocket_refusals(&self, up: &Upgrade) -> bool {
        match self.node.config.upgrade_refusals.as_str() {
            "websocket" => true,
            "http" => false,
            _ => up.has_origin,
        }
    }

    /// An upgrade refused: the HTTP response `http`, or, in the WebSocket
    /// form, the upgrade accepted and closed at once with `code` and
    /// `reason` (no session is opened, and the socket is closed once they
    /// are written).
    fn refuse_upgrade(&self, up: &Upgrade, http: Vec<u8>, code: u16, reason: &str) -> Routed {
        if !self.websocket_refusals(up) {
            return Routed::Reply(http);
        }
        let mut r = handshake::accept_response(up);
        r.extend_from_slice(&frame::encode(OpCode::Close, &close::payload(code, reason)));
        Routed::Reply(r)
    }

    /// Whether a socket just accepted from `peer` may stay: the shard holds
    /// `sockets` of them, the node was `within_budget` of its open files,
    /// and the peer's address is under its cap (from the accept on, before
    /// anything is read). On success, what it counts against its address.
    fn admit_socket(
        &self,
        sockets: usize,
        within_budget: bool,
        peer: IpAddr,
    ) -> Result<Slots, Refusal> {
        let node = &self.node;
        let admitted = if !within_budget || node.admission.shard_full(sockets) {
            Err(Refusal::ServerFull)
        } else {
            let trusted = node.trusted_proxies.iter().any(|n| n.contains(peer));
            node.admission.admit_socket(peer, trusted)
        };
        if let Err(r) = admitted {
            self.metrics().refused[r.index()].inc();
        }
        admitted
    }

    /// Takes what other shards sent, up to a batch from each, and passes
    /// it to the engine. Returns how many messages it took.
    fn drain_mesh(&self) -> usize {
        let node = &self.node;
        let mut got = 0;
        {
            let mut engine = self.engine.borrow_mut();
            let mut outbox = self.outbox.borrow_mut();
            let now = now_ms();
            for from in 0..node.mesh.endpoints() as ShardId {
                while got < DRAIN_BATCH {
                    let Some(m) = node.mesh.pop(from, self.id) else {
                        break;
                    };
                    engine.handle_mesh(m, now, &mut *outbox);
                    got += 1;
                }
            }
            outbox.flush();
        }
        self.metrics().mesh_messages_in.add(got as u64);
        got
    }

    /// The sweep's verdict on one open or closing connection: pings a quiet
    /// one, closes one that missed its pong or its `auth`, shuts one whose
    /// close handshake timed out.
    fn check_keepalive(&self, io: &ConnIo, now: u64, ping: &bytes::Bytes) {
        let c = &self.node.config;
        let since = |t: u64| now.saturating_sub(t);
        match io.state() {
            State::Done => {}
            State::Closing => {
                let t = io.closing_since.get();
                if t != NEVER && since(t) >= c.close_timeout_ms {
                    io.abort();
                }
            }
            State::Open => {
                if now >= io.auth_deadline.get() {
                    self.metrics().auth_failures.inc();
                    let msg = ServerMessage::error(
                        None,
                        ErrorCode::Unauthorized,
                        "no `auth` message in time",
                    );
                    io.push_data(&protocol::encode_frame(Protocol::Json, &msg));
                    io.close(close::UNAUTHORIZED, "authentication timeout");
                } else if io.ping_sent.get() != NEVER {
                    if since(io.ping_sent.get()) >= c.ping_timeout_ms {
                        self.metrics().keepalive_closes.inc();
                        io.close(close::POLICY_VIOLATION, "ping timeout");
                    }
                } else if since(io.last_rx.get()) >= c.ping_interval_ms {
                    io.ping_sent.set(now);
                    io.push_control(ping.clone());
                }
            }
        }
    }

    /// Runs the engine's deadlines that are due (typing expiry, presence
    /// grace, ringing calls, …).
    fn tick_engine(&self) {
        let Some(due) = self.engine.borrow().next_deadline() else {
            return;
        };
        let now = now_ms();
        if now < due {
            return;
        }
        let mut outbox = self.outbox.borrow_mut();
        self.engine.borrow_mut().tick(now, &mut *outbox);
        outbox.flush();
    }

    /// Time until the engine's next deadline, if it has one.
    fn engine_wait(&self) -> Option<Duration> {
        let due = self.engine.borrow().next_deadline()?;
        Some(Duration::from_millis(due.saturating_sub(now_ms())))
    }

    /// How often the sweep runs: a quarter of the shortest timeout.
    fn sweep_tick(&self) -> Duration {
        let c = &self.node.config;
        let ms = [
            c.ping_interval_ms,
            c.ping_timeout_ms,
            c.close_timeout_ms,
            c.auth_timeout_ms,
        ]
        .into_iter()
        .min()
        .unwrap_or(1000)
        .div_ceil(4)
        .clamp(10, 1000);
        Duration::from_millis(ms)
    }
}

async fn serve_socket(shard: Rc<Shard>, stream: TcpStream) {
    let mut count = SocketCount::new(&shard);
    let peer = stream
        .peer_addr()
        .map_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |a| a.ip());
    match shard.admit_socket(shard.sockets.get(), count.within_budget, peer) {
        Ok(ip) => count.ip = ip,
        // Past the node's open files, the socket goes at once: lingering
        // would hold the descriptors the headroom is for.
        Err(r) if !count.within_budget => return write_and_close(stream, r.response()).await,
        Err(r) => return refuse_at_accept(stream, r.response()).await,
    }
    let mut stream = stream;
    let mut buf = BytesMut::with_capacity(2048);
    let mut held = PreAuth::new(&shard);
    let (req, consumed) = match read_request(&shard, &mut stream, &mut buf, &mut held).await {
        Ok(r) => r,
        Err(HeadError::Gone) => return,
        Err(HeadError::Invalid(e)) => {
            shard.metrics().handshake_failures[e.index()].inc();
            return write_and_close(stream, e.response()).await;
        }
        Err(HeadError::Busy) => {
            return write_and_close(stream, Refusal::ServerFull.response()).await
        }
    };
    let _ = buf.split_to(consumed);
    let accepted = match shard.route(req, peer, &mut count.ip) {
        Routed::Reply(r) => return write_and_close(stream, r).await,
        Routed::Accept(a) => a,
    };
    // The WebSocket phase runs as a task of its own, so that the handshake's
    // state (its buffer, timer and parser) is freed rather than carried for
    // the life of the connection.
    if buf.is_empty() {
        buf = BytesMut::new();
    }
    monoio::spawn(serve_ws(shard, stream, buf, accepted, count, held));
}

/// An upgrade the shard accepted (its 101 response not yet written).
pub(super) struct Accepted {
    /// A later refusal (by the per-user cap) takes the WebSocket form.
    websocket_refusals: bool,
    up: Upgrade,
    echo: bool,
    user: Option<Identity>,
    device: DeviceKind,
    response: Vec<u8>,
    ip: Slots,
}

/// Answers a socket refused before its request was read, then reads what
/// the client sends for a moment, so that closing does not reset the
/// connection before the client has read the answer.
async fn refuse_at_accept(mut stream: TcpStream, response: Vec<u8>) {
    let (res, _) = stream.write_all(response).await;
    if res.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let drain = async {
        let mut buf = vec![0u8; 4096];
        loop {
            let (res, b) = stream.read(buf).await;
            buf = b;
            if !matches!(res, Ok(n) if n > 0) {
                break;
            }
        }
    };
    let _ = monoio::time::timeout(Duration::from_secs(1), drain).await;
}

fn plain_http(node: &Node, method: &str, path: &str) -> Vec<u8> {
    let mut response = plain_http_body(node, method, path);
    if method == "HEAD" {
        // Same headers (Content-Length included), no body.
        if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
            response.truncate(end + 4);
        }
    }
    response
}

fn plain_http_body(node: &Node, method: &str, path: &str) -> Vec<u8> {
    let path = path.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return handshake::http_response(
            405,
            "Allow: GET\r\n",
            "text/plain",
            b"method_not_allowed",
        );
    }
    match path {
        "/health" => handshake::http_response(200, "", "text/plain", b"ok\n"),
        "/ready" if node.is_ready() => handshake::http_response(200, "", "text/plain", b"ready\n"),
        "/ready" => handshake::http_response(
            503,
            "",
            "text/plain",
            format!("{}\n", node.state_name()).as_bytes(),
        ),
        "/metrics" => handshake::http_response(
            200,
            "",
            "text/plain; version=0.0.4",
            node.metrics_text().as_bytes(),
        ),
        _ => handshake::http_response(404, "", "text/plain", b"not_found"),
    }
}

/// The read buffer's size follows the traffic: reads that fill it double
/// it (up to 64 KiB), and once it is empty and quiet it goes back to 512
/// bytes, so an idle connection keeps a small buffer and a busy one reads
/// in large chunks.
struct ReadSize {
    size: usize,
}

impl ReadSize {
    const MIN: usize = 512;
    const MAX: usize = 64 * 1024;

    fn new() -> Self {
        ReadSize { size: Self::MIN }
    }

    /// Makes room for the next read, releasing a large buffer when empty.
    fn prepare(&self, buf: &mut BytesMut) {
        if buf.is_empty() && buf.capacity() > 2 * self.size {
            *buf = BytesMut::with_capacity(self.size);
        } else if buf.capacity() - buf.len() < self.size / 2 {
            buf.reserve(self.size);
        }
    }

    /// Learns from a read of `n` bytes into `room` bytes of space.
    fn update(&mut self, n: usize, room: usize) {
        if n == room {
            self.size = (self.size * 2).min(Self::MAX);
        } else if n < self.size / 4 {
            self.size = (self.size / 2).max(Self::MIN);
        }
    }
}

enum Mode {
    Echo,
    Unauthenticated,
    Authenticated(ConnId),
    /// The connection has left the engine.
    Ended,
}

/// What the read loop does after a message.
enum Next {
    Continue,
    /// The closing handshake is over (or the connection failed): tear down.
    Finish,
}

/// The WebSocket phase of one connection, as the read side sees it. The
/// shard and the connection's outbound side are passed in by the caller
/// (the io_uring loop or the epoll task), which already holds them.
struct Session {
    protocol: Protocol,
    device: DeviceKind,
    mode: Mode,
    /// Messages other than a valid `auth` sent before authenticating.
    preauth_strikes: u8,
    /// The client address's counters (given back at the end).
    ip: Slots,
}

impl Session {
    /// Whether the connection waits for its `auth` message.
    fn preauth(&self) -> bool {
        matches!(self.mode, Mode::Unauthenticated)
    }

    /// The largest message the connection may send now: small until it
    /// has authenticated.
    fn max_message(&self, c: &crate::config::Config) -> usize {
        if self.preauth() {
            c.max_unauthenticated_message_size.min(c.max_message_size)
        } else {
            c.max_message_size
        }
    }

    /// Starts the WebSocket phase of an accepted upgrade (either IO
    /// driver): the 101 goes first through the connection's queue (it may be
    /// held: see `Session::new`), and the connection is counted.
    fn start(shard: &Shard, io: &Rc<ConnIo>, a: Accepted) -> Session {
        let Accepted {
            websocket_refusals,
            up,
            echo,
            user,
            device,
            response,
            ip,
        } = a;
        io.push_control(bytes::Bytes::from(response));
        if websocket_refusals {
            io.refuse_in_websocket();
        }
        let m = shard.metrics();
        m.connections.inc();
        m.connections_total.inc();
        Session::new(shard, io, up.protocol, device, echo, user, ip)
    }

    /// The WebSocket phase of an accepted upgrade: a session that is either
    /// authenticated by the handshake's token, waiting for `auth` (with a
    /// deadline), or an echo.
    #[allow(clippy::too_many_arguments)]
    fn new(
        shard: &Shard,
        io: &Rc<ConnIo>,
        protocol: Protocol,
        device: DeviceKind,
        echo: bool,
        user: Option<Identity>,
        ip: Slots,
    ) -> Session {
        let mut s = Session {
            protocol,
            device,
            mode: if echo {
                Mode::Echo
            } else {
                Mode::Unauthenticated
            },
            preauth_strikes: 0,
            ip,
        };
        match user {
            Some(u) => {
                // The 101 waits for the user's home shard to count the
                // connection: over the per-user cap it becomes a 429.
                if shard.node.config.max_connections_per_user > 0 {
                    io.hold();
                }
                s.authenticate(shard, io, u, None)
            }
            None if !echo => io
                .auth_deadline
                .set(shard.outq.now_ms() + shard.node.config.auth_timeout_ms),
            None => {}
        }
        s
    }

    /// Takes the connection out of the engine (its channels, its user). A
    /// connection that never authenticated stays counted as such until its
    /// buffers are freed.
    fn end(&mut self, shard: &Shard) {
        shard
            .node
            .admission
            .release_ip(std::mem::take(&mut self.ip));
        if let Mode::Authenticated(id) = self.mode {
            let mut outbox = shard.outbox.borrow_mut();
            shard.engine.borrow_mut().close(id, now_ms(), &mut *outbox);
            outbox.flush();
            self.mode = Mode::Ended;
        }
    }

    fn reply(&self, io: &ConnIo, msg: &ServerMessage) {
        io.push_data(&protocol::encode_frame(self.protocol, msg));
    }

    fn authenticate(
        &mut self,
        shard: &Shard,
        io: &Rc<ConnIo>,
        identity: Identity,
        ack: Option<u64>,
    ) {
        let session = shard.new_session_id();
        let Identity { user, access } = identity;
        let member = Member {
            user: user.as_str().into(),
            session,
            protocol: self.protocol,
        };
        // The ack and `ready` come first: opening the connection may queue
        // events for it at once (pending notifications, when the user's home
        // is this shard).
        if ack.is_some() {
            self.reply(io, &ServerMessage::ack(ack, AckBody::Empty(Empty {})));
        }
        self.reply(
            io,
            &ServerMessage::event(ServerEvent::Ready(Ready {
                user_id: user.clone(),
                session_id: session.to_string(),
                shard: shard.id as u32,
                heartbeat_interval_ms: shard.node.config.ping_interval_ms,
            })),
        );
        let id = {
            let mut outbox = shard.outbox.borrow_mut();
            let id = shard.engine.borrow_mut().open(
                io.clone(),
                member,
                self.device,
                access,
                now_ms(),
                &mut *outbox,
            );
            outbox.flush();
            id
        };
        self.mode = Mode::Authenticated(id);
        io.auth_deadline.set(NEVER);
    }

    fn on_data(&mut self, shard: &Shard, io: &Rc<ConnIo>, text: bool, mut payload: BytesMut) {
        if io.state() != State::Open {
            return;
        }
        if let Mode::Echo = self.mode {
            let op = if text { OpCode::Text } else { OpCode::Binary };
            io.push_data(&frame::encode(op, &payload));
            return;
        }
        if let Mode::Authenticated(id) = self.mode {
            return self.on_event(shard, id, text, payload);
        }
        let decoded = match (self.protocol, text) {
            (Protocol::Json, true) => {
                json::decode_client(&mut payload, &mut shard.scratch.borrow_mut())
            }
            (Protocol::Binary, false) => binary::decode_client(&payload),
            (p, _) => Err(DecodeError::wrong_frame(p)),
        };
        let msg = match decoded {
            Ok(m) => m,
            Err(e) => {
                self.reply(io, &ServerMessage::error(e.id, e.code, e.message));
                return self.preauth_strike(shard, io);
            }
        };
        match self.mode {
            Mode::Unauthenticated => match msg.event {
                ClientEvent::Auth(a) => match shard.node.verifier.identify(&a.token) {
                    Ok(identity) => {
                        let ban = shard.engine.borrow().server_ban(&identity.user, now_ms());
                        match ban {
                            None => self.authenticate(shard, io, identity, msg.id),
                            Some(why) => {
                                shard.metrics().auth_failures.inc();
                                self.reply(
                                    io,
                                    &ServerMessage::error(msg.id, ErrorCode::Forbidden, why),
                                );
                                io.close(close::BANNED, "banned");
                            }
                        }
                    }
                    Err(e) => {
                        shard.metrics().auth_failures.inc();
                        self.reply(
                            io,
                            &ServerMessage::error(msg.id, ErrorCode::Unauthorized, e.0),
                        );
                        io.close(close::UNAUTHORIZED, "unauthorized");
                    }
                },
                _ => {
                    self.reply(
                        io,
                        &ServerMessage::error(
                            msg.id,
                            ErrorCode::Unauthorized,
                            "authenticate first: send `auth` with a token",
                        ),
                    );
                    self.preauth_strike(shard, io);
                }
            },
            Mode::Echo | Mode::Authenticated(_) => unreachable!("handled above"),
            Mode::Ended => {}
        }
    }

    /// A message of an authenticated connection, for the engine.
    fn on_event(&self, shard: &Shard, id: ConnId, text: bool, mut payload: BytesMut) {
        let mut outbox = shard.outbox.borrow_mut();
        let mut scratch = shard.scratch.borrow_mut();
        shard.engine.borrow_mut().handle_frame(
            id,
            text,
            &mut payload,
            &mut scratch,
            now_ms(),
            &mut *outbox,
        );
    }

    /// Counts a message that was not a valid `auth` before authentication;
    /// past `rate_limit_strikes` of them the connection is closed (1008).
    fn preauth_strike(&mut self, shard: &Shard, io: &ConnIo) {
        self.preauth_strikes = self.preauth_strikes.saturating_add(1);
        let max = shard.node.config.rate_limit_strikes;
        if max > 0 && self.preauth_strikes as u32 > max {
            shard.metrics().rate_limit_closes.inc();
            io.close(
                close::POLICY_VIOLATION,
                "too many invalid messages before authentication",
            );
        }
    }

    fn on_message(&mut self, shard: &Shard, io: &Rc<ConnIo>, m: Message) -> Next {
        match m {
            Message::Text(p) => self.on_data(shard, io, true, p),
            Message::Binary(p) => self.on_data(shard, io, false, p),
            Message::Ping(p) => {
                io.push_control(frame::encode(OpCode::Pong, &p));
            }
            Message::Pong(_) => {}
            Message::Close(c) => {
                if io.state() == State::Open {
                    // Echo the peer's code (RFC 6455 §5.5.1).
                    let payload = c
                        .map(|(code, _)| close::payload(code, ""))
                        .unwrap_or_default();
                    io.close_with(payload);
                }
                return Next::Finish;
            }
        }
        Next::Continue
    }
}

async fn serve_ws(
    shard: Rc<Shard>,
    stream: TcpStream,
    mut buf: BytesMut,
    a: Box<Accepted>,
    _count: SocketCount,
    mut held: PreAuth,
) {
    let io = Rc::new(ConnIo::for_task(
        stream.as_raw_fd(),
        shard.outq.clone(),
        shard.outq.now_ms(),
    ));
    let reg_slot = shard.registry.borrow_mut().insert(io.clone());
    let metrics_conn = shard.metrics();
    let (mut rd, wr) = stream.into_split();
    monoio::spawn(conn::writer(io.clone(), wr));
    let mut s = Session::start(&shard, &io, *a);
    let mut decoder = Decoder::new();
    let config = &shard.node.config;
    let mut read_size = ReadSize::new();
    'conn: loop {
        loop {
            match decoder.decode(&mut buf, s.max_message(config)) {
                Ok(Some(m)) => {
                    metrics_conn.frames_in.inc();
                    if let Next::Finish = s.on_message(&shard, &io, m) {
                        break 'conn;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    metrics_conn.protocol_errors.inc();
                    tracing::debug!(shard = shard.id, error = %e, "protocol error");
                    io.close(e.close_code(), e.reason());
                    break 'conn;
                }
            }
        }
        shard.outbox.borrow_mut().flush();
        if io.state() == State::Done {
            break;
        }
        while shard.outbox.borrow().backlog > OUTBOX_HIGH {
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
        read_size.prepare(&mut buf);
        let preauth = if s.preauth() {
            buf.capacity() + decoder.buffered()
        } else {
            0
        };
        if !held.set(preauth) {
            io.close(
                close::TRY_AGAIN_LATER,
                "server busy: too many bytes buffered before authentication",
            );
            break;
        }
        let (len, cap) = (buf.len(), buf.capacity());
        let (res, slice) = rd.read(std::mem::take(&mut buf).slice_mut(len..cap)).await;
        buf = slice.into_inner();
        match res {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                read_size.update(n, cap - len);
                metrics_conn.bytes_in.add(n as u64);
                io.last_rx.set(shard.outq.now_ms());
                io.ping_sent.set(NEVER);
            }
        }
    }
    s.end(&shard);
    // What was buffered goes now, not after the closing handshake.
    drop((buf, decoder, held));
    let close_timeout = Duration::from_millis(shard.node.config.close_timeout_ms);
    let _ = monoio::time::timeout(close_timeout, io.flushed()).await;
    io.abort();
    shard.registry.borrow_mut().remove(reg_slot);
    metrics_conn.connections.sub(1);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    /// A session input for [`super::fuzz_session`]: the start byte, then
    /// each message as a length byte and its bytes.
    pub(crate) fn session_input(head: u8, messages: &[&[u8]]) -> Vec<u8> {
        let mut out = vec![head];
        for m in messages {
            out.push(m.len() as u8);
            out.extend_from_slice(m);
        }
        out
    }

    #[test]
    fn whole_sessions_keep_their_bounds() {
        let text = |s: &str| [&[1u8][..], s.as_bytes()].concat();
        let join = text(r#"{"t":"channel:join","id":1,"d":{"channelId":"general"}}"#);
        let send =
            text(r#"{"t":"message:send","id":2,"d":{"channelId":"general","content":"hi"}}"#);
        let ping = [&[3u8][..], &[b'p'; 120][..]].concat();
        // Authenticated, a peer that never reads: messages, then pings past
        // every bound.
        let mut msgs: Vec<&[u8]> = vec![&join, &send, &send];
        msgs.extend(std::iter::repeat_n(&ping[..], 200));
        super::fuzz_session(&session_input(2 | 4, &msgs));
        // The same peer reading, and one without a token sending `auth`.
        super::fuzz_session(&session_input(2 | 4 | 8, &msgs));
        let auth = text(r#"{"t":"auth","id":1,"d":{"token":"x.y.z"}}"#);
        super::fuzz_session(&session_input(1 | 4, &[&auth, &join, &join]));
        // A request written by the input, trickled.
        let req = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n";
        super::fuzz_session(&session_input(
            0,
            &[req, b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"],
        ));
    }

    proptest! {
        #[test]
        fn any_bytes_make_a_session_that_keeps_its_bounds(
            head in 0u8..16,
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..60), 0..12),
        ) {
            let msgs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            super::fuzz_session(&session_input(head, &msgs));
        }
    }

    /// What every connection costs in the shard's tables, whatever it does
    /// (docs/BENCHMARKS.md itemises it): a regression here is memory on
    /// every idle connection.
    #[test]
    fn a_connection_stays_small() {
        assert_eq!(std::mem::size_of::<super::conn::ConnIo>(), 80);
        assert_eq!(
            super::Engine::<std::rc::Rc<super::conn::ConnIo>>::slot_size(),
            72
        );
        assert_eq!(super::uring::loop_slot_size(), 72);
    }
}
