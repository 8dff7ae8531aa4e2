//! Reads from remote packs by window. A blob missing from the on-disk cache is fetched together
//! with every other blob that starts in the same aligned window of its pack: one range read
//! instead of one per blob. Backups write a disk's chunks into packs in disk order, so a window
//! holds the chunks a sequential reader wants next, and a random reader pays one larger read for
//! neighbours it is likely to want soon. Against object storage, where each request costs tens of
//! milliseconds and money, this is what makes cold reads fast.
//!
//! Concurrent misses in one window wait for a single read. The windows' boundaries come from the
//! pack's table of contents, read once per pack and kept in memory.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use crate::ids::PackId;
use crate::index::Location;
use crate::pack::PackEntry;

/// Bytes of a pack covered by one window (blobs that start in it are read together).
pub const WINDOW: u64 = 1 << 20;

/// Tables of contents kept in memory (a few KiB each).
const TOCS_KEPT: usize = 1024;

/// Per-key async locks, so that concurrent work on one key happens once.
pub(crate) struct KeyedLocks<K> {
    locks: Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
}

impl<K: Hash + Eq + Clone> KeyedLocks<K> {
    pub fn new() -> Self {
        Self {
            locks: Mutex::new(HashMap::new()),
        }
    }

    pub async fn lock(&self, key: &K) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut map = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
            if map.len() > 4096 {
                // Forget locks nobody holds or waits for.
                map.retain(|_, m| Arc::strong_count(m) > 1);
            }
            map.entry(key.clone()).or_default().clone()
        };
        m.lock_owned().await
    }
}

/// What the window reader remembers between reads.
pub(crate) struct PackWindows {
    tocs: Mutex<HashMap<PackId, Arc<Vec<PackEntry>>>>,
    pub toc_locks: KeyedLocks<PackId>,
    pub window_locks: KeyedLocks<(PackId, u64)>,
}

impl PackWindows {
    pub fn new() -> Self {
        Self {
            tocs: Mutex::new(HashMap::new()),
            toc_locks: KeyedLocks::new(),
            window_locks: KeyedLocks::new(),
        }
    }

    pub fn toc(&self, pack: &PackId) -> Option<Arc<Vec<PackEntry>>> {
        self.tocs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(pack)
            .cloned()
    }

    pub fn keep_toc(&self, pack: PackId, toc: Arc<Vec<PackEntry>>) {
        let mut tocs = self.tocs.lock().unwrap_or_else(PoisonError::into_inner);
        if tocs.len() >= TOCS_KEPT {
            tocs.clear();
        }
        tocs.insert(pack, toc);
    }
}

/// The blobs of `toc` that start in the window holding `loc`, as locations in pack order, or
/// `None` when the table does not list `loc` exactly (then the caller reads `loc` alone).
pub(crate) fn window_of(toc: &[PackEntry], loc: &Location) -> Option<Vec<Location>> {
    let w = loc.offset as u64 / WINDOW;
    let mut members: Vec<Location> = toc
        .iter()
        .filter(|e| e.offset as u64 / WINDOW == w)
        .map(|e| Location {
            pack: loc.pack,
            offset: e.offset,
            len: e.len,
            raw_len: e.raw_len,
            kind: e.kind,
        })
        .collect();
    members.sort_by_key(|m| m.offset);
    members
        .iter()
        .any(|m| m.offset == loc.offset && m.len == loc.len)
        .then_some(members)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BlobKind;
    use blockvault_chunker::ChunkId;

    fn entry(offset: u32, len: u32) -> PackEntry {
        PackEntry {
            id: ChunkId([offset as u8; 32]),
            kind: BlobKind::Data,
            offset,
            len,
            raw_len: len * 2,
        }
    }

    fn loc(offset: u32, len: u32) -> Location {
        Location {
            pack: PackId([9; 16]),
            offset,
            len,
            raw_len: len * 2,
            kind: BlobKind::Data,
        }
    }

    #[test]
    fn a_window_holds_the_blobs_that_start_in_it() {
        let w = WINDOW as u32;
        // Out of order on purpose: the result comes back in pack order.
        let toc = [
            entry(w - 100, 300),
            entry(24, 1000),
            entry(1024, w - 1124 - 100),
            entry(w + 200, 50),
        ];
        let got = window_of(&toc, &loc(1024, w - 1124 - 100)).unwrap();
        let offsets: Vec<u32> = got.iter().map(|l| l.offset).collect();
        assert_eq!(offsets, vec![24, 1024, w - 100]);
        assert!(got.iter().all(|l| l.pack == PackId([9; 16])));
        let got = window_of(&toc, &loc(w + 200, 50)).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].raw_len, 100);
    }

    #[test]
    fn a_location_the_table_does_not_list_is_read_alone() {
        let toc = [entry(24, 1000), entry(1024, 500)];
        assert!(window_of(&toc, &loc(24, 999)).is_none());
        assert!(window_of(&toc, &loc(25, 1000)).is_none());
        assert!(window_of(&[], &loc(24, 1000)).is_none());
    }
}
