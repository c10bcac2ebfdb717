//! A shard's mesh messages held back while their queues are full, and
//! the doorbells to ring once a batch is queued.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::engine::{MeshMsg, MeshTx, ShardId};
use crate::node::Node;

/// Messages for other shards that did not fit their queue yet.
pub struct Outbox {
    pub(super) node: Arc<Node>,
    pub(super) me: ShardId,
    pub(super) pending: Vec<VecDeque<MeshMsg>>,
    pub(super) backlog: usize,
    pub(super) dirty: Vec<ShardId>,
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
    pub(super) fn mark(&mut self, to: ShardId) {
        if !self.dirty.contains(&to) {
            self.dirty.push(to);
        }
    }

    /// Moves held-back messages into their queues and rings each receiver
    /// that got something, once.
    pub(super) fn flush(&mut self) {
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
