//! Log lines that could repeat without end (an `accept` failing on every
//! try, a peer misbehaving on every frame) go through a [`Throttle`]: at
//! most one line a second per call site, saying how many were left out.

use std::cell::Cell;

/// At most one log line a second from one call site; single-threaded (each
/// shard, and the API's thread, keeps its own).
#[derive(Debug, Default)]
pub struct Throttle {
    /// When the next line may go (ms on the caller's clock).
    next: Cell<u64>,
    suppressed: Cell<u64>,
}

impl Throttle {
    /// Whether a line may be logged at `now_ms`: `Some(n)` with the number
    /// of lines left out since the last one, or `None` (counted as left
    /// out).
    pub fn allow(&self, now_ms: u64) -> Option<u64> {
        if now_ms < self.next.get() {
            self.suppressed.set(self.suppressed.get() + 1);
            return None;
        }
        self.next.set(now_ms.saturating_add(1000));
        Some(self.suppressed.replace(0))
    }
}

#[cfg(test)]
mod tests {
    use super::Throttle;

    #[test]
    fn one_line_a_second_with_the_count_left_out() {
        let t = Throttle::default();
        assert_eq!(t.allow(5_000), Some(0));
        assert_eq!(t.allow(5_001), None);
        assert_eq!(t.allow(5_999), None);
        assert_eq!(t.allow(6_000), Some(2));
        assert_eq!(t.allow(6_500), None);
        assert_eq!(t.allow(9_000), Some(1));
    }
}
