//! The wall clock and randomness, read by the IO shells (shards, the
//! bridge, the server API, start-up) and handed to the sans-IO layers as
//! values.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A random number from the operating system (the clock mixed with a
/// constant if it has none to give).
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return now_ms() ^ 0x9E37_79B9_7F4A_7C15;
    }
    u64::from_ne_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_is_past_2020_and_random_numbers_differ() {
        assert!(now_ms() > 1_577_836_800_000);
        assert_ne!(random_u64(), random_u64());
    }
}
