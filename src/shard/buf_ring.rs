//! The ring of provided buffers a shard's io_uring loop receives into: a
//! pool per shard (at most 2 MiB, whatever the number of connections), each
//! buffer taken by the kernel for one receive and given back once its bytes
//! are decoded.
//!
//! The kernel takes buffers in ring order, so a ring offering all of them
//! would have every one written, and resident, after its first thousand
//! receives. The ring offers only what the load needs ([`Offer`]): 64
//! buffers at first, the ones given back last offered again first, and twice
//! as many whenever a round finds the ring nearly or wholly drained. An idle
//! or lightly loaded shard keeps 128 KiB of them resident, not 2 MiB.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::{types, IoUring};

/// Provided buffers for receives (a power of two) and their size: at most
/// 2 MiB per shard, whatever the number of connections.
pub(super) const BUF_COUNT: u16 = 1024;
/// Buffers offered at first.
const FIRST_OFFER: u16 = 64;
pub(super) const BUF_SIZE: usize = 2048;
pub(super) const BUF_GROUP: u16 = 0;

/// Which buffers the ring offers, sans IO: the most recently given back
/// first, and no more than the load needs.
#[derive(Debug)]
pub(super) struct Offer {
    /// Buffers not in the ring, the most recently given back on top.
    free: Vec<u16>,
    /// Buffers in the ring, not taken by the kernel yet.
    offered: u16,
    /// How many the ring should hold.
    target: u16,
    /// Buffers the kernel took since the last top-up.
    took: u16,
    /// A receive found the ring empty since the last top-up.
    dry: bool,
}

impl Default for Offer {
    fn default() -> Self {
        Offer {
            // The lowest on top: they are offered first.
            free: (0..BUF_COUNT).rev().collect(),
            offered: 0,
            target: FIRST_OFFER,
            took: 0,
            dry: false,
        }
    }
}

impl Offer {
    /// The kernel took a buffer for a receive.
    pub(super) fn taken(&mut self) {
        self.offered = self.offered.saturating_sub(1);
        self.took = self.took.saturating_add(1);
    }

    /// A buffer's bytes are decoded: it may be offered again.
    pub(super) fn given_back(&mut self, bid: u16) {
        self.free.push(bid);
    }

    /// A receive found no buffer in the ring.
    pub(super) fn ran_dry(&mut self) {
        self.dry = true;
    }

    /// How many buffers the ring holds at most now.
    pub(super) fn target(&self) -> u16 {
        self.target
    }

    /// The buffers to put in the ring now. The ring grows (twice the
    /// buffers, up to [`BUF_COUNT`]) when it ran dry or the kernel took
    /// more than three quarters of it since the last top-up. Whether its
    /// target changed.
    pub(super) fn top_up(&mut self, mut offer: impl FnMut(u16)) -> bool {
        let target = self.target;
        if self.dry || self.took as u32 * 4 > self.target as u32 * 3 {
            self.target = self.target.saturating_mul(2).min(BUF_COUNT);
        }
        self.dry = false;
        self.took = 0;
        while self.offered < self.target {
            let Some(bid) = self.free.pop() else {
                break;
            };
            offer(bid);
            self.offered += 1;
        }
        self.target != target
    }
}

/// The ring of provided buffers: the kernel takes a buffer for each receive
/// and the loop gives it back once the bytes are decoded.
pub(super) struct BufRing {
    entries: *mut types::BufRingEntry,
    map_len: usize,
    data: *mut u8,
    layout: std::alloc::Layout,
    tail: u16,
    published: u16,
    offer: Offer,
    /// Keep the memory at drop (operations may still point into it).
    pub(super) leak: bool,
}

impl BufRing {
    pub(super) fn new(ring: &IoUring) -> io::Result<BufRing> {
        let map_len = BUF_COUNT as usize * std::mem::size_of::<types::BufRingEntry>();
        // SAFETY: an anonymous private mapping, unmapped in Drop.
        let entries = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if entries == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let layout = std::alloc::Layout::from_size_align(BUF_COUNT as usize * BUF_SIZE, 4096)
            .map_err(io::Error::other)?;
        // SAFETY: a non-zero size; zeroed pages are only touched when used.
        let data = unsafe { std::alloc::alloc_zeroed(layout) };
        let mut bufs = BufRing {
            entries: entries.cast(),
            map_len,
            data,
            layout,
            tail: 0,
            published: 0,
            offer: Offer::default(),
            leak: false,
        };
        if data.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        // SAFETY: the mapping lives until Drop, which runs after the ring
        // that uses it is gone (see `Loop`'s field order).
        unsafe {
            ring.submitter()
                .register_buf_ring(entries as u64, BUF_COUNT, BUF_GROUP)?
        };
        bufs.publish();
        Ok(bufs)
    }

    /// A completion carried a buffer: the kernel took it.
    pub(super) fn taken(&mut self) {
        self.offer.taken();
    }

    /// A receive found the ring empty: it grows at the next `publish`.
    pub(super) fn ran_dry(&mut self) {
        self.offer.ran_dry();
    }

    /// Buffer `bid`'s bytes are decoded: it may be offered again.
    pub(super) fn give(&mut self, bid: u16) {
        self.offer.given_back(bid);
    }

    /// How many buffers the ring holds at most now.
    pub(super) fn target(&self) -> u16 {
        self.offer.target()
    }

    /// Tops the ring up and lets the kernel see it. Whether the ring's
    /// target changed.
    pub(super) fn publish(&mut self) -> bool {
        let (entries, data, tail) = (self.entries, self.data, &mut self.tail);
        let grew = self.offer.top_up(|bid| {
            // SAFETY: the index is masked into the mapping; the kernel only
            // reads entries between its head and the published tail, and
            // never holds more than `BUF_COUNT` of them (the offer's bound).
            let e = unsafe { &mut *entries.add((*tail & (BUF_COUNT - 1)) as usize) };
            // SAFETY: bid < BUF_COUNT, inside the data allocation.
            e.set_addr(unsafe { data.add(bid as usize * BUF_SIZE) } as u64);
            e.set_len(BUF_SIZE as u32);
            e.set_bid(bid);
            *tail = tail.wrapping_add(1);
        });
        if self.published == self.tail {
            return grew;
        }
        // SAFETY: the tail shares the first entry's reserved field; the
        // kernel reads it with acquire ordering.
        unsafe {
            let tail = types::BufRingEntry::tail(self.entries) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
        self.published = self.tail;
        grew
    }

    /// The `len` bytes the kernel wrote into buffer `bid`.
    pub(super) fn bytes(&self, bid: u16, len: usize) -> &[u8] {
        assert!((bid as usize) < BUF_COUNT as usize && len <= BUF_SIZE);
        // SAFETY: in bounds (checked above); the kernel is done with this
        // buffer until it is given back.
        unsafe { std::slice::from_raw_parts(self.data.add(bid as usize * BUF_SIZE), len) }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.leak {
            return;
        }
        // SAFETY: the mapping and allocation made in `new`.
        unsafe {
            libc::munmap(self.entries.cast(), self.map_len);
            std::alloc::dealloc(self.data, self.layout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tops up, putting the bids offered at the back of `ring` (the
    /// kernel takes from the front).
    fn top_up(o: &mut Offer, ring: &mut std::collections::VecDeque<u16>) {
        let target = o.target();
        let changed = o.top_up(|bid| ring.push_back(bid));
        assert_eq!(changed, o.target() != target);
        assert!(ring.len() <= BUF_COUNT as usize);
        assert_eq!(ring.len(), o.offered as usize);
    }

    #[test]
    fn a_light_load_keeps_reusing_the_same_few_buffers() {
        let mut o = Offer::default();
        let mut ring = std::collections::VecDeque::new();
        top_up(&mut o, &mut ring);
        assert_eq!(ring.len(), 64);
        assert_eq!(ring.iter().max(), Some(&63), "the lowest first");
        let mut used = std::collections::BTreeSet::new();
        // 10,000 rounds of 10 receives each: the kernel takes from the
        // front, the loop gives each back after decoding it.
        for _ in 0..10_000 {
            let took: Vec<u16> = (0..10).map(|_| ring.pop_front().unwrap()).collect();
            for bid in took {
                o.taken();
                used.insert(bid);
                o.given_back(bid);
            }
            top_up(&mut o, &mut ring);
        }
        assert_eq!(o.target(), 64);
        assert_eq!(used.len(), 64, "the same buffers, no others");
    }

    #[test]
    fn a_drained_or_dry_ring_offers_twice_as_many_up_to_the_pool() {
        let mut o = Offer::default();
        let mut ring = std::collections::VecDeque::new();
        top_up(&mut o, &mut ring);
        // The kernel takes 60 of 64 in one round (held, not given back yet).
        let held: Vec<u16> = (0..60).map(|_| ring.pop_front().unwrap()).collect();
        held.iter().for_each(|_| o.taken());
        top_up(&mut o, &mut ring);
        assert_eq!(o.target(), 128);
        assert_eq!(ring.len(), 128);
        // A receive found it empty: twice again, once per top-up.
        o.ran_dry();
        o.ran_dry();
        top_up(&mut o, &mut ring);
        assert_eq!(o.target(), 256);
        // Never past the pool, even with every buffer taken and held.
        for _ in 0..10 {
            while let Some(_bid) = ring.pop_front() {
                o.taken();
            }
            o.ran_dry();
            top_up(&mut o, &mut ring);
        }
        assert_eq!(o.target(), BUF_COUNT);
        assert!(o.free.is_empty(), "all 1,024 are out");
        // Given back, they are offered again.
        for bid in held {
            o.given_back(bid);
        }
        top_up(&mut o, &mut ring);
        assert_eq!(ring.len(), 60);
    }
}
