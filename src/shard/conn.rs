//! One connection's outbound side: a bounded queue of refcounted frames and
//! what writes it with vectored writes (the io_uring loop of
//! [`super::uring`], or the [`writer`] task on epoll).
//!
//! Every frame a connection receives is a clone of a shared [`Bytes`] (a
//! refcount increment). The writer takes every queued frame at once and
//! hands them to the kernel in one vectored submission. When the queue
//! already holds `max_frames` frames or `max_bytes` bytes, the connection is
//! too slow for its bound: its queue is dropped, it is sent close 1013 and,
//! if it does not take even that, its socket is shut after the close timeout.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use monoio::buf::IoVecBuf;
use monoio::io::AsyncWriteRent;

use crate::engine::Outbound;
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

/// How the writer learns that there is something to do.
pub enum Notify {
    /// A task parked on a waker (epoll driver).
    Task(Cell<Option<Waker>>),
    /// The shard's io_uring loop: the connection's slot goes on the loop's
    /// list of connections to visit, once until the loop takes it.
    Loop {
        slot: u32,
        listed: Cell<bool>,
        ready: Rc<RefCell<Vec<u32>>>,
    },
}

impl Notify {
    pub fn task() -> Notify {
        Notify::Task(Cell::new(None))
    }
}

pub struct ConnIo {
    fd: RawFd,
    node: Arc<Node>,
    shard: usize,
    pub(super) queue: RefCell<VecDeque<Bytes>>,
    pub(super) queued_bytes: Cell<usize>,
    max_frames: usize,
    max_bytes: usize,
    state: Cell<State>,
    notify: Notify,
    flush_waker: Cell<Option<Waker>>,
    /// The writer holds frames it took from the queue.
    pub(super) writing: Cell<bool>,
    pub closing_since: Cell<Option<Instant>>,
    pub last_rx: Cell<Instant>,
    pub ping_sent: Cell<Option<Instant>>,
    /// Set until the connection authenticates.
    pub auth_deadline: Cell<Option<Instant>>,
}

impl ConnIo {
    pub fn new(fd: RawFd, node: Arc<Node>, shard: usize, now: Instant, notify: Notify) -> ConnIo {
        let (max_frames, max_bytes) = (
            node.config.outbound_queue_frames,
            node.config.outbound_queue_bytes,
        );
        ConnIo {
            fd,
            node,
            shard,
            queue: RefCell::new(VecDeque::new()),
            queued_bytes: Cell::new(0),
            max_frames,
            max_bytes,
            state: Cell::new(State::Open),
            notify,
            flush_waker: Cell::new(None),
            writing: Cell::new(false),
            closing_since: Cell::new(None),
            last_rx: Cell::new(now),
            ping_sent: Cell::new(None),
            auth_deadline: Cell::new(None),
        }
    }

    pub fn state(&self) -> State {
        self.state.get()
    }

    fn wake_writer(&self) {
        match &self.notify {
            Notify::Task(waker) => {
                if let Some(w) = waker.take() {
                    w.wake();
                }
            }
            Notify::Loop {
                slot,
                listed,
                ready,
            } => {
                if !listed.replace(true) {
                    ready.borrow_mut().push(*slot);
                }
            }
        }
    }

    /// Called by the loop when it takes this connection off its list.
    pub(super) fn unlist(&self) {
        if let Notify::Loop { listed, .. } = &self.notify {
            listed.set(false);
        }
    }

    /// Whether nothing is queued or being written.
    pub fn is_flushed(&self) -> bool {
        self.queue.borrow().is_empty() && !self.writing.get()
    }

    fn enqueue(&self, frame: Bytes) {
        self.queued_bytes.set(self.queued_bytes.get() + frame.len());
        self.queue.borrow_mut().push_back(frame);
        self.wake_writer();
    }

    /// Queues a data frame within the bound (see the module doc).
    pub fn push_data(&self, frame: &Bytes) -> bool {
        if self.state.get() != State::Open {
            return false;
        }
        let (len, queued) = (self.queue.borrow().len(), self.queued_bytes.get());
        if len > 0 && (len >= self.max_frames || queued + frame.len() > self.max_bytes) {
            self.node.metrics[self.shard].slow_consumer_closes.inc();
            tracing::debug!(
                shard = self.shard,
                queued_frames = len,
                queued_bytes = queued,
                "slow consumer closed"
            );
            self.queue.borrow_mut().clear();
            self.queued_bytes.set(0);
            self.close(close::TRY_AGAIN_LATER, "slow consumer: outbound queue full");
            return false;
        }
        self.enqueue(frame.clone());
        true
    }

    /// Queues a control frame (pong, ping) regardless of the bound: control
    /// frames are tiny and their number is bounded by what the peer sends.
    pub fn push_control(&self, frame: Bytes) {
        if self.state.get() == State::Open {
            self.enqueue(frame);
        }
    }

    /// Starts the closing handshake: queues a close frame; data stops.
    pub fn close(&self, code: u16, reason: &str) {
        self.close_with(close::payload(code, reason));
    }

    /// Queues a close frame with this payload (empty, or code and reason).
    pub fn close_with(&self, payload: Bytes) {
        if self.state.get() != State::Open {
            return;
        }
        self.enqueue(frame::encode(OpCode::Close, &payload));
        self.state.set(State::Closing);
        self.closing_since.set(Some(Instant::now()));
    }

    /// Tears the socket down: pending reads and writes end at once.
    pub fn abort(&self) {
        if self.state.get() == State::Done {
            return;
        }
        self.state.set(State::Done);
        // SAFETY: shutdown(2) on a descriptor this connection owns; it stays
        // open until both halves of the stream are dropped.
        unsafe {
            libc::shutdown(self.fd, libc::SHUT_RDWR);
        }
        self.wake_writer();
        if let Some(w) = self.flush_waker.take() {
            w.wake();
        }
    }

    /// Waits until everything queued has been written (or the socket died).
    pub async fn flushed(&self) {
        std::future::poll_fn(|cx| {
            if self.state.get() == State::Done || self.is_flushed() {
                Poll::Ready(())
            } else {
                self.flush_waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

impl Outbound for Rc<ConnIo> {
    #[inline]
    fn push(&self, frame: &Bytes) -> bool {
        self.push_data(frame)
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

    pub(super) fn fill(&mut self, queue: &mut VecDeque<Bytes>, max: usize) -> usize {
        self.frames.clear();
        self.iov.clear();
        self.first = 0;
        let mut bytes = 0;
        while self.frames.len() < max {
            let Some(f) = queue.pop_front() else { break };
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
    let metrics = &io.node.metrics[io.shard];
    let mut batch = Batch::default();
    let Notify::Task(waker) = &io.notify else {
        unreachable!("the writer task serves task-notified connections")
    };
    loop {
        let go = std::future::poll_fn(|cx| {
            if io.state.get() == State::Done {
                Poll::Ready(false)
            } else if !io.queue.borrow().is_empty() {
                Poll::Ready(true)
            } else {
                waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await;
        if !go {
            break;
        }
        let bytes = batch.fill(&mut io.queue.borrow_mut(), MAX_IOV);
        io.queued_bytes
            .set(io.queued_bytes.get().saturating_sub(bytes));
        io.writing.set(true);
        let frames = batch.frames.len();
        while !batch.is_done() {
            let (res, b) = wr.writev(batch).await;
            batch = b;
            match res {
                Ok(0) | Err(_) => {
                    io.writing.set(false);
                    io.abort();
                    return;
                }
                Ok(n) => batch.advance(n),
            }
        }
        io.writing.set(false);
        metrics.frames_out.add(frames as u64);
        metrics.bytes_out.add(bytes as u64);
        batch.frames.clear();
        if io.queue.borrow().is_empty() {
            if let Some(w) = io.flush_waker.take() {
                w.wake();
            }
        }
    }
    if let Some(w) = io.flush_waker.take() {
        w.wake();
    }
}
