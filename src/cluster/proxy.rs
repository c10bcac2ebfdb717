//! Connections of other nodes, as the bridge stands in for them: a call
//! held here whose callee answers on another node talks to the callee's
//! connection through a stand-in `ConnRef` on the bridge's mesh endpoint;
//! what the engine sends it, the bridge passes to the connection's node.

use std::collections::{HashMap, VecDeque};

use crate::engine::{ConnId, ConnRef, ShardId};
use crate::protocol::Protocol;

/// Stand-ins kept at most (the oldest go first). A stand-in lives as long
/// as a call may: thousands of simultaneous cross-node calls per node fit.
const MAX: usize = 65_536;

/// A connection of another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Remote {
    pub node: u64,
    pub conn: ConnRef,
    pub protocol: Protocol,
}

pub struct Proxies {
    /// The bridge's mesh endpoint (the stand-ins' shard).
    me: ShardId,
    slots: Vec<(u32, Option<Remote>)>,
    by_remote: HashMap<Remote, u32>,
    order: VecDeque<u32>,
}

impl Proxies {
    pub fn new(me: ShardId) -> Proxies {
        Proxies {
            me,
            slots: Vec::new(),
            by_remote: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// The stand-in for a remote connection (the same one each time).
    pub fn stand_in(&mut self, r: Remote) -> ConnRef {
        if let Some(&slot) = self.by_remote.get(&r) {
            let gen = self.slots[slot as usize].0;
            return self.conn_ref(slot, gen);
        }
        let slot = if self.slots.len() < MAX {
            self.slots.push((0, None));
            (self.slots.len() - 1) as u32
        } else {
            let slot = self.order.pop_front().expect("full, so not empty");
            let (gen, old) = &mut self.slots[slot as usize];
            if let Some(old) = old.take() {
                self.by_remote.remove(&old);
            }
            *gen = gen.wrapping_add(1);
            slot
        };
        self.slots[slot as usize].1 = Some(r);
        self.by_remote.insert(r, slot);
        self.order.push_back(slot);
        let gen = self.slots[slot as usize].0;
        self.conn_ref(slot, gen)
    }

    fn conn_ref(&self, slot: u32, gen: u32) -> ConnRef {
        ConnRef {
            shard: self.me,
            conn: ConnId { slot, gen },
        }
    }

    /// The remote connection a stand-in is for.
    pub fn get(&self, id: ConnId) -> Option<Remote> {
        match self.slots.get(id.slot as usize) {
            Some((gen, Some(r))) if *gen == id.gen => Some(*r),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_connection_keeps_its_stand_in_and_old_ones_go() {
        let mut p = Proxies::new(9);
        let r = |n: u32| Remote {
            node: 7,
            conn: ConnRef {
                shard: 1,
                conn: ConnId { slot: n, gen: 0 },
            },
            protocol: Protocol::Json,
        };
        let a = p.stand_in(r(1));
        assert_eq!(a.shard, 9);
        assert_eq!(p.stand_in(r(1)), a);
        assert_eq!(p.get(a.conn), Some(r(1)));
        let b = p.stand_in(r(2));
        assert_ne!(a, b);
        assert_eq!(p.get(ConnId { slot: 5, gen: 0 }), None);
    }
}
