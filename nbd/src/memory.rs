//! An in-memory block device with sparse pages, for tests and for callers that need a scratch
//! export. Unwritten pages are holes and cost nothing, so a terabyte-sized device is cheap.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::{Bytes, BytesMut};

use crate::device::{BlockDevice, BlockSizes, Extent, ReadSegment};
use crate::error::DeviceError;

/// Granularity of allocation; block status reports extents in multiples of it.
pub const PAGE_SIZE: usize = 4096;
const PAGE: u64 = PAGE_SIZE as u64;

enum Page {
    Data(Box<[u8; PAGE_SIZE]>),
    /// Allocated (written with `NBD_CMD_FLAG_NO_HOLE`) but known to be zero.
    Zero,
}

/// In-memory device. All connections share one store, so it is safe for multi-conn.
pub struct MemoryDevice {
    size: u64,
    read_only: bool,
    block_sizes: BlockSizes,
    trim: bool,
    pages: RwLock<BTreeMap<u64, Page>>,
    flushes: AtomicU64,
}

impl MemoryDevice {
    /// A writable device of `size` bytes reading as zeroes.
    pub fn new(size: u64) -> Self {
        MemoryDevice {
            size,
            read_only: false,
            block_sizes: BlockSizes::default(),
            trim: true,
            pages: RwLock::new(BTreeMap::new()),
            flushes: AtomicU64::new(0),
        }
    }

    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    pub fn with_block_sizes(mut self, block_sizes: BlockSizes) -> Self {
        self.block_sizes = block_sizes;
        self
    }

    pub fn with_trim(mut self, trim: bool) -> Self {
        self.trim = trim;
        self
    }

    /// Writes directly, bypassing the read-only flag (to fill a device before serving it).
    /// Bytes past the end of the device are ignored.
    pub fn write_at(&self, offset: u64, data: &[u8]) {
        let end = offset.saturating_add(data.len() as u64).min(self.size);
        if offset >= end {
            return;
        }
        let data = &data[..(end - offset) as usize];
        let mut pages = self.pages_mut();
        let mut pos = 0usize;
        while pos < data.len() {
            let abs = offset + pos as u64;
            let index = abs / PAGE;
            let in_page = (abs % PAGE) as usize;
            let n = (PAGE_SIZE - in_page).min(data.len() - pos);
            let page = pages.entry(index).or_insert(Page::Zero);
            if let Page::Zero = page {
                *page = Page::Data(Box::new([0u8; PAGE_SIZE]));
            }
            if let Page::Data(buf) = page {
                buf[in_page..in_page + n].copy_from_slice(&data[pos..pos + n]);
            }
            pos += n;
        }
    }

    /// Copies `len` bytes from `offset` (zeroes past the end).
    pub fn read_vec(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        let pages = self.pages();
        let first = offset / PAGE;
        let last = offset.saturating_add(len as u64).div_ceil(PAGE);
        for (&index, page) in pages.range(first..last) {
            if let Page::Data(buf) = page {
                copy_overlap(index * PAGE, &buf[..], offset, &mut out);
            }
        }
        out
    }

    /// The whole device as bytes; only sensible for small devices.
    pub fn contents(&self) -> Vec<u8> {
        self.read_vec(0, usize::try_from(self.size).unwrap_or(usize::MAX))
    }

    /// How many times `flush` was called (tests check flush-on-shutdown with it).
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// Bytes of memory held by allocated pages.
    pub fn allocated_bytes(&self) -> u64 {
        self.pages().len() as u64 * PAGE
    }

    fn pages(&self) -> RwLockReadGuard<'_, BTreeMap<u64, Page>> {
        // A panic while holding the lock cannot leave a page half-replaced in a way that matters
        // more than the panic itself, so keep serving rather than propagate the poison.
        self.pages.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn pages_mut(&self) -> RwLockWriteGuard<'_, BTreeMap<u64, Page>> {
        self.pages.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DeviceError::invalid(format!(
                "range {offset}+{len} is outside the device of {} bytes",
                self.size
            ))),
        }
    }

    fn check_writable(&self) -> Result<(), DeviceError> {
        if self.read_only {
            Err(DeviceError::perm("device is read-only"))
        } else {
            Ok(())
        }
    }

    /// Zeroes `[offset, offset+len)`; whole pages become holes or `Zero` pages.
    fn zero_range(&self, offset: u64, len: u64, may_trim: bool) {
        let end = offset + len;
        let mut pages = self.pages_mut();
        let mut pos = offset;
        while pos < end {
            let index = pos / PAGE;
            let page_start = index * PAGE;
            let n = (page_start + PAGE).min(end) - pos;
            if n == PAGE {
                if may_trim {
                    pages.remove(&index);
                } else {
                    pages.insert(index, Page::Zero);
                }
            } else {
                match pages.get_mut(&index) {
                    Some(Page::Data(buf)) => {
                        let from = (pos - page_start) as usize;
                        buf[from..from + n as usize].fill(0);
                    }
                    Some(Page::Zero) => {}
                    None if !may_trim => {
                        pages.insert(index, Page::Zero);
                    }
                    None => {}
                }
            }
            pos += n;
        }
    }
}

/// Copies the part of `src` (which starts at absolute `src_start`) that overlaps `dst` (which
/// starts at absolute `dst_start`).
fn copy_overlap(src_start: u64, src: &[u8], dst_start: u64, dst: &mut [u8]) {
    let start = src_start.max(dst_start);
    let end = (src_start + src.len() as u64).min(dst_start + dst.len() as u64);
    if start >= end {
        return;
    }
    let n = (end - start) as usize;
    let s = (start - src_start) as usize;
    let d = (start - dst_start) as usize;
    dst[d..d + n].copy_from_slice(&src[s..s + n]);
}

#[async_trait::async_trait]
impl BlockDevice for MemoryDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    fn block_sizes(&self) -> BlockSizes {
        self.block_sizes
    }

    fn supports_trim(&self) -> bool {
        self.trim
    }

    fn supports_fast_zero(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadSegment>, DeviceError> {
        self.check_range(offset, u64::from(len))?;
        let end = offset + u64::from(len);
        let mut segments = Vec::new();
        // Contiguous data pages are copied into one buffer so the server sends one data chunk per
        // allocated run rather than one per page.
        let mut run: Option<(u64, BytesMut)> = None;
        let mut pos = offset;
        let pages = self.pages();
        let flush_run = |run: &mut Option<(u64, BytesMut)>, segments: &mut Vec<ReadSegment>| {
            if let Some((_, buf)) = run.take() {
                segments.push(ReadSegment::Data(buf.freeze()));
            }
        };
        for (&index, page) in pages.range(offset / PAGE..end.div_ceil(PAGE)) {
            let Page::Data(buf) = page else { continue };
            let page_start = index * PAGE;
            let from = page_start.max(offset);
            let to = (page_start + PAGE).min(end);
            if from > pos {
                flush_run(&mut run, &mut segments);
                segments.push(ReadSegment::Zero((from - pos) as u32));
            }
            let slice = &buf[(from - page_start) as usize..(to - page_start) as usize];
            match &mut run {
                Some((_, b)) => b.extend_from_slice(slice),
                None => {
                    let mut b = BytesMut::with_capacity((end - from) as usize);
                    b.extend_from_slice(slice);
                    run = Some((from, b));
                }
            }
            pos = to;
        }
        flush_run(&mut run, &mut segments);
        if pos < end {
            segments.push(ReadSegment::Zero((end - pos) as u32));
        }
        Ok(segments)
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), DeviceError> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        self.write_at(offset, &data);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _fua: bool,
        may_trim: bool,
    ) -> Result<(), DeviceError> {
        self.check_writable()?;
        self.check_range(offset, u64::from(len))?;
        self.zero_range(offset, u64::from(len), may_trim);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), DeviceError> {
        self.check_writable()?;
        self.check_range(offset, u64::from(len))?;
        // Only whole pages are released; partial pages keep their data, which trim allows.
        let first = offset.div_ceil(PAGE);
        let last = (offset + u64::from(len)) / PAGE;
        if first < last {
            let mut pages = self.pages_mut();
            let doomed: Vec<u64> = pages.range(first..last).map(|(&i, _)| i).collect();
            for i in doomed {
                pages.remove(&i);
            }
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, DeviceError> {
        self.check_range(offset, u64::from(len))?;
        let end = offset + u64::from(len);
        let mut extents: Vec<Extent> = Vec::new();
        let push = |extents: &mut Vec<Extent>, length: u64, flags: u32| {
            if length == 0 {
                return;
            }
            match extents.last_mut() {
                Some(last) if last.flags == flags => last.length += length as u32,
                _ => extents.push(Extent {
                    length: length as u32,
                    flags,
                }),
            }
        };
        let mut pos = offset;
        let pages = self.pages();
        for (&index, page) in pages.range(offset / PAGE..end.div_ceil(PAGE)) {
            let page_start = index * PAGE;
            let from = page_start.max(offset);
            let to = (page_start + PAGE).min(end);
            push(&mut extents, from - pos, Extent::HOLE | Extent::ZERO);
            let flags = match page {
                Page::Data(_) => 0,
                Page::Zero => Extent::ZERO,
            };
            push(&mut extents, to - from, flags);
            pos = to;
        }
        push(&mut extents, end - pos, Extent::HOLE | Extent::ZERO);
        Ok(extents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(segs: &[ReadSegment]) -> u64 {
        segs.iter().map(ReadSegment::len).sum()
    }

    #[tokio::test]
    async fn sparse_reads_cover_the_range() {
        let dev = MemoryDevice::new(1 << 20);
        dev.write_at(5000, &[7u8; 10000]);
        let segs = dev.read(0, 65536).await.unwrap();
        assert_eq!(total(&segs), 65536);
        assert_eq!(segs[0], ReadSegment::Zero(4096));
        let ReadSegment::Data(d) = &segs[1] else {
            panic!("expected data")
        };
        assert_eq!(d.len(), 3 * 4096);
        assert_eq!(&d[..904], &[0u8; 904][..]);
        assert_eq!(&d[904..904 + 10000], &[7u8; 10000][..]);
        assert_eq!(dev.read_vec(4999, 3), vec![0, 7, 7]);
        // Unaligned read inside a page.
        let segs = dev.read(5001, 10).await.unwrap();
        assert_eq!(segs, vec![ReadSegment::Data(Bytes::from(vec![7u8; 10]))]);
    }

    #[tokio::test]
    async fn zeroes_trim_and_status() {
        let dev = MemoryDevice::new(64 * 1024);
        dev.write_at(0, &[1u8; 32 * 1024]);
        dev.write_zeroes(4096, 4096, false, true).await.unwrap();
        dev.write_zeroes(8192, 4096, false, false).await.unwrap();
        dev.trim(12288 + 100, 8192).await.unwrap();
        let ext = dev.block_status(0, 65536).await.unwrap();
        assert_eq!(
            ext,
            vec![
                Extent::data(4096),
                Extent::hole(4096),
                Extent::zero(4096),
                Extent::data(4096),
                Extent::hole(4096),
                Extent::data(3 * 4096),
                Extent::hole(32 * 1024),
            ]
        );
        assert_eq!(dev.read_vec(4096, 8192), vec![0u8; 8192]);
        assert!(dev
            .write(65536, Bytes::from_static(b"x"), false)
            .await
            .is_err());
        let ro = MemoryDevice::new(4096).with_read_only(true);
        let err = ro
            .write(0, Bytes::from_static(b"x"), false)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), crate::DeviceErrorKind::Perm);
    }
}
