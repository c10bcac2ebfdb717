//! The mesh: one bounded lock-free queue for every ordered pair of shards,
//! and a doorbell per shard.
//!
//! A receiving shard drains its queues in batches. Only when it finds them
//! all empty does it set its `parked` flag and wait on its doorbell (a
//! socket it reads through the shard's io_uring, or epoll). A sender rings a
//! doorbell only when the receiver is parked, and at most once per batch
//! ([`Mesh::wake`] clears the flag as it rings), so a busy mesh makes no
//! syscalls at all. Nothing here takes a lock.
//!
//! Cost: N² queues for N shards, each of `capacity` slots.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

use crossbeam_queue::ArrayQueue;

use crate::engine::{MeshMsg, ShardId};

#[repr(align(128))]
struct Parked(AtomicBool);

pub struct Mesh {
    shards: usize,
    /// `queues[from * shards + to]`.
    queues: Vec<ArrayQueue<MeshMsg>>,
    parked: Vec<Parked>,
    bells: Vec<UnixStream>,
}

impl Mesh {
    /// Creates the mesh and returns, for each shard, the receiving end of
    /// its doorbell (to be awaited on that shard's runtime).
    pub fn new(shards: usize, capacity: usize) -> std::io::Result<(Mesh, Vec<UnixStream>)> {
        let mut bells = Vec::with_capacity(shards);
        let mut receivers = Vec::with_capacity(shards);
        for _ in 0..shards {
            let (tx, rx) = UnixStream::pair()?;
            tx.set_nonblocking(true)?;
            rx.set_nonblocking(true)?;
            bells.push(tx);
            receivers.push(rx);
        }
        Ok((
            Mesh {
                shards,
                queues: (0..shards * shards)
                    .map(|_| ArrayQueue::new(capacity))
                    .collect(),
                parked: (0..shards)
                    .map(|_| Parked(AtomicBool::new(false)))
                    .collect(),
                bells,
            },
            receivers,
        ))
    }

    pub fn shards(&self) -> usize {
        self.shards
    }

    fn queue(&self, from: ShardId, to: ShardId) -> &ArrayQueue<MeshMsg> {
        &self.queues[from as usize * self.shards + to as usize]
    }

    /// Queues a message; gives it back when the queue is full.
    pub fn try_push(&self, from: ShardId, to: ShardId, msg: MeshMsg) -> Result<(), MeshMsg> {
        self.queue(from, to).push(msg)
    }

    pub fn pop(&self, from: ShardId, to: ShardId) -> Option<MeshMsg> {
        self.queue(from, to).pop()
    }

    /// Whether any queue into `to` holds a message.
    pub fn has_pending(&self, to: ShardId) -> bool {
        (0..self.shards).any(|from| !self.queue(from as ShardId, to).is_empty())
    }

    /// Marks `me` as about to sleep. Returns false if a message arrived in
    /// the meantime (then the caller must not sleep).
    pub fn park(&self, me: ShardId) -> bool {
        self.parked[me as usize].0.store(true, SeqCst);
        if self.has_pending(me) {
            self.parked[me as usize].0.store(false, SeqCst);
            return false;
        }
        true
    }

    pub fn unpark(&self, me: ShardId) {
        self.parked[me as usize].0.store(false, SeqCst);
    }

    /// Rings `to`'s doorbell if it is parked. Returns whether it rang.
    pub fn wake(&self, to: ShardId) -> bool {
        if self.parked[to as usize].0.swap(false, SeqCst) {
            self.ring(to);
            return true;
        }
        false
    }

    /// Rings unconditionally (control events such as shutdown).
    pub fn ring(&self, to: ShardId) {
        // A full socket buffer already means "wake up": ignore WouldBlock.
        let _ = (&self.bells[to as usize]).write(&[1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ConnId;
    use bytes::Bytes;
    use std::io::Read;

    fn msg(n: u32) -> MeshMsg {
        MeshMsg::ToConn {
            conn: ConnId { slot: n, gen: 0 },
            frame: Bytes::new(),
        }
    }

    #[test]
    fn bounded_fifo_per_pair() {
        let (m, _rx) = Mesh::new(2, 2).unwrap();
        assert!(m.try_push(0, 1, msg(1)).is_ok());
        assert!(m.try_push(0, 1, msg(2)).is_ok());
        assert!(m.try_push(0, 1, msg(3)).is_err(), "bounded");
        assert!(m.has_pending(1));
        assert!(!m.has_pending(0));
        for want in [1, 2] {
            match m.pop(0, 1) {
                Some(MeshMsg::ToConn { conn, .. }) => assert_eq!(conn.slot, want),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn rings_only_a_parked_shard_and_only_once() {
        let (m, mut rx) = Mesh::new(2, 8).unwrap();
        assert!(!m.wake(1), "not parked: no syscall");
        assert!(m.park(1));
        assert!(m.wake(1));
        assert!(!m.wake(1), "one ring per park");
        let mut buf = [0u8; 8];
        assert_eq!(rx[1].read(&mut buf).unwrap(), 1);
        m.try_push(0, 1, msg(0)).unwrap();
        assert!(!m.park(1), "pending messages prevent parking");
    }
}
