//! Random access to one disk of a restore point: offset -> chunk slot -> chunk-map page -> chunk id
//! -> index -> pack range read -> decrypt -> decompress.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use blockvault_chunker::ChunkLayout;
use blockvault_repo::{
    page_slots, ChunkId, ChunkMapPage, DiskManifest, PointManifest, Repository, SLOTS_PER_PAGE,
};
use bytes::Bytes;

use crate::buffers::BufferPool;
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct ReaderOptions {
    /// Chunks fetched at once by sequential consumers (export, hydration).
    pub parallel: usize,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        Self { parallel: 8 }
    }
}

pub struct DiskReader {
    repo: Arc<Repository>,
    point: String,
    disk: DiskManifest,
    layout: ChunkLayout,
    /// Decoded chunk-map pages. A page is at most 128 KiB and covers `SLOTS_PER_PAGE` chunks, so
    /// keeping every touched page costs 1/2000 of the data it describes.
    pages: Mutex<HashMap<u64, Arc<ChunkMapPage>>>,
    opts: ReaderOptions,
    /// Chunk buffers, recycled when the last view of a chunk is dropped.
    buffers: Arc<BufferPool>,
}

/// Decoded chunk data starts at this alignment inside its buffer, so an export hands it to an
/// `O_DIRECT` write as it is instead of copying it into an aligned buffer first (the copy was a
/// sixth of a raw export's CPU time; see `direct_write`).
pub const CHUNK_ALIGN: usize = 4096;

/// Idle chunk buffers a reader keeps for reuse, in bytes (at least four buffers).
const IDLE_BUFFER_BYTES: usize = 16 << 20;

impl DiskReader {
    pub fn open(
        repo: Arc<Repository>,
        point: &PointManifest,
        disk: &str,
        opts: ReaderOptions,
    ) -> Result<Self> {
        let d = point.disk(disk).ok_or_else(|| Error::NoSuchDisk {
            point: point.id.to_hex(),
            disk: disk.into(),
            available: point
                .disks
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        let layout = ChunkLayout::new(point.chunk_size, d.size).map_err(|e| Error::Disk {
            disk: disk.into(),
            detail: e.to_string(),
        })?;
        let pages_needed = layout.chunk_count().div_ceil(SLOTS_PER_PAGE as u64);
        if point.slots_per_page != SLOTS_PER_PAGE || d.pages.len() as u64 != pages_needed {
            return Err(Error::Disk {
                disk: disk.into(),
                detail: format!(
                    "restore point {} lists {} chunk-map pages of {} slots; {} pages of {SLOTS_PER_PAGE} expected",
                    point.id,
                    d.pages.len(),
                    point.slots_per_page,
                    pages_needed
                ),
            });
        }
        Ok(Self {
            repo,
            point: point.id.to_hex(),
            disk: d.clone(),
            layout,
            pages: Mutex::new(HashMap::new()),
            opts,
            buffers: BufferPool::new(
                point.chunk_size as usize + CHUNK_ALIGN,
                (IDLE_BUFFER_BYTES / point.chunk_size.max(1) as usize).max(4),
            ),
        })
    }

    pub fn size(&self) -> u64 {
        self.layout.disk_size()
    }

    pub fn layout(&self) -> &ChunkLayout {
        &self.layout
    }

    pub fn name(&self) -> &str {
        &self.disk.name
    }

    /// The id of the restore point this disk belongs to.
    pub fn point(&self) -> &str {
        &self.point
    }

    pub fn options(&self) -> &ReaderOptions {
        &self.opts
    }

    async fn page(&self, page_no: u64) -> Result<Option<Arc<ChunkMapPage>>> {
        let Some(id) = self.disk.pages[page_no as usize] else {
            return Ok(None);
        };
        if let Some(p) = self.pages.lock().expect("page cache lock").get(&page_no) {
            return Ok(Some(p.clone()));
        }
        let slots = page_slots(self.layout.chunk_count(), page_no);
        let page = Arc::new(self.repo.load_page(&id.0, slots).await?);
        self.pages
            .lock()
            .expect("page cache lock")
            .insert(page_no, page.clone());
        Ok(Some(page))
    }

    /// The id stored in chunk slot `slot`, or `None` for a zero chunk.
    pub async fn chunk_id(&self, slot: u64) -> Result<Option<ChunkId>> {
        let page = self.page(slot / SLOTS_PER_PAGE as u64).await?;
        Ok(page.and_then(|p| p.slots[(slot % SLOTS_PER_PAGE as u64) as usize]))
    }

    /// Fetches and decodes chunk `slot`; `None` for a zero chunk.
    pub async fn fetch_chunk(&self, slot: u64) -> Result<Option<Bytes>> {
        let Some(id) = self.chunk_id(slot).await? else {
            return Ok(None);
        };
        // Padding before the data up to the next aligned address; the decoding appends after it.
        let mut buf = self.buffers.take();
        let pad = match buf.as_ptr().align_offset(CHUNK_ALIGN) {
            pad if pad < CHUNK_ALIGN => pad,
            _ => 0,
        };
        buf.resize(pad, 0);
        let data = self
            .repo
            .read_blob_into(&id, None, buf)
            .await
            .map_err(|source| Error::Chunk {
                disk: self.disk.name.clone(),
                point: self.point.clone(),
                slot,
                offset: slot * self.layout.chunk_size() as u64,
                source: Box::new(source),
            })?;
        let decoded = data.len() - pad;
        if decoded as u32 != self.layout.chunk_len(slot) {
            return Err(Error::Disk {
                disk: self.disk.name.clone(),
                detail: format!(
                    "chunk {slot} decodes to {decoded} bytes, the chunk map expects {}",
                    self.layout.chunk_len(slot)
                ),
            });
        }
        Ok(Some(self.buffers.share(data).slice(pad..)))
    }

    /// Every chunk of the disk in slot order, `options().parallel` fetched at once. Each fetch is a
    /// task of its own, so fetches keep going while the consumer is busy writing the previous
    /// chunk (a plain `buffered` stream would only advance them while it is polled).
    pub fn chunks_in_order(
        self: &Arc<Self>,
    ) -> impl futures::Stream<Item = (u64, Result<Option<Bytes>>)> + Send + 'static {
        use futures::StreamExt;
        let reader = self.clone();
        let parallel = self.opts.parallel.max(1);
        futures::stream::iter(0..self.layout.chunk_count())
            .map(move |slot| {
                let reader = reader.clone();
                let task = tokio::spawn(async move { reader.fetch_chunk(slot).await });
                async move { (slot, task.await.map_err(Error::task).and_then(|r| r)) }
            })
            .buffered(parallel)
    }

    /// Which chunk slots hold data (the rest are zeros), page by page; cheap: reads only pages.
    pub async fn allocated_slots(&self) -> Result<Vec<bool>> {
        let mut out = Vec::with_capacity(self.layout.chunk_count() as usize);
        for p in 0..self.disk.pages.len() as u64 {
            let slots = page_slots(self.layout.chunk_count(), p);
            match self.page(p).await? {
                Some(page) => out.extend(page.slots.iter().map(Option::is_some)),
                None => out.extend(std::iter::repeat_n(false, slots)),
            }
        }
        Ok(out)
    }
}
