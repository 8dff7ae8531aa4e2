//! Random access to a restore point for block-device clients: `read_at` answers with data and
//! zero segments (zero chunks travel as holes), fetches the chunks of one request in parallel,
//! reads ahead when access is sequential, and answers block status from the chunk map alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use blockvault_repo::MAX_TRACE_SLOTS;

use blockvault_chunker::ChunkLayout;
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use tokio::sync::{mpsc, Semaphore};

use crate::cache::{CacheStats, ChunkCache};
use crate::reader::DiskReader;
use crate::{Error, Result};

/// A piece of a read: bytes, or a run of zeroes that never needed fetching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Data(Bytes),
    Zero(u64),
}

impl Segment {
    pub fn len(&self) -> u64 {
        match self {
            Segment::Data(b) => b.len() as u64,
            Segment::Zero(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One run of the chunk map: `zero` runs hold zero chunks only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapRun {
    pub offset: u64,
    pub length: u64,
    pub zero: bool,
}

#[derive(Debug, Clone)]
pub struct RandomReadOptions {
    /// Upper bound of decoded chunk bytes kept in memory.
    pub cache_bytes: usize,
    /// Chunks fetched at once, for one request and for readahead together.
    pub parallel: usize,
    /// Chunks fetched ahead of a sequential reader.
    pub readahead_chunks: u64,
}

impl Default for RandomReadOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 256 << 20,
            parallel: 8,
            readahead_chunks: 8,
        }
    }
}

/// Random reads of one disk of a restore point, shared by every connection of an export.
pub struct RandomReader {
    cache: Arc<ChunkCache>,
    allocated: Arc<Vec<bool>>,
    layout: ChunkLayout,
    opts: RandomReadOptions,
    fetches: Arc<Semaphore>,
    /// End of the previous read; a read starting there counts as sequential.
    last_end: AtomicU64,
    /// Chunks the guest asked for, so hydration can copy them first.
    demand: Mutex<Option<mpsc::Sender<u64>>>,
    /// The boot trace being recorded, if any.
    recorder: Mutex<Option<Recorder>>,
}

/// Records data chunks in the order of their first read, for a window of time from the first.
struct Recorder {
    seen: Vec<bool>,
    order: Vec<u64>,
    window: Duration,
    first: Option<Instant>,
    last: Option<Instant>,
}

/// What a boot-trace recording saw.
#[derive(Debug, Clone, Default)]
pub struct Recording {
    pub slots: Vec<u64>,
    pub span_ms: u64,
}

/// What a prefetch did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct PrefetchReport {
    pub chunks: u64,
    pub bytes: u64,
    pub failed: u64,
    pub millis: u64,
}

impl RandomReader {
    /// Opens the reader; loads every chunk-map page once to know where the zero chunks are.
    pub async fn open(reader: Arc<DiskReader>, opts: RandomReadOptions) -> Result<Self> {
        if opts.parallel == 0 {
            return Err(Error::Invalid("parallel fetches must be at least 1".into()));
        }
        let allocated = Arc::new(reader.allocated_slots().await?);
        let layout = *reader.layout();
        let cache = Arc::new(ChunkCache::new(reader, opts.cache_bytes));
        Ok(Self {
            cache,
            allocated,
            layout,
            fetches: Arc::new(Semaphore::new(opts.parallel)),
            last_end: AtomicU64::new(u64::MAX),
            demand: Mutex::new(None),
            recorder: Mutex::new(None),
            opts,
        })
    }

    pub fn size(&self) -> u64 {
        self.layout.disk_size()
    }

    pub fn layout(&self) -> &ChunkLayout {
        &self.layout
    }

    pub fn disk_reader(&self) -> &Arc<DiskReader> {
        self.cache.reader()
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Whether chunk `slot` holds data in the restore point.
    pub fn is_allocated(&self, slot: u64) -> bool {
        self.allocated.get(slot as usize).copied().unwrap_or(false)
    }

    pub(crate) fn set_demand(&self, tx: mpsc::Sender<u64>) {
        *self.demand.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
    }

    /// The data chunk `slot` (decoded, through the cache).
    pub async fn chunk(&self, slot: u64) -> Result<Bytes> {
        let _permit = self.fetches.acquire().await.map_err(|_| Error::Cancelled)?;
        self.cache.get(slot).await
    }

    /// [`RandomReader::chunk`] on a task of its own. A fetch from a local directory decodes on
    /// the task that runs it when the bytes are in the page cache, so the chunks of one request
    /// spread over tasks are decoded on every core at once, not one after another.
    async fn chunk_on_a_task(&self, slot: u64) -> Result<Bytes> {
        let (cache, fetches) = (self.cache.clone(), self.fetches.clone());
        tokio::spawn(async move {
            let _permit = fetches
                .acquire_owned()
                .await
                .map_err(|_| Error::Cancelled)?;
            cache.get(slot).await
        })
        .await
        .map_err(Error::task)?
    }

    pub(crate) fn check(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size()) {
            return Err(Error::Invalid(format!(
                "read of {len} bytes at offset {offset} runs past the end of the {}-byte disk",
                self.size()
            )));
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` as segments covering exactly that range, in order.
    pub async fn read_at(&self, offset: u64, len: u64) -> Result<Vec<Segment>> {
        self.read(offset, len, true).await
    }

    /// [`RandomReader::read_at`] with every chunk fetched on the calling task, for callers that
    /// read on several threads of their own (file extraction): handing chunks to other tasks
    /// would only add thread switches there. Chunks served in full stay in the cache: a file
    /// system reader comes back to the same metadata blocks again and again, and with
    /// drop-behind a tree extraction decoded them anew each time (34 s instead of 5 s).
    pub async fn read_at_here(&self, offset: u64, len: u64) -> Result<Vec<Segment>> {
        self.read(offset, len, false).await
    }

    /// `mount`: a block-device client's read, whose chunks are spread over tasks and dropped
    /// behind once served in full (`cache.rs`).
    async fn read(&self, offset: u64, len: u64, mount: bool) -> Result<Vec<Segment>> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = offset + len;
        let slots = self.layout.chunks_of(offset..end);
        let sequential = self.last_end.swap(end, Ordering::Relaxed) == offset;
        self.record(slots.clone());
        // Hydration copies the chunks a guest reads from the cache, so while it runs they stay
        // there rather than leaving once served.
        let mut drop_behind = mount;
        if let Some(tx) = self
            .demand
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            drop_behind = false;
            for s in slots.clone().filter(|s| self.is_allocated(*s)) {
                // A full queue only means hydration is busy with earlier demands.
                let _ = tx.try_send(s);
            }
        }
        let first = slots.start;
        let chunks: Vec<(u64, Option<Bytes>)> = stream::iter(slots.clone())
            .map(|s| async move {
                if !self.is_allocated(s) {
                    return Ok::<_, Error>((s, None));
                }
                // The first chunk, and any already cached or in flight, right here; the others
                // of a longer read each on a task, so they decode in parallel.
                let data = if !mount || s == first || self.cache.contains(s) {
                    self.chunk(s).await?
                } else {
                    self.chunk_on_a_task(s).await?
                };
                Ok((s, Some(data)))
            })
            .buffered(self.opts.parallel)
            .try_collect()
            .await?;
        if sequential {
            self.read_ahead(slots.end);
        }
        let mut out: Vec<Segment> = Vec::with_capacity(chunks.len());
        for (s, data) in chunks {
            let r = self.layout.chunk_range(s);
            let (from, to) = (offset.max(r.start), end.min(r.end));
            let seg = match data {
                Some(b) => {
                    let within = (from - r.start) as usize..(to - r.start) as usize;
                    if drop_behind {
                        self.cache.served(s, within.clone());
                    }
                    Segment::Data(b.slice(within))
                }
                None => Segment::Zero(to - from),
            };
            match (out.last_mut(), &seg) {
                (Some(Segment::Zero(n)), Segment::Zero(m)) => *n += m,
                _ => out.push(seg),
            }
        }
        Ok(out)
    }

    /// Starts recording a boot trace: the data chunks read from now on, in the order of their
    /// first read, until `window` after the first one.
    pub fn start_recording(&self, window: Duration) {
        *self.recorder.lock().unwrap_or_else(PoisonError::into_inner) = Some(Recorder {
            seen: vec![false; self.layout.chunk_count() as usize],
            order: Vec::new(),
            window,
            first: None,
            last: None,
        });
    }

    /// Ends the recording and returns it (`None` if none was started).
    pub fn take_recording(&self) -> Option<Recording> {
        let r = self
            .recorder
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        let span_ms = match (r.first, r.last) {
            (Some(f), Some(l)) => l.duration_since(f).as_millis() as u64,
            _ => 0,
        };
        Some(Recording {
            slots: r.order,
            span_ms,
        })
    }

    fn record(&self, slots: std::ops::Range<u64>) {
        let mut g = self.recorder.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(r) = g.as_mut() else { return };
        let now = Instant::now();
        let first = *r.first.get_or_insert(now);
        if now.duration_since(first) > r.window || r.order.len() >= MAX_TRACE_SLOTS {
            return;
        }
        for s in slots.filter(|s| self.is_allocated(*s)) {
            if !std::mem::replace(&mut r.seen[s as usize], true) {
                r.order.push(s);
                r.last = Some(now);
            }
        }
    }

    /// Fetches `slots` into the memory cache in that order (a boot trace), at most half the fetch
    /// slots at a time so the guest's own reads are never starved, and no more than three
    /// quarters of the cache, so the chunks fetched first are not evicted by the last.
    pub async fn prefetch(&self, slots: &[u64]) -> PrefetchReport {
        let started = Instant::now();
        let budget = (self.opts.cache_bytes as u64) / 4 * 3;
        let mut report = PrefetchReport::default();
        let wanted = slots
            .iter()
            .copied()
            .filter(|s| *s < self.layout.chunk_count() && self.is_allocated(*s));
        let mut fetches = std::pin::pin!(stream::iter(wanted)
            .map(|s| async move { (s, self.chunk(s).await) })
            .buffered((self.opts.parallel / 2).max(1)));
        while let Some((s, r)) = fetches.next().await {
            match r {
                Ok(b) => {
                    report.chunks += 1;
                    report.bytes += b.len() as u64;
                }
                Err(e) => {
                    report.failed += 1;
                    tracing::debug!(slot = s, error = %e, "boot prefetch failed");
                }
            }
            if report.bytes >= budget {
                break;
            }
        }
        report.millis = started.elapsed().as_millis() as u64;
        report
    }

    /// Starts fetching the chunks after `next` in the background, only with spare fetch
    /// permits so readahead never delays a client's own reads.
    fn read_ahead(&self, next: u64) {
        let last = (next + self.opts.readahead_chunks).min(self.layout.chunk_count());
        for s in next..last {
            if !self.is_allocated(s) || !self.cache.wanted_ahead(s) {
                continue;
            }
            let Ok(permit) = self.fetches.clone().try_acquire_owned() else {
                return;
            };
            let cache = self.cache.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = cache.get_ahead(s).await {
                    tracing::debug!(slot = s, error = %e, "readahead failed");
                }
            });
        }
    }

    /// The chunk map's view of `offset..offset+len`: runs of data and zero chunks, merged.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<MapRun>> {
        self.check(offset, len)?;
        let end = offset + len;
        let mut out: Vec<MapRun> = Vec::new();
        for s in self.layout.chunks_of(offset..end) {
            let r = self.layout.chunk_range(s);
            let (from, to) = (offset.max(r.start), end.min(r.end));
            let zero = !self.is_allocated(s);
            match out.last_mut() {
                Some(run) if run.zero == zero => run.length += to - from,
                _ => out.push(MapRun {
                    offset: from,
                    length: to - from,
                    zero,
                }),
            }
        }
        Ok(out)
    }
}
