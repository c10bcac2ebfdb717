//! The epoll driver: a monoio runtime with a task per connection, used
//! where io_uring is unavailable (or `io_driver = "epoll"`).

use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::{TcpListener, TcpStream};

use crate::admission::Refusal;
use crate::node::Node;
use crate::signal::yield_now;
use crate::ws::handshake::{self, Request};
use crate::ws::{close, frame, Decoder, OpCode};

use super::conn::{ConnIo, State};
use super::*;

pub(super) async fn shard_main(
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
    monoio::spawn(poll_flusher(shard.clone()));
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

pub(super) async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
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

pub(super) async fn drain_mesh(shard: Rc<Shard>, mut bell: monoio::net::UnixStream) {
    let node = shard.node.clone();
    let me = shard.id;
    let mut buf = vec![0u8; 64];
    let mut idle = 0u32;
    loop {
        let got = shard.drain_mesh();
        for a in shard.adopted.take() {
            monoio::spawn(serve_adopted(shard.clone(), a));
        }
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

pub(super) async fn sweep(shard: Rc<Shard>) {
    let tick = shard.sweep_tick();
    let ping = frame::encode(OpCode::Ping, b"");
    loop {
        monoio::time::sleep(tick).await;
        if shard.stop.is_set() {
            return;
        }
        let now = shard.outq.now_ms();
        shard.run_deferred();
        if shard.burst_over() {
            crate::node::give_back_memory();
        }
        shard.polls.borrow_mut().sweep(&shard, now, &ping);
        for io in shard.registry.borrow().slots.iter().flatten() {
            shard.check_keepalive(io, now, &ping);
        }
    }
}

/// Answers the long-polling requests whose sessions queued frames (epoll
/// driver; the io_uring loop looks every round).
pub(super) async fn poll_flusher(shard: Rc<Shard>) {
    loop {
        std::future::poll_fn(|cx| {
            if shard.stop.is_set() || !shard.outq.polls.borrow().is_empty() {
                std::task::Poll::Ready(())
            } else {
                shard.outq.poll_waker.set(Some(cx.waker().clone()));
                std::task::Poll::Pending
            }
        })
        .await;
        if shard.stop.is_set() {
            return;
        }
        shard.flush_polls();
        shard.outbox.borrow_mut().flush();
    }
}

/// Runs the engine's deadlines (epoll driver; the io_uring loop checks them
/// every round). Wakes at the next deadline, or every 100 ms to notice new
/// ones.
pub(super) async fn engine_timers(shard: Rc<Shard>) {
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

pub(super) async fn write_and_close(mut stream: TcpStream, response: Vec<u8>) {
    let (_, _) = stream.write_all(response).await;
    let _ = stream.shutdown().await;
}

/// Why no request head came.
pub(super) enum HeadError {
    /// The peer went away or missed the deadline.
    Gone,
    Invalid(handshake::HandshakeError),
    /// The shard's budget for bytes of unauthenticated connections is spent.
    Busy,
    /// The body the request announces is past the bound.
    TooLarge,
}

/// Reads the request head (and the body a plain request announces)
/// within the handshake deadline; `buf` may hold bytes already.
pub(super) async fn read_request(
    shard: &Shard,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    held: &mut PreAuth,
) -> Result<(Request, usize), HeadError> {
    let cfg = &shard.handshake;
    let deadline = Duration::from_millis(shard.node.config.handshake_timeout_ms);
    let complete = |buf: &BytesMut| match handshake::parse_request(buf, cfg) {
        Ok(None) => Ok(None),
        Ok(Some((req, consumed))) => {
            let body = super::body_len(&req);
            if body > super::max_body(shard) {
                Err(HeadError::TooLarge)
            } else if buf.len() < consumed + body {
                Ok(None)
            } else {
                Ok(Some((req, consumed)))
            }
        }
        Err(e) => Err(HeadError::Invalid(e)),
    };
    let read = async {
        if !buf.is_empty() {
            if let Some(r) = complete(buf)? {
                return Ok(r);
            }
        }
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
            if let Some(r) = complete(buf)? {
                return Ok(r);
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
pub(super) struct PreAuth {
    pub(super) shard: Rc<Shard>,
    pub(super) held: usize,
}

impl PreAuth {
    pub(super) fn new(shard: &Rc<Shard>) -> PreAuth {
        PreAuth {
            shard: shard.clone(),
            held: 0,
        }
    }

    /// Counts `n` bytes instead of what was counted; false when that spent
    /// the shard's budget.
    pub(super) fn set(&mut self, n: usize) -> bool {
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

pub(super) async fn serve_socket(shard: Rc<Shard>, stream: TcpStream) {
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
    serve_request(shard, stream, BytesMut::with_capacity(2048), count, peer).await
}

/// A socket another shard handed over (see `polling.rs`): served from the
/// bytes it had read.
pub(super) async fn serve_adopted(shard: Rc<Shard>, a: crate::engine::Adoption) {
    let crate::engine::Adoption { fd, bytes, ip } = a;
    let std_stream = std::net::TcpStream::from(fd);
    let peer = std_stream
        .peer_addr()
        .map_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |a| a.ip());
    let Ok(stream) = TcpStream::from_std(std_stream) else {
        shard.node.admission.release_ip(ip);
        return;
    };
    let mut count = SocketCount::new(&shard);
    count.ip = ip;
    serve_request(shard, stream, BytesMut::from(&bytes[..]), count, peer).await
}

/// Reads a request and serves it: a reply, a long-polling request, a
/// hand-over, or a WebSocket session.
async fn serve_request(
    shard: Rc<Shard>,
    mut stream: TcpStream,
    mut buf: BytesMut,
    mut count: SocketCount,
    peer: IpAddr,
) {
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
        Err(HeadError::TooLarge) => return write_and_close(stream, super::body_too_large()).await,
    };
    let body_len = super::body_len(&req);
    let routed = shard.route(
        req,
        &buf[consumed..consumed + body_len],
        peer,
        &mut count.ip,
    );
    let accepted = match routed {
        Routed::Reply(r) => return write_and_close(stream, r).await,
        Routed::Poll(req) => return serve_poll(shard, stream, *req, count).await,
        Routed::HandOver(owner) => {
            use std::os::fd::{FromRawFd, IntoRawFd};
            let ip = std::mem::take(&mut count.ip);
            // SAFETY: the descriptor leaves the stream (deregistered from
            // this shard's poller) and is owned by what carries it.
            let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(stream.into_raw_fd()) };
            return super::hand_over(&shard, owner, fd, buf.to_vec(), ip);
        }
        Routed::Accept(a) => a,
    };
    let _ = buf.split_to(consumed);
    // The WebSocket phase runs as a task of its own, so that the handshake's
    // state (its buffer, timer and parser) is freed rather than carried for
    // the life of the connection.
    if buf.is_empty() {
        buf = BytesMut::new();
    }
    monoio::spawn(serve_ws(shard, stream, buf, accepted, count, held));
}

/// A long-polling request: the socket waits for the session's answer (or
/// for the client to leave), then closes.
async fn serve_poll(
    shard: Rc<Shard>,
    stream: TcpStream,
    req: super::polling::PollRequest,
    _count: SocketCount,
) {
    let io = Rc::new(ConnIo::for_task(
        stream.as_raw_fd(),
        shard.outq.clone(),
        shard.outq.now_ms(),
    ));
    let (mut rd, wr) = stream.into_split();
    monoio::spawn(conn::writer(io.clone(), wr));
    shard.poll(req, io.clone());
    let gone = async {
        let mut buf = vec![0u8; 512];
        loop {
            let (res, b) = rd.read(buf).await;
            buf = b;
            if !matches!(res, Ok(n) if n > 0) {
                return;
            }
        }
    };
    monoio::select! {
        _ = io.responded() => {}
        _ = gone => {}
    }
    io.abort();
}

/// Answers a socket refused before its request was read, then reads what
/// the client sends for a moment, so that closing does not reset the
/// connection before the client has read the answer.
pub(super) async fn refuse_at_accept(mut stream: TcpStream, response: Vec<u8>) {
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

/// The read buffer's size follows the traffic: reads that fill it double
/// it (up to 64 KiB), and once it is empty and quiet it goes back to 512
/// bytes, so an idle connection keeps a small buffer and a busy one reads
/// in large chunks.
pub(super) struct ReadSize {
    pub(super) size: usize,
}

impl ReadSize {
    const MIN: usize = 512;
    const MAX: usize = 64 * 1024;

    pub(super) fn new() -> Self {
        ReadSize { size: Self::MIN }
    }

    /// Makes room for the next read, releasing a large buffer when empty.
    pub(super) fn prepare(&self, buf: &mut BytesMut) {
        if buf.is_empty() && buf.capacity() > 2 * self.size {
            *buf = BytesMut::with_capacity(self.size);
        } else if buf.capacity() - buf.len() < self.size / 2 {
            buf.reserve(self.size);
        }
    }

    /// Learns from a read of `n` bytes into `room` bytes of space.
    pub(super) fn update(&mut self, n: usize, room: usize) {
        if n == room {
            self.size = (self.size * 2).min(Self::MAX);
        } else if n < self.size / 4 {
            self.size = (self.size / 2).max(Self::MIN);
        }
    }
}

pub(super) async fn serve_ws(
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
                io.received(shard.outq.now_ms());
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
