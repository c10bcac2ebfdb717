//! Who may open a connection: a cap on each shard's sockets, and per-IP
//! handshake rate and concurrent connections. (The per-user cap is kept
//! exactly by each user's home shard: see the engine.)
//!
//! Per-IP counts are node-wide and lock-free: they live in count-min
//! sketches of atomic counters that every shard updates, so a limit holds
//! across shards without a message between them. A sketch never
//! under-counts: an address's count is the smaller of its two counters,
//! each shared with whatever other addresses hash there. So a limit is
//! never exceeded; an address near its limit may be refused a few
//! connections early when the node holds many (both of its counters
//! crowded). The tables hold a counter per two connections of the node's
//! capacity (from 256 KiB; pages are mapped as they are first written),
//! and the hash is keyed per process, so a client cannot aim at another
//! address's counters.
//!
//! Behind a proxy, every connection comes from the proxy's address:
//! `trusted_proxies` names those whose `X-Forwarded-For` is believed.

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

/// Why a connection was refused before its upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The shard holds `max_connections_per_shard` sockets (503).
    ServerFull,
    /// The address opened more than `max_handshakes_per_ip` this second (429).
    TooManyHandshakes,
    /// The address holds `max_connections_per_ip` sockets (429).
    TooManyFromIp,
    /// The user holds `max_connections_per_user` connections (429).
    TooManyForUser,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [
        Refusal::ServerFull,
        Refusal::TooManyHandshakes,
        Refusal::TooManyFromIp,
        Refusal::TooManyForUser,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn status(self) -> u16 {
        match self {
            Refusal::ServerFull => 503,
            _ => 429,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Refusal::ServerFull => "server_full",
            Refusal::TooManyHandshakes => "too_many_handshakes",
            Refusal::TooManyFromIp => "too_many_connections_from_ip",
            Refusal::TooManyForUser => "too_many_connections_for_user",
        }
    }

    /// The HTTP response that refuses the upgrade.
    pub fn response(self) -> Vec<u8> {
        let retry = match self {
            Refusal::ServerFull => "Retry-After: 5\r\n",
            Refusal::TooManyHandshakes => "Retry-After: 1\r\n",
            _ => "",
        };
        crate::ws::handshake::http_response(
            self.status(),
            retry,
            "text/plain",
            self.reason().as_bytes(),
        )
    }
}

/// The two counters of a key in a sketch (0: none taken). Four bytes, as
/// every connection keeps one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Slots(u32);

/// Concurrent counts per key, never under-counted.
struct Sketch {
    cells: Box<[AtomicU32]>,
    mask: u32,
}

/// `size` zeroed counters, in pages the kernel maps only when first
/// written (a large table costs memory as keys arrive, not up front).
fn zeroed(size: usize) -> Box<[AtomicU32]> {
    let cells: Box<[u32]> = vec![0u32; size].into_boxed_slice();
    // SAFETY: `AtomicU32` has the size, alignment and bit validity of
    // `u32`, so a boxed slice of one is a boxed slice of the other.
    unsafe { Box::from_raw(Box::into_raw(cells) as *mut [AtomicU32]) }
}

/// A key's two cells, from its (non-zero) 32-bit hash: the low bits, and
/// the bits of a multiplicative remix.
fn two_cells(hash: u32, mask: u32) -> (usize, usize) {
    let a = hash & mask;
    let mut b = hash.wrapping_mul(0x9E37_79B9).rotate_left(16) & mask;
    if b == a {
        b = (b + 1) & mask;
    }
    (a as usize, b as usize)
}

/// A 32-bit hash that is never 0 (0 means "no slots").
fn key32(hash: u64) -> u32 {
    ((hash ^ (hash >> 32)) as u32) | 1
}

impl Sketch {
    fn new(size: usize) -> Sketch {
        let size = size.next_power_of_two();
        Sketch {
            cells: zeroed(size),
            mask: size as u32 - 1,
        }
    }

    /// Counts one more for `hash` unless that would pass `limit`.
    fn take(&self, hash: u64, limit: u32) -> Option<Slots> {
        let key = key32(hash);
        let (a, b) = two_cells(key, self.mask);
        let na = self.cells[a].fetch_add(1, Relaxed) + 1;
        let nb = self.cells[b].fetch_add(1, Relaxed) + 1;
        if na.min(nb) > limit {
            self.cells[a].fetch_sub(1, Relaxed);
            self.cells[b].fetch_sub(1, Relaxed);
            return None;
        }
        Some(Slots(key))
    }

    fn give_back(&self, slots: Slots) {
        if slots.0 == 0 {
            return;
        }
        let (a, b) = two_cells(slots.0, self.mask);
        self.cells[a].fetch_sub(1, Relaxed);
        self.cells[b].fetch_sub(1, Relaxed);
    }

    fn count(&self, hash: u64) -> u32 {
        let (a, b) = two_cells(key32(hash), self.mask);
        self.cells[a].load(Relaxed).min(self.cells[b].load(Relaxed))
    }
}

/// Events per key in the current second: each counter holds the second
/// (low 16 bits) and the count (high 16 bits).
struct RateSketch {
    cells: Box<[AtomicU32]>,
    mask: u32,
}

impl RateSketch {
    fn new(size: usize) -> RateSketch {
        let size = size.next_power_of_two();
        RateSketch {
            cells: zeroed(size),
            mask: size as u32 - 1,
        }
    }

    /// Counts an event; false when the key already had `limit` this second.
    fn hit(&self, hash: u64, limit: u32, now_ms: u64) -> bool {
        let second = (now_ms / 1000) as u32 & 0xffff;
        let (a, b) = two_cells(key32(hash), self.mask);
        let bump = |cell: &AtomicU32| -> u32 {
            let mut cur = cell.load(Relaxed);
            loop {
                let count = if cur & 0xffff == second { cur >> 16 } else { 0 };
                let next = (count + 1).min(0xffff);
                match cell.compare_exchange_weak(cur, (next << 16) | second, Relaxed, Relaxed) {
                    Ok(_) => return next,
                    Err(actual) => cur = actual,
                }
            }
        };
        bump(&self.cells[a]).min(bump(&self.cells[b])) <= limit
    }
}

/// The node's connection limits (0: that limit is off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections_per_shard: usize,
    pub max_handshakes_per_ip: u32,
    pub max_connections_per_ip: u32,
}

/// An address block: `10.0.0.0/8`, `fd00::/8`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    pub fn parse(s: &str) -> Result<Net, String> {
        let bad = || format!("`{s}` is not an address or address/prefix");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(bad)?,
            None => max,
        };
        Ok(Net { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// An IPv4 address in its IPv6-mapped form is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The client's address: the peer's, or, when the peer is a trusted proxy,
/// the last address of `X-Forwarded-For` that is not itself a trusted
/// proxy.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[Net]) -> IpAddr {
    let peer = canonical(peer);
    let trusted_ip = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    let Some(list) = forwarded_for.filter(|_| trusted_ip(peer)) else {
        return peer;
    };
    let mut client = peer;
    for hop in list.rsplit(',') {
        let Ok(ip) = hop.trim().parse::<IpAddr>() else {
            break;
        };
        client = canonical(ip);
        if !trusted_ip(client) {
            break;
        }
    }
    client
}

pub struct Admission {
    limits: Limits,
    hasher: std::collections::hash_map::RandomState,
    ip_rate: Option<RateSketch>,
    ip_conns: Option<Sketch>,
}

impl Admission {
    /// `capacity`: the connections the node may hold (0: unknown). Each
    /// table has half as many counters (at least 65,536, at most 2^20:
    /// 256 KiB to 4 MiB).
    pub fn new(limits: Limits, capacity: usize) -> Admission {
        let cells = (capacity / 2).clamp(1 << 16, 1 << 20);
        Admission {
            limits,
            hasher: Default::default(),
            ip_rate: (limits.max_handshakes_per_ip > 0).then(|| RateSketch::new(cells)),
            ip_conns: (limits.max_connections_per_ip > 0).then(|| Sketch::new(cells)),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Whether a shard holding `sockets` sockets (a new one included) is
    /// over its cap.
    pub fn shard_full(&self, sockets: usize) -> bool {
        let cap = self.limits.max_connections_per_shard;
        cap > 0 && sockets > cap
    }

    /// A socket just accepted from `peer`, before anything is read from
    /// it: it counts against the peer's address from now on. A trusted
    /// proxy's sockets are not counted here: the client behind it is, once
    /// its request names it ([`Admission::admit_upgrade`]). On success, the
    /// slots to give back when the socket closes.
    pub fn admit_socket(&self, peer: IpAddr, trusted_proxy: bool) -> Result<Slots, Refusal> {
        match &self.ip_conns {
            Some(s) if !trusted_proxy => s
                .take(
                    self.hasher.hash_one(canonical(peer)),
                    self.limits.max_connections_per_ip,
                )
                .ok_or(Refusal::TooManyFromIp),
            _ => Ok(Slots::default()),
        }
    }

    /// A complete upgrade request from `client`: its address's handshake
    /// rate and, when its socket was not counted at accept (it came through
    /// a trusted proxy), its connections, counted into `held`.
    pub fn admit_upgrade(
        &self,
        client: IpAddr,
        held: &mut Slots,
        now_ms: u64,
    ) -> Result<(), Refusal> {
        if self.ip_rate.is_none() && self.ip_conns.is_none() {
            return Ok(());
        }
        let hash = self.hasher.hash_one(canonical(client));
        if let Some(r) = &self.ip_rate {
            if !r.hit(hash, self.limits.max_handshakes_per_ip, now_ms) {
                return Err(Refusal::TooManyHandshakes);
            }
        }
        match &self.ip_conns {
            Some(s) if *held == Slots::default() => {
                *held = s
                    .take(hash, self.limits.max_connections_per_ip)
                    .ok_or(Refusal::TooManyFromIp)?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// [`Admission::admit_socket`] then [`Admission::admit_upgrade`], for
    /// a request straight from `ip` (tests).
    pub fn admit_ip(&self, ip: IpAddr, now_ms: u64) -> Result<Slots, Refusal> {
        let mut held = self.admit_socket(ip, false)?;
        match self.admit_upgrade(ip, &mut held, now_ms) {
            Ok(()) => Ok(held),
            Err(r) => {
                self.release_ip(held);
                Err(r)
            }
        }
    }

    pub fn release_ip(&self, slots: Slots) {
        if let Some(s) = &self.ip_conns {
            s.give_back(slots);
        }
    }

    /// How many connections `ip` holds, as the sketch sees it (at least
    /// the true count).
    pub fn ip_count(&self, ip: IpAddr) -> u32 {
        self.ip_conns
            .as_ref()
            .map_or(0, |s| s.count(self.hasher.hash_one(canonical(ip))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(shard: usize, rate: u32, ip: u32) -> Limits {
        Limits {
            max_connections_per_shard: shard,
            max_handshakes_per_ip: rate,
            max_connections_per_ip: ip,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn concurrent_connections_per_address() {
        let a = Admission::new(limits(0, 0, 3), 0);
        let held: Vec<Slots> = (0..3)
            .map(|_| a.admit_ip(ip("10.0.0.1"), 0).unwrap())
            .collect();
        assert_eq!(a.admit_ip(ip("10.0.0.1"), 0), Err(Refusal::TooManyFromIp));
        assert!(
            a.admit_ip(ip("10.0.0.2"), 0).is_ok(),
            "another address is not held back"
        );
        assert_eq!(a.ip_count(ip("10.0.0.1")), 3);
        a.release_ip(held[0]);
        assert_eq!(a.ip_count(ip("10.0.0.1")), 2);
        assert!(a.admit_ip(ip("10.0.0.1"), 0).is_ok());
    }

    #[test]
    fn the_shard_cap_and_the_handshake_rate() {
        let a = Admission::new(limits(10, 5, 0), 0);
        assert!(a.shard_full(11) && !a.shard_full(10));
        for _ in 0..5 {
            assert!(a.admit_ip(ip("192.168.1.9"), 1_000).is_ok());
        }
        assert_eq!(
            a.admit_ip(ip("192.168.1.9"), 1_999),
            Err(Refusal::TooManyHandshakes)
        );
        assert!(a.admit_ip(ip("192.168.1.9"), 2_000).is_ok(), "a new second");
        // IPv4 and its IPv6-mapped form are one address.
        for _ in 0..4 {
            assert!(a.admit_ip(ip("::ffff:192.168.1.9"), 2_500).is_ok());
        }
        assert_eq!(
            a.admit_ip(ip("192.168.1.9"), 2_600),
            Err(Refusal::TooManyHandshakes)
        );
    }

    #[test]
    fn off_limits_take_nothing() {
        let a = Admission::new(limits(0, 0, 0), 0);
        for _ in 0..100_000 {
            assert_eq!(a.admit_ip(ip("::1"), 0), Ok(Slots::default()));
        }
        assert!(!a.shard_full(usize::MAX));
    }

    #[test]
    fn crowded_tables_refuse_only_near_the_limit() {
        // A full node (capacity 131,072: 65,536 counters) of connections
        // from 65,536 addresses, two each: an address far from its limit
        // is never refused, and one at its limit loses only a few of its
        // connections to the crowd. The hash is seeded at random, so the
        // crowd an address meets varies: no address ever gets past its
        // limit (a count-min sketch never counts short), and the typical
        // one (the median of many) keeps most of it.
        let a = Admission::new(limits(0, 0, 20), 131_072);
        for i in 0..65_536u32 {
            let addr = IpAddr::V4(i.into());
            assert!(a.admit_ip(addr, 0).is_ok());
            assert!(a.admit_ip(addr, 0).is_ok());
        }
        let mut admitted: Vec<usize> = (0..41u32)
            .map(|k| {
                let probe = IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, k as u8));
                (0..30).filter(|_| a.admit_ip(probe, 0).is_ok()).count()
            })
            .collect();
        assert!(admitted.iter().all(|&n| n <= 20), "{admitted:?}");
        admitted.sort_unstable();
        assert!(
            admitted[20] >= 14,
            "median {} of a limit of 20",
            admitted[20]
        );
    }

    #[test]
    fn the_count_holds_across_threads() {
        let a = std::sync::Arc::new(Admission::new(limits(0, 0, 100), 0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let a = a.clone();
                std::thread::spawn(move || {
                    (0..1000)
                        .filter(|_| a.admit_ip(ip("10.9.8.7"), 0).is_ok())
                        .count()
                })
            })
            .collect();
        let admitted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert!(
            (1..=100).contains(&admitted),
            "{admitted} admitted past a limit of 100"
        );
        assert_eq!(a.ip_count(ip("10.9.8.7")) as usize, admitted);
    }

    #[test]
    fn nets_and_forwarded_addresses() {
        let lan = Net::parse("10.0.0.0/8").unwrap();
        assert!(lan.contains(ip("10.20.30.40")) && !lan.contains(ip("11.0.0.1")));
        assert!(lan.contains(ip("::ffff:10.1.1.1")));
        assert!(Net::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
        assert!(Net::parse("192.168.0.1")
            .unwrap()
            .contains(ip("192.168.0.1")));
        assert!(Net::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x", "::/129"] {
            assert!(Net::parse(bad).is_err(), "{bad}");
        }
        let trusted = [lan];
        let xff = Some("198.51.100.1, 203.0.113.9, 10.0.0.5");
        // From a trusted proxy: the last hop that is not a trusted proxy.
        assert_eq!(client_ip(ip("10.0.0.2"), xff, &trusted), ip("203.0.113.9"));
        // From anyone else the header is not believed.
        assert_eq!(
            client_ip(ip("198.51.100.200"), xff, &trusted),
            ip("198.51.100.200")
        );
        assert_eq!(client_ip(ip("10.0.0.2"), None, &trusted), ip("10.0.0.2"));
        // A malformed hop stops the walk at what was read so far.
        assert_eq!(
            client_ip(ip("10.0.0.2"), Some("junk, 10.0.0.9"), &trusted),
            ip("10.0.0.9")
        );
    }
}
