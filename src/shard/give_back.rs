//! Memory back to the system after a burst.
//!
//! A join storm or a burst of messages allocates and frees a great deal at
//! once (member events, frames, handshakes). The allocator keeps what was
//! freed in its pages and gives it back only on later allocations, so a
//! shard that goes quiet after a burst would hold it for as long as it
//! stays quiet: about 70 bytes per connection after 10,000 connections join
//! rooms of 100 (docs/BENCHMARKS.md). Once per sweep the shard compares
//! the work done since the last sweep with the busiest sweep of the burst;
//! the first few quiet sweeps after a burst give it back (a millisecond at
//! most with 19,000 connections, measured; tens of microseconds when there
//! is little to give). Steady load is never interrupted: it reuses what it
//! frees.

/// Events in one sweep (frames in and out, connections opened) that make
/// it a burst.
const BURST: u64 = 1_000;

/// Quiet sweeps after a burst that give memory back: what the burst's
/// own timers free a little later (rate-limit buckets full again, tables
/// emptied) goes back too.
const AFTER: u8 = 4;

/// The decision, sans IO: fed the shard's running count of work at every
/// sweep.
#[derive(Debug, Default, Clone, Copy)]
pub struct AfterBurst {
    last: u64,
    /// The busiest sweep since the last burst ended.
    busiest: u64,
    /// A sweep doing at most this much is quiet (a quarter of the last
    /// burst's busiest).
    quiet: u64,
    /// Quiet sweeps still due to give memory back.
    owed: u8,
}

impl AfterBurst {
    /// `work`: the shard's running count of events. Whether to give memory
    /// back now.
    pub fn sweep(&mut self, work: u64) -> bool {
        let done = work.wrapping_sub(self.last);
        self.last = work;
        self.busiest = self.busiest.max(done);
        if self.busiest >= BURST && done.saturating_mul(4) <= self.busiest {
            self.quiet = self.busiest / 4;
            self.busiest = 0;
            self.owed = AFTER;
        }
        if self.owed > 0 && done <= self.quiet {
            self.owed -= 1;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs sweeps that each did `per_sweep[i]` events; which gave back.
    fn run(per_sweep: &[u64]) -> Vec<usize> {
        let mut a = AfterBurst::default();
        let mut work = 0u64;
        let mut gave = vec![];
        for (i, n) in per_sweep.iter().enumerate() {
            work = work.wrapping_add(*n);
            if a.sweep(work) {
                gave.push(i);
            }
        }
        gave
    }

    #[test]
    fn the_first_quiet_sweep_after_a_burst_gives_back_once() {
        assert_eq!(
            run(&[0, 50, 20_000, 30_000, 10, 0, 0, 5, 0, 0]),
            [4, 5, 6, 7]
        );
        // Not while busy again; a second burst, a second time.
        let sweeps = [20_000, 100, 0, 8_000, 1_000, 0, 0, 0, 0, 0];
        assert_eq!(run(&sweeps), [1, 2, 4, 5, 6, 7]);
    }

    #[test]
    fn steady_load_and_small_traffic_never_give_back() {
        assert!(run(&[300; 50]).is_empty(), "below a burst");
        assert!(run(&[40_000, 35_000, 45_000, 38_000, 20_000]).is_empty());
    }

    #[test]
    fn the_count_may_wrap() {
        let mut a = AfterBurst {
            last: u64::MAX - 10,
            ..Default::default()
        };
        assert!(!a.sweep(5_000));
        assert!(a.sweep(5_100));
    }
}
