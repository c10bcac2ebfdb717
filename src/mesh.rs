//! The mesh: one bounded lock-free queue for every ordered pair of
//! endpoints, and a doorbell per endpoint. The endpoints are the shards,
//! then any extra threads that talk to them the same way (the server API).
//!
//! A receiving shard drains its queues in batches. Only when it finds them
//! all empty does it set its `parked` flag and wait on its doorbell (a
//! socket it reads through the shard's io_uring, or epoll). A sender rings a
//! doorbell only when the receiver is parked, and at most once per batch
//! ([`Mesh::wake`] clears the flag as it rings), so a busy mesh makes no
//! syscalls at all. Nothing here takes a lock.
//!
//! Cost: N² queues for N shards, each of `capacity` slots; a queue to or
//! from an extra endpoint has at most [`EXTRA_CAPACITY`] slots (the traffic
//! there is requests and their answers, not fan-out).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

use crossbeam_queue::ArrayQueue;

use crate::engine::{MeshMsg, ShardId};

#[repr(align(128))]
struct Parked(AtomicBool);

/// Slots of a queue to or from an extra endpoint.
pub const EXTRA_CAPACITY: usize = 1024;

/// Extra endpoints after the shards: the server API, the cluster's
/// bridge, the ban store, the hooks (each whether its thread runs or not,
/// so that their numbers never move).
pub const EXTRA_ENDPOINTS: usize = 4;

/// The server API's mesh endpoint on a node of `shards` shards.
pub fn api_endpoint(shards: usize) -> ShardId {
    shards as ShardId
}

/// The cluster bridge's mesh endpoint on a node of `shards` shards.
pub fn bridge_endpoint(shards: usize) -> ShardId {
    (shards + 1) as ShardId
}

/// The ban store's mesh endpoint on a node of `shards` shards.
pub fn store_endpoint(shards: usize) -> ShardId {
    (shards + 2) as ShardId
}

/// The hooks' mesh endpoint on a node of `shards` shards.
pub fn hooks_endpoint(shards: usize) -> ShardId {
    (shards + 3) as ShardId
}

pub struct Mesh {
    shards: usize,
    /// Shards and extra endpoints.
    endpoints: usize,
    /// `queues[from * endpoints + to]`.
    queues: Vec<ArrayQueue<MeshMsg>>,
    parked: Vec<Parked>,
    bells: Vec<UnixStream>,
}

impl Mesh {
    /// Creates the mesh of `shards` shards and `extra` other endpoints,
    /// and returns, for each endpoint, the receiving end of its doorbell
    /// (to be awaited on that endpoint's runtime).
    pub fn new(
        shards: usize,
        extra: usize,
        capacity: usize,
    ) -> std::io::Result<(Mesh, Vec<UnixStream>)> {
        let endpoints = shards + extra;
        let mut bells = Vec::with_capacity(endpoints);
        let mut receivers = Vec::with_capacity(endpoints);
        for _ in 0..endpoints {
            let (tx, rx) = UnixStream::pair()?;
            tx.set_nonblocking(true)?;
            rx.set_nonblocking(true)?;
            bells.push(tx);
            receivers.push(rx);
        }
        let queues = (0..endpoints * endpoints)
            .map(|i| {
                let (from, to) = (i / endpoints, i % endpoints);
                if from < shards && to < shards {
                    ArrayQueue::new(capacity)
                } else {
                    ArrayQueue::new(capacity.min(EXTRA_CAPACITY))
                }
            })
            .collect();
        Ok((
            Mesh {
                shards,
                endpoints,
                queues,
                parked: (0..endpoints)
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

    /// Shards and extra endpoints.
    pub fn endpoints(&self) -> usize {
        self.endpoints
    }

    fn queue(&self, from: ShardId, to: ShardId) -> &ArrayQueue<MeshMsg> {
        &self.queues[from as usize * self.endpoints + to as usize]
    }

    /// Queues a message; gives it back when the queue is full.
    pub fn try_push(&self, from: ShardId, to: ShardId, msg: MeshMsg) -> Result<(), MeshMsg> {
        self.queue(from, to).push(msg)
    }

    /// Queues a message and rings `to` if it sleeps; gives the message back
    /// when the queue is full (for the caller's runtime to wait and retry).
    pub fn send(&self, from: ShardId, to: ShardId, msg: MeshMsg) -> Result<(), MeshMsg> {
        self.try_push(from, to, msg)?;
        self.wake(to);
        Ok(())
    }

    pub fn pop(&self, from: ShardId, to: ShardId) -> Option<MeshMsg> {
        self.queue(from, to).pop()
    }

    /// Whether any queue into `to` holds a message.
    pub fn has_pending(&self, to: ShardId) -> bool {
        (0..self.endpoints).any(|from| !self.queue(from as ShardId, to).is_empty())
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
        let (m, _rx) = Mesh::new(2, 0, 2).unwrap();
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
        let (m, mut rx) = Mesh::new(2, 0, 8).unwrap();
        assert!(!m.wake(1), "not parked: no syscall");
        assert!(m.park(1));
        assert!(m.wake(1));
        assert!(!m.wake(1), "one ring per park");
        let mut buf = [0u8; 8];
        assert_eq!(rx[1].read(&mut buf).unwrap(), 1);
        m.try_push(0, 1, msg(0)).unwrap();
        assert!(!m.park(1), "pending messages prevent parking");
    }

    #[test]
    fn an_extra_endpoint_talks_to_every_shard_through_small_queues() {
        let (m, mut rx) = Mesh::new(2, 1, 4096).unwrap();
        assert_eq!((m.shards(), m.endpoints(), rx.len()), (2, 3, 3));
        m.try_push(2, 0, msg(7)).unwrap();
        assert!(
            m.has_pending(0),
            "a shard sees what the extra endpoint sent"
        );
        assert!(m.park(2));
        m.try_push(1, 2, msg(8)).unwrap();
        assert!(m.wake(2));
        let mut buf = [0u8; 8];
        assert_eq!(rx[2].read(&mut buf).unwrap(), 1);
        assert_eq!(m.queue(1, 2).capacity(), EXTRA_CAPACITY);
        assert_eq!(m.queue(0, 1).capacity(), 4096);
    }
}
