//! A growable array whose elements never move: storage comes in chunks of
//! [`CHUNK`] elements, allocated as the array grows and never reallocated.
//!
//! Per-connection tables use it instead of a `Vec`. A `Vec` of 50,000
//! connection slots doubles by copying megabytes in the middle of a shard's
//! loop (a latency spike) and leaves the old copy with the allocator; here
//! growth costs one chunk allocation, and memory follows the number of
//! elements rather than the next power of two.

/// Elements per chunk.
pub const CHUNK: usize = 1024;

pub struct ChunkedVec<T> {
    chunks: Vec<Vec<T>>,
    len: usize,
}

impl<T> Default for ChunkedVec<T> {
    fn default() -> Self {
        ChunkedVec {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<T> ChunkedVec<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `v`; returns its index.
    pub fn push(&mut self, v: T) -> usize {
        if self.len % CHUNK == 0 {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        let chunk = self.chunks.last_mut().expect("a chunk with room");
        debug_assert!(chunk.len() < CHUNK);
        chunk.push(v);
        self.len += 1;
        self.len - 1
    }

    pub fn get(&self, i: usize) -> Option<&T> {
        self.chunks.get(i / CHUNK)?.get(i % CHUNK)
    }

    pub fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.chunks.get_mut(i / CHUNK)?.get_mut(i % CHUNK)
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flatten()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.chunks.iter_mut().flatten()
    }
}

impl<T> std::ops::Index<usize> for ChunkedVec<T> {
    type Output = T;
    fn index(&self, i: usize) -> &T {
        &self.chunks[i / CHUNK][i % CHUNK]
    }
}

impl<T> std::ops::IndexMut<usize> for ChunkedVec<T> {
    fn index_mut(&mut self, i: usize) -> &mut T {
        &mut self.chunks[i / CHUNK][i % CHUNK]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_stay_where_they_were_put() {
        let mut v = ChunkedVec::default();
        assert!(v.is_empty());
        let n = CHUNK * 3 + 7;
        for i in 0..n {
            assert_eq!(v.push(i * 2), i);
        }
        let first = &v[0] as *const usize;
        let last_of_first_chunk = &v[CHUNK - 1] as *const usize;
        for i in 0..CHUNK * 2 {
            v.push(i);
        }
        assert_eq!(&v[0] as *const usize, first, "growth moved an element");
        assert_eq!(&v[CHUNK - 1] as *const usize, last_of_first_chunk);
        assert_eq!(v.len(), n + CHUNK * 2);
        assert_eq!(v[CHUNK], CHUNK * 2);
        assert_eq!(v.get(n - 1), Some(&((n - 1) * 2)));
        assert_eq!(v.get(v.len()), None);
        *v.get_mut(5).unwrap() = 99;
        v[6] = 100;
        assert_eq!((v[5], v[6]), (99, 100));
        assert_eq!(v.iter().count(), v.len());
        assert_eq!(v.iter().nth(CHUNK + 1), Some(&((CHUNK + 1) * 2)));
        v.iter_mut().for_each(|x| *x = 1);
        assert_eq!(v.iter().sum::<usize>(), v.len());
    }
}
