//! Bounds on stored notifications. A notification waits for a user who is
//! offline (for `notification_ttl_ms`); what a shard keeps that way is
//! bounded in total and per sender, so that nobody can fill a node's
//! memory (or, in a cluster, Redis) by mentioning users who are away.
//!
//! The [`Ledger`] of a home shard counts every notification it keeps, by
//! who made it (a mention's author, a missed call's caller; the server
//! API's count in the total only), and, in a cluster, those it made for
//! users with no device on this node (kept in Redis only) until they expire.
//! A notification past a bound is not stored: devices online get it all
//! the same, and `corecast_notifications_dropped_total` counts it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Characters of a message a mention notification holds (the message
/// itself stays in the channel's history, found by its id).
pub const MENTION_EXCERPT_CHARS: usize = 100;

/// Why a notification was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The shard keeps its share of `max_stored_notifications`.
    Node,
    /// Its sender has its share of `max_notifications_per_sender` waiting.
    Sender,
}

/// What a home shard keeps, counted (see the module doc).
#[derive(Debug, Default)]
pub struct Ledger {
    total: usize,
    by_sender: HashMap<Arc<str>, u32>,
    /// Made here for Redis without a copy here (cluster): expiry and
    /// sender, in expiry order (every notification lives as long).
    away: VecDeque<(u64, Option<Arc<str>>)>,
}

impl Ledger {
    /// Whether one more notification from `from` fits within `max_total`
    /// and `max_per_sender` (this shard's shares).
    pub fn admit(
        &self,
        from: Option<&Arc<str>>,
        max_total: usize,
        max_per_sender: usize,
    ) -> Result<(), Full> {
        if self.total >= max_total {
            return Err(Full::Node);
        }
        match from.and_then(|f| self.by_sender.get(f)) {
            Some(&n) if n as usize >= max_per_sender => Err(Full::Sender),
            _ => Ok(()),
        }
    }

    pub fn add(&mut self, from: Option<&Arc<str>>) {
        self.total += 1;
        if let Some(f) = from {
            *self.by_sender.entry(f.clone()).or_default() += 1;
        }
    }

    pub fn remove(&mut self, from: Option<&Arc<str>>) {
        self.total = self.total.saturating_sub(1);
        let Some(f) = from else { return };
        if let Some(n) = self.by_sender.get_mut(f) {
            *n -= 1;
            if *n == 0 {
                self.by_sender.remove(f);
            }
        }
    }

    /// Counts a notification made for another node (kept in Redis only)
    /// until it expires.
    pub fn add_away(&mut self, expires_at: u64, from: Option<Arc<str>>) {
        self.add(from.as_ref());
        self.away.push_back((expires_at, from));
    }

    /// Forgets the notifications made for other nodes that have expired.
    pub fn expire_away(&mut self, now: u64) {
        while let Some((at, _)) = self.away.front() {
            if *at > now {
                break;
            }
            let (_, from) = self.away.pop_front().expect("just seen");
            self.remove(from.as_ref());
        }
    }

    /// Notifications counted.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Notifications counted for `from`.
    pub fn of(&self, from: &str) -> usize {
        self.by_sender.get(from).map_or(0, |n| *n as usize)
    }
}

/// The first [`MENTION_EXCERPT_CHARS`] characters of a message, with `…`
/// when there was more.
pub fn excerpt(content: &str) -> String {
    match content.char_indices().nth(MENTION_EXCERPT_CHARS) {
        None => content.to_string(),
        Some((i, _)) => format!("{}…", &content[..i]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_bounds_the_total_and_each_sender() {
        let mut l = Ledger::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        for _ in 0..3 {
            assert_eq!(l.admit(Some(&a), 10, 3), Ok(()));
            l.add(Some(&a));
        }
        assert_eq!(l.admit(Some(&a), 10, 3), Err(Full::Sender));
        assert_eq!(l.admit(Some(&b), 10, 3), Ok(()), "another sender");
        assert_eq!(l.admit(None, 10, 3), Ok(()), "the backend");
        l.remove(Some(&a));
        assert_eq!(l.admit(Some(&a), 10, 3), Ok(()));
        for t in 0..8 {
            l.add_away(100 + t, None);
        }
        assert_eq!(l.total(), 10);
        assert_eq!(l.admit(None, 10, 3), Err(Full::Node));
        l.expire_away(103);
        assert_eq!(l.total(), 6);
        l.expire_away(1_000);
        assert_eq!((l.total(), l.of("a")), (2, 2));
    }

    #[test]
    fn an_excerpt_is_cut_on_a_character() {
        assert_eq!(excerpt("short"), "short");
        let long = "é".repeat(150);
        let e = excerpt(&long);
        assert_eq!(e.chars().count(), MENTION_EXCERPT_CHARS + 1);
        assert!(e.ends_with('…'));
        assert_eq!(excerpt(&"x".repeat(100)), "x".repeat(100));
    }
}
