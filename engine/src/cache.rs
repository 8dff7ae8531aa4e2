//! A memory-bounded cache of decoded chunks with single-flight fetching: concurrent readers of
//! one chunk wait for a single repository read instead of each decrypting it again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tokio::sync::OnceCell;

use crate::reader::DiskReader;
use crate::Result;

type Slot = Arc<OnceCell<Bytes>>;

struct State {
    ready: HashMap<u64, Bytes>,
    /// Insertion order for eviction (FIFO with a second chance for recently hit chunks is not
    /// worth its bookkeeping here: sequential readers never come back, random readers are
    /// served by the hit path before eviction reaches them).
    order: VecDeque<u64>,
    bytes: usize,
    inflight: HashMap<u64, Slot>,
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
                bytes: 0,
                inflight: HashMap::new(),
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

    /// The decoded data chunk `slot`; the caller knows it is not a zero chunk (a zero chunk
    /// yields an empty `Bytes`, never cached).
    pub async fn get(&self, slot: u64) -> Result<Bytes> {
        let cell = {
            let mut s = self.lock();
            if let Some(b) = s.ready.get(&slot) {
                return Ok(b.clone());
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
                    s.bytes += b.len();
                    s.ready.insert(slot, b.clone());
                    s.order.push_back(slot);
                    while s.bytes > self.limit {
                        let Some(old) = s.order.pop_front() else {
                            break;
                        };
                        if let Some(v) = s.ready.remove(&old) {
                            s.bytes -= v.len();
                        }
                    }
                }
            }
        }
        res
    }
}
