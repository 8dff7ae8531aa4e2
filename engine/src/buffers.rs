//! Recycled chunk buffers. Every decoded chunk lives in a buffer of the disk's chunk size; when
//! the last `Bytes` pointing into it is dropped (a cache eviction, a finished NBD reply, a chunk
//! written out by an export) the buffer goes back to its pool instead of to the allocator, and the
//! next chunk is decoded into it. A long-running mount therefore reuses a fixed set of buffers
//! instead of asking the allocator for 256 KiB per chunk, whose churn fragments glibc's heap
//! arenas and made the process grow past its cache bound.

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

/// A pool of equal-capacity byte buffers, keeping at most `keep` idle ones.
#[derive(Debug)]
pub struct BufferPool {
    capacity: usize,
    keep: usize,
    idle: Mutex<Vec<Vec<u8>>>,
}

/// A buffer on loan from a pool; goes back when dropped.
struct Loan {
    buf: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for Loan {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf));
    }
}

impl BufferPool {
    pub fn new(capacity: usize, keep: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            keep,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// An empty buffer with room for `capacity` bytes: an idle one, else a new one.
    pub fn take(&self) -> Vec<u8> {
        let reused = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        reused.unwrap_or_else(|| Vec::with_capacity(self.capacity))
    }

    /// Returns a buffer; dropped instead when the pool already keeps enough or it is not one of
    /// ours (grown past the capacity).
    pub fn put(&self, mut buf: Vec<u8>) {
        if buf.capacity() != self.capacity {
            return;
        }
        buf.clear();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.keep {
            idle.push(buf);
        }
    }

    /// Freezes `buf` (taken from this pool) into `Bytes` that return it here when dropped.
    pub fn share(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Loan {
            buf,
            pool: self.clone(),
        })
    }

    /// Idle buffers held right now.
    #[cfg(test)]
    pub fn idle(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_when_the_last_view_is_dropped() {
        let pool = BufferPool::new(1024, 2);
        let mut b = pool.take();
        assert!(b.capacity() >= 1024);
        b.extend_from_slice(&[5u8; 1000]);
        let ptr = b.as_ptr();
        let shared = pool.share(b);
        let part = shared.slice(10..20);
        drop(shared);
        assert_eq!(pool.idle(), 0, "a slice still points into the buffer");
        assert_eq!(&part[..], &[5u8; 10]);
        drop(part);
        assert_eq!(pool.idle(), 1);
        let again = pool.take();
        assert_eq!(again.as_ptr(), ptr, "the same buffer is reused");
        assert!(again.is_empty());
        // At most `keep` idle buffers; foreign sizes are not kept.
        for _ in 0..5 {
            pool.put(Vec::with_capacity(1024));
        }
        pool.put(Vec::with_capacity(4096));
        assert_eq!(pool.idle(), 2);
    }
}
