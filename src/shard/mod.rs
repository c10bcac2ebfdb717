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
//!
//! Here: the shard's state shared by both drivers (registry of
//! connections, engine, outbox) and how a request is routed (plain HTTP,
//! refusal or upgrade). Elsewhere, by concern:
//! - `uring`: the io_uring driver, one loop over every socket;
//! - `buf_ring`: the provided buffers it receives into;
//! - `epoll`: the fallback driver, a monoio task per connection;
//! - `session`: a connection's WebSocket phase (authentication, messages,
//!   bounds), the same for both drivers;
//! - `conn`: a connection's outbound queue and writer;
//! - `outbox`: mesh messages held back while queues are full.

mod buf_ring;
mod conformance;
pub mod conn;
mod connect_hook;
mod epoll;
mod give_back;
mod outbox;
mod polling;
mod session;
mod uring;

#[doc(hidden)]
pub use uring::fuzz_session;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use monoio::{LegacyDriver, RuntimeBuilder};

use crate::admission::{self, Refusal, Slots};
use crate::clock::{now_ms, random_u64};
use crate::engine::{Adoption, Engine, MeshMsg, SessionId, ShardId};
use crate::logs::Throttle;
use crate::metrics::ShardMetrics;
use crate::node::Node;
use crate::protocol::{self, json, socketio, DeviceKind, ErrorCode, Protocol, ServerMessage};
use crate::signal::Signal;
use crate::ws::handshake::{self, HandshakeConfig, Request, Upgrade};
use crate::ws::{close, frame, OpCode};
use conn::{ConnIo, Outq, State, NEVER};
use epoll::shard_main;
use outbox::Outbox;
use session::{Accepted, Next, Session};

/// Mesh messages a shard may hold back (queues full) before its connections
/// stop reading: TCP then pushes back on the clients.
const OUTBOX_HIGH: usize = 65_536;
/// Mesh messages taken from each source per drain round before other
/// tasks get a turn.
const DRAIN_BATCH: usize = 4096;
/// Empty drain rounds (yielding to other tasks) before parking: a short spin
/// keeps hand-offs under a microsecond when traffic is steady.
const SPIN_ROUNDS: u32 = 16;

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
    /// Frames that go at the next sweep, not with what was queued before
    /// them (`--socketio-conformance` only: see `conformance.rs`).
    deferred: RefCell<Vec<(Rc<ConnIo>, bytes::Bytes)>>,
    /// The long-polling sessions this shard holds.
    polls: RefCell<polling::Polls>,
    /// Sockets other shards handed over, for the IO driver to take.
    adopted: RefCell<Vec<Adoption>>,
    /// Connections waiting for the connect hook, by question.
    connecting: RefCell<HashMap<u64, Rc<connect_hook::PendingConnect>>>,
    connect_next: Cell<u64>,
    /// The connect hook's answers taken off the mesh, to act on.
    connect_answers: RefCell<Vec<crate::engine::hooks::HookAnswer>>,
    /// When to give memory back after a burst (see `give_back.rs`).
    after_burst: Cell<give_back::AfterBurst>,
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
        let verifier = node.clone();
        engine.set_token_check(Box::new(move |token| {
            verifier.verifier.identify(token).map_err(|e| e.0)
        }));
        engine.load_bans(node.initial_bans.iter().cloned(), now_ms());
        let history = node
            .initial_history
            .lock()
            .ok()
            .and_then(|mut parts| parts.get_mut(id).map(std::mem::take))
            .unwrap_or_default();
        engine.load_history(&history, now_ms());
        drop(history);
        if let Some(store) = node.event_store {
            engine.set_event_store(store, node.line_pools[id].clone());
        }
        if let Some(s) = &node.event_stream {
            engine.set_event_stream(s.outbox.backlog.clone());
        }
        if node.config.hooks.enabled() {
            engine.set_hooks(crate::mesh::hooks_endpoint(n));
        }
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
            deferred: RefCell::default(),
            polls: RefCell::default(),
            adopted: RefCell::default(),
            connecting: RefCell::default(),
            connect_next: Cell::new(0),
            connect_answers: RefCell::default(),
            sockets: Cell::new(0),
            preauth_bytes: Cell::new(0),
            after_burst: Cell::default(),
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

/// An Engine.IO refusal: 400 with `{"code": N, "message": "..."}`, as
/// Engine.IO servers answer a request they cannot take.
fn engine_io_refusal(code: u8, message: &str) -> Vec<u8> {
    let body = serde_json::json!({ "code": code, "message": message }).to_string();
    handshake::http_response(400, "", "application/json", body.as_bytes())
}

/// Whether `route` is `path`, with or without its trailing slash.
fn route_is(route: &str, path: &str) -> bool {
    route.strip_suffix('/').unwrap_or(route) == path.strip_suffix('/').unwrap_or(path)
}

/// Sends a socket to the shard that holds the session its request names.
fn hand_over(shard: &Shard, owner: ShardId, fd: std::os::fd::OwnedFd, bytes: Vec<u8>, ip: Slots) {
    use crate::engine::MeshTx;
    shard.metrics().socketio_handovers.inc();
    let msg = MeshMsg::Adopt(Box::new(Adoption { fd, bytes, ip }));
    let mut outbox = shard.outbox.borrow_mut();
    outbox.send(owner, msg);
    outbox.flush();
}

/// The body a request says follows its head.
fn body_len(req: &Request) -> usize {
    match req {
        Request::Plain(p) => p.content_length,
        Request::Upgrade(_) => 0,
    }
}

/// The largest body a request may carry: a long-polling POST of the
/// largest message, in base64, with room for its separators.
fn max_body(shard: &Shard) -> usize {
    shard.node.config.max_message_size / 3 * 4 + 4096
}

fn body_too_large() -> Vec<u8> {
    handshake::http_response(413, "", "text/plain", b"payload_too_large")
}

/// CORS headers that let a page of `origin` read long-polling responses.
fn cors_headers(origin: &str) -> String {
    let clean: String = origin.chars().filter(|c| !c.is_control()).collect();
    format!("Access-Control-Allow-Origin: {clean}\r\nAccess-Control-Allow-Credentials: true\r\nVary: Origin\r\n")
}

/// The transport an Engine.IO request names, or its refusal: a version
/// other than 4, or no known transport.
fn engine_io_query(query: &str) -> Result<&'static str, Vec<u8>> {
    let q = |name| handshake::query_param(query, name);
    if q("EIO").as_deref() != Some("4") {
        return Err(engine_io_refusal(5, "Unsupported protocol version"));
    }
    match q("transport").as_deref() {
        Some("websocket") => Ok("websocket"),
        Some("polling") => Ok("polling"),
        _ => Err(engine_io_refusal(0, "Transport unknown")),
    }
}

/// What to do with a parsed request.
enum Routed {
    /// Answer, then close (plain HTTP requests and refusals).
    Reply(Vec<u8>),
    /// Switch protocols: write the 101 response, then speak WebSocket.
    Accept(Box<Accepted>),
    /// A long-polling request of a session on this shard: the socket
    /// waits for its answer (`Shard::poll`), then closes.
    Poll(Box<polling::PollRequest>),
    /// A request of a session another shard holds: the socket and the
    /// bytes read go there.
    HandOver(ShardId),
}

impl Shard {
    /// Decides on a complete request: plain HTTP, refusal, or upgrade (with
    /// the user when the request carried a valid token).
    /// `ip` holds what the socket counts against its address (from the
    /// accept); an accepted upgrade takes it into its session.
    fn route(&self, req: Request, body: &[u8], peer: IpAddr, ip: &mut Slots) -> Routed {
        let mut up = match req {
            Request::Plain(p) => {
                let (route, query) = p.path.split_once('?').unwrap_or((&p.path, ""));
                let engine_echo =
                    self.node.config.socketio_conformance && route_is(route, "/engine.io/");
                if engine_echo || self.socketio_path(route) {
                    return self.route_polling(&p, query, body, engine_echo, peer, ip);
                }
                return Routed::Reply(crate::http::plain(&self.node, &p.method, &p.path));
            }
            Request::Upgrade(up) => up,
        };
        let conformance = self.node.config.socketio_conformance;
        let engine_echo = conformance && route_is(&up.path, "/engine.io/");
        let socketio = engine_echo || self.socketio_path(&up.path);
        if socketio {
            match engine_io_query(&up.query) {
                Err(refusal) => return Routed::Reply(refusal),
                Ok("websocket") => {}
                Ok(_) => return Routed::Reply(engine_io_refusal(3, "Bad request")),
            }
            up.protocol = Protocol::SocketIo;
            up.protocol_offered = false;
            if let Some(sid) = handshake::query_param(&up.query, "sid") {
                // The upgrade of a long-polling session.
                match polling::owner_of(&sid) {
                    Some(owner) if owner != self.id && (owner as usize) < self.node.shards() => {
                        return Routed::HandOver(owner);
                    }
                    Some(owner) if owner == self.id && self.polls.borrow_mut().upgradable(&sid) => {
                        let response = handshake::accept_response(&up);
                        return Routed::Accept(Box::new(Accepted {
                            websocket_refusals: false,
                            conformance: None,
                            upgrade_of: Some(sid),
                            device: DeviceKind::Web,
                            up,
                            echo: false,
                            user: None,
                            response,
                            ip: std::mem::take(ip),
                        }));
                    }
                    _ => {
                        // As Engine.IO servers do for a session already
                        // upgraded (or gone): the WebSocket opens and closes.
                        let mut r = handshake::accept_response(&up);
                        r.extend_from_slice(&frame::encode(
                            OpCode::Close,
                            &close::payload(close::POLICY_VIOLATION, "Session ID unknown"),
                        ));
                        return Routed::Reply(r);
                    }
                }
            }
        }
        let echo = match up.path.as_str() {
            _ if socketio => false,
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
            (Some(t), false) => match session::verify(self, t) {
                Ok(identity) => Some(identity),
                Err((ErrorCode::Forbidden, why)) => {
                    return refuse(403, close::BANNED, &format!("banned: {why}"));
                }
                Err((_, why)) => {
                    tracing::debug!(shard = self.id, error = %why, "handshake token refused");
                    return refuse(401, close::UNAUTHORIZED, &why);
                }
            },
            _ => None,
        };
        let response = handshake::accept_response(&up);
        Routed::Accept(Box::new(Accepted {
            websocket_refusals: self.websocket_refusals(&up),
            conformance: (socketio && conformance).then_some(!engine_echo),
            upgrade_of: None,
            up,
            echo,
            user,
            device,
            response,
            ip: std::mem::take(ip),
        }))
    }

    /// A request of Engine.IO's long-polling transport: a new session (the
    /// token from the query string or `Authorization`, checked as an
    /// upgrade's), or a GET or POST of a session, here or on its shard.
    fn route_polling(
        &self,
        p: &handshake::PlainRequest,
        query: &str,
        body: &[u8],
        engine_echo: bool,
        peer: IpAddr,
        ip: &mut Slots,
    ) -> Routed {
        let node = &self.node;
        let cors = match (&p.origin, node.config.allowed_origins.is_empty()) {
            (None, _) => String::new(),
            (Some(o), true) => cors_headers(o),
            (Some(o), false) => {
                if !node
                    .config
                    .allowed_origins
                    .iter()
                    .any(|a| a.eq_ignore_ascii_case(o.trim()))
                {
                    return Routed::Reply(handshake::http_response(
                        403,
                        "",
                        "text/plain",
                        b"origin_not_allowed",
                    ));
                }
                cors_headers(o)
            }
        };
        let refuse = |code: u8, message: &str| {
            Routed::Reply(polling::error_response(&cors, code, message).to_vec())
        };
        match engine_io_query(query) {
            Err(refusal) => return Routed::Reply(refusal),
            // A WebSocket transport without its upgrade.
            Ok("websocket") => return refuse(3, "Bad request"),
            Ok(_) => {}
        }
        let sid = handshake::query_param(query, "sid");
        let Some(sid) = sid else {
            if p.method != "GET" {
                return refuse(2, "Bad handshake method");
            }
            if node.is_draining() {
                return Routed::Reply(handshake::http_response(503, "", "text/plain", b"draining"));
            }
            let client =
                admission::client_ip(peer, p.forwarded_for.as_deref(), &node.trusted_proxies);
            if let Err(refusal) = node.admission.admit_upgrade(client, ip, now_ms()) {
                self.metrics().refused[refusal.index()].inc();
                return Routed::Reply(refusal.response());
            }
            let device = match handshake::query_param(query, "device").as_deref() {
                None => DeviceKind::Web,
                Some(d) => match DeviceKind::parse(d) {
                    Some(k) => k,
                    None => return refuse(3, "bad_device: device must be desktop, mobile or web"),
                },
            };
            let token = p
                .bearer
                .clone()
                .or_else(|| handshake::query_param(query, "token"));
            let conformance = node.config.socketio_conformance.then_some(!engine_echo);
            let user = match token {
                Some(t) if conformance.is_none() => match session::verify(self, &t) {
                    Ok(identity) => Some(identity),
                    Err((ErrorCode::Forbidden, why)) => {
                        return refuse(4, &format!("banned: {why}"))
                    }
                    Err((_, why)) => return refuse(4, &why),
                },
                _ => None,
            };
            return Routed::Poll(Box::new(polling::PollRequest::Open {
                device,
                user,
                conformance,
                ip: std::mem::take(ip),
                cors,
            }));
        };
        match polling::owner_of(&sid) {
            Some(owner) if owner != self.id && (owner as usize) < node.shards() => {
                Routed::HandOver(owner)
            }
            Some(owner) if owner == self.id => match p.method.as_str() {
                "GET" => Routed::Poll(Box::new(polling::PollRequest::Get { sid, cors })),
                "POST" => Routed::Poll(Box::new(polling::PollRequest::Post {
                    sid,
                    body: body.to_vec(),
                    cors,
                })),
                _ => refuse(2, "Bad handshake method"),
            },
            _ => refuse(1, "Session ID unknown"),
        }
    }

    /// Answers (or parks, until there is something to answer with) a
    /// long-polling request; `waiter` is its socket's outbound side.
    fn poll(&self, req: polling::PollRequest, waiter: Rc<ConnIo>) {
        waiter.await_response();
        let mut polls = self.polls.borrow_mut();
        polls.request(self, req, waiter);
        polls.flush_ready(self);
        drop(polls);
        self.outbox.borrow_mut().flush();
    }

    /// Long-polling sessions that queued frames since the last look.
    fn flush_polls(&self) {
        if self.outq.polls.borrow().is_empty() {
            return;
        }
        self.polls.borrow_mut().flush_ready(self);
    }

    /// Whether `route` is where Socket.IO clients connect (with or without
    /// its trailing slash).
    fn socketio_path(&self, route: &str) -> bool {
        let p = self.node.config.socketio_path.as_str();
        !p.is_empty() && route_is(route, p)
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
                    match m {
                        MeshMsg::Adopt(a) => self.adopted.borrow_mut().push(*a),
                        MeshMsg::HookAnswer(a) if connect_hook::is_connect_answer(&a) => {
                            self.connect_answers.borrow_mut().push(*a)
                        }
                        m => engine.handle_mesh(m, now, &mut *outbox),
                    }
                    got += 1;
                }
            }
            outbox.flush();
        }
        if !self.connect_answers.borrow().is_empty() {
            self.answer_connects();
        }
        self.metrics().mesh_messages_in.add(got as u64);
        got
    }

    /// At every sweep: whether a burst is over, so that the IO driver
    /// trims what it kept for the burst and the memory it left free goes
    /// back to the system (see `give_back.rs`).
    fn burst_over(&self) -> bool {
        let m = self.metrics();
        let work = m
            .frames_in
            .get()
            .wrapping_add(m.frames_out.get())
            .wrapping_add(m.connections_total.get());
        let mut a = self.after_burst.get();
        let over = a.sweep(work);
        self.after_burst.set(a);
        if over {
            m.memory_returns.inc();
        }
        over
    }

    /// Queues the frames deferred to this sweep, each once what was
    /// queued before it is written (so that it goes in a write of its own);
    /// the others wait for the next sweep.
    fn run_deferred(&self) {
        let mut later = Vec::new();
        for (io, frame) in self.deferred.take() {
            if io.state() != State::Open {
                continue;
            }
            if io.is_flushed() {
                io.push_data(&frame);
            } else {
                later.push((io, frame));
            }
        }
        self.deferred.borrow_mut().extend(later);
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
                    if io.engine_io() {
                        io.push_data(&socketio::connect_error_frame(
                            "/",
                            Some("unauthorized"),
                            "no CONNECT packet in time",
                            false,
                        ));
                    } else {
                        let msg = ServerMessage::error(
                            None,
                            ErrorCode::Unauthorized,
                            "no `auth` message in time",
                        );
                        io.push_data(&protocol::encode_frame(Protocol::Json, &msg));
                    }
                    io.close(close::UNAUTHORIZED, "authentication timeout");
                } else if io.ping_sent.get() != NEVER {
                    if since(io.ping_sent.get()) >= c.ping_timeout_ms
                        || io.engine_io_expired(now, c)
                    {
                        self.metrics().keepalive_closes.inc();
                        io.close(close::POLICY_VIOLATION, "ping timeout");
                    }
                } else if since(io.last_rx.get()) >= c.ping_interval_ms {
                    io.ping_sent.set(now);
                    if io.engine_io() {
                        io.push_control(socketio::ping_frame());
                    } else {
                        io.push_control(ping.clone());
                    }
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

    /// How often the sweep runs: a quarter of the shortest timeout (25 ms
    /// with `--socketio-conformance`, whose suites time heartbeats to tens
    /// of milliseconds and wait for the frames it defers).
    fn sweep_tick(&self) -> Duration {
        let c = &self.node.config;
        if c.socketio_conformance {
            return Duration::from_millis(25);
        }
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
