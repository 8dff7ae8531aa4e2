//! Positioned reads of a disk, and the `Read + Seek` view of one window of it (a partition) that
//! the parsers want.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use crate::error::BoxedError;

/// A disk that answers positioned reads. Implemented over a restore point by the CLI, over bytes
/// in memory by [`MemDisk`].
pub trait ReadAt: Send + Sync {
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; a read past the end is an error.
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// A disk image held in memory (tests, the fuzz target).
pub struct MemDisk(Vec<u8>);

impl MemDisk {
    pub fn new(data: Vec<u8>) -> Self {
        Self(data)
    }
}

impl ReadAt for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= self.0.len() as u64)
            .ok_or_else(|| past_end(offset, buf.len(), self.0.len() as u64))?;
        buf.copy_from_slice(&self.0[offset as usize..end as usize]);
        Ok(())
    }
}

pub(crate) fn past_end(offset: u64, len: usize, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("a read of {len} bytes at {offset} runs past the end ({size} bytes)"),
    )
}

/// A window `start..start+len` of a disk as a seekable stream, for the parsers. Reads past the
/// window's end return what is left (then 0); writes are refused: restore never changes a disk.
/// An optional budget of reads stops parsers that would otherwise walk a hostile chain forever.
#[derive(Clone)]
pub struct Window {
    dev: Arc<dyn ReadAt>,
    start: u64,
    len: u64,
    pos: u64,
    /// Reads allowed before the current operation is stopped; shared with the volume that owns
    /// a clone, which sets it before each operation.
    reads_left: Option<Budget>,
}

/// A count of reads, shared between a [`Window`] handed to a parser and its owner.
#[derive(Clone, Debug, Default)]
pub struct Budget(Arc<std::sync::atomic::AtomicU64>);

impl Budget {
    pub fn set(&self, reads: u64) {
        self.0.store(reads, std::sync::atomic::Ordering::Relaxed);
    }

    fn take(&self) -> bool {
        self.0
            .fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |n| n.checked_sub(1),
            )
            .is_ok()
    }
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Window({}+{})", self.start, self.len)
    }
}

impl Window {
    pub fn new(dev: Arc<dyn ReadAt>, start: u64, len: u64) -> Self {
        Self {
            dev,
            start,
            len,
            pos: 0,
            reads_left: None,
        }
    }

    pub fn with_read_budget(self, reads: u64) -> Self {
        let b = Budget::default();
        b.set(reads);
        self.with_budget(b)
    }

    pub fn with_budget(mut self, b: Budget) -> Self {
        self.reads_left = Some(b);
        self
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Reads exactly `buf.len()` bytes at `offset` inside the window.
    pub fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if let Some(b) = &self.reads_left {
            if !b.take() {
                return Err(io::Error::other(
                    "too many reads for one operation: a structure that loops or does not end",
                ));
            }
        }
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.len)
        {
            return Err(past_end(offset, buf.len(), self.len));
        }
        self.dev.read_exact_at(self.start + offset, buf)
    }
}

impl Read for Window {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.len.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        let pos = self.pos;
        self.read_exact_at(pos, &mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Window {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        }
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        self.pos = new;
        Ok(new)
    }
}

impl Write for Window {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "restore never writes to a backed-up disk",
        ))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ext4_view::Ext4Read for Window {
    fn read(&mut self, start_byte: u64, dst: &mut [u8]) -> Result<(), BoxedError> {
        self.read_exact_at(start_byte, dst)
            .map_err(|e| Box::new(e) as BoxedError)
    }
}

/// A disk image file on the host (tests, benchmarks, `fuzz` reproduction).
pub struct FileDisk {
    file: std::fs::File,
    size: u64,
}

impl FileDisk {
    pub fn open(path: &std::path::Path) -> io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        Ok(Self { file, size })
    }
}

impl ReadAt for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(past_end(offset, buf.len(), self.size));
        }
        self.file.read_exact_at(buf, offset)
    }
}
