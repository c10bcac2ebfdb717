//! The ring of provided buffers a shard's io_uring loop receives into: a
//! fixed pool per shard (2 MiB, whatever the number of connections), each
//! buffer taken by the kernel for one receive and given back once its bytes
//! are decoded.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::{types, IoUring};

/// Provided buffers for receives (a power of two) and their size: 2 MiB
/// per shard, whatever the number of connections.
pub(super) const BUF_COUNT: u16 = 1024;
pub(super) const BUF_SIZE: usize = 2048;
pub(super) const BUF_GROUP: u16 = 0;

/// The ring of provided buffers: the kernel takes a buffer for each receive
/// and the loop gives it back once the bytes are decoded.
pub(super) struct BufRing {
    entries: *mut types::BufRingEntry,
    map_len: usize,
    data: *mut u8,
    layout: std::alloc::Layout,
    tail: u16,
    published: u16,
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
        for bid in 0..BUF_COUNT {
            bufs.give(bid);
        }
        bufs.publish();
        Ok(bufs)
    }

    /// Puts buffer `bid` back at the tail (visible after `publish`).
    pub(super) fn give(&mut self, bid: u16) {
        // SAFETY: the index is masked into the mapping; the kernel only
        // reads entries between its head and the published tail.
        let e = unsafe { &mut *self.entries.add((self.tail & (BUF_COUNT - 1)) as usize) };
        // SAFETY: bid < BUF_COUNT, inside the data allocation.
        e.set_addr(unsafe { self.data.add(bid as usize * BUF_SIZE) } as u64);
        e.set_len(BUF_SIZE as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    pub(super) fn publish(&mut self) {
        if self.published == self.tail {
            return;
        }
        // SAFETY: the tail shares the first entry's reserved field; the
        // kernel reads it with acquire ordering.
        unsafe {
            let tail = types::BufRingEntry::tail(self.entries) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
        self.published = self.tail;
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
