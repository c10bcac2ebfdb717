//! Rate limits: a token bucket per user and event, on the shard of the
//! user's connections.
//!
//! A user connected through several shards would otherwise get the limit
//! once per shard: its home shard tells each of them how many shards hold
//! the user's connections, and each bucket takes that share of the limit.
//! The user's total never exceeds the limit, and checking costs no message
//! between shards.

use std::collections::HashMap;
use std::sync::Arc;

use crate::protocol::CLIENT_EVENT_NAMES;

/// `count` events per `per_ms` milliseconds, in bursts of up to `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub count: u32,
    pub per_ms: u64,
}

impl Limit {
    /// Parses `30/60s`, `10/10s`, `5/500ms`, `100/1m`, or `off` (`None`).
    pub fn parse(spec: &str) -> Result<Option<Limit>, String> {
        let spec = spec.trim();
        if spec == "off" {
            return Ok(None);
        }
        let bad = || {
            format!("`{spec}` is not a rate: use COUNT/DURATION (30/60s, 5/500ms, 100/1m) or off")
        };
        let (count, window) = spec.split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let window = window.trim();
        let (digits, unit) = window
            .find(|c: char| !c.is_ascii_digit())
            .map_or((window, ""), |i| window.split_at(i));
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let per_ms = match unit {
            "ms" => n,
            "s" => n * 1000,
            "m" => n * 60_000,
            "h" => n * 3_600_000,
            _ => return Err(bad()),
        };
        if count == 0 || per_ms == 0 {
            return Err(format!(
                "`{spec}`: the count and the duration must be at least 1"
            ));
        }
        Ok(Some(Limit { count, per_ms }))
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.per_ms % 1000 == 0 {
            write!(f, "{}/{}s", self.count, self.per_ms / 1000)
        } else {
            write!(f, "{}/{}ms", self.count, self.per_ms)
        }
    }
}

/// The bucket of events the server does not know (and of every event
/// without a limit of its own).
pub const DEFAULT: usize = CLIENT_EVENT_NAMES.len();
/// The bucket of the application's own events (`custom_events`).
pub const CUSTOM: usize = CLIENT_EVENT_NAMES.len() + 1;

/// The limit of each client event (`None`: unlimited), by
/// [`crate::protocol::ClientEvent::index`], then the default (which also
/// covers events the server does not know), then `custom`, the
/// application's own events.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimits {
    by_event: Vec<Option<Limit>>,
    /// Events given a limit of their own (the others follow the default).
    own: Vec<bool>,
}

const DEFAULTS: &[(&str, u32, u64)] = &[
    ("message:send", 30, 60_000),
    ("typing:start", 10, 10_000),
    ("presence:update", 5, 30_000),
    ("voice:update", 20, 5_000),
    ("channel:join", 50, 60_000),
    ("call:initiate", 5, 60_000),
    ("message:react", 50, 60_000),
    ("custom", 50, 5_000),
];

impl Default for RateLimits {
    /// The limits of the systems corecast replaces: `message:send` 30/min,
    /// `typing:start` 10 per 10 s, `presence:update` 5 per 30 s,
    /// `voice:update` 20 per 5 s, `channel:join` 50/min, `call:initiate`
    /// 5/min, `message:react` 50/min, the application's own events
    /// (`custom`) 50 per 5 s, anything else 100/min.
    fn default() -> Self {
        let n = CUSTOM + 1;
        let mut r = RateLimits {
            by_event: vec![None; n],
            own: vec![false; n],
        };
        r.set("default", Limit::parse("100/60s").expect("valid"))
            .expect("known");
        for (name, count, per_ms) in DEFAULTS {
            let limit = Limit {
                count: *count,
                per_ms: *per_ms,
            };
            r.set(name, Some(limit)).expect("known event");
        }
        r
    }
}

impl RateLimits {
    /// Sets the limit of `event`; `default` sets the limit of every event
    /// without one of its own, `*` sets every limit.
    pub fn set(&mut self, event: &str, limit: Option<Limit>) -> Result<(), String> {
        match event {
            "*" => {
                self.by_event.iter_mut().for_each(|l| *l = limit);
                self.own.iter_mut().for_each(|o| *o = false);
            }
            "default" => {
                for (l, own) in self.by_event.iter_mut().zip(&self.own) {
                    if !own {
                        *l = limit;
                    }
                }
            }
            name => {
                let i = CLIENT_EVENT_NAMES
                    .iter()
                    .position(|n| *n == name)
                    .filter(|i| *i != 0)
                    .or((name == "custom").then_some(CUSTOM))
                    .ok_or_else(|| {
                        format!(
                            "rate limit for `{name}`: not a client event (nor `custom`, `default` or `*`)"
                        )
                    })?;
                self.by_event[i] = limit;
                self.own[i] = true;
            }
        }
        debug_assert_eq!(self.by_event.len(), CUSTOM + 1);
        Ok(())
    }

    pub fn get(&self, index: usize) -> Option<Limit> {
        self.by_event
            .get(index)
            .copied()
            .unwrap_or(self.by_event[DEFAULT])
    }

    /// `(event, limit)` for every event, and `default`.
    pub fn entries(&self) -> Vec<(&'static str, Option<Limit>)> {
        let mut v: Vec<(&'static str, Option<Limit>)> = CLIENT_EVENT_NAMES
            .iter()
            .enumerate()
            .skip(1) // `auth` happens before a connection is known
            .map(|(i, n)| (*n, self.by_event[i]))
            .collect();
        v.push(("default", self.by_event[DEFAULT]));
        v.push(("custom", self.by_event[CUSTOM]));
        v
    }
}

/// The low 56 bits of a bucket: its schedule, in microseconds.
const TIME: u64 = (1 << 56) - 1;

/// One user's buckets on one shard, made on its first limited event and
/// dropped once they are all full again (see [`Limiter::sweep`]). Each
/// bucket is one word: the event in the top byte and, below it, the
/// bucket's schedule in microseconds (the generic cell rate algorithm: the
/// time at which the bucket is full again; events may run ahead of it by
/// a burst's worth). A full bucket needs no state, so a user idle for a
/// window costs nothing here.
#[derive(Debug, Default)]
pub struct Buckets {
    slots: Box<[u64]>,
}

impl Buckets {
    /// Takes a token for `event`, whose bucket holds `limit` divided by
    /// `share`. Refused: the milliseconds until a token is back.
    pub fn take(&mut self, event: usize, limit: Limit, share: u16, now: u64) -> Result<(), u64> {
        let share = share.max(1) as f64;
        let capacity = (limit.count as f64 / share).max(1.0);
        // Microseconds per token, and how far the schedule may run ahead
        // of now (all of a full bucket's tokens but one).
        let interval = limit.per_ms as f64 * 1000.0 * share / limit.count as f64;
        let burst = interval * (capacity - 1.0);
        let now = now.saturating_mul(1000).min(TIME);
        let tag = (event as u64 & 0xff) << 56;
        let slot = self.slots.iter().position(|b| b & !TIME == tag);
        let due = slot.map_or(now, |i| self.slots[i] & TIME).max(now);
        let ahead = (due - now) as f64;
        if ahead > burst {
            return Err(((ahead - burst) / 1000.0).ceil().max(1.0) as u64);
        }
        let next = tag | (due + interval.round() as u64).min(TIME);
        match slot {
            Some(i) => self.slots[i] = next,
            None => {
                let mut v = Vec::with_capacity(self.slots.len() + 1);
                v.extend_from_slice(&self.slots);
                v.push(next);
                self.slots = v.into_boxed_slice();
            }
        }
        Ok(())
    }

    /// Whether every bucket is full again at `now` (then they can go).
    pub fn full(&self, now: u64) -> bool {
        let now = now.saturating_mul(1000).min(TIME);
        self.slots.iter().all(|b| b & TIME <= now)
    }
}

/// The buckets of the users active on this shard, and how many shards
/// each multi-shard user is spread over.
#[derive(Default)]
pub struct Limiter {
    pub buckets: HashMap<Arc<str>, Buckets>,
    pub spread: HashMap<Arc<str>, u16>,
}

impl Limiter {
    /// Drops the buckets that are full again at `now`, and gives back the
    /// table's room when most of it is empty. Whether any are left (then
    /// the next sweep is due).
    pub fn sweep(&mut self, now: u64) -> bool {
        self.buckets.retain(|_, b| !b.full(now));
        let left = self.buckets.len();
        if left == 0 {
            self.buckets = HashMap::new();
        } else if self.buckets.capacity() > 4 * left {
            self.buckets.shrink_to(2 * left);
        }
        left > 0
    }

    pub fn share(&self, user: &str) -> u16 {
        self.spread.get(user).copied().unwrap_or(1)
    }

    pub fn set_spread(&mut self, user: &Arc<str>, shards: u16) {
        if shards > 1 {
            self.spread.insert(user.clone(), shards);
        } else {
            self.spread.remove(user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(name: &str) -> usize {
        CLIENT_EVENT_NAMES.iter().position(|n| *n == name).unwrap()
    }

    #[test]
    fn specs() {
        assert_eq!(
            Limit::parse("30/60s"),
            Ok(Some(Limit {
                count: 30,
                per_ms: 60_000
            }))
        );
        assert_eq!(Limit::parse("5/500ms").unwrap().unwrap().per_ms, 500);
        assert_eq!(Limit::parse("100/1m").unwrap().unwrap().per_ms, 60_000);
        assert_eq!(Limit::parse(" off "), Ok(None));
        for bad in ["30", "x/1s", "30/", "30/1d", "0/1s", "3/0s", "-1/1s"] {
            assert!(Limit::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Limit::parse("30/60s").unwrap().unwrap().to_string(),
            "30/60s"
        );
    }

    #[test]
    fn defaults_and_overrides() {
        let mut r = RateLimits::default();
        let send = index("message:send");
        assert_eq!(r.get(send).unwrap().count, 30);
        assert_eq!(r.get(index("heartbeat")).unwrap().count, 100);
        assert_eq!(
            r.get(CLIENT_EVENT_NAMES.len()).unwrap().count,
            100,
            "unknown events"
        );
        r.set("default", Limit::parse("7/1s").unwrap()).unwrap();
        assert_eq!(r.get(index("heartbeat")).unwrap().count, 7);
        assert_eq!(r.get(send).unwrap().count, 30, "own limits stay");
        r.set("message:send", None).unwrap();
        assert_eq!(r.get(send), None);
        r.set("*", None).unwrap();
        assert!(r.entries().iter().all(|(_, l)| l.is_none()));
        assert!(r.set("auth", None).is_err());
        assert!(r.set("message:sned", None).is_err());
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let limit = Limit {
            count: 3,
            per_ms: 3_000,
        };
        let mut b = Buckets::default();
        for _ in 0..3 {
            assert_eq!(b.take(7, limit, 1, 1_000), Ok(()));
        }
        assert_eq!(b.take(7, limit, 1, 1_000), Err(1_000));
        assert_eq!(b.take(7, limit, 1, 1_600), Err(400));
        assert_eq!(b.take(7, limit, 1, 2_000), Ok(()));
        // Other events have buckets of their own.
        assert_eq!(b.take(8, limit, 1, 2_000), Ok(()));
        assert_eq!(b.slots.len(), 2);
        // Full again when every token is back: event 7's last one, taken
        // at 2 s with two due before it, at 5 s.
        assert!(!b.full(4_999));
        assert!(b.full(5_000));
        // A dropped full bucket and a kept one allow the same.
        let mut fresh = Buckets::default();
        for _ in 0..3 {
            assert_eq!(b.take(7, limit, 1, 5_000), Ok(()));
            assert_eq!(fresh.take(7, limit, 1, 5_000), Ok(()));
        }
        assert_eq!(b.take(7, limit, 1, 5_000), Err(1_000));
        assert_eq!(fresh.take(7, limit, 1, 5_000), Err(1_000));
    }

    #[test]
    fn a_sweep_drops_full_buckets_and_the_table_with_them() {
        let limit = Limit {
            count: 2,
            per_ms: 1_000,
        };
        let mut l = Limiter::default();
        for i in 0..1_000 {
            let user: Arc<str> = format!("u{i}").into();
            let b = l.buckets.entry(user).or_default();
            // Users 0..10 send a burst at 500 ms, the others once at 0.
            let at = if i < 10 { 500 } else { 0 };
            assert_eq!(b.take(3, limit, 1, at), Ok(()));
            if i < 10 {
                assert_eq!(b.take(3, limit, 1, at), Ok(()));
            }
        }
        assert!(l.sweep(499), "none is full yet");
        assert_eq!(l.buckets.len(), 1_000);
        assert!(l.sweep(500), "the bursts are not full");
        assert_eq!(l.buckets.len(), 10);
        assert!(l.buckets.capacity() < 100, "the room is given back");
        assert!(!l.sweep(1_500));
        assert_eq!(l.buckets.capacity(), 0);
    }

    #[test]
    fn a_user_on_two_shards_gets_half_the_limit_on_each() {
        let limit = Limit {
            count: 30,
            per_ms: 60_000,
        };
        let (mut a, mut b) = (Buckets::default(), Buckets::default());
        let mut allowed = 0;
        for i in 0..100 {
            let t = 1_000 + i;
            allowed += a.take(1, limit, 2, t).is_ok() as u32;
            allowed += b.take(1, limit, 2, t).is_ok() as u32;
        }
        assert_eq!(allowed, 30, "the user's total is the limit");
        // A tiny limit still lets one event through per shard.
        let one = Limit {
            count: 1,
            per_ms: 60_000,
        };
        assert!(Buckets::default().take(1, one, 4, 0).is_ok());
    }
}
