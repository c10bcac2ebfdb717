//! Test harness: runs the real `corecast` binary on 127.0.0.1 port 0 and
//! talks to it through real sockets, with tokio-tungstenite as the
//! independent client and a raw socket for malformed input.
#![allow(dead_code)]

pub mod backend;
pub mod redis;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corecast::config::AuthConfig;
use corecast::ws::frame::{encode_masked, parse_header};
use corecast::ws::OpCode;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

pub const SECRET: &str = "integration-test-secret-0123456789";

pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `corecast serve` with an HS256 secret, on a free port.
    pub fn start(extra: &[&str]) -> Server {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--auth-secret", SECRET];
        args.extend_from_slice(extra);
        Self::start_raw(&args, &[])
    }

    /// One shard with the server API on, keyed with `key`.
    pub fn with_api(key: &str) -> Server {
        Server::start(&[
            "--shards",
            "1",
            "--api-listen",
            "127.0.0.1:0",
            "--api-key",
            key,
        ])
    }

    pub fn start_raw(args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::start_limited(args, env, None)
    }

    /// Like [`Server::start_raw`], with the process's open-file limit set
    /// to `nofile` when given.
    pub fn start_limited(args: &[&str], env: &[(&str, &str)], nofile: Option<u64>) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_corecast"));
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; it runs in the child
            // between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let r = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("CORECAST_LOG", "info,corecast=debug")
            // Tests that keep bans say where; tests of rate limits set them.
            .env("CORECAST_BAN_FILE", "")
            .env("CORECAST_HISTORY_FILE", "")
            .env("CORECAST_RATE_LIMITS", "*=off")
            // Tests open connections from 127.0.0.1 by the hundred.
            .env("CORECAST_MAX_HANDSHAKES_PER_IP", "0")
            .env("CORECAST_MAX_CONNECTIONS_PER_IP", "0");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start corecast");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("corecast listening on ").nth(1) {
                    let addr: SocketAddr = rest.split_whitespace().next().unwrap().parse().unwrap();
                    let _ = tx.send(addr);
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("corecast did not start:\n{}", log.lock().unwrap());
            }
        };
        let s = Server { child, addr, log };
        s.wait_ready();
        s
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if http_get(self.addr, "/ready").0 == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("never ready:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Where the server API listens (it says so right after starting).
    pub fn api_addr(&self) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(rest) = self.log().split("server API listening on ").nth(1) {
                return rest.split_whitespace().next().unwrap().parse().unwrap();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the server API did not start:\n{}", self.log());
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub fn metrics(&self) -> String {
        http_get(self.addr, "/metrics").1
    }

    /// Sum of a metric over its series.
    pub fn metric(&self, name: &str) -> u64 {
        self.metrics()
            .lines()
            .filter(|l| {
                l.starts_with(name)
                    && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    pub fn sigterm(&self) {
        unsafe {
            libc_kill(self.child.id() as i32, 15);
        }
    }

    /// Waits for the process to exit and returns its code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn token(user: &str, ttl: i64) -> String {
    let cfg = AuthConfig {
        secret: Some(SECRET.into()),
        ..AuthConfig::default()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    corecast::auth::mint(&cfg, user, ttl, None, now).unwrap()
}

/// A token with these claims, signed with the test secret.
pub fn token_with(claims: &corecast::auth::Claims) -> String {
    let cfg = AuthConfig {
        secret: Some(SECRET.into()),
        ..AuthConfig::default()
    };
    corecast::auth::mint_claims(&cfg, claims, None).unwrap()
}

/// Seconds since the epoch, `ahead` from now.
pub fn exp_in(ahead: i64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    (now as i64 + ahead) as u64
}

/// A plain HTTP GET; returns the status and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Sends raw request bytes and returns the whole response.
pub fn http_raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends a request and reads the response head (and the body of a refusal,
/// which closes): for upgrades that may succeed, where reading to the end
/// would wait for the connection to close. Returns it and the socket.
pub fn http_head(addr: SocketAddr, request: &[u8]) -> (String, TcpStream) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let mut tmp = [0u8; 1024];
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).into_owned();
            if head.starts_with("HTTP/1.1 101") {
                return (head, s);
            }
        }
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&tmp[..n]),
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), s)
}

pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// A WebSocket client on a raw socket, for frames a real client would
/// never send.
pub struct Raw {
    pub s: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug, PartialEq)]
pub struct RawFrame {
    pub opcode: OpCode,
    pub fin: bool,
    pub payload: Vec<u8>,
}

impl RawFrame {
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == OpCode::Close && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

impl Raw {
    pub fn connect(addr: SocketAddr, path: &str, extra: &str) -> Raw {
        Self::connect_with(TcpStream::connect(addr).unwrap(), path, extra)
    }

    pub fn connect_with(mut s: TcpStream, path: &str, extra: &str) -> Raw {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(upgrade_request(path, extra).as_bytes())
            .unwrap();
        let mut buf = Vec::new();
        let mut tmp = [0u8; 4096];
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let n = s.read(&mut tmp).unwrap();
            assert!(
                n > 0,
                "closed during handshake: {}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&tmp[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        buf.drain(..head_end);
        Raw { s, buf }
    }

    pub fn send(&mut self, fin: bool, opcode: OpCode, payload: &[u8]) {
        self.s
            .write_all(&encode_masked(fin, opcode, payload, [9, 8, 7, 6]))
            .unwrap();
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    /// The next frame, or None when the server closed the socket.
    pub fn recv(&mut self) -> Option<RawFrame> {
        let mut tmp = [0u8; 65536];
        loop {
            if let Ok(Some(h)) = parse_header(&self.buf) {
                assert!(h.mask.is_none(), "server frames are never masked");
                let total = h.header_len + h.payload_len as usize;
                if self.buf.len() >= total {
                    let payload = self.buf[h.header_len..total].to_vec();
                    self.buf.drain(..total);
                    return Some(RawFrame {
                        opcode: h.opcode,
                        fin: h.fin,
                        payload,
                    });
                }
            }
            match self.s.read(&mut tmp) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }

    /// Skips frames until a close frame; returns its code (None if the
    /// socket closed without one).
    pub fn recv_close(&mut self) -> Option<u16> {
        while let Some(f) = self.recv() {
            if f.opcode == OpCode::Close {
                return f.close_code().or(Some(1005));
            }
        }
        None
    }

    pub fn json(&mut self, v: Value) {
        self.send(true, OpCode::Text, v.to_string().as_bytes());
    }

    /// The next text frame as JSON.
    pub fn recv_json(&mut self) -> Value {
        loop {
            let f = self.recv().expect("connection closed");
            if f.opcode == OpCode::Text {
                return serde_json::from_slice(&f.payload).unwrap();
            }
        }
    }

    /// Whether the server has closed the TCP connection (EOF).
    pub fn is_eof(&mut self) -> bool {
        let mut tmp = [0u8; 65536];
        loop {
            match self.s.read(&mut tmp) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects with tokio-tungstenite, optionally offering a subprotocol.
pub async fn ws_connect(url: &str, protocol: Option<&str>) -> Ws {
    let mut req = url.into_client_request().unwrap();
    if let Some(p) = protocol {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", p.parse().unwrap());
    }
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("connect");
    ws
}

/// Connects as `user` with a `?token=` and returns the socket and its `ready`.
pub async fn ws_user(server: &Server, user: &str) -> (Ws, Value) {
    let mut ws = ws_connect(
        &server.url(&format!("/ws?token={}", token(user, 600))),
        None,
    )
    .await;
    let ready = recv_event(&mut ws, "ready").await;
    (ws, ready)
}

pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// The next text message as JSON (fails after 10 s).
pub async fn recv(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("timed out waiting for a message")
            .expect("stream ended")
            .expect("websocket error");
        match m {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => continue,
        }
    }
}

/// Skips messages until one whose `t` is `event`.
pub async fn recv_event(ws: &mut Ws, event: &str) -> Value {
    for _ in 0..10_000 {
        let v = recv(ws).await;
        if v["t"] == event {
            return v;
        }
    }
    panic!("no {event}");
}

/// Reads until the server's close frame and returns its code.
pub async fn recv_close(ws: &mut Ws) -> Option<CloseCode> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("timed out waiting for close")
        {
            Some(Ok(Message::Close(c))) => return c.map(|c| c.code),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

pub async fn join(ws: &mut Ws, channel: &str, id: u64) -> Value {
    send(
        ws,
        json!({"t": "channel:join", "id": id, "d": {"channelId": channel}}),
    )
    .await;
    loop {
        let v = recv(ws).await;
        if v["t"] == "ack" && v["id"] == id {
            return v;
        }
        assert_ne!(v["t"], "error", "{v}");
    }
}

/// A JSON client that keeps what it receives, so that a test can wait for
/// an ack or an event without losing the others that arrive meanwhile.
pub struct Peer {
    pub ws: Ws,
    pub inbox: std::collections::VecDeque<Value>,
    pub ready: Value,
    next_id: u64,
}

impl Peer {
    /// Connects as `user` (query `extra`, e.g. `&device=mobile`) until the
    /// connection lands on `shard` (the kernel spreads connections over the
    /// shards' listeners).
    pub async fn on(server: &Server, user: &str, shard: u64, extra: &str) -> Peer {
        Self::with_token(server, &token(user, 600), shard, extra).await
    }

    /// Like [`Peer::on`], with a token of one's own.
    pub async fn with_token(server: &Server, token: &str, shard: u64, extra: &str) -> Peer {
        for _ in 0..200 {
            let url = server.url(&format!("/ws?token={token}{extra}"));
            let mut ws = ws_connect(&url, None).await;
            let ready = recv_event(&mut ws, "ready").await;
            if ready["d"]["shard"] == shard {
                return Peer {
                    ws,
                    inbox: Default::default(),
                    ready,
                    next_id: 1000,
                };
            }
            // Close the others properly: once the server's close frame is
            // back, it has told the user's home shard the device is gone.
            let _ = ws.close(None).await;
            let _ = recv_close(&mut ws).await;
        }
        panic!("no connection landed on shard {shard}");
    }

    pub fn session(&self) -> String {
        self.ready["d"]["sessionId"].as_str().unwrap().to_string()
    }

    pub async fn send(&mut self, v: Value) {
        send(&mut self.ws, v).await
    }

    /// Sends event `t` with payload `d` and waits for its answer (an `ack`,
    /// an `error`, or a `heartbeat:ack`), keeping everything else.
    pub async fn request(&mut self, t: &str, d: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        self.send(json!({"t": t, "id": id, "d": d})).await;
        loop {
            let v = recv(&mut self.ws).await;
            let answer = v["t"] == "ack" || v["t"] == "error" || v["t"] == "heartbeat:ack";
            if answer && v["id"] == id {
                return v;
            }
            self.inbox.push_back(v);
        }
    }

    /// Like [`Peer::request`], expecting an ack; returns its `d`.
    pub async fn ok(&mut self, t: &str, d: Value) -> Value {
        let v = self.request(t, d.clone()).await;
        assert_eq!(v["t"], "ack", "{t} {d}: {v}");
        v["d"].clone()
    }

    /// Like [`Peer::request`], expecting an error; returns its code.
    pub async fn refused(&mut self, t: &str, d: Value) -> String {
        let v = self.request(t, d.clone()).await;
        assert_eq!(v["t"], "error", "{t} {d}: {v}");
        v["d"]["code"].as_str().unwrap().to_string()
    }

    /// The next event named `t` (from what was kept, then from the socket),
    /// dropping other events before it.
    pub async fn event(&mut self, t: &str) -> Value {
        while let Some(v) = self.inbox.pop_front() {
            if v["t"] == t {
                return v;
            }
        }
        recv_event(&mut self.ws, t).await
    }

    /// The next event named `t` whose `d.<key>` is `value`.
    pub async fn event_for(&mut self, t: &str, key: &str, value: &str) -> Value {
        loop {
            let v = self.event(t).await;
            if v["d"][key] == value {
                return v;
            }
        }
    }

    /// Asks for `user`'s presence and forgets the `presence:changed` events
    /// received before the answer: the answer travels from the user's home
    /// shard the way those events do, so it comes after all of them.
    pub async fn settle_presence(&mut self, user: &str) -> Value {
        let bulk = self
            .ok("presence:get_bulk", json!({"userIds": [user]}))
            .await;
        self.inbox.retain(|v| v["t"] != "presence:changed");
        bulk["presences"][0].clone()
    }

    /// Reads `presence:changed` events until one satisfies `want`.
    pub async fn presence_until(&mut self, want: impl Fn(&Value) -> bool) -> Value {
        loop {
            let v = self.event("presence:changed").await;
            if want(&v["d"]) {
                return v;
            }
        }
    }

    /// Every event received until (and with) the next one named `last`.
    pub async fn events_until(&mut self, last: &str) -> Vec<Value> {
        let mut out: Vec<Value> = Vec::new();
        loop {
            let v = match self.inbox.pop_front() {
                Some(v) => v,
                None => recv(&mut self.ws).await,
            };
            let done = v["t"] == last;
            out.push(v);
            if done {
                return out;
            }
        }
    }

    /// Sends a heartbeat and returns what arrived before its answer: a
    /// barrier showing that nothing else was queued for this connection.
    pub async fn drain(&mut self) -> Vec<Value> {
        self.request("heartbeat", json!({})).await;
        self.inbox.drain(..).collect()
    }
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's resident memory, in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }

    /// How many log lines contain `text`.
    pub fn log_count(&self, text: &str) -> usize {
        self.log().lines().filter(|l| l.contains(text)).count()
    }
}

impl Server {
    /// Waits for the process to exit and returns its code as soon as it
    /// has (no polling delay), killing it after `within`.
    pub fn wait_exit_now(&mut self, within: Duration) -> Option<i32> {
        let pid = self.pid() as i32;
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watch = done.clone();
        std::thread::spawn(move || {
            std::thread::sleep(within);
            if !watch.load(std::sync::atomic::Ordering::SeqCst) {
                unsafe {
                    libc_kill(pid, 9);
                }
            }
        });
        let status = self.child.wait().unwrap();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        status.code()
    }
}

/// A port free at the time of asking, on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One request to the server API on a connection of its own: the status
/// and the JSON body.
pub fn api_call(
    api: SocketAddr,
    method: &str,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let out = http_raw(api, req.as_bytes());
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Connects with tokio-tungstenite sending these extra request headers
/// (an `Origin`, as browsers do).
pub async fn ws_connect_with(url: &str, headers: &[(&str, &str)]) -> Ws {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("connect");
    ws
}

/// Reads until the server's close frame; returns its code and reason
/// (None if the connection ended without one), and the text messages
/// before it.
pub async fn close_of(ws: &mut Ws) -> (Option<(u16, String)>, Vec<Value>) {
    let mut before = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("timed out waiting for close")
        {
            Some(Ok(Message::Close(c))) => {
                return (c.map(|c| (u16::from(c.code), c.reason.to_string())), before)
            }
            Some(Ok(Message::Text(t))) => before.push(serde_json::from_str(&t).unwrap()),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return (None, before),
        }
    }
}

/// Raises this process's open-file limit to its hard limit (tests that
/// hold many sockets).
pub fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
}

/// The arguments of `corecast serve` on one shard of a free port with the
/// test secret, and `extra`; for `Server::start_raw`, which leaves out the
/// harness's settings (the default limits apply).
pub fn one_shard_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--auth-secret",
        SECRET,
        "--shards",
        "1",
    ];
    args.extend_from_slice(extra);
    args
}

/// What the event stream's optional kinds are tested with: alice and bob
/// join `general`, alice says hello there and bob reads it, then alice
/// sends bob a direct message twice with one nonce (sent once). Returns
/// the message's id and the direct message's first ack.
pub async fn joins_a_read_and_a_dm(alice: &mut Peer, bob: &mut Peer) -> (String, Value) {
    alice
        .ok("channel:join", json!({"channelId": "general"}))
        .await;
    bob.ok("channel:join", json!({"channelId": "general"}))
        .await;
    let sent = alice
        .ok(
            "message:send",
            json!({"channelId": "general", "content": "hello"}),
        )
        .await;
    let id = sent["messageId"].as_str().unwrap().to_owned();
    bob.event("message:new").await;
    bob.ok(
        "message:mark_read",
        json!({"channelId": "general", "messageId": id}),
    )
    .await;
    let dm = json!({"toUserId": "bob", "content": "psst", "nonce": "d1"});
    let first = alice.ok("dm:send", dm.clone()).await;
    let again = alice.ok("dm:send", dm).await;
    assert_eq!(again["duplicate"], true, "{again}");
    (id, first)
}
