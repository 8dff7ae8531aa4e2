//! Buffers kept for reuse by a repository's readers: whole packs (verify's pack checks and a
//! repack's copies), the scratch of a blob check, and single blob reads (a chunk's stored bytes,
//! a decoded chunk-map page). Each pack read used to allocate a buffer of the pack's size (16 MiB
//! by default), each blob check two more (the sealed copy and the plaintext) and each blob read
//! one. glibc serves such sizes from
//! per-thread heap arenas once the first large buffer has been freed, and an arena keeps what is
//! freed in it, so the peak grew with the number of threads that ever ran rather than with the
//! work in flight (docs/OPERATIONS.md, "Memory"). Kept buffers bound it by the reads in flight.

use std::sync::{Mutex, PoisonError};

/// Scratch space for checking one blob at a time: the sealed bytes (decrypted in place) and the
/// plaintext.
#[derive(Default)]
pub(crate) struct BlobScratch {
    pub sealed: Vec<u8>,
    /// The second buffer of reads ahead (`pack_check`'s direct reads).
    pub ahead: Vec<u8>,
    pub plain: Vec<u8>,
}

/// Idle buffers of a repository's pack readers.
pub(crate) struct Recycled {
    /// Scratch sets kept: two per core, as verify checks two packs at a time on every core.
    /// With one per core, half its threads allocated (and zero-filled) a scratch set per pack.
    keep_scratch: usize,
    packs: Mutex<Vec<Vec<u8>>>,
    blobs: Mutex<Vec<Vec<u8>>>,
    scratch: Mutex<Vec<BlobScratch>>,
}

/// Idle blob buffers kept (one blob's stored bytes, or a decoded chunk-map page).
const KEEP_BLOBS: usize = 8;
/// Larger blob buffers (a pack window read for a remote store) are not kept.
const MAX_KEPT_BLOB: usize = 2 << 20;

/// Idle pack buffers kept: verify reads two packs at a time by default and a repack reads three
/// ahead of the one it writes.
const KEEP_PACKS: usize = 4;

impl Recycled {
    pub fn new() -> Self {
        Self {
            keep_scratch: 2 * std::thread::available_parallelism().map_or(2, |n| n.get()),
            packs: Mutex::new(Vec::new()),
            blobs: Mutex::new(Vec::new()),
            scratch: Mutex::new(Vec::new()),
        }
    }

    /// An empty buffer for a pack read: a kept one (the largest capacity goes first), else new.
    pub fn pack_buffer(&self) -> Vec<u8> {
        let mut idle = self.packs.lock().unwrap_or_else(PoisonError::into_inner);
        idle.pop().unwrap_or_default()
    }

    /// Gives a pack buffer back; dropped when enough are kept already.
    pub fn return_pack_buffer(&self, mut buf: Vec<u8>) {
        buf.clear();
        let mut idle = self.packs.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < KEEP_PACKS {
            idle.push(buf);
            // Largest last, so `pack_buffer` hands out the one least likely to grow.
            idle.sort_by_key(Vec::capacity);
        }
    }

    /// An empty buffer for one blob read.
    pub fn blob_buffer(&self) -> Vec<u8> {
        let mut idle = self.blobs.lock().unwrap_or_else(PoisonError::into_inner);
        idle.pop().unwrap_or_default()
    }

    /// Gives a blob buffer back; dropped when enough are kept already or it is large.
    pub fn return_blob_buffer(&self, mut buf: Vec<u8>) {
        if buf.capacity() > MAX_KEPT_BLOB {
            return;
        }
        buf.clear();
        let mut idle = self.blobs.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < KEEP_BLOBS {
            idle.push(buf);
        }
    }

    /// Scratch for one checking thread.
    pub fn scratch(&self) -> BlobScratch {
        let mut idle = self.scratch.lock().unwrap_or_else(PoisonError::into_inner);
        idle.pop().unwrap_or_default()
    }

    /// Gives scratch back; dropped when one per core is kept already.
    pub fn return_scratch(&self, s: BlobScratch) {
        let mut idle = self.scratch.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.keep_scratch {
            idle.push(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_buffers_come_back_largest_first_and_are_bounded() {
        let r = Recycled::new();
        for cap in [10, 1000, 100, 5, 7, 9] {
            r.return_pack_buffer(Vec::with_capacity(cap));
        }
        let first = r.pack_buffer();
        assert!(first.capacity() >= 1000 && first.is_empty());
        let mut kept = 1;
        while r.pack_buffer().capacity() > 0 {
            kept += 1;
        }
        assert_eq!(kept, KEEP_PACKS);
    }
}
