//! The shard's own io_uring loop (the default driver).
//!
//! One ring per shard and no task per connection: every socket is a slot in
//! a slab, and the loop reacts to completions.
//! - **Accept**: one multishot accept on the shard's listener.
//! - **Read**: one multishot receive per connection into a ring of provided
//!   buffers shared by the shard. A buffer is lent for the time it takes to
//!   decode what it holds, then goes back to the ring, so an idle connection
//!   holds no read buffer at all; only a partial frame is copied aside.
//! - **Write**: one vectored send per connection at a time, carrying every
//!   frame queued since the previous one.
//! - **Mesh**: a receive on the doorbell, armed at all times, wakes a
//!   parked shard.
//!
//! Submissions collect during a round and reach the kernel in one
//! `io_uring_enter`, which also waits for the next completions when the
//! shard has nothing to do.
//!
//! When the shard holds back more mesh messages than [`OUTBOX_HIGH`], it
//! stops decoding received data: the data waits in its buffers, the buffer
//! ring runs dry, receives stop, and TCP pushes back on the clients.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{IntoRawFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::rc::Rc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::buf_ring::{BufRing, BUF_GROUP};
use super::conn::{Batch, ConnIo, State, MAX_IOV, NEVER};
use super::{Next, Routed, Session, Shard, OUTBOX_HIGH, SPIN_ROUNDS};
use crate::admission::{Refusal, Slots};
use crate::engine::ChunkedVec;
use crate::node::Node;
use crate::ws::{close, frame, handshake, Decoder, OpCode};

/// Submission queue entries; the completion queue is eight times larger.
const SQ_ENTRIES: u32 = 2048;
/// `io_uring_enter`'s flag asking for completions (the crate keeps its
/// constants private).
const IORING_ENTER_GETEVENTS: u32 = 1;
/// Idle write descriptors kept for reuse.
const WRITE_POOL: usize = 1024;
/// Sends (and frames per send) the pool keeps once a burst is over.
const WRITE_POOL_AFTER_BURST: usize = 64;

// What a completion is about: the top byte of its user data. The next 24
// bits hold the slot's generation, the low 32 bits the slot.
const ACCEPT: u64 = 1;
const RECV: u64 = 2;
const WRITE: u64 = 3;
const BELL: u64 = 4;
const CANCEL: u64 = 5;

fn token(kind: u64, slot: u32, gen: u32) -> u64 {
    (kind << 56) | ((gen as u64 & 0xff_ffff) << 32) | slot as u64
}

fn parts(user_data: u64) -> (u64, u32, u32) {
    (
        user_data >> 56,
        user_data as u32,
        ((user_data >> 32) & 0xff_ffff) as u32,
    )
}

/// One vectored send in flight, with the message header the kernel reads.
struct WriteOp {
    batch: Batch,
    msg: libc::msghdr,
    bytes: usize,
}

impl Default for WriteOp {
    fn default() -> Self {
        WriteOp {
            batch: Batch::default(),
            // SAFETY: an all-zero msghdr is a valid empty header.
            msg: unsafe { std::mem::zeroed() },
            bytes: 0,
        }
    }
}

enum Phase {
    /// Reading the request head, since this time (ms); the socket counts
    /// against its address from the accept (`ip`).
    Handshake { since: u64, ip: Slots },
    /// Speaking WebSocket.
    Ws { session: Session, decoder: Decoder },
    /// Writing a plain HTTP answer or a refusal, then closing (or, for a
    /// long-polling request, waiting for the answer first).
    Reply { ip: Slots },
    /// A request of a long-polling session another shard holds: once the
    /// receive is cancelled, the socket and its bytes go there.
    HandOver {
        owner: crate::engine::ShardId,
        ip: Slots,
    },
}

/// A connection's slot: what the loop needs beyond the outbound side.
struct Conn {
    io: Rc<ConnIo>,
    gen: u32,
    /// A multishot receive is armed.
    recv: bool,
    /// An asynchronous cancel of that receive was submitted.
    cancelled: bool,
    /// The read side is over: the session left the engine, and the socket
    /// shuts once everything queued is written (or at `flush_deadline`).
    ended: bool,
    /// A write waits in the loop's `delayed` list (`write_delay_ms`).
    write_due: bool,
    phase: Phase,
    /// Bytes of an incomplete frame or request head, held only while there
    /// are some.
    inbuf: Option<Box<BytesMut>>,
    write: Option<Box<WriteOp>>,
    /// When a connection whose read side is over gets shut (ms, or
    /// [`NEVER`]).
    flush_deadline: u64,
}

impl Conn {
    fn fd(&self) -> RawFd {
        self.io.fd()
    }
}

struct Recv {
    slot: u32,
    gen: u32,
    res: i32,
    flags: u32,
}

struct Loop {
    // Field order matters: the ring goes first, before the memory its
    // operations point into (buffers, write descriptors, connections).
    ring: IoUring,
    taskrun: TaskRun,
    bufs: BufRing,
    conns: ChunkedVec<Option<Conn>>,
    shard: Rc<Shard>,
    listener: RawFd,
    bell: RawFd,
    bell_buf: Box<[u8; 64]>,
    gens: ChunkedVec<u32>,
    free: Vec<u32>,
    live: usize,
    visiting: Vec<u32>,
    completions: Vec<(u64, i32, u32)>,
    received: VecDeque<Recv>,
    rearm: Vec<u32>,
    /// Writes held back by `write_delay_ms`: (due ms, slot, generation), in
    /// due order (every delay is the same).
    delayed: VecDeque<(u64, u32, u32)>,
    write_delay_ms: u64,
    /// Boxed: the kernel reads a write's header and iovecs in place, so
    /// they must not move while the write is in flight.
    #[allow(clippy::vec_box)]
    writes: Vec<Box<WriteOp>>,
    accept_armed: bool,
    accept_retry: Option<Instant>,
    scratch: BytesMut,
    ping: Bytes,
    drain_deadline: Option<Instant>,
    forced_at: Option<Instant>,
}

/// Sets up the ring and its buffers.
fn setup() -> io::Result<(IoUring, TaskRun, BufRing)> {
    // Multishot receives into provided buffers need Linux 6.0; older
    // kernels accept the ring and the buffers but fail every receive.
    if let Some((major, minor)) = crate::doctor::kernel_version() {
        if (major, minor) < (6, 0) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("kernel {major}.{minor}: the io_uring loop needs Linux 6.0 or newer"),
            ));
        }
    }
    let (ring, taskrun) = build_ring()?;
    if !ring.params().is_feature_ext_arg() || !ring.params().is_feature_nodrop() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "io_uring lacks EXT_ARG or NODROP",
        ));
    }
    let bufs = BufRing::new(&ring)?;
    Ok((ring, taskrun, bufs))
}

/// When the kernel runs the ring's completion work (the receives that
/// multishot polling found data for, the sends it finished).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TaskRun {
    /// Only when the shard asks for completions (`DEFER_TASKRUN`, Linux
    /// 6.1): one batch per loop round, and no interrupt of the shard's core
    /// for each packet that arrives.
    Deferred,
    /// At the shard's next system call (`COOP_TASKRUN`, 5.19), with a flag
    /// in the ring saying work waits.
    Cooperative,
    /// By interrupting the shard (older kernels).
    Interrupt,
}

/// The ring, with the most economical completion work this kernel offers.
fn build_ring() -> io::Result<(IoUring, TaskRun)> {
    let mut last = None;
    for mode in [TaskRun::Deferred, TaskRun::Cooperative, TaskRun::Interrupt] {
        let mut b = IoUring::builder();
        b.setup_cqsize(SQ_ENTRIES * 8).setup_clamp();
        match mode {
            TaskRun::Deferred => {
                b.setup_single_issuer().setup_defer_taskrun();
            }
            TaskRun::Cooperative => {
                b.setup_coop_taskrun().setup_taskrun_flag();
            }
            TaskRun::Interrupt => {}
        }
        match b.build(SQ_ENTRIES) {
            Ok(ring) => return Ok((ring, mode)),
            // EINVAL: this kernel does not know the flag.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("at least one mode tried"))
}

/// A setup failure: the reason, and the sockets handed back.
pub type SetupError = (io::Error, std::net::TcpListener, StdUnixStream);

/// Runs shard `id` on its own io_uring loop until the node has drained.
/// When this kernel lacks what the loop needs, fails before the shard
/// starts and hands the sockets back (the caller may fall back to epoll).
pub fn run(
    id: usize,
    node: Arc<Node>,
    listener: std::net::TcpListener,
    bell: StdUnixStream,
) -> Result<io::Result<()>, SetupError> {
    let (ring, taskrun, bufs) = match setup() {
        Ok(r) => r,
        Err(e) => return Err((e, listener, bell)),
    };
    let shard = Shard::new(id, node.clone());
    let mut lp = Loop {
        ring,
        taskrun,
        bufs,
        conns: ChunkedVec::default(),
        listener: listener.into_raw_fd(),
        bell: bell.into_raw_fd(),
        bell_buf: Box::new([0; 64]),
        gens: ChunkedVec::default(),
        free: Vec::new(),
        live: 0,
        visiting: Vec::new(),
        completions: Vec::new(),
        received: VecDeque::new(),
        rearm: Vec::new(),
        delayed: VecDeque::new(),
        write_delay_ms: node.config.write_delay_ms,
        writes: Vec::new(),
        accept_armed: false,
        accept_retry: None,
        scratch: BytesMut::new(),
        ping: frame::encode(OpCode::Ping, b""),
        drain_deadline: None,
        forced_at: None,
        shard,
    };
    lp.arm_accept();
    lp.arm_bell();
    node.shard_started(id, "io_uring");
    tracing::info!(shard = id, io_driver = "io_uring", completions = ?lp.taskrun, "shard started");
    let result = lp.run();
    tracing::info!(shard = id, "shard stopped");
    Ok(result)
}

impl Loop {
    fn run(&mut self) -> io::Result<()> {
        let me = self.shard.id;
        let tick = self.shard.sweep_tick();
        let mut next_sweep = Instant::now() + tick;
        let mut idle = 0u32;
        let buffers = self.bufs.target() as u64;
        self.shard.metrics().receive_buffers.set(buffers);
        loop {
            let mut work = self.complete();
            work += self.decode_received();
            work += self.shard.drain_mesh();
            let adopted = self.shard.adopted.take();
            work += adopted.len();
            for a in adopted {
                self.adopt(a);
            }
            self.shard.tick_engine();
            self.shard.outbox.borrow_mut().flush();
            let now = Instant::now();
            if now >= next_sweep {
                self.sweep();
                next_sweep = now + tick;
            }
            if self.shard.node.is_draining() && self.drain_deadline.is_none() {
                self.begin_drain(now);
            }
            if self.drain_deadline.is_some() && self.drained(now) {
                return Ok(());
            }
            if !self.accept_armed
                && self.drain_deadline.is_none()
                && self.accept_retry.is_none_or(|t| now >= t)
            {
                self.arm_accept();
            }
            self.visit_ready();
            work += self.start_delayed_writes();
            self.rearm_receives();
            if self.bufs.publish() {
                self.shard
                    .metrics()
                    .receive_buffers
                    .set(self.bufs.target() as u64);
            }

            let held_back = !self.received.is_empty() || self.shard.outbox.borrow().backlog > 0;
            if work > 0 {
                idle = 0;
                self.submit()?;
            } else if held_back {
                // Waiting for other shards to take their messages.
                self.wait(Duration::from_micros(50))?;
            } else if idle < SPIN_ROUNDS {
                idle += 1;
                self.submit()?;
            } else {
                idle = 0;
                if !self.shard.node.mesh.park(me) {
                    continue;
                }
                let now = Instant::now();
                let mut until = next_sweep.saturating_duration_since(now);
                if let Some(&(due, ..)) = self.delayed.front() {
                    let wait = due.saturating_sub(self.shard.outq.ms(now));
                    until = until.min(Duration::from_millis(wait));
                }
                if let Some(engine) = self.shard.engine_wait() {
                    until = until.min(engine);
                }
                let r = self.wait(until.max(Duration::from_micros(100)));
                self.shard.node.mesh.unpark(me);
                r?;
            }
        }
    }

    /// Pushes a submission, making room by submitting when the queue is full.
    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every entry points into memory the loop keeps alive
            // until its completion (see the field order of `Loop`).
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                if let Some(suppressed) = self.shard.logs.submit.allow(self.shard.outq.now_ms()) {
                    tracing::warn!(shard = self.shard.id, error = %e, suppressed, "io_uring submit failed");
                }
                std::thread::yield_now();
            }
        }
    }

    /// Submits what is queued and lets the kernel post what completed.
    fn submit(&mut self) -> io::Result<()> {
        let r = match self.taskrun {
            TaskRun::Deferred => {
                let queued = self.ring.submission().len() as u32;
                // SAFETY: no argument is passed; the entries were pushed
                // (and the queue's tail published) by `push`.
                unsafe {
                    self.ring.submitter().enter::<libc::sigset_t>(
                        queued,
                        0,
                        IORING_ENTER_GETEVENTS,
                        None,
                    )
                }
            }
            TaskRun::Cooperative | TaskRun::Interrupt => {
                let sq = self.ring.submission();
                if sq.is_empty() && !sq.taskrun() {
                    return Ok(());
                }
                drop(sq);
                self.ring.submit()
            }
        };
        match r {
            Ok(_) => Ok(()),
            Err(e) if is_transient(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Submits and sleeps until a completion arrives or `timeout` passes.
    fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e) if is_transient(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn arm_accept(&mut self) {
        let e = opcode::AcceptMulti::new(types::Fd(self.listener))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(token(ACCEPT, 0, 0));
        self.push(e);
        self.accept_armed = true;
        self.accept_retry = None;
    }

    fn arm_bell(&mut self) {
        let e = opcode::Recv::new(
            types::Fd(self.bell),
            self.bell_buf.as_mut_ptr(),
            self.bell_buf.len() as u32,
        )
        .build()
        .user_data(token(BELL, 0, 0));
        self.push(e);
    }

    fn arm_recv(&mut self, slot: u32) {
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return;
        };
        c.recv = true;
        let e = opcode::RecvMulti::new(types::Fd(c.fd()), BUF_GROUP)
            .build()
            .user_data(token(RECV, slot, c.gen));
        self.push(e);
    }

    /// Takes every completion from the queue. Receives wait in `received`
    /// to be decoded in order.
    fn complete(&mut self) -> usize {
        let mut done = std::mem::take(&mut self.completions);
        done.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(user_data, res, flags) in &done {
            let (kind, slot, gen) = parts(user_data);
            match kind {
                ACCEPT => self.on_accept(res, flags),
                RECV => {
                    if cqueue::buffer_select(flags).is_some() {
                        self.bufs.taken();
                    }
                    self.received.push_back(Recv {
                        slot,
                        gen,
                        res,
                        flags,
                    })
                }
                WRITE => self.on_write(slot, gen, res),
                BELL => {
                    if res == 0 {
                        // The node's end of the doorbell is gone: nothing will
                        // ring it again, and the loop's rounds still see the
                        // mesh queues.
                        continue;
                    }
                    let logs = &self.shard.logs;
                    if res < 0 && res != -libc::EINTR && res != -libc::EAGAIN {
                        if let Some(suppressed) = logs.bell.allow(self.shard.outq.now_ms()) {
                            tracing::warn!(
                                shard = self.shard.id,
                                errno = -res,
                                suppressed,
                                "doorbell read failed"
                            );
                        }
                    }
                    self.arm_bell();
                }
                _ => {}
            }
        }
        let n = done.len();
        done.clear();
        self.completions = done;
        n
    }

    fn on_accept(&mut self, res: i32, flags: u32) {
        if !cqueue::more(flags) {
            self.accept_armed = false;
        }
        if res >= 0 {
            self.add_conn(res);
            return;
        }
        let errno = -res;
        if errno == libc::ECANCELED {
            return;
        }
        if let Some(suppressed) = self.shard.logs.accept.allow(self.shard.outq.now_ms()) {
            tracing::warn!(
                shard = self.shard.id,
                error = %io::Error::from_raw_os_error(errno),
                suppressed,
                "accept failed"
            );
        }
        if !self.accept_armed {
            self.accept_retry = Some(Instant::now() + Duration::from_millis(10));
        }
    }

    fn add_conn(&mut self, fd: RawFd) {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a socket this loop owns, with a valid int.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        let now = self.shard.outq.now_ms();
        let (slot, within_budget) = self.insert_conn(fd, Slots::default(), None, now);
        let conn = self.conns[slot as usize].as_mut().expect("just added");
        match self
            .shard
            .admit_socket(self.live, within_budget, peer_of(fd))
        {
            Ok(held) => {
                if let Phase::Handshake { ip, .. } = &mut conn.phase {
                    *ip = held;
                }
            }
            // Refused before its request is read; what it sends is read
            // and dropped until it closes (or the close timeout).
            Err(r) => reply(&self.shard, conn, r.response(), now),
        }
        self.arm_recv(slot);
    }

    /// Gives a socket a slot, reading its request (with `ip` counted
    /// against its address, and `inbuf` read already); counts it in the
    /// shard and the node's budget (whether it was within it comes back).
    fn insert_conn(
        &mut self,
        fd: RawFd,
        ip: Slots,
        inbuf: Option<Box<BytesMut>>,
        now: u64,
    ) -> (u32, bool) {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.gens.push(0);
                self.conns.push(None) as u32
            }
        };
        let io = Rc::new(ConnIo::for_loop(fd, self.shard.outq.clone(), slot, now));
        self.conns[slot as usize] = Some(Conn {
            io,
            gen: self.gens[slot as usize],
            recv: false,
            cancelled: false,
            ended: false,
            write_due: false,
            phase: Phase::Handshake { since: now, ip },
            inbuf,
            write: None,
            flush_deadline: NEVER,
        });
        self.live += 1;
        (slot, self.shard.node.socket_opened())
    }

    /// Takes a socket's slot out of the shard's and the node's counts and
    /// frees it for another (the descriptor is the caller's to close or
    /// pass on).
    fn vacate(&mut self, slot: u32, conn: &Conn) {
        self.shard.preauth_change(preauth_held(conn), 0);
        self.shard.node.socket_closed();
        self.gens[slot as usize] = self.gens[slot as usize].wrapping_add(1) & 0xff_ffff;
        self.free.push(slot);
        self.live -= 1;
    }

    fn conn(&mut self, slot: u32, gen: u32) -> Option<&mut Conn> {
        self.conns
            .get_mut(slot as usize)?
            .as_mut()
            .filter(|c| c.gen == gen)
    }

    /// Decodes received data in arrival order, unless the shard holds back
    /// too many mesh messages (see the module doc).
    fn decode_received(&mut self) -> usize {
        let mut n = 0;
        while self.shard.outbox.borrow().backlog <= OUTBOX_HIGH {
            let Some(r) = self.received.pop_front() else {
                break;
            };
            self.on_recv(r);
            n += 1;
        }
        n
    }

    fn on_recv(&mut self, r: Recv) {
        let bid = cqueue::buffer_select(r.flags);
        let more = cqueue::more(r.flags);
        let shard = self.shard.clone();
        let Some(conn) = self
            .conns
            .get_mut(r.slot as usize)
            .and_then(|c| c.as_mut())
            .filter(|c| c.gen == r.gen)
        else {
            if let Some(b) = bid {
                self.bufs.give(b);
            }
            return;
        };
        if !more {
            conn.recv = false;
        }
        let mut read_over = false;
        if r.res > 0 {
            if let Some(b) = bid {
                let data = self.bufs.bytes(b, r.res as usize);
                let m = shard.metrics();
                m.bytes_in.add(r.res as u64);
                let now = shard.outq.now_ms();
                conn.io.received(now);
                let before = preauth_held(conn);
                read_over = feed(&shard, conn, data, &mut self.scratch, now);
                if !shard.preauth_change(before, preauth_held(conn)) {
                    read_over |= refuse_preauth(&shard, conn, now);
                }
                self.bufs.give(b);
            }
            if !more && !read_over {
                self.rearm.push(r.slot);
            }
        } else if r.res == -libc::ENOBUFS {
            // The buffer ring ran dry: arm again once buffers are back (and
            // the ring offers more).
            self.bufs.ran_dry();
            if !more {
                self.rearm.push(r.slot);
            }
        } else if !more || r.res == 0 {
            // End of stream, or the socket failed.
            read_over = true;
        }
        if read_over {
            self.end_read(r.slot);
        }
        if self.handing_over(r.slot) {
            return;
        }
        self.visit(r.slot);
    }

    /// A connection whose request goes to another shard: its receive is
    /// cancelled, and once no receive is in flight, its socket, the bytes
    /// read and its address slots go to the owner, which serves it as if it
    /// had accepted it. True when the slot is gone (or going).
    fn handing_over(&mut self, slot: u32) -> bool {
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return false;
        };
        if !matches!(conn.phase, Phase::HandOver { .. }) {
            return false;
        }
        if conn.recv {
            if !conn.cancelled {
                conn.cancelled = true;
                let e = opcode::AsyncCancel::new(token(RECV, slot, conn.gen))
                    .build()
                    .user_data(token(CANCEL, slot, conn.gen));
                self.push(e);
            }
            return true;
        }
        let Some(mut conn) = self.conns[slot as usize].take() else {
            return true;
        };
        self.vacate(slot, &conn);
        let Phase::HandOver { owner, ip } = std::mem::replace(
            &mut conn.phase,
            Phase::Reply {
                ip: Slots::default(),
            },
        ) else {
            unreachable!("checked above");
        };
        conn.io.detach();
        // SAFETY: the descriptor is this connection's, no operation on it
        // is in flight, and nothing here closes it: it changes hands.
        let fd =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(conn.fd()) };
        let bytes = conn.inbuf.take().map(|b| b.to_vec()).unwrap_or_default();
        super::hand_over(&self.shard, owner, fd, bytes, ip);
        true
    }

    /// A socket another shard handed over: served from its bytes on.
    fn adopt(&mut self, a: super::Adoption) {
        let super::Adoption { fd, bytes, ip } = a;
        use std::os::fd::IntoRawFd;
        let fd = fd.into_raw_fd();
        let now = self.shard.outq.now_ms();
        let inbuf = Some(Box::new(BytesMut::from(&bytes[..])));
        // Admitted where it was accepted: the node's budget counts it
        // again here, as the shard that handed it over gave it back.
        let (slot, _) = self.insert_conn(fd, ip, inbuf, now);
        let shard = self.shard.clone();
        let conn = self.conns[slot as usize].as_mut().expect("just added");
        let over = handshake_step(&shard, conn, &mut self.scratch, now);
        if over {
            self.end_read(slot);
        } else if !conn.ended {
            self.arm_recv(slot);
        }
        self.visit(slot);
    }

    /// The peer is done sending (or must not be read any more): leave the
    /// engine, then shut the socket once what is queued is written.
    fn end_read(&mut self, slot: u32) {
        let shard = &self.shard;
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return;
        };
        if conn.ended {
            return;
        }
        conn.ended = true;
        conn.flush_deadline = shard.outq.now_ms() + shard.node.config.close_timeout_ms;
        if let Phase::Ws { session, .. } = &mut conn.phase {
            session.end(shard);
        }
        if matches!(conn.phase, Phase::Handshake { .. }) {
            conn.io.abort();
        }
        if matches!(conn.phase, Phase::Reply { .. }) && conn.io.awaiting() {
            // A long-polling request whose client left: its answer, when
            // it comes, stays with the session for the next one.
            conn.io.abort();
        }
    }

    fn rearm_receives(&mut self) {
        if self.rearm.is_empty() || !self.received.is_empty() {
            return;
        }
        let rearm = std::mem::take(&mut self.rearm);
        for &slot in &rearm {
            let ok = self.conns[slot as usize]
                .as_ref()
                .is_some_and(|c| !c.recv && !c.ended && c.io.state() != State::Done);
            if ok {
                self.arm_recv(slot);
            }
        }
        self.rearm = rearm;
        self.rearm.clear();
    }

    /// Visits every connection that queued frames or was aborted since the
    /// last round.
    fn visit_ready(&mut self) {
        loop {
            // Long-polling sessions first: their answers make sockets ready.
            self.shard.flush_polls();
            let mut list = std::mem::take(&mut self.visiting);
            std::mem::swap(&mut list, &mut *self.shard.outq.ready.borrow_mut());
            if list.is_empty() {
                self.visiting = list;
                return;
            }
            for &slot in &list {
                if let Some(c) = self.conns[slot as usize].as_ref() {
                    c.io.unlist();
                    self.visit(slot);
                }
            }
            list.clear();
            self.visiting = list;
        }
    }

    /// Starts the next write, shuts a flushed connection whose read side is
    /// over, or frees a dead one.
    fn visit(&mut self, slot: u32) {
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return;
        };
        if conn.io.state() == State::Done {
            if conn.recv && !conn.cancelled {
                conn.cancelled = true;
                let e = opcode::AsyncCancel::new(token(RECV, slot, conn.gen))
                    .build()
                    .user_data(token(CANCEL, slot, conn.gen));
                self.push(e);
            }
            self.try_free(slot);
            return;
        }
        if conn.write.is_none() && conn.io.has_writable() {
            let wait =
                self.write_delay_ms > 0 && !conn.io.is_urgent() && conn.io.state() == State::Open;
            if !wait {
                self.start_write(slot);
            } else if !conn.write_due {
                conn.write_due = true;
                let due = self.shard.outq.now_ms() + self.write_delay_ms;
                self.delayed.push_back((due, slot, conn.gen));
            }
        } else if conn.io.is_flushed() && !conn.io.awaiting() {
            // A long-polling request shuts once its answer is written.
            let answered =
                matches!(conn.phase, Phase::Reply { .. }) && conn.io.state() == State::Closing;
            if conn.ended || answered {
                conn.io.abort();
                self.visit(slot);
            }
        }
    }

    /// Starts the writes whose delay is over; returns how many.
    fn start_delayed_writes(&mut self) -> usize {
        let Some(&(first, ..)) = self.delayed.front() else {
            return 0;
        };
        let now = self.shard.outq.now_ms();
        if first > now {
            return 0;
        }
        let mut n = 0;
        while let Some(&(due, slot, gen)) = self.delayed.front() {
            if due > now {
                break;
            }
            self.delayed.pop_front();
            let Some(conn) = self.conn(slot, gen) else {
                continue;
            };
            if !conn.write_due {
                continue;
            }
            conn.write_due = false;
            if conn.write.is_none() && conn.io.has_writable() {
                self.start_write(slot);
                n += 1;
            }
        }
        n
    }

    fn start_write(&mut self, slot: u32) {
        let mut w = self.writes.pop().unwrap_or_default();
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return;
        };
        conn.write_due = false;
        w.bytes = conn.io.take_batch(&mut w.batch, MAX_IOV);
        let (fd, gen) = (conn.fd(), conn.gen);
        let e = send_entry(&mut w, fd, token(WRITE, slot, gen));
        conn.write = Some(w);
        self.push(e);
    }

    fn on_write(&mut self, slot: u32, gen: u32, res: i32) {
        let shard = self.shard.clone();
        let Some(conn) = self.conn(slot, gen) else {
            return;
        };
        let Some(mut w) = conn.write.take() else {
            return;
        };
        if res > 0 {
            shard.metrics().writes.inc();
            w.batch.advance(res as usize);
            if !w.batch.is_done() {
                let e = send_entry(&mut w, conn.fd(), token(WRITE, slot, gen));
                conn.write = Some(w);
                self.push(e);
                return;
            }
            let m = shard.metrics();
            m.frames_out.add(w.batch.frames() as u64);
            m.bytes_out.add(w.bytes as u64);
        } else {
            conn.io.abort();
        }
        conn.io.written();
        w.batch.clear();
        if self.writes.len() < WRITE_POOL {
            self.writes.push(w);
        }
        self.visit(slot);
    }

    /// After a burst: the pool of sends keeps a few, each with room for a
    /// few frames (a storm of member events leaves up to `WRITE_POOL` of
    /// them, each with room for hundreds).
    fn trim_writes(&mut self) {
        self.writes.truncate(WRITE_POOL_AFTER_BURST);
        self.writes.shrink_to_fit();
        for w in &mut self.writes {
            w.batch.shrink(WRITE_POOL_AFTER_BURST);
        }
    }

    /// Frees a dead connection once the kernel holds nothing of it.
    fn try_free(&mut self, slot: u32) {
        let free = self.conns[slot as usize]
            .as_ref()
            .is_some_and(|c| c.io.state() == State::Done && !c.recv && c.write.is_none());
        if !free {
            return;
        }
        self.end_read(slot);
        let Some(mut conn) = self.conns[slot as usize].take() else {
            return;
        };
        self.vacate(slot, &conn);
        if let Phase::Handshake { ip, .. } | Phase::Reply { ip } | Phase::HandOver { ip, .. } =
            conn.phase
        {
            self.shard.node.admission.release_ip(ip);
        }
        if let Phase::Ws { session, .. } = &mut conn.phase {
            session.end(&self.shard);
            self.shard.metrics().connections.sub(1);
        }
        // SAFETY: the descriptor belongs to this connection, and no
        // operation on it is in flight any more.
        unsafe {
            libc::close(conn.fd());
        }
    }

    fn sweep(&mut self) {
        let shard = self.shard.clone();
        let now = shard.outq.now_ms();
        let handshake_timeout = shard.node.config.handshake_timeout_ms;
        shard.run_deferred();
        if shard.burst_over() {
            self.trim_writes();
            crate::node::give_back_memory();
        }
        shard.polls.borrow_mut().sweep(&shard, now, &self.ping);
        for conn in self.conns.iter().flatten() {
            if conn.io.state() == State::Done {
                continue;
            }
            if now >= conn.flush_deadline {
                conn.io.abort();
                continue;
            }
            match &conn.phase {
                Phase::Handshake { since, .. }
                    if now.saturating_sub(*since) >= handshake_timeout =>
                {
                    shard.metrics().handshake_timeouts.inc();
                    conn.io.abort();
                }
                Phase::Ws { .. } if !conn.ended => shard.check_keepalive(&conn.io, now, &self.ping),
                _ => {}
            }
        }
    }

    fn begin_drain(&mut self, now: Instant) {
        let timeout = Duration::from_millis(self.shard.node.config.shutdown_timeout_ms);
        self.drain_deadline = Some(now + timeout);
        let ws = self
            .conns
            .iter()
            .flatten()
            .filter(|c| matches!(c.phase, Phase::Ws { .. }))
            .count();
        tracing::info!(
            shard = self.shard.id,
            connections = ws,
            "draining: closing connections with 1001"
        );
        for conn in self.conns.iter().flatten() {
            match conn.phase {
                Phase::Ws { .. } => conn.io.close(close::GOING_AWAY, "server shutting down"),
                Phase::Handshake { .. } => conn.io.abort(),
                Phase::Reply { .. } | Phase::HandOver { .. } => {}
            }
        }
    }

    /// Whether a draining shard may stop: every connection is gone, or the
    /// shutdown timeout passed, the rest were shut, and they are gone too
    /// (or a last grace period ran out).
    fn drained(&mut self, now: Instant) -> bool {
        if self.live == 0 {
            return true;
        }
        let Some(deadline) = self.drain_deadline else {
            return false;
        };
        if now < deadline {
            return false;
        }
        match self.forced_at {
            None => {
                self.forced_at = Some(now);
                for conn in self.conns.iter().flatten() {
                    conn.io.abort();
                }
                false
            }
            Some(t) if now - t >= Duration::from_secs(1) => {
                tracing::warn!(
                    shard = self.shard.id,
                    connections = self.live,
                    "connections still busy in the kernel at shutdown"
                );
                true
            }
            Some(_) => false,
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if self.live > 0 {
            // Operations may still point into the receive buffers while the
            // kernel tears the ring down: keep that memory.
            self.bufs.leak = true;
        }
        for conn in self.conns.iter().flatten() {
            // SAFETY: descriptors owned by the loop.
            unsafe {
                libc::close(conn.fd());
            }
        }
        // SAFETY: the listener and doorbell descriptors this loop owns.
        // The listener is shut first: closing its descriptor is not enough,
        // as the multishot accept holds the socket until the kernel has
        // torn the ring down (after the process exits), and meanwhile a
        // new process could not bind the port.
        unsafe {
            libc::shutdown(self.listener, libc::SHUT_RDWR);
            libc::close(self.listener);
            libc::close(self.bell);
        }
    }
}

/// The send of what `w` still holds: a plain send for one frame (the usual
/// case at low rates; it spares the kernel importing a message header), a
/// vectored one for several.
fn send_entry(w: &mut WriteOp, fd: RawFd, user_data: u64) -> squeue::Entry {
    let iov = w.batch.pending();
    let entry = if let [one] = iov {
        opcode::Send::new(types::Fd(fd), one.iov_base as *const u8, one.iov_len as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
    } else {
        w.msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        w.msg.msg_iovlen = iov.len() as _;
        opcode::SendMsg::new(types::Fd(fd), &w.msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
    };
    entry.user_data(user_data)
}

/// The address at the other end of a connected socket.
fn peer_of(fd: RawFd) -> IpAddr {
    // SAFETY: getpeername(2) writes at most `len` bytes into the storage,
    // which is large enough for any address family.
    unsafe {
        let mut addr: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getpeername(
            fd,
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        ) != 0
        {
            return IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        }
        match addr.ss_family as libc::c_int {
            libc::AF_INET => {
                let a = &*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                IpAddr::V4(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)))
            }
            libc::AF_INET6 => {
                let a = &*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                IpAddr::V6(Ipv6Addr::from(a.sin6_addr.s6_addr))
            }
            _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)
    )
}

/// Bytes a connection holds while it has not authenticated: its request
/// head, the bytes of an incomplete frame, a fragmented message.
fn preauth_held(conn: &Conn) -> usize {
    let inbuf = conn.inbuf.as_ref().map_or(0, |b| b.capacity());
    match &conn.phase {
        Phase::Handshake { .. } => inbuf,
        Phase::Ws { session, decoder } if session.preauth() => inbuf + decoder.buffered(),
        _ => 0,
    }
}

/// Closes a connection whose buffer grew past the shard's budget for
/// connections not authenticated yet, and gives its bytes back. Returns
/// true when its read side is over.
fn refuse_preauth(shard: &Rc<Shard>, conn: &mut Conn, now: u64) -> bool {
    let before = preauth_held(conn);
    let over = match conn.phase {
        Phase::Handshake { .. } => {
            reply(shard, conn, Refusal::ServerFull.response(), now);
            false
        }
        Phase::Ws {
            ref mut decoder, ..
        } => {
            conn.io.close(
                close::TRY_AGAIN_LATER,
                "server busy: too many bytes buffered before authentication",
            );
            *decoder = Decoder::new();
            conn.inbuf = None;
            true
        }
        Phase::Reply { .. } | Phase::HandOver { .. } => false,
    };
    shard.preauth_change(before, preauth_held(conn));
    over
}

/// Feeds received bytes to a connection. Returns true when its read side is
/// over (close handshake answered, protocol error).
fn feed(shard: &Rc<Shard>, conn: &mut Conn, data: &[u8], scratch: &mut BytesMut, now: u64) -> bool {
    if conn.ended {
        return false;
    }
    match conn.phase {
        Phase::Handshake { .. } => {
            conn.inbuf
                .get_or_insert_with(Default::default)
                .extend_from_slice(data);
            handshake_step(shard, conn, scratch, now)
        }
        Phase::Ws { .. } => feed_ws(shard, conn, data, scratch),
        Phase::Reply { .. } => false,
        // What comes until the receive is cancelled goes along.
        Phase::HandOver { .. } => {
            conn.inbuf
                .get_or_insert_with(Default::default)
                .extend_from_slice(data);
            false
        }
    }
}

fn handshake_step(shard: &Rc<Shard>, conn: &mut Conn, scratch: &mut BytesMut, now: u64) -> bool {
    let Some(head) = conn.inbuf.as_ref() else {
        return false;
    };
    let (req, consumed) = match handshake::parse_request(head, &shard.handshake) {
        Ok(None) => return false,
        Err(e) => {
            shard.metrics().handshake_failures[e.index()].inc();
            reply(shard, conn, e.response(), now);
            return false;
        }
        Ok(Some(r)) => r,
    };
    // A plain request's body (long-polling POSTs) comes in whole first.
    let body_len = super::body_len(&req);
    if body_len > super::max_body(shard) {
        reply(shard, conn, super::body_too_large(), now);
        return false;
    }
    if head.len() < consumed + body_len {
        return false;
    }
    // The peer is asked again rather than kept from the accept: a slot
    // stays small.
    let peer = peer_of(conn.fd());
    let Phase::Handshake { ip, .. } = &mut conn.phase else {
        return false;
    };
    let body = &head[consumed..consumed + body_len];
    match shard.route(req, body, peer, ip) {
        Routed::Reply(r) => {
            reply(shard, conn, r, now);
            false
        }
        Routed::Poll(req) => {
            let ip = std::mem::take(ip);
            conn.phase = Phase::Reply { ip };
            conn.inbuf = None;
            let c = &shard.node.config;
            // Answered within a ping interval (the ping, at the latest).
            conn.flush_deadline = now + c.ping_interval_ms + c.ping_timeout_ms + c.close_timeout_ms;
            shard.poll(*req, conn.io.clone());
            false
        }
        Routed::HandOver(owner) => {
            let ip = std::mem::take(ip);
            conn.phase = Phase::HandOver { owner, ip };
            false
        }
        Routed::Accept(a) => {
            if let Some(head) = conn.inbuf.as_mut() {
                head.advance(consumed);
            }
            let session = Session::start(shard, &conn.io, *a);
            conn.phase = Phase::Ws {
                session,
                decoder: Decoder::new(),
            };
            match conn.inbuf.take() {
                Some(rest) if !rest.is_empty() => feed_ws(shard, conn, &rest, scratch),
                _ => false,
            }
        }
    }
}

fn reply(shard: &Rc<Shard>, conn: &mut Conn, response: Vec<u8>, now: u64) {
    conn.io.push_control(Bytes::from(response));
    let ip = match &mut conn.phase {
        Phase::Handshake { ip, .. } | Phase::Reply { ip } | Phase::HandOver { ip, .. } => {
            std::mem::take(ip)
        }
        Phase::Ws { .. } => Slots::default(),
    };
    conn.phase = Phase::Reply { ip };
    conn.inbuf = None;
    conn.ended = true;
    conn.flush_deadline = now + shard.node.config.close_timeout_ms;
}

/// Decodes WebSocket frames. Data goes through the shard's scratch buffer;
/// only the bytes of an incomplete frame stay with the connection.
fn feed_ws(shard: &Rc<Shard>, conn: &mut Conn, data: &[u8], scratch: &mut BytesMut) -> bool {
    let Conn {
        phase, inbuf, io, ..
    } = conn;
    let Phase::Ws { session, decoder } = phase else {
        return false;
    };
    match inbuf {
        None => {
            scratch.clear();
            scratch.extend_from_slice(data);
            let over = decode_all(shard, session, decoder, io, scratch);
            if !over && !scratch.is_empty() {
                *inbuf = Some(Box::new(BytesMut::from(&scratch[..])));
            }
            scratch.clear();
            over
        }
        Some(held) => {
            held.extend_from_slice(data);
            let over = decode_all(shard, session, decoder, io, held);
            if over || held.is_empty() {
                *inbuf = None;
            }
            over
        }
    }
}

fn decode_all(
    shard: &Shard,
    session: &mut Session,
    decoder: &mut Decoder,
    io: &Rc<ConnIo>,
    buf: &mut BytesMut,
) -> bool {
    let m = shard.metrics();
    loop {
        match decoder.decode(buf, session.max_message(&shard.node.config)) {
            Ok(Some(msg)) => {
                m.frames_in.inc();
                if let Next::Finish = session.on_message(shard, io, msg) {
                    return true;
                }
            }
            Ok(None) => return false,
            Err(e) => {
                m.protocol_errors.inc();
                tracing::debug!(shard = shard.id, error = %e, "protocol error");
                io.close(e.close_code(), e.reason());
                return true;
            }
        }
    }
}

/// Bytes of the loop's slot of one connection (without what it points to).
#[cfg(test)]
pub(super) fn loop_slot_size() -> usize {
    std::mem::size_of::<Option<Conn>>()
}

/// Drives one connection's whole session from bytes, without a socket or a
/// ring: handshake, authentication, frames and envelopes go through the
/// code the io_uring loop runs (`feed`), the engine of a one-shard node
/// answers, and every bound is checked after each step. The fuzz target
/// `session` calls it.
///
/// `data[0]` picks the start: bits 0-1 the request (0: the input writes
/// its own; 1: an upgrade without a token; 2 and 3: with a valid token, on
/// `corecast.json` or `corecast.bin`), bit 2 whether the rest is raw bytes
/// or messages the driver frames (first byte: FIN and opcode), bit 3
/// whether the peer reads what is written. The rest is chunks, each a
/// length byte and that many bytes.
#[doc(hidden)]
pub fn fuzz_session(data: &[u8]) {
    use crate::config::Config;
    let Some((&head, mut rest)) = data.split_first() else {
        return;
    };
    let config = Config {
        shards: 1,
        ban_file: String::new(),
        outbound_queue_frames: 64,
        outbound_queue_bytes: 64 << 10,
        max_message_size: 64 << 10,
        max_preauth_bytes_per_shard: 64 << 10,
        max_connections_per_ip: 0,
        max_handshakes_per_ip: 0,
        ..Config::default()
    };
    let (max_frames, max_bytes) = (config.outbound_queue_frames, config.outbound_queue_bytes);
    let Ok(verifier) = crate::auth::Verifier::from_config(&config.auth) else {
        return;
    };
    let token = crate::auth::mint(
        &config.auth,
        "fuzzer",
        600,
        None,
        crate::clock::now_ms() / 1000,
    )
    .expect("a development token");
    let Ok((mesh, _bells)) = crate::mesh::Mesh::new(1, 2, 64) else {
        return;
    };
    let node = Arc::new(Node::new(config, verifier, mesh));
    let shard = Shard::new(0, node.clone());
    let now = shard.outq.now_ms();
    let io = Rc::new(ConnIo::for_loop(-1, shard.outq.clone(), 0, now));
    let mut conn = Conn {
        io,
        gen: 0,
        recv: true,
        cancelled: false,
        ended: false,
        write_due: false,
        phase: Phase::Handshake {
            since: now,
            ip: Slots::default(),
        },
        inbuf: None,
        write: None,
        flush_deadline: NEVER,
    };
    let request = |path: &str, proto: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: f\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{proto}\r\n"
        )
    };
    let start = match head & 3 {
        0 => String::new(),
        1 => request("/ws", ""),
        2 => request(&format!("/ws?token={token}"), ""),
        _ => request(
            &format!("/ws?token={token}"),
            "Sec-WebSocket-Protocol: corecast.bin\r\n",
        ),
    };
    let (framed, reader) = (head & 4 != 0, head & 8 != 0);
    let mut scratch = BytesMut::new();
    let mut batch = Batch::default();
    let mut step = |bytes: &[u8], conn: &mut Conn| -> bool {
        let before = preauth_held(conn);
        let mut over = feed(&shard, conn, bytes, &mut scratch, now);
        if !shard.preauth_change(before, preauth_held(conn)) {
            over |= refuse_preauth(&shard, conn, now);
        }
        shard.drain_mesh();
        shard.tick_engine();
        shard.outbox.borrow_mut().flush();
        // Every byte queued for the peer within its bound (a close frame
        // may pass it once).
        let queued = conn.io.queued();
        assert!(queued.0 <= max_frames + 1, "{queued:?} frames queued");
        assert!(queued.1 <= max_bytes + 127, "{queued:?} bytes queued");
        assert_eq!(shard.preauth_bytes.get(), preauth_held(conn));
        if reader {
            conn.io.take_batch(&mut batch, MAX_IOV);
            conn.io.written();
            batch.clear();
        }
        over
    };
    let mut over = !start.is_empty() && step(start.as_bytes(), &mut conn);
    while !over && !rest.is_empty() {
        let len = (rest[0] as usize).min(rest.len() - 1);
        let (chunk, tail) = rest[1..].split_at(len);
        rest = tail;
        over = if framed && !chunk.is_empty() {
            let (op, payload) = (chunk[0], &chunk[1..]);
            let opcode = match op & 7 {
                0 => crate::ws::OpCode::Continuation,
                1 => crate::ws::OpCode::Text,
                2 => crate::ws::OpCode::Binary,
                3 => crate::ws::OpCode::Ping,
                4 => crate::ws::OpCode::Pong,
                _ => crate::ws::OpCode::Close,
            };
            let f = crate::ws::frame::encode_masked(op & 8 == 0, opcode, payload, [1, 2, 3, 4]);
            step(&f, &mut conn)
        } else {
            step(chunk, &mut conn)
        };
    }
    // The connection goes: its session leaves the engine, and everything
    // it held is given back.
    if let Phase::Ws { session, .. } = &mut conn.phase {
        session.end(&shard);
    }
    shard.preauth_change(preauth_held(&conn), 0);
    shard.outbox.borrow_mut().flush();
    shard.drain_mesh();
    assert_eq!(shard.preauth_bytes.get(), 0);
    drop(conn);
    assert_eq!(shard.outq.queued_frames(), 0, "frames left in the arena");
    assert_eq!(
        node.admission
            .ip_count(std::net::Ipv4Addr::UNSPECIFIED.into()),
        0
    );
}
