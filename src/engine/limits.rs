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

    /// The longest window: a user idle this long has full buckets.
    pub fn longest_ms(&self) -> u64 {
        self.by_event
            .iter()
            .flatten()
            .map(|l| l.per_ms)
            .max()
            .unwrap_or(0)
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

#[derive(Debug, Clone, Copy)]
struct Bucket {
    event: u8,
    tokens: f64,
    at: u64,
}

/// One user's buckets on one shard, made on its first limited event.
#[derive(Debug, Default)]
pub struct Buckets {
    slots: Vec<Bucket>,
}

impl Buckets {
    /// Takes a token for `event`, whose bucket holds `limit` divided by
    /// `share`. Refused: the milliseconds until a token is back.
    pub fn take(&mut self, event: usize, limit: Limit, share: u16, now: u64) -> Result<(), u64> {
        let share = share.max(1) as f64;
        let capacity = (limit.count as f64 / share).max(1.0);
        let per_ms = limit.count as f64 / share / limit.per_ms as f64;
        let event = event as u8;
        let b = match self.slots.iter_mut().find(|b| b.event == event) {
            Some(b) => b,
            None => {
                let bucket = Bucket {
                    event,
                    tokens: capacity,
                    at: now,
                };
                super::push_small(&mut self.slots, bucket);
                self.slots.last_mut().expect("just pushed")
            }
        };
        let elapsed = now.saturating_sub(b.at) as f64;
        b.tokens = (b.tokens + elapsed * per_ms).min(capacity);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.tokens) / per_ms).ceil().max(1.0) as u64)
        }
    }

    /// Whether every bucket has refilled by `now` (then it can go).
    pub fn idle(&self, limits: &RateLimits, now: u64) -> bool {
        self.slots.iter().all(|b| {
            limits
                .get(b.event as usize)
                .is_none_or(|l| now.saturating_sub(b.at) >= l.per_ms)
        })
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
        assert_eq!(r.longest_ms(), 0);
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
        let limits = RateLimits::default();
        assert!(!b.idle(&limits, 2_000));
        assert!(b.idle(&limits, 2_000 + 60_000));
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
