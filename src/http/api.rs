//! The server API: an HTTP/1.1 listener of its own (127.0.0.1 by default)
//! for the application backend, with API-key authentication. It runs on a
//! thread of its own, which is an endpoint of the shards' mesh: each
//! request becomes a message to the shard in charge (the channel's owner,
//! the user's home), whose answer comes back through the mesh like a
//! client's ack. The shards' hot path does not change.
//!
//! | method and path | does |
//! |---|---|
//! | `POST /api/publish` | a message into a channel, sequenced and kept in history |
//! | `POST /api/notify` | a notification to a user, delivered now or kept |
//! | `POST /api/emit` | an application's own event to a channel or a user's devices, not kept |
//! | `POST /api/subscribe`, `POST /api/unsubscribe` | a user's connections join a channel, or leave it |
//! | `POST /api/kick` | a kick from a channel or the server |
//! | `POST /api/ban` | a ban from a channel or the server |
//! | `DELETE /api/ban/{userId}` | lifts a ban (`?channelId=` for a channel's) |
//! | `GET /api/presence?userIds=a,b` | presence of users |
//! | `GET /api/channels/{id}/members` | members of a channel |
//! | `GET /api/stats` | the node's counts |
//!
//! Errors are JSON: `{"error": {"code": "bad_request", "message": "…"}}`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{TcpListener, TcpStream};
use monoio::{LegacyDriver, RuntimeBuilder};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::engine::{
    check_id, home_of, owner_of, ApiCall, ApiOp, ConnId, ConnRef, EmitTo, GatherPart, MeshMsg,
    ModKind, Moderation, PresenceQuery, ShardId, MAX_BAN_MS,
};
use crate::node::Node;
use crate::protocol::{json as json_codec, AckBody, ErrorCode, Json, MessageSend, PresenceView};
use crate::protocol::{Protocol, ServerEvent, ServerMessage};
use crate::signal::{yield_now, Signal};
use crate::ws::handshake::percent_decode;

/// Largest request body.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest request head.
const MAX_HEAD: usize = 8 * 1024;
/// How long a request waits for the shards' answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new connection has to send its first complete request.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a kept-alive connection may stay quiet.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts the API's thread on `listener`; `bell` is the receiving end of
/// its mesh doorbell. The thread ends when the node drains.
pub fn spawn(
    node: Arc<Node>,
    listener: std::net::TcpListener,
    bell: StdUnixStream,
) -> io::Result<JoinHandle<io::Result<()>>> {
    std::thread::Builder::new()
        .name("corecast-api".into())
        .spawn(move || {
            let mut rt = RuntimeBuilder::<LegacyDriver>::new()
                .enable_timer()
                .build()?;
            rt.block_on(run(node, listener, bell))
        })
}

/// A request waiting for the shards.
#[derive(Default)]
struct Waiting {
    done: Signal,
    answer: RefCell<Option<ServerMessage>>,
    /// Presence answers still expected, and those received.
    parts: Cell<usize>,
    presences: RefCell<Vec<PresenceView>>,
}

struct Api {
    node: Arc<Node>,
    /// This thread's mesh endpoint.
    me: ShardId,
    next: Cell<u64>,
    waiting: RefCell<HashMap<u64, Rc<Waiting>>>,
    /// Every open connection, for eviction when the API is full.
    conns: RefCell<Vec<Rc<ApiConn>>>,
    stop: Signal,
    started: Instant,
}

/// An open connection of the API.
struct ApiConn {
    fd: std::os::fd::RawFd,
    /// A request is being answered.
    busy: Cell<bool>,
    /// Since when it has been idle (waiting for a request).
    idle_since: Cell<Instant>,
}

impl Api {
    /// Makes room for one more connection when the API holds its most:
    /// the connection idle the longest (waiting for a first or a next
    /// request) is shut, so that idle sockets, whoever opened them, never
    /// lock out the backend. False when every connection is busy.
    fn make_room(&self) -> bool {
        let conns = self.conns.borrow();
        if conns.len() < self.node.budget.api_connections {
            return true;
        }
        let Some(oldest) = conns
            .iter()
            .filter(|c| !c.busy.get())
            .min_by_key(|c| c.idle_since.get())
        else {
            return false;
        };
        // SAFETY: shutdown(2) on a socket its serving task still owns; the
        // task's pending read ends and the task closes it.
        unsafe {
            libc::shutdown(oldest.fd, libc::SHUT_RDWR);
        }
        oldest.busy.set(true);
        true
    }
}

async fn run(
    node: Arc<Node>,
    listener: std::net::TcpListener,
    bell: StdUnixStream,
) -> io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    let bell = monoio::net::UnixStream::from_std(bell)?;
    let api = Rc::new(Api {
        me: crate::mesh::api_endpoint(node.mesh.shards()),
        node,
        next: Cell::new(1),
        waiting: RefCell::new(HashMap::new()),
        conns: RefCell::new(Vec::new()),
        stop: Signal::default(),
        started: Instant::now(),
    });
    monoio::spawn(drain(api.clone(), bell));
    let accept_log = crate::logs::Throttle::default();
    loop {
        monoio::select! {
            _ = api.stop.wait() => break,
            res = listener.accept() => match res {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    if !api.make_room() {
                        let r = response(503, &error_body(ErrorCode::Internal, "too many API connections"), false);
                        monoio::spawn(async move {
                            let mut stream = stream;
                            let _ = stream.write_all(r).await;
                        });
                        continue;
                    }
                    monoio::spawn(serve(api.clone(), stream));
                }
                Err(e) => {
                    if let Some(suppressed) = accept_log.allow(api.started.elapsed().as_millis() as u64) {
                        tracing::warn!(error = %e, suppressed, "API accept failed");
                    }
                    monoio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    tracing::info!("server API stopped");
    Ok(())
}

/// Takes the shards' answers off the mesh.
async fn drain(api: Rc<Api>, mut bell: monoio::net::UnixStream) {
    let node = api.node.clone();
    let mut buf = vec![0u8; 64];
    loop {
        let mut got = 0;
        for from in 0..node.mesh.shards() as ShardId {
            while let Some(m) = node.mesh.pop(from, api.me) {
                api.deliver(m);
                got += 1;
            }
        }
        if node.is_draining() {
            api.stop.set();
            return;
        }
        if got > 0 {
            yield_now().await;
            continue;
        }
        if !node.mesh.park(api.me) {
            continue;
        }
        let (res, b) = bell.read(buf).await;
        buf = b;
        node.mesh.unpark(api.me);
        if !matches!(res, Ok(n) if n > 0) {
            api.stop.set();
            return;
        }
    }
}

fn request_id(conn: ConnId) -> u64 {
    conn.slot as u64 | (conn.gen as u64) << 32
}

impl Api {
    fn deliver(&self, m: MeshMsg) {
        match m {
            MeshMsg::ToConn { conn, frame } => self.answer(request_id(conn), &frame),
            MeshMsg::ToConns(t) => {
                if let Some(f) = t.frames.get(Protocol::Json) {
                    for c in &t.conns {
                        self.answer(request_id(*c), f);
                    }
                }
            }
            MeshMsg::Gathered(g) => {
                let Some(w) = self.waiting.borrow().get(&g.gather).cloned() else {
                    return;
                };
                if let GatherPart::Presences(views) = g.part {
                    w.presences.borrow_mut().extend(views);
                    w.parts.set(w.parts.get().saturating_sub(1));
                    if w.parts.get() == 0 {
                        w.done.set();
                    }
                }
            }
            other => tracing::debug!(?other, "API endpoint ignores a mesh message"),
        }
    }

    fn answer(&self, id: u64, frame: &[u8]) {
        let Some(w) = self.waiting.borrow().get(&id).cloned() else {
            return;
        };
        let msg = crate::ws::frame::parse_header(frame)
            .ok()
            .flatten()
            .and_then(|h| json_codec::decode_server(&frame[h.header_len..]).ok());
        // Events a request sets off for its own `from` (none today) are
        // not answers.
        if let Some(m) = msg.filter(|m| {
            matches!(m.event, ServerEvent::Ack(_) | ServerEvent::Error(_)) && m.id == Some(id)
        }) {
            *w.answer.borrow_mut() = Some(m);
            w.done.set();
        }
    }

    fn new_request(&self, parts: usize) -> (u64, ConnRef, Rc<Waiting>) {
        let id = self.next.get();
        self.next.set(id + 1);
        let w = Rc::new(Waiting::default());
        w.parts.set(parts);
        self.waiting.borrow_mut().insert(id, w.clone());
        let from = ConnRef {
            shard: self.me,
            conn: ConnId {
                slot: id as u32,
                gen: (id >> 32) as u32,
            },
        };
        (id, from, w)
    }

    /// Waits for every part of request `id` to be answered (504 past
    /// `ANSWER_TIMEOUT`), then forgets the request.
    async fn answered(&self, id: u64, w: &Waiting) -> Result<(), (u16, Value)> {
        let got = monoio::time::timeout(ANSWER_TIMEOUT, w.done.wait()).await;
        self.waiting.borrow_mut().remove(&id);
        got.map_err(|_| {
            (
                504,
                error_body(ErrorCode::Internal, "no answer from the node in time"),
            )
        })
    }

    /// Queues a message for a shard, waiting while its queue is full.
    async fn send(&self, to: ShardId, mut msg: MeshMsg) {
        while let Err(back) = self.node.mesh.send(self.me, to, msg) {
            msg = back;
            monoio::time::sleep(Duration::from_micros(200)).await;
        }
    }

    /// Sends `op` to shard `to` and waits for its answer.
    async fn call(&self, to: ShardId, op: ApiOp) -> Result<AckBody, (u16, Value)> {
        let (id, from, w) = self.new_request(0);
        self.send(to, MeshMsg::Api(Box::new(ApiCall { from, id, op })))
            .await;
        self.answered(id, &w).await?;
        let answer = w.answer.borrow_mut().take();
        match answer.map(|m| m.event) {
            Some(ServerEvent::Ack(body)) => Ok(body),
            Some(ServerEvent::Error(e)) => Err((status_of(e.code), error_body(e.code, &e.message))),
            _ => Err((500, error_body(ErrorCode::Internal, "unexpected answer"))),
        }
    }

    async fn presence(&self, users: Vec<String>) -> Result<Value, (u16, Value)> {
        let shards = self.node.mesh.shards() as u16;
        let mut order: Vec<String> = Vec::new();
        for u in users {
            if !order.contains(&u) {
                order.push(u);
            }
        }
        let mut groups: Vec<(ShardId, Vec<Arc<str>>)> = Vec::new();
        for u in &order {
            let home = home_of(u, shards);
            match groups.iter_mut().find(|(s, _)| *s == home) {
                Some((_, g)) => g.push(u.as_str().into()),
                None => groups.push((home, vec![u.as_str().into()])),
            }
        }
        let (id, from, w) = self.new_request(groups.len());
        for (home, users) in groups {
            let q = PresenceQuery {
                gather: id,
                from,
                protocol: Protocol::Json,
                users,
                subscribe: false,
            };
            self.send(home, MeshMsg::Presence(Box::new(q))).await;
        }
        self.answered(id, &w).await?;
        let mut views = std::mem::take(&mut *w.presences.borrow_mut());
        views.sort_by_key(|v| order.iter().position(|o| *o == v.user_id));
        Ok(json!({ "presences": views }))
    }

    fn stats(&self) -> Value {
        let m = &self.node.metrics;
        let sum = |f: fn(&crate::metrics::ShardMetrics) -> u64| m.iter().map(|s| f(s)).sum::<u64>();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "shards": m.len(),
            "ioDriver": self.node.io_driver(),
            "ready": self.node.is_ready(),
            "uptimeMs": self.started.elapsed().as_millis() as u64,
            "connections": sum(|s| s.connections.get()),
            "onlineUsers": sum(|s| s.online_users.get()),
            "channels": sum(|s| s.channels.get()),
            // Every shard holds every ban; the one that answered last is
            // at least as current as the others.
            "bans": m.iter().map(|s| s.bans.get()).max().unwrap_or(0),
            "messagesPublished": sum(|s| s.messages_published.get()),
            "deliveries": sum(|s| s.deliveries.get()),
            "rateLimited": sum(|s| s.rate_limited.get()),
            "connectionsRefused": sum(|s| s.refused.iter().map(|c| c.get()).sum()),
        })
    }
}

/// One HTTP request, as far as the API needs it.
struct Request {
    method: String,
    path: String,
    query: String,
    authorization: Option<String>,
    api_key: Option<String>,
    keep_alive: bool,
    body: Vec<u8>,
}

/// How reading a request failed: a response to send (then close), or
/// nothing to say (the peer went away or stayed quiet).
enum ReadError {
    Respond(u16, Value),
    Gone,
}

async fn serve(api: Rc<Api>, mut stream: TcpStream) {
    let conn = Rc::new(ApiConn {
        fd: std::os::fd::AsRawFd::as_raw_fd(&stream),
        busy: Cell::new(false),
        idle_since: Cell::new(Instant::now()),
    });
    api.conns.borrow_mut().push(conn.clone());
    serve_requests(&api, &mut stream, &conn).await;
    api.conns.borrow_mut().retain(|c| !Rc::ptr_eq(c, &conn));
}

async fn serve_requests(api: &Api, stream: &mut TcpStream, conn: &ApiConn) {
    let mut buf = BytesMut::with_capacity(4096);
    let mut wait = FIRST_REQUEST_TIMEOUT;
    loop {
        let req = match monoio::time::timeout(wait, read_request(stream, &mut buf)).await {
            Ok(Ok(r)) => r,
            Ok(Err(ReadError::Respond(status, body))) => {
                let _ = stream.write_all(response(status, &body, false)).await;
                break;
            }
            Ok(Err(ReadError::Gone)) | Err(_) => break,
        };
        let keep = req.keep_alive;
        if conn.busy.replace(true) {
            // Shut to make room while its request arrived.
            break;
        }
        let (status, body, extra) = handle(api, req).await;
        let mut r = response(status, &body, keep);
        if let Some(h) = extra {
            insert_header(&mut r, h);
        }
        let (res, _) = stream.write_all(r).await;
        if res.is_err() || !keep || api.stop.is_set() {
            break;
        }
        conn.busy.set(false);
        conn.idle_since.set(Instant::now());
        wait = IDLE_TIMEOUT;
    }
}

async fn read_request(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<Request, ReadError> {
    let bad =
        |status: u16, code: ErrorCode, m: &str| ReadError::Respond(status, error_body(code, m));
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(head)) => {
                let method = req.method.unwrap_or_default().to_string();
                let target = req.path.unwrap_or_default();
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                let (path, query) = (path.to_string(), query.to_string());
                let header = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .and_then(|h| std::str::from_utf8(h.value).ok())
                        .map(|v| v.trim().to_string())
                };
                let keep_alive = match header("connection") {
                    Some(c) if c.eq_ignore_ascii_case("close") => false,
                    _ => req.version == Some(1),
                };
                let length = body_length(req.headers)
                    .map_err(|(status, m)| bad(status, ErrorCode::BadRequest, m))?;
                if length > MAX_BODY {
                    return Err(bad(
                        413,
                        ErrorCode::TooLarge,
                        &format!("the body is larger than {MAX_BODY} bytes"),
                    ));
                }
                let (authorization, api_key) = (header("authorization"), header("x-api-key"));
                while buf.len() < head + length {
                    read_more(stream, buf).await?;
                }
                let body = buf[head..head + length].to_vec();
                buf.advance(head + length);
                return Ok(Request {
                    method,
                    path,
                    query,
                    authorization,
                    api_key,
                    keep_alive,
                    body,
                });
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEAD {
                    return Err(bad(
                        431,
                        ErrorCode::TooLarge,
                        "the request head is too large",
                    ));
                }
                read_more(stream, buf).await?;
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(bad(431, ErrorCode::TooLarge, "too many headers"))
            }
            Err(e) => {
                return Err(bad(
                    400,
                    ErrorCode::BadRequest,
                    &format!("malformed request: {e}"),
                ))
            }
        }
    }
}

/// The length of a request's body from its headers. Framing that two
/// readers could understand differently (the request-smuggling class) is
/// refused: `Transfer-Encoding` (411 alone, 400 beside `Content-Length`),
/// `Content-Length` given twice (even with one value) or as anything but
/// digits.
fn body_length(headers: &[httparse::Header<'_>]) -> Result<usize, (u16, &'static str)> {
    let named = |name: &'static str| {
        headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
    };
    let mut lengths = named("content-length");
    let length = lengths.next();
    if lengths.next().is_some() {
        return Err((400, "ambiguous framing: more than one Content-Length"));
    }
    if named("transfer-encoding").next().is_some() {
        return Err(match length {
            Some(_) => (
                400,
                "ambiguous framing: Transfer-Encoding and Content-Length",
            ),
            None => (411, "send the body with Content-Length, not chunked"),
        });
    }
    let Some(h) = length else { return Ok(0) };
    let v = std::str::from_utf8(h.value).unwrap_or("").trim();
    if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err((400, "Content-Length is not a number"));
    }
    Ok(v.parse().expect("at most 19 digits"))
}

async fn read_more(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<(), ReadError> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(4096);
    }
    let (len, cap) = (buf.len(), buf.capacity());
    let (res, slice) = stream.read(std::mem::take(buf).slice_mut(len..cap)).await;
    *buf = slice.into_inner();
    match res {
        Ok(n) if n > 0 => Ok(()),
        _ => Err(ReadError::Gone),
    }
}

/// Whether the request carries one of the configured keys (compared in
/// constant time).
fn authorized(keys: &[String], req: &Request) -> bool {
    let given = req
        .authorization
        .as_deref()
        .and_then(|a| {
            a.get(..7)
                .filter(|p| p.eq_ignore_ascii_case("bearer "))
                .map(|_| a[7..].trim())
        })
        .or(req.api_key.as_deref());
    let Some(given) = given else { return false };
    keys.iter().fold(false, |ok, k| {
        ok | constant_time_eq(k.as_bytes(), given.as_bytes())
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

type Answer = (u16, Value, Option<&'static str>);

async fn handle(api: &Api, req: Request) -> Answer {
    if !authorized(&api.node.config.api_keys, &req) {
        return (
            401,
            error_body(
                ErrorCode::Unauthorized,
                "send the API key as `Authorization: Bearer <key>` or `X-API-Key: <key>`",
            ),
            Some("WWW-Authenticate: Bearer\r\n"),
        );
    }
    let segments: Vec<String> = req
        .path
        .trim_end_matches('/')
        .split('/')
        .skip(1)
        .map(|p| percent_decode(p, false))
        .collect();
    let seg: Vec<&str> = segments.iter().map(String::as_str).collect();
    let m = req.method.as_str();
    let result = match (m, seg.as_slice()) {
        ("POST", ["api", "publish"]) => publish(api, &req.body).await,
        ("POST", ["api", "notify"]) => notify(api, &req.body).await,
        ("POST", ["api", "emit"]) => emit(api, &req.body).await,
        ("POST", ["api", "subscribe"]) => subscribe(api, &req.body, true).await,
        ("POST", ["api", "unsubscribe"]) => subscribe(api, &req.body, false).await,
        ("POST", ["api", "kick"]) => kick(api, &req.body).await,
        ("POST", ["api", "ban"]) => ban(api, &req.body).await,
        ("DELETE", ["api", "ban", user]) => unban(api, user, &req.query).await,
        ("GET", ["api", "presence"]) => presence(api, &req.query).await,
        ("GET", ["api", "channels", channel, "members"]) => members(api, channel).await,
        ("GET", ["api", "stats"]) => Ok(api.stats()),
        (_, ["api", "publish" | "notify" | "emit" | "kick" | "subscribe" | "unsubscribe"]) => {
            return not_allowed("POST")
        }
        (_, ["api", "ban"]) => return not_allowed("POST"),
        (_, ["api", "ban", _]) => return not_allowed("DELETE"),
        (_, ["api", "presence" | "stats"]) | (_, ["api", "channels", _, "members"]) => {
            return not_allowed("GET")
        }
        _ => Err((
            404,
            error_body(
                ErrorCode::NotFound,
                &format!("no such endpoint: {m} {}", req.path),
            ),
        )),
    };
    match result {
        Ok(v) => (200, v, None),
        Err((status, v)) => (status, v, None),
    }
}

fn not_allowed(allow: &'static str) -> Answer {
    let header = match allow {
        "POST" => "Allow: POST\r\n",
        "DELETE" => "Allow: DELETE\r\n",
        _ => "Allow: GET\r\n",
    };
    (
        405,
        error_body(
            ErrorCode::BadRequest,
            &format!("method not allowed: use {allow}"),
        ),
        Some(header),
    )
}

type Outcome = Result<Value, (u16, Value)>;

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, (u16, Value)> {
    serde_json::from_slice(body).map_err(|e| {
        (
            400,
            error_body(ErrorCode::BadRequest, &format!("body: {e}")),
        )
    })
}

fn bad_request(message: String) -> (u16, Value) {
    (400, error_body(ErrorCode::BadRequest, &message))
}

fn shards(api: &Api) -> u16 {
    api.node.mesh.shards() as u16
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PublishBody {
    channel_id: String,
    content: String,
    /// The author others see (default `server`).
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    reply_to: Option<String>,
    #[serde(default)]
    thread_id: Option<String>,
    #[serde(default)]
    mentions: Vec<String>,
    #[serde(default)]
    nonce: Option<String>,
    /// The application's metadata: a JSON object.
    #[serde(default)]
    meta: Option<Value>,
}

async fn publish(api: &Api, body: &[u8]) -> Outcome {
    let b: PublishBody = parse(body)?;
    let owner = owner_of(&b.channel_id, shards(api));
    let send = MessageSend {
        channel_id: b.channel_id,
        content: b.content,
        reply_to: b.reply_to,
        thread_id: b.thread_id,
        mentions: b.mentions,
        nonce: b.nonce,
    };
    let user = b.user_id.unwrap_or_else(|| "server".into());
    let meta = b.meta.map(|m| Json(m.to_string()));
    match api.call(owner, ApiOp::Publish { user, send, meta }).await? {
        AckBody::Send(a) => Ok(serde_json::to_value(a).expect("plain data")),
        _ => Err((500, error_body(ErrorCode::Internal, "unexpected answer"))),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NotifyBody {
    user_id: String,
    /// The application's name for it (`invoice`, `friend_request`, …).
    kind: String,
    #[serde(default)]
    data: Option<Value>,
}

async fn notify(api: &Api, body: &[u8]) -> Outcome {
    let b: NotifyBody = parse(body)?;
    let home = home_of(&b.user_id, shards(api));
    let op = ApiOp::Notify {
        user: b.user_id,
        kind: b.kind,
        data: b.data.map(|d| Json(d.to_string())),
    };
    match api.call(home, op).await? {
        AckBody::Notifications(mut n) if !n.notifications.is_empty() => {
            Ok(serde_json::to_value(n.notifications.remove(0)).expect("plain data"))
        }
        _ => Err((500, error_body(ErrorCode::Internal, "unexpected answer"))),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct EmitBody {
    /// The event's name (`game:over`, …): not one of the server's own.
    event: String,
    #[serde(default, deserialize_with = "present_string")]
    channel_id: Option<String>,
    #[serde(default, deserialize_with = "present_string")]
    user_id: Option<String>,
    #[serde(default)]
    data: Option<Value>,
}

/// A field that, when given, is a string (`null` is refused, not taken for
/// absent: one of two fields must be given).
fn present_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    String::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SubscribeBody {
    user_id: String,
    channel_id: String,
}

/// `POST /api/subscribe` (`join`) and `/api/unsubscribe`: on the user's
/// home, which tells each of its connections (on every node).
async fn subscribe(api: &Api, body: &[u8], join: bool) -> Outcome {
    let b: SubscribeBody = parse(body)?;
    let home = home_of(&b.user_id, shards(api));
    let op = ApiOp::Subscribe {
        user: b.user_id,
        channel: b.channel_id,
        join,
    };
    match api.call(home, op).await? {
        AckBody::Empty(_) => Ok(json!({ "ok": true })),
        _ => Err((500, error_body(ErrorCode::Internal, "unexpected answer"))),
    }
}

async fn emit(api: &Api, body: &[u8]) -> Outcome {
    let b: EmitBody = parse(body)?;
    let (at, to) = match (b.channel_id, b.user_id) {
        (Some(c), None) => (owner_of(&c, shards(api)), EmitTo::Channel(c)),
        (None, Some(u)) => (home_of(&u, shards(api)), EmitTo::User(u)),
        _ => {
            let why = "give `channelId` or `userId`, one of them";
            return Err((400, error_body(ErrorCode::BadRequest, why)));
        }
    };
    let op = ApiOp::Emit {
        name: b.event,
        to,
        data: b.data.map(|d| Json(d.to_string())),
    };
    match api.call(at, op).await? {
        AckBody::Empty(_) => Ok(json!({ "ok": true })),
        _ => Err((500, error_body(ErrorCode::Internal, "unexpected answer"))),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct KickBody {
    user_id: String,
    #[serde(default)]
    channel_id: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    /// Who asked, as the user and the channel are told (default `api`).
    #[serde(default)]
    by: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BanBody {
    user_id: String,
    #[serde(default)]
    channel_id: Option<String>,
    #[serde(default)]
    duration_ms: Option<u64>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    by: Option<String>,
}

async fn moderate(
    api: &Api,
    kind: ModKind,
    user: String,
    channel: Option<String>,
    reason: Option<String>,
    by: Option<String>,
) -> Outcome {
    let m = Moderation {
        kind,
        user: user.as_str().into(),
        channel: channel.map(|c| c.as_str().into()),
        reason,
        by: by.unwrap_or_else(|| "api".into()),
        at: 0,
        from: None,
        ack: None,
    };
    let to = home_of(&user, shards(api));
    api.call(to, ApiOp::Moderate(m)).await?;
    Ok(json!({ "ok": true }))
}

async fn kick(api: &Api, body: &[u8]) -> Outcome {
    let b: KickBody = parse(body)?;
    moderate(api, ModKind::Kick, b.user_id, b.channel_id, b.reason, b.by).await
}

async fn ban(api: &Api, body: &[u8]) -> Outcome {
    let b: BanBody = parse(body)?;
    let until = match b.duration_ms {
        None => None,
        Some(d) if (1..=MAX_BAN_MS).contains(&d) => Some(crate::clock::now_ms() + d),
        Some(_) => {
            return Err(bad_request(format!(
                "`durationMs` must be 1 to {MAX_BAN_MS} (ten years)"
            )))
        }
    };
    moderate(
        api,
        ModKind::Ban { until },
        b.user_id,
        b.channel_id,
        b.reason,
        b.by,
    )
    .await
}

async fn unban(api: &Api, user: &str, query: &str) -> Outcome {
    let channel = crate::ws::handshake::query_param(query, "channelId");
    moderate(api, ModKind::Unban, user.to_string(), channel, None, None).await
}

async fn presence(api: &Api, query: &str) -> Outcome {
    let users: Vec<String> = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(k, _)| *k == "userIds")
        .flat_map(|(_, v)| {
            percent_decode(v, true)
                .split(',')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    if users.is_empty() {
        return Err(bad_request(
            "`userIds` is required: ?userIds=alice,bob".into(),
        ));
    }
    if users.len() > crate::protocol::json::MAX_LIST {
        return Err(bad_request(format!(
            "`userIds` has more than {} entries",
            crate::protocol::json::MAX_LIST
        )));
    }
    for u in &users {
        check_id("userIds", u).map_err(bad_request)?;
    }
    api.presence(users).await
}

async fn members(api: &Api, channel: &str) -> Outcome {
    let owner = owner_of(channel, shards(api));
    let op = ApiOp::Members {
        channel: channel.to_string(),
    };
    match api.call(owner, op).await? {
        AckBody::Members(m) => Ok(serde_json::to_value(m).expect("plain data")),
        _ => Err((500, error_body(ErrorCode::Internal, "unexpected answer"))),
    }
}

/// The HTTP status of an engine error. A field past its bounds
/// (`too_large`) is a 400 like any invalid field; 413 is kept for a body
/// past [`MAX_BODY`].
pub fn status_of(code: ErrorCode) -> u16 {
    match code {
        ErrorCode::BadRequest | ErrorCode::Unsupported | ErrorCode::TooLarge => 400,
        ErrorCode::Unauthorized => 401,
        ErrorCode::Forbidden => 403,
        ErrorCode::NotFound => 404,
        ErrorCode::RateLimited => 429,
        ErrorCode::Internal => 500,
        ErrorCode::Unavailable => 503,
    }
}

fn error_body(code: ErrorCode, message: &str) -> Value {
    json!({ "error": { "code": code, "message": message } })
}

fn response(status: u16, body: &Value, keep_alive: bool) -> Vec<u8> {
    let body = serde_json::to_vec(body).expect("JSON values serialize");
    crate::ws::handshake::response(status, "", "application/json", &body, keep_alive)
}

/// Adds a header line (ending in CRLF) to a response built by [`response`].
fn insert_header(r: &mut Vec<u8>, header: &str) {
    if let Some(end) = r.windows(4).position(|w| w == b"\r\n\r\n") {
        r.splice(end + 2..end + 2, header.bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::body_length;

    fn length(head: &str) -> Result<usize, u16> {
        let text = format!("POST /api/publish HTTP/1.1\r\nHost: x\r\n{head}\r\n");
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        req.parse(text.as_bytes()).unwrap();
        body_length(req.headers).map_err(|(status, _)| status)
    }

    #[test]
    fn only_one_unambiguous_content_length_frames_a_body() {
        assert_eq!(length(""), Ok(0));
        assert_eq!(length("Content-Length: 12\r\n"), Ok(12));
        assert_eq!(length("content-length:  7 \r\n"), Ok(7));
        for smuggling in [
            "Content-Length: 5\r\nContent-Length: 50\r\n",
            "Content-Length: 5\r\nContent-Length: 5\r\n",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Content-Length: +5\r\n",
            "Content-Length: 5, 5\r\n",
            "Content-Length: 0x10\r\n",
            "Content-Length: -1\r\n",
            "Content-Length: \r\n",
            "Content-Length: 99999999999999999999\r\n",
        ] {
            assert_eq!(length(smuggling), Err(400), "{smuggling:?}");
        }
        assert_eq!(length("Transfer-Encoding: chunked\r\n"), Err(411));
    }
}
