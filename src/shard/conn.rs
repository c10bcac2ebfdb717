//! One connection's outbound side: a bounded queue of refcounted frames and
//! what writes it with vectored writes (the io_uring loop of
//! [`super::uring`], or the [`writer`] task on epoll).
//!
//! Every frame a connection receives is a clone of a shared [`Bytes`] (a
//! refcount increment). Frames waiting to be written are linked into one
//! arena per shard ([`Outq`]), so a connection with nothing queued holds no
//! queue buffer at all. The writer takes every queued frame at once and
//! hands them to the kernel in one vectored submission. Every frame counts
//! against the bound, whatever its kind (data, pong, ping, HTTP response):
//! when the queue already holds `max_frames` frames or `max_bytes` bytes,
//! the connection is too slow for its bound: its queue is dropped, it is
//! sent close 1013 and, if it does not take even that, its socket is shut
//! after the close timeout.
//!
//! Deadlines are kept as milliseconds since the shard started ([`Outq::ms`])
//! rather than `Instant`s, which keeps [`ConnIo`] at 80 bytes.

use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use monoio::buf::IoVecBuf;
use monoio::io::AsyncWriteRent;

use crate::engine::Outbound;
use crate::metrics::ShardMetrics;
use crate::node::Node;
use crate::ws::{close, frame, OpCode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Frames flow both ways.
    Open,
    /// A close frame is queued or sent; no more data frames.
    Closing,
    /// The socket is being torn down; the writer exits.
    Done,
}

/// "No time": an unset deadline or timestamp.
pub const NEVER: u64 = u64::MAX;
/// End of a frame list.
const NIL: u32 = u32::MAX;

/// On the loop's ready list.
const LISTED: u8 = 1;
/// The writer holds frames it took from the queue.
const WRITING: u8 = 2;
/// A control frame waits: write without the configured write delay.
const URGENT: u8 = 4;
/// Nothing is written until the user's home shard admits the connection
/// (its 101 response waits with the rest).
const HELD: u8 = 8;
/// Engine.IO's heartbeat: the server pings (`2`) every interval and only
/// the client's pong (`3`) counts as an answer, not any bytes read.
const ENGINE_IO: u8 = 32;
/// An HTTP request of a long-polling session waits for its response (the
/// socket shuts once the response is written, not before).
const AWAITING: u8 = 64;
/// A Socket.IO client of `socket.io-msgpack-parser`.
const MSGPACK: u8 = 128;
/// A refusal by the user's home shard takes the WebSocket form: the 101
/// goes, then a close frame (4029), instead of an HTTP 429.
const REFUSE_IN_WEBSOCKET: u8 = 16;
/// An arena that empties keeps at most this many nodes' worth of memory.
const ARENA_KEEP: usize = 4096;

/// The frames queued for one connection: a list through the shard's arena.
#[derive(Debug, Clone, Copy)]
pub struct FrameList {
    head: u32,
    tail: u32,
    len: u32,
}

impl FrameList {
    pub const EMPTY: FrameList = FrameList {
        head: NIL,
        tail: NIL,
        len: 0,
    };

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

struct Link {
    frame: Option<Bytes>,
    next: u32,
}

/// Storage for every queued frame of a shard: nodes linked into one list
/// per connection, with a free list. It grows to the largest number of
/// frames queued at once (bounded by the per-connection bounds) and gives
/// its memory back when it empties.
#[derive(Default)]
pub struct FrameArena {
    nodes: Vec<Link>,
    free: Option<u32>,
    live: usize,
}

impl FrameArena {
    pub fn push(&mut self, list: &mut FrameList, frame: Bytes) {
        let node = Link {
            frame: Some(frame),
            next: NIL,
        };
        let i = match self.free {
            Some(i) => {
                let next = self.nodes[i as usize].next;
                self.free = (next != NIL).then_some(next);
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        if list.tail == NIL {
            list.head = i;
        } else {
            self.nodes[list.tail as usize].next = i;
        }
        list.tail = i;
        list.len += 1;
        self.live += 1;
    }

    pub fn pop(&mut self, list: &mut FrameList) -> Option<Bytes> {
        if list.head == NIL {
            return None;
        }
        let i = list.head;
        let node = &mut self.nodes[i as usize];
        let frame = node.frame.take();
        list.head = node.next;
        node.next = self.free.unwrap_or(NIL);
        self.free = Some(i);
        if list.head == NIL {
            list.tail = NIL;
        }
        list.len -= 1;
        self.live -= 1;
        if self.live == 0 && self.nodes.capacity() > ARENA_KEEP {
            self.nodes = Vec::with_capacity(ARENA_KEEP);
            self.free = None;
        }
        frame
    }

    pub fn clear(&mut self, list: &mut FrameList) {
        while self.pop(list).is_some() {}
    }

    /// Frames queued across all lists.
    pub fn live(&self) -> usize {
        self.live
    }
}

/// What the connections of one shard share: limits, the frame arena, the
/// clock base, and the io_uring loop's list of connections to visit.
pub struct Outq {
    node: Arc<Node>,
    shard: usize,
    max_frames: u32,
    max_bytes: u32,
    epoch: Instant,
    frames: RefCell<FrameArena>,
    /// Slots of the io_uring loop's connections that queued frames or were
    /// aborted since the loop last looked.
    pub(super) ready: RefCell<Vec<u32>>,
    /// Long-polling sessions that queued frames or closed since the shard
    /// last looked, and the epoll driver's task that looks.
    pub(super) polls: RefCell<Vec<u32>>,
    pub(super) poll_waker: Cell<Option<Waker>>,
}

impl Outq {
    pub fn new(node: Arc<Node>, shard: usize) -> Rc<Outq> {
        let c = &node.config;
        Rc::new(Outq {
            max_frames: c.outbound_queue_frames.min(u32::MAX as usize) as u32,
            max_bytes: c.outbound_queue_bytes.min(u32::MAX as usize) as u32,
            node,
            shard,
            epoch: Instant::now(),
            frames: RefCell::new(FrameArena::default()),
            ready: RefCell::new(Vec::new()),
            polls: RefCell::new(Vec::new()),
            poll_waker: Cell::new(None),
        })
    }

    /// `t` in milliseconds since the shard started.
    pub fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    pub fn now_ms(&self) -> u64 {
        self.ms(Instant::now())
    }

    fn metrics(&self) -> &ShardMetrics {
        &self.node.metrics[self.shard]
    }

    /// Frames queued on this shard, all connections together.
    pub fn queued_frames(&self) -> usize {
        self.frames.borrow().live()
    }
}

/// How the writer of a connection learns that there is something to do.
enum Notify {
    /// The shard's io_uring loop: the connection's slot goes on
    /// [`Outq::ready`], once until the loop takes it.
    Loop { slot: u32 },
    /// A writer task parked on a waker (epoll driver).
    Task(Box<Wakers>),
    /// A long-polling session without a socket of its own: its key goes on
    /// [`Outq::polls`], once until the shard takes it, and the shard's
    /// poll flusher is woken (see `polling.rs`).
    Poll { key: u32 },
}

#[derive(Default)]
struct Wakers {
    writer: Cell<Option<Waker>>,
    flushed: Cell<Option<Waker>>,
}

pub struct ConnIo {
    outq: Rc<Outq>,
    notify: Notify,
    fd: RawFd,
    queue: Cell<FrameList>,
    queued_bytes: Cell<u32>,
    state: Cell<State>,
    /// [`LISTED`], [`WRITING`], [`URGENT`], [`HELD`].
    flags: Cell<u8>,
    /// When the close frame was queued (ms, [`NEVER`] while open).
    pub closing_since: Cell<u64>,
    /// Last bytes received (ms).
    pub last_rx: Cell<u64>,
    /// When an unanswered keep-alive ping went out (ms, or [`NEVER`]).
    pub ping_sent: Cell<u64>,
    /// Until when the connection may stay unauthenticated (ms, or
    /// [`NEVER`] once authenticated or when no `auth` is expected).
    pub auth_deadline: Cell<u64>,
}

impl ConnIo {
    /// A connection served by the io_uring loop, in its slot `slot`.
    pub fn for_loop(fd: RawFd, outq: Rc<Outq>, slot: u32, now_ms: u64) -> ConnIo {
        Self::new(fd, outq, Notify::Loop { slot }, now_ms)
    }

    /// The outbound side of a long-polling session: no socket; what it
    /// queues is taken by the session's GET requests.
    pub fn for_poll(outq: Rc<Outq>, key: u32, now_ms: u64) -> ConnIo {
        Self::new(-1, outq, Notify::Poll { key }, now_ms)
    }

    /// A connection whose writes run in a [`writer`] task.
    pub fn for_task(fd: RawFd, outq: Rc<Outq>, now_ms: u64) -> ConnIo {
        Self::new(fd, outq, Notify::Task(Box::default()), now_ms)
    }

    fn new(fd: RawFd, outq: Rc<Outq>, notify: Notify, now_ms: u64) -> ConnIo {
        ConnIo {
            outq,
            notify,
            fd,
            queue: Cell::new(FrameList::EMPTY),
            queued_bytes: Cell::new(0),
            state: Cell::new(State::Open),
            flags: Cell::new(0),
            closing_since: Cell::new(NEVER),
            last_rx: Cell::new(now_ms),
            ping_sent: Cell::new(NEVER),
            auth_deadline: Cell::new(NEVER),
        }
    }

    pub fn fd(&self) -> RawFd {
        self.fd
    }

    pub fn state(&self) -> State {
        self.state.get()
    }

    fn flag(&self, f: u8) -> bool {
        self.flags.get() & f != 0
    }

    /// Sets or clears a flag; returns whether it was set.
    fn set_flag(&self, f: u8, on: bool) -> bool {
        let old = self.flags.get();
        self.flags.set(if on { old | f } else { old & !f });
        old & f != 0
    }

    fn wake_writer(&self) {
        match &self.notify {
            Notify::Task(w) => {
                if let Some(w) = w.writer.take() {
                    w.wake();
                }
            }
            Notify::Loop { slot } => {
                if !self.set_flag(LISTED, true) {
                    self.outq.ready.borrow_mut().push(*slot);
                }
            }
            Notify::Poll { key } => {
                if !self.set_flag(LISTED, true) {
                    self.outq.polls.borrow_mut().push(*key);
                    if let Some(w) = self.outq.poll_waker.take() {
                        w.wake();
                    }
                }
            }
        }
    }

    /// Called by the loop when it takes this connection off its list.
    pub(super) fn unlist(&self) {
        self.set_flag(LISTED, false);
    }

    /// Frames and bytes waiting to be written.
    pub fn queued(&self) -> (usize, usize) {
        (self.queue.get().len(), self.queued_bytes.get() as usize)
    }

    /// Whether frames wait to be written.
    pub fn has_queued(&self) -> bool {
        !self.queue.get().is_empty()
    }

    /// Whether frames wait and may be written now.
    pub fn has_writable(&self) -> bool {
        !self.flag(HELD) && self.has_queued()
    }

    /// Holds every write until [`ConnIo::release`] or [`ConnIo::refuse`].
    pub fn hold(&self) {
        self.set_flag(HELD, true);
    }

    pub fn release(&self) {
        if self.set_flag(HELD, false) && self.has_queued() {
            self.wake_writer();
        }
    }

    /// See [`AWAITING`].
    pub fn await_response(&self) {
        self.set_flag(AWAITING, true);
    }

    pub fn awaiting(&self) -> bool {
        self.flag(AWAITING)
    }

    /// The response of a request that awaited one: queued, then the socket
    /// shuts once it is written. False when the socket is gone.
    pub fn respond(&self, response: Bytes) -> bool {
        self.set_flag(AWAITING, false);
        if self.state.get() != State::Open {
            self.wake_writer();
            return false;
        }
        self.set_flag(URGENT, true);
        self.enqueue(response);
        self.state.set(State::Closing);
        self.closing_since.set(self.outq.now_ms());
        true
    }

    /// Waits until the response a request awaited is written (or the
    /// socket is gone): epoll driver.
    pub async fn responded(&self) {
        let Notify::Task(w) = &self.notify else {
            return;
        };
        std::future::poll_fn(|cx| {
            if self.state.get() == State::Done || (!self.awaiting() && self.is_flushed()) {
                Poll::Ready(())
            } else {
                w.flushed.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }

    /// Queues a frame again (one a long-polling GET took but could not
    /// deliver, or held back), whatever the connection's state: it was
    /// counted once already.
    pub fn requeue(&self, frame: Bytes) {
        self.enqueue(frame);
    }

    /// Takes every queued frame, in order (a long-polling session's GET
    /// takes them to answer with).
    pub fn take_queued(&self) -> Vec<Bytes> {
        let mut q = self.queue.get();
        let mut out = Vec::with_capacity(q.len());
        {
            let mut arena = self.outq.frames.borrow_mut();
            while let Some(f) = arena.pop(&mut q) {
                out.push(f);
            }
        }
        self.queue.set(q);
        self.queued_bytes.set(0);
        out
    }

    /// Marks a long-polling session as looked at (see [`Notify::Poll`]).
    pub(super) fn unlist_poll(&self) {
        self.set_flag(LISTED, false);
    }

    /// An Engine.IO session whose client has not answered a ping for an
    /// interval and a timeout: gone.
    pub fn engine_io_expired(&self, now: u64, c: &crate::config::Config) -> bool {
        self.engine_io()
            && now.saturating_sub(self.last_rx.get()) >= c.ping_interval_ms + c.ping_timeout_ms
    }

    /// Keeps Engine.IO's heartbeat (see [`ENGINE_IO`]).
    pub fn set_engine_io(&self) {
        self.set_flag(ENGINE_IO, true);
    }

    pub fn engine_io(&self) -> bool {
        self.flag(ENGINE_IO)
    }

    /// Bytes arrived at `now`: for a WebSocket peer, proof of life that
    /// answers a keep-alive ping (Engine.IO waits for its pong instead).
    pub fn received(&self, now: u64) {
        if !self.engine_io() {
            self.heard(now);
        }
    }

    /// The peer answered: the next ping is an interval from now.
    pub fn heard(&self, now: u64) {
        self.last_rx.set(now);
        self.ping_sent.set(NEVER);
    }

    /// See [`REFUSE_IN_WEBSOCKET`].
    pub fn refuse_in_websocket(&self) {
        self.set_flag(REFUSE_IN_WEBSOCKET, true);
    }

    /// Refuses a held connection with an HTTP response instead of what was
    /// queued (nothing of it was written); a connection already released,
    /// or one refused in the WebSocket form, is closed with `code` instead.
    pub fn refuse(&self, response: Bytes, code: u16, reason: &str) {
        if self.set_flag(REFUSE_IN_WEBSOCKET, false) && self.flag(HELD) {
            // The 101 goes (the first frame queued), then the close frame;
            // what the session queued after the 101 does not.
            let mut q = self.queue.get();
            let first = self.outq.frames.borrow_mut().pop(&mut q);
            self.queue.set(q);
            self.drop_queue();
            if let Some(f) = first {
                self.enqueue(f);
            }
            self.release();
            return self.close(code, reason);
        }
        if !self.set_flag(HELD, false) {
            return self.close(code, reason);
        }
        if self.state.get() == State::Done {
            return;
        }
        self.drop_queue();
        self.set_flag(URGENT, true);
        self.enqueue(response);
        self.state.set(State::Closing);
        self.closing_since.set(self.outq.now_ms());
    }

    /// Whether a control frame is queued (it does not wait for the write
    /// delay).
    pub fn is_urgent(&self) -> bool {
        self.flag(URGENT)
    }

    /// Whether nothing is queued or being written.
    pub fn is_flushed(&self) -> bool {
        !self.has_queued() && !self.flag(WRITING)
    }

    fn enqueue(&self, frame: Bytes) {
        let len = frame.len().min(u32::MAX as usize) as u32;
        self.queued_bytes
            .set(self.queued_bytes.get().saturating_add(len));
        let mut q = self.queue.get();
        self.outq.frames.borrow_mut().push(&mut q, frame);
        self.queue.set(q);
        self.wake_writer();
    }

    fn drop_queue(&self) {
        let mut q = self.queue.get();
        self.outq.frames.borrow_mut().clear(&mut q);
        self.queue.set(q);
        self.queued_bytes.set(0);
    }

    /// Whether a frame of `len` bytes fits within the connection's bound.
    /// When it does not, the connection is too slow for its bound: its
    /// queue is dropped (its memory given back at once) and it is closed
    /// with 1013.
    fn admit(&self, len: usize) -> bool {
        let (frames, queued) = (self.queue.get().len, self.queued_bytes.get());
        let o = &self.outq;
        if frames == 0 || (frames < o.max_frames && queued as usize + len <= o.max_bytes as usize) {
            return true;
        }
        o.metrics().slow_consumer_closes.inc();
        tracing::debug!(
            shard = o.shard,
            queued_frames = frames,
            queued_bytes = queued,
            "slow consumer closed"
        );
        self.drop_queue();
        self.close(close::TRY_AGAIN_LATER, "slow consumer: outbound queue full");
        false
    }

    /// Queues a data frame within the bound (see the module doc).
    pub fn push_data(&self, frame: &Bytes) -> bool {
        if self.state.get() != State::Open || !self.admit(frame.len()) {
            return false;
        }
        self.enqueue(frame.clone());
        true
    }

    /// Queues a control frame (a pong, a keep-alive ping) or an HTTP
    /// response: it does not wait for the write delay, and it counts
    /// against the same bound as data, so a peer that sends pings and never
    /// reads the pongs is closed like any slow reader.
    pub fn push_control(&self, frame: Bytes) -> bool {
        if self.state.get() != State::Open || !self.admit(frame.len()) {
            return false;
        }
        self.set_flag(URGENT, true);
        self.enqueue(frame);
        true
    }

    /// Starts the closing handshake: queues a close frame; data stops. The
    /// close frame is the one frame queued past the bound (at most 127
    /// bytes, once per connection), so that a peer is always told why.
    pub fn close(&self, code: u16, reason: &str) {
        if self.engine_io()
            && matches!(
                code,
                close::UNAUTHORIZED | close::KICKED | close::BANNED | close::TOO_MANY
            )
        {
            // A decision about the user: Socket.IO's DISCONNECT first, so
            // that the client does not reconnect by itself ("io server
            // disconnect"), as it would after a transport close.
            let disconnect = if self.flag(MSGPACK) {
                crate::protocol::socketio::msgpack_frame(b"1")
            } else {
                frame::encode(OpCode::Text, b"41")
            };
            self.push_data(&disconnect);
        }
        self.close_with(close::payload(code, reason));
    }

    /// Marks a Socket.IO client of `socket.io-msgpack-parser`.
    pub fn set_msgpack(&self) {
        self.set_flag(MSGPACK, true);
    }

    /// Queues a close frame with this payload (empty, or code and reason).
    pub fn close_with(&self, payload: Bytes) {
        if self.state.get() != State::Open {
            return;
        }
        self.set_flag(URGENT, true);
        self.enqueue(frame::encode(OpCode::Close, &payload));
        self.state.set(State::Closing);
        self.closing_since.set(self.outq.now_ms());
    }

    /// The socket changes hands (a request handed to another shard): this
    /// side is done with it, without shutting it.
    pub fn detach(&self) {
        self.state.set(State::Done);
    }

    /// Tears the socket down: pending reads and writes end at once.
    pub fn abort(&self) {
        if self.state.get() == State::Done {
            return;
        }
        self.state.set(State::Done);
        // SAFETY: shutdown(2) on a descriptor this connection owns; it stays
        // open until its owner closes it. (A long-polling session has none.)
        if self.fd >= 0 {
            unsafe {
                libc::shutdown(self.fd, libc::SHUT_RDWR);
            }
        }
        self.wake_writer();
        if let Notify::Task(w) = &self.notify {
            if let Some(w) = w.flushed.take() {
                w.wake();
            }
        }
    }

    /// Moves up to `max` queued frames into `batch` for one vectored write;
    /// returns their bytes. The connection counts as writing until
    /// [`ConnIo::written`].
    pub(super) fn take_batch(&self, batch: &mut Batch, max: usize) -> usize {
        let mut q = self.queue.get();
        let bytes = batch.fill(&mut self.outq.frames.borrow_mut(), &mut q, max);
        self.queue.set(q);
        let taken = bytes.min(u32::MAX as usize) as u32;
        self.queued_bytes
            .set(self.queued_bytes.get().saturating_sub(taken));
        self.set_flag(WRITING, true);
        self.set_flag(URGENT, false);
        bytes
    }

    /// The frames of the last [`ConnIo::take_batch`] are written (or the
    /// write failed).
    pub(super) fn written(&self) {
        self.set_flag(WRITING, false);
    }

    /// Waits until everything queued has been written (or the socket died).
    /// Only for connections with a writer task.
    pub async fn flushed(&self) {
        let Notify::Task(w) = &self.notify else {
            return;
        };
        std::future::poll_fn(|cx| {
            if self.state.get() == State::Done || self.is_flushed() {
                Poll::Ready(())
            } else {
                w.flushed.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        self.drop_queue();
    }
}

impl Outbound for Rc<ConnIo> {
    #[inline]
    fn push(&self, frame: &Bytes) -> bool {
        self.push_data(frame)
    }

    fn close(&self, code: u16, reason: &str) {
        ConnIo::close(self, code, reason)
    }

    fn admitted(&self) {
        self.release();
    }

    fn refused(&self, reason: &str) {
        let r = crate::admission::Refusal::TooManyForUser;
        let code = if self.flag(REFUSE_IN_WEBSOCKET) {
            close::TOO_MANY
        } else {
            close::POLICY_VIOLATION
        };
        self.refuse(Bytes::from(r.response()), code, reason);
    }
}

/// Frames taken from the queue, with the iovec array the kernel reads.
#[derive(Default)]
pub(super) struct Batch {
    frames: Vec<Bytes>,
    iov: Vec<libc::iovec>,
    first: usize,
}

// SAFETY: the iovecs point into the `Bytes` held in `frames`, whose heap data
// does not move while the batch is owned by the runtime; `iov` itself is not
// modified during a submission.
unsafe impl IoVecBuf for Batch {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iov[self.first..].as_ptr()
    }
    fn read_iovec_len(&self) -> usize {
        self.iov.len() - self.first
    }
}

impl Batch {
    /// The iovecs still to write.
    pub(super) fn pending(&self) -> &[libc::iovec] {
        &self.iov[self.first..]
    }

    pub(super) fn frames(&self) -> usize {
        self.frames.len()
    }

    pub(super) fn clear(&mut self) {
        self.frames.clear();
        self.iov.clear();
        self.first = 0;
    }

    /// Keeps room for at most `frames` frames (the batch is empty).
    pub(super) fn shrink(&mut self, frames: usize) {
        self.frames.shrink_to(frames);
        self.iov.shrink_to(frames);
    }

    fn fill(&mut self, arena: &mut FrameArena, queue: &mut FrameList, max: usize) -> usize {
        self.clear();
        let mut bytes = 0;
        while self.frames.len() < max {
            let Some(f) = arena.pop(queue) else { break };
            bytes += f.len();
            self.iov.push(libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            });
            self.frames.push(f);
        }
        bytes
    }

    pub(super) fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let v = &mut self.iov[self.first];
            if n >= v.iov_len {
                n -= v.iov_len;
                self.first += 1;
            } else {
                // SAFETY: n < iov_len, so the pointer stays within the frame.
                v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
                v.iov_len -= n;
                n = 0;
            }
        }
    }

    pub(super) fn is_done(&self) -> bool {
        self.first == self.iov.len()
    }
}

/// Frames per `writev`; Linux's IOV_MAX.
pub(super) const MAX_IOV: usize = 1024;

/// The write loop of one connection. Ends when the connection is `Done` or a
/// write fails.
pub async fn writer<W: AsyncWriteRent>(io: Rc<ConnIo>, mut wr: W) {
    let Notify::Task(wakers) = &io.notify else {
        unreachable!("the writer task serves task-notified connections")
    };
    let mut batch = Batch::default();
    let delay = std::time::Duration::from_millis(io.outq.node.config.write_delay_ms);
    loop {
        let go = std::future::poll_fn(|cx| {
            if io.state.get() == State::Done {
                Poll::Ready(false)
            } else if io.has_writable() {
                Poll::Ready(true)
            } else {
                wakers.writer.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await;
        if !go {
            break;
        }
        if !delay.is_zero() && !io.is_urgent() && io.state() == State::Open {
            // Let more frames join this send (see `write_delay_ms`).
            monoio::time::sleep(delay).await;
            if io.state.get() == State::Done {
                break;
            }
        }
        let bytes = io.take_batch(&mut batch, MAX_IOV);
        let frames = batch.frames.len();
        let mut writes = 0;
        while !batch.is_done() {
            let (res, b) = wr.writev(batch).await;
            batch = b;
            writes += 1;
            match res {
                Ok(0) | Err(_) => {
                    io.written();
                    io.abort();
                    return;
                }
                Ok(n) => batch.advance(n),
            }
        }
        io.written();
        let metrics = io.outq.metrics();
        metrics.writes.add(writes);
        metrics.frames_out.add(frames as u64);
        metrics.bytes_out.add(bytes as u64);
        batch.clear();
        if !io.has_queued() {
            if let Some(w) = wakers.flushed.take() {
                w.wake();
            }
        }
    }
    if let Some(w) = wakers.flushed.take() {
        w.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8) -> Bytes {
        Bytes::from(vec![n])
    }

    /// The outbound side of a shard whose connections may queue `frames`
    /// frames or `bytes` bytes.
    pub(crate) fn outq(frames: usize, bytes: usize) -> Rc<Outq> {
        let config = crate::config::Config {
            outbound_queue_frames: frames,
            outbound_queue_bytes: bytes,
            ..Default::default()
        };
        let verifier = crate::auth::Verifier::from_config(&config.auth).unwrap();
        let (mesh, _bells) = crate::mesh::Mesh::new(1, 0, 16).unwrap();
        let node = Arc::new(Node::new(config, verifier, mesh));
        Outq::new(node, 0)
    }

    #[test]
    fn every_kind_of_frame_counts_against_the_bound() {
        // A peer that sends pings and never reads: its pongs fill the
        // queue up to the bound, then it is closed as too slow, and what
        // was queued is given back.
        let q = outq(8, 1 << 20);
        let io = ConnIo::for_task(-1, q.clone(), 0);
        let pong = frame::encode(OpCode::Pong, &[b'p'; 125]);
        let mut queued = 0;
        while io.push_control(pong.clone()) {
            queued += 1;
            assert!(queued <= 8, "past the frame bound");
        }
        assert_eq!(queued, 8);
        assert_eq!(io.state(), State::Closing);
        assert_eq!(q.queued_frames(), 1, "only the close frame is left");
        assert_eq!(q.metrics().slow_consumer_closes.get(), 1);
        assert!(!io.push_data(&pong) && !io.push_control(pong.clone()));

        // The byte bound holds for control frames and HTTP responses too.
        let q = outq(4096, 1000);
        let io = ConnIo::for_task(-1, q.clone(), 0);
        assert!(
            io.push_control(Bytes::from(vec![0u8; 900])),
            "an empty queue takes any frame"
        );
        assert!(!io.push_control(pong.clone()), "900 + 127 > 1000");
        assert_eq!(io.state(), State::Closing);
        assert_eq!(q.queued_frames(), 1);
    }

    #[test]
    fn lists_keep_their_order_and_share_the_arena() {
        let mut arena = FrameArena::default();
        let (mut a, mut b) = (FrameList::EMPTY, FrameList::EMPTY);
        for i in 0..5 {
            arena.push(&mut a, frame(i));
            arena.push(&mut b, frame(100 + i));
        }
        assert_eq!((a.len(), b.len(), arena.live()), (5, 5, 10));
        assert_eq!(arena.pop(&mut a).unwrap()[0], 0);
        assert_eq!(arena.pop(&mut a).unwrap()[0], 1);
        // Freed nodes are reused by the other list, which keeps its order.
        arena.push(&mut b, frame(105));
        arena.push(&mut b, frame(106));
        let got: Vec<u8> = std::iter::from_fn(|| arena.pop(&mut b))
            .map(|f| f[0])
            .collect();
        assert_eq!(got, vec![100, 101, 102, 103, 104, 105, 106]);
        assert!(b.is_empty());
        assert_eq!(arena.nodes.len(), 10, "no node allocated past the peak");
        arena.clear(&mut a);
        assert!(a.is_empty());
        assert_eq!(arena.live(), 0);
        assert!(arena.pop(&mut a).is_none());
    }

    #[test]
    fn an_emptied_arena_gives_back_its_memory() {
        let mut arena = FrameArena::default();
        let mut lists = vec![FrameList::EMPTY; 100];
        for round in 0..100 {
            for l in lists.iter_mut() {
                arena.push(l, frame(round));
            }
        }
        assert!(arena.nodes.capacity() >= 10_000);
        for l in lists.iter_mut() {
            arena.clear(l);
        }
        assert_eq!(arena.live(), 0);
        assert!(arena.nodes.capacity() <= ARENA_KEEP);
        // And works on afterwards.
        arena.push(&mut lists[0], frame(7));
        assert_eq!(arena.pop(&mut lists[0]).unwrap()[0], 7);
    }
}
