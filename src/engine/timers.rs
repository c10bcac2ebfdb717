//! Deadlines as data: the engine files what should happen when, the shell
//! asks for the next deadline and calls [`super::Engine::tick`] once it has
//! passed. A timer is not cancelled when its reason goes away; whoever
//! handles it checks that the reason still holds (a typing entry that was
//! refreshed keeps a later deadline, a call that was answered no longer
//! rings), which keeps cancellation free.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

/// What a deadline is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Timer {
    /// A typing indicator may have expired (owner shard).
    Typing { channel: Arc<str> },
    /// An owned channel without members may have outlived its history.
    ChannelGc { channel: Arc<str> },
    /// What Redis refused of a channel (its state, messages sequenced
    /// alone) is asked again.
    ClusterRetry { channel: Arc<str> },
    /// A user's grace period may be over, a resume window closed or a
    /// notification expired (home shard).
    User { user: Arc<str> },
    /// A call may have rung out (callee's home shard).
    CallRing { call: u64 },
    /// Timed bans may have ended (every shard).
    Bans,
    /// The rate-limit buckets that are full again are dropped (every
    /// second while any are kept).
    RateSweep,
    /// The connections' tokens are looked at (every second while any
    /// connection's token expires).
    Tokens,
}

#[derive(Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(u64, Timer)>>,
}

impl Timers {
    pub fn at(&mut self, due: u64, timer: Timer) {
        self.heap.push(Reverse((due, timer)));
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((due, _))| *due)
    }

    /// Takes the next timer due at `now` or before.
    pub fn pop_due(&mut self, now: u64) -> Option<Timer> {
        if self.next()? > now {
            return None;
        }
        self.heap.pop().map(|Reverse((_, t))| t)
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_timers_come_out_in_order() {
        let mut t = Timers::default();
        assert_eq!(t.next(), None);
        t.at(30, Timer::CallRing { call: 3 });
        t.at(10, Timer::CallRing { call: 1 });
        t.at(20, Timer::CallRing { call: 2 });
        assert_eq!(t.next(), Some(10));
        assert_eq!(t.pop_due(5), None);
        assert_eq!(t.pop_due(25), Some(Timer::CallRing { call: 1 }));
        assert_eq!(t.pop_due(25), Some(Timer::CallRing { call: 2 }));
        assert_eq!(t.pop_due(25), None);
        assert_eq!(t.len(), 1);
    }
}
