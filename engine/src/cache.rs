//! A memory-bounded cache of decoded chunks with single-flight fetching: concurrent readers of
//! one chunk wait for a single repository read instead of each decrypting it again.
//!
//! Chunks leave in insertion order when the cache is over its bound, and also as soon as
//! readers have been served every byte of them ([`ChunkCache::served`], "drop-behind"). A
//! sequential reader (a copy, a guest reading a large file) never comes back for what it read,
//! so its chunks are not left to push out the chunks a booting guest keeps reading in pieces.
//! It also keeps the decoder's output buffers hot: a chunk dropped behind goes back to the
//! buffer pool (`buffers.rs`) as soon as its reply is sent, while it is still in the core's
//! cache, and the next chunk is decoded into it. With every chunk kept until evicted, each
//! decode wrote into the buffer evicted longest ago, cold in every cache, which cost a mount
//! under `nbdcopy` 5-12 % of its CPU (docs/BENCHMARKS.md, "Drop-behind, and verify reads blob by
//! blob").

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tokio::sync::OnceCell;

use crate::reader::DiskReader;
use crate::Result;

type Slot = Arc<OnceCell<Bytes>>;

/// A chunk is tracked as this many equal pieces for drop-behind: a piece counts as served once
/// one read has covered all of it.
const PIECES: u32 = 64;
/// Chunks remembered as dropped behind (a few KiB of memory): far more than readahead reaches
/// back over, which is a few requests of each connection.
const SPENT_KEPT: usize = 1024;

struct Entry {
    data: Bytes,
    /// When the chunk went in (matches its place in `State::order`).
    generation: u64,
    /// One bit per piece served to a reader.
    served: u64,
}

struct State {
    ready: HashMap<u64, Entry>,
    /// Insertion order for eviction, as `(slot, generation)`; an entry whose chunk has left
    /// (dropped behind) or come back since (a newer generation) is skipped. FIFO with a second
    /// chance for recently hit chunks is not worth its bookkeeping here: sequential readers
    /// never come back, random readers are served by the hit path before eviction reaches them.
    order: VecDeque<(u64, u64)>,
    generation: u64,
    bytes: usize,
    inflight: HashMap<u64, Slot>,
    /// Chunks lately dropped behind, oldest first, so readahead (which runs behind readers on
    /// other connections as often as ahead of them) does not fetch them again.
    spent: VecDeque<u64>,
    spent_set: HashSet<u64>,
}

impl State {
    fn remove(&mut self, slot: u64) {
        if let Some(e) = self.ready.remove(&slot) {
            self.bytes -= e.data.len();
        }
    }

    /// Drops the entries of `order` whose chunk left, once they outnumber the live ones, so the
    /// queue stays proportional to the cache whatever leaves by drop-behind.
    fn compact(&mut self) {
        if self.order.len() > 2 * self.ready.len() + 64 {
            let ready = &self.ready;
            self.order
                .retain(|(s, g)| ready.get(s).is_some_and(|e| e.generation == *g));
        }
    }
}

/// Decoded chunks of one disk, at most `limit` bytes of them.
pub struct ChunkCache {
    reader: Arc<DiskReader>,
    limit: usize,
    state: Mutex<State>,
}

/// Counters for `restore sessions` and benchmarks.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    pub bytes: usize,
    pub chunks: usize,
    pub limit: usize,
}

impl ChunkCache {
    pub fn new(reader: Arc<DiskReader>, limit: usize) -> Self {
        Self {
            reader,
            limit,
            state: Mutex::new(State {
                ready: HashMap::new(),
                order: VecDeque::new(),
                generation: 0,
                bytes: 0,
                inflight: HashMap::new(),
                spent: VecDeque::new(),
                spent_set: HashSet::new(),
            }),
        }
    }

    pub fn reader(&self) -> &Arc<DiskReader> {
        &self.reader
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn stats(&self) -> CacheStats {
        let s = self.lock();
        CacheStats {
            bytes: s.bytes,
            chunks: s.ready.len(),
            limit: self.limit,
        }
    }

    pub fn contains(&self, slot: u64) -> bool {
        let s = self.lock();
        s.ready.contains_key(&slot) || s.inflight.contains_key(&slot)
    }

    /// Whether reading chunk `slot` ahead of its readers would help: it is not here, not on its
    /// way, and not among the chunks readers were lately given in full.
    pub fn wanted_ahead(&self, slot: u64) -> bool {
        let s = self.lock();
        !(s.ready.contains_key(&slot)
            || s.inflight.contains_key(&slot)
            || s.spent_set.contains(&slot))
    }

    /// The decoded data chunk `slot`; the caller knows it is not a zero chunk (a zero chunk
    /// yields an empty `Bytes`, never cached).
    pub async fn get(&self, slot: u64) -> Result<Bytes> {
        self.fetch(slot, false).await
    }

    /// [`ChunkCache::get`] for readahead: nothing (an empty `Bytes`) when the chunk is among
    /// those lately dropped behind. Checked under the same lock that starts the fetch, so a
    /// reader that was served the chunk between the readahead's start and this call is seen.
    pub async fn get_ahead(&self, slot: u64) -> Result<Bytes> {
        self.fetch(slot, true).await
    }

    async fn fetch(&self, slot: u64, ahead: bool) -> Result<Bytes> {
        let cell = {
            let mut s = self.lock();
            if let Some(e) = s.ready.get(&slot) {
                return Ok(e.data.clone());
            }
            if ahead && s.spent_set.contains(&slot) {
                return Ok(Bytes::new());
            }
            s.inflight
                .entry(slot)
                .or_insert_with(|| Arc::new(OnceCell::new()))
                .clone()
        };
        let res = cell
            .get_or_try_init(|| async {
                Ok::<_, crate::Error>(self.reader.fetch_chunk(slot).await?.unwrap_or_default())
            })
            .await
            .cloned();
        let mut s = self.lock();
        // Whoever finishes first moves the chunk from in-flight to ready; a failed fetch is
        // forgotten so the next reader retries.
        if s.inflight.get(&slot).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            s.inflight.remove(&slot);
            if let Ok(b) = &res {
                if !b.is_empty() && b.len() <= self.limit {
                    s.generation += 1;
                    let generation = s.generation;
                    s.bytes += b.len();
                    let entry = Entry {
                        data: b.clone(),
                        generation,
                        served: 0,
                    };
                    s.ready.insert(slot, entry);
                    s.order.push_back((slot, generation));
                    while s.bytes > self.limit {
                        let Some((old, g)) = s.order.pop_front() else {
                            break;
                        };
                        if s.ready.get(&old).is_some_and(|e| e.generation == g) {
                            s.remove(old);
                        }
                    }
                    s.compact();
                }
            }
        }
        res
    }

    /// Notes that a reader was given bytes `range` of chunk `slot` (offsets within the chunk);
    /// once every piece of the chunk has been given out, it leaves the cache.
    pub fn served(&self, slot: u64, range: Range<usize>) {
        let mut s = self.lock();
        let Some(e) = s.ready.get_mut(&slot) else {
            return;
        };
        e.served |= pieces_within(e.data.len(), range);
        if e.served != all_pieces(e.data.len()) {
            return;
        }
        s.remove(slot);
        s.compact();
        if s.spent_set.insert(slot) {
            s.spent.push_back(slot);
            if s.spent.len() > SPENT_KEPT {
                if let Some(old) = s.spent.pop_front() {
                    s.spent_set.remove(&old);
                }
            }
        }
    }
}

/// Bytes per piece of a chunk of `len` bytes.
fn piece_len(len: usize) -> usize {
    len.div_ceil(PIECES as usize).max(1)
}

/// The bits of every piece of a `len`-byte chunk.
fn all_pieces(len: usize) -> u64 {
    let n = len.div_ceil(piece_len(len)) as u32;
    if n >= u64::BITS {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

/// The bits of the pieces of a `len`-byte chunk that lie wholly within `range`.
fn pieces_within(len: usize, range: Range<usize>) -> u64 {
    let p = piece_len(len);
    let end = range.end.min(len);
    let first = range.start.div_ceil(p);
    // The last piece may be short: it is covered when the range reaches the chunk's end.
    let last = if end == len { len.div_ceil(p) } else { end / p };
    (first..last).fold(0, |bits, i| bits | (1u64 << i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_count_only_when_wholly_covered() {
        let len = 256 * 1024;
        let p = len / 64;
        assert_eq!(all_pieces(len), u64::MAX);
        assert_eq!(pieces_within(len, 0..len), u64::MAX);
        assert_eq!(pieces_within(len, 0..p), 1);
        assert_eq!(pieces_within(len, 1..p), 0);
        assert_eq!(pieces_within(len, 0..p - 1), 0);
        assert_eq!(pieces_within(len, p..3 * p + 5), 0b110);
        assert_eq!(pieces_within(len, len - p..len), 1 << 63);
        // A short last chunk: 100 bytes in pieces of 2, the last piece reached by the end.
        assert_eq!(all_pieces(100), (1 << 50) - 1);
        assert_eq!(pieces_within(100, 98..100), 1 << 49);
        assert_eq!(pieces_within(100, 0..100), all_pieces(100));
        // A chunk smaller than 64 bytes: one byte per piece.
        assert_eq!(all_pieces(3), 0b111);
        assert_eq!(pieces_within(3, 1..3), 0b110);
        // 4 KiB reads of a whole chunk, in any order, cover it.
        let mut bits = 0;
        for i in (0..64).rev() {
            bits |= pieces_within(len, i * 4096..(i + 1) * 4096);
        }
        assert_eq!(bits, all_pieces(len));
    }
}
