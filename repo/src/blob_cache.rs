//! A bounded on-disk cache of blob bytes read from a remote store, so cold reads of the same
//! chunks (a second export, a remounted disk) are served from local disk.
//!
//! Entries are the raw stored bytes of one blob, named by pack, offset and length, so an entry
//! can never describe the wrong blob; their content is not checked here because every blob is
//! authenticated when it is decoded, and a caller that finds a cached blob damaged removes it and
//! fetches again. Several processes may share the directory: entries are written to a temporary
//! name and renamed into place, and eviction tolerates entries vanishing under it. Recency is the
//! file's modification time, refreshed on every hit.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use bytes::Bytes;

use crate::Location;

/// Fraction of the bound that eviction brings the cache down to, so it does not run on every put.
const LOW_WATER_PERCENT: u64 = 90;

#[derive(Debug)]
pub struct BlobCache {
    dir: PathBuf,
    bound: u64,
    /// This process's estimate of the cache size; rescanned at open and at every eviction.
    size: AtomicU64,
    evicting: Mutex<()>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Hits and misses since the cache was opened.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct BlobCacheStats {
    pub hits: u64,
    pub misses: u64,
}

impl BlobCache {
    /// Opens (creating) the cache in `dir` with a bound of `bound` bytes. Returns `None` when
    /// the bound is 0 or the directory cannot be made: the cache is an optimisation only.
    pub fn open(dir: PathBuf, bound: u64) -> Option<Self> {
        if bound == 0 {
            return None;
        }
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!("blob cache {} disabled: {e}", dir.display());
            return None;
        }
        let c = Self {
            dir,
            bound,
            size: AtomicU64::new(0),
            evicting: Mutex::new(()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        };
        c.size
            .store(c.scan().iter().map(|e| e.1).sum(), Ordering::Relaxed);
        // Another process may have left it over a smaller bound.
        c.evict();
        Some(c)
    }

    #[cfg(test)]
    fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    pub fn stats(&self) -> BlobCacheStats {
        BlobCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    fn entry_path(&self, loc: &Location) -> PathBuf {
        let pack = loc.pack.to_string();
        let shard = pack.get(..2).unwrap_or("00");
        self.dir
            .join(shard)
            .join(format!("{pack}-{}-{}", loc.offset, loc.len))
    }

    /// The cached bytes of the blob at `loc`, if present and of the right length.
    pub fn get(&self, loc: &Location) -> Option<Bytes> {
        let p = self.entry_path(loc);
        match std::fs::read(&p) {
            Ok(b) if b.len() as u64 == loc.len as u64 => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                // Refresh recency; failure only makes the entry an earlier eviction candidate.
                if let Ok(f) = std::fs::File::options().write(true).open(&p) {
                    let _ = f.set_modified(SystemTime::now());
                }
                Some(Bytes::from(b))
            }
            Ok(_) => {
                self.remove(loc);
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(_) => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Stores the blob at `loc`. Errors are logged and otherwise ignored.
    pub fn put(&self, loc: &Location, bytes: &[u8]) {
        let len = bytes.len() as u64;
        if len > self.bound / 4 {
            return;
        }
        let p = self.entry_path(loc);
        if let Err(e) = crate::cache_file::write_whole(&p, bytes) {
            tracing::debug!("blob cache: cannot store {}: {e}", p.display());
            return;
        }
        if self.size.fetch_add(len, Ordering::Relaxed) + len > self.bound {
            self.evict();
        }
    }

    /// Drops one entry (found damaged by its reader).
    pub fn remove(&self, loc: &Location) {
        let p = self.entry_path(loc);
        if let Ok(m) = std::fs::metadata(&p) {
            if std::fs::remove_file(&p).is_ok() {
                let _ = self
                    .size
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                        Some(s.saturating_sub(m.len()))
                    });
            }
        }
    }

    /// All entries with size and recency, including other processes' (temporaries excluded).
    fn scan(&self) -> Vec<(PathBuf, u64, SystemTime)> {
        let mut v = Vec::new();
        let Ok(shards) = std::fs::read_dir(&self.dir) else {
            return v;
        };
        for shard in shards.flatten() {
            let Ok(files) = std::fs::read_dir(shard.path()) else {
                continue;
            };
            for f in files.flatten() {
                // Entries are hex names; dot-files are `write_whole`'s temporaries.
                if f.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                if let Ok(m) = f.metadata() {
                    if m.is_file() {
                        let t = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                        v.push((f.path(), m.len(), t));
                    }
                }
            }
        }
        v
    }

    /// Deletes least recently used entries until the cache is under its low-water mark.
    fn evict(&self) {
        let Ok(_g) = self.evicting.try_lock() else {
            return; // another thread is already evicting
        };
        let mut entries = self.scan();
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        let target = self.bound / 100 * LOW_WATER_PERCENT;
        if total > self.bound {
            entries.sort_by_key(|e| e.2);
            for (p, len, _) in entries {
                if total <= target {
                    break;
                }
                // Gone already means another process evicted it: count it out either way.
                let _ = std::fs::remove_file(&p);
                total -= len;
            }
        }
        self.size.store(total, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PackId;

    fn loc(pack: &PackId, offset: u32, len: u32) -> Location {
        Location {
            pack: *pack,
            offset,
            len,
            raw_len: len,
            kind: crate::BlobKind::Data,
        }
    }

    fn disk_usage(dir: &std::path::Path) -> u64 {
        let mut t = 0;
        for s in std::fs::read_dir(dir).unwrap().flatten() {
            for f in std::fs::read_dir(s.path()).unwrap().flatten() {
                t += f.metadata().unwrap().len();
            }
        }
        t
    }

    #[test]
    fn round_trip_bound_and_lru() {
        let d = tempfile::tempdir().unwrap();
        let c = BlobCache::open(d.path().join("c"), 40_000).unwrap();
        let pack = PackId::random();
        let first = loc(&pack, 0, 1000);
        c.put(&first, &[7u8; 1000]);
        assert_eq!(c.get(&first).unwrap(), Bytes::from(vec![7u8; 1000]));
        assert!(c.get(&loc(&pack, 1000, 1000)).is_none());
        for i in 1..100u32 {
            // Keep `first` the most recently used.
            std::thread::sleep(std::time::Duration::from_millis(2));
            let _ = c.get(&first);
            c.put(&loc(&pack, i * 1000, 1000), &[i as u8; 1000]);
            assert!(disk_usage(c.dir()) <= 40_000);
        }
        assert!(c.get(&first).is_some(), "recently used entry was evicted");
        assert!(
            c.get(&loc(&pack, 1000, 1000)).is_none(),
            "oldest entry kept"
        );
        assert!(c.get(&loc(&pack, 99_000, 1000)).is_some());
        // A second process's view starts from what is on disk.
        let c2 = BlobCache::open(d.path().join("c"), 10_000).unwrap();
        assert!(disk_usage(c2.dir()) <= 10_000);
    }

    #[test]
    fn wrong_length_entry_is_discarded() {
        let d = tempfile::tempdir().unwrap();
        let c = BlobCache::open(d.path().join("c"), 1 << 20).unwrap();
        let l = loc(&PackId::random(), 8, 100);
        c.put(&l, &[1u8; 100]);
        std::fs::write(c.entry_path(&l), [1u8; 50]).unwrap();
        assert!(c.get(&l).is_none());
        assert!(!c.entry_path(&l).exists());
        assert!(BlobCache::open(d.path().join("z"), 0).is_none());
    }
}
