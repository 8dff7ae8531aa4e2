use std::ops::Range;

use crate::Error;

pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
pub const MAX_CHUNK_SIZE: u32 = 8 * 1024 * 1024;

/// Fixed-size chunks aligned to the disk's own offsets: chunk `i` covers `[i * size, (i+1) * size)`,
/// the last one cut short at the end of the disk. Offset -> chunk is a shift.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLayout {
    chunk_size: u32,
    disk_size: u64,
}

impl ChunkLayout {
    pub fn new(chunk_size: u32, disk_size: u64) -> Result<Self, Error> {
        check_chunk_size(chunk_size as u64)?;
        Ok(Self {
            chunk_size,
            disk_size,
        })
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    pub fn chunk_count(&self) -> u64 {
        self.disk_size.div_ceil(self.chunk_size as u64)
    }

    /// Byte range of chunk `index` on the disk.
    pub fn chunk_range(&self, index: u64) -> Range<u64> {
        let start = index * self.chunk_size as u64;
        start..(start + self.chunk_size as u64).min(self.disk_size)
    }

    pub fn chunk_len(&self, index: u64) -> u32 {
        let r = self.chunk_range(index);
        (r.end - r.start) as u32
    }

    pub fn index_of(&self, offset: u64) -> u64 {
        offset / self.chunk_size as u64
    }

    /// Chunks that intersect `range` (clipped to the disk).
    pub fn chunks_of(&self, range: Range<u64>) -> Range<u64> {
        let end = range.end.min(self.disk_size);
        if range.start >= end {
            return 0..0;
        }
        self.index_of(range.start)..end.div_ceil(self.chunk_size as u64)
    }
}

/// Accepts the chunk sizes a repository may be created with.
pub fn check_chunk_size(size: u64) -> Result<(), Error> {
    if size.is_power_of_two() && (MIN_CHUNK_SIZE as u64..=MAX_CHUNK_SIZE as u64).contains(&size) {
        Ok(())
    } else {
        Err(Error::BadChunkSize(size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_chunk_is_short() {
        let l = ChunkLayout::new(65536, 200_000).unwrap();
        assert_eq!(l.chunk_count(), 4);
        assert_eq!(l.chunk_range(3), 196_608..200_000);
        assert_eq!(l.chunk_len(3), 3392);
        assert_eq!(l.chunks_of(65535..65537), 0..2);
        assert_eq!(l.chunks_of(199_999..300_000), 3..4);
        assert_eq!(l.chunks_of(300_000..400_000), 0..0);
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(ChunkLayout::new(65536 + 1, 1).is_err());
        assert!(ChunkLayout::new(32768, 1).is_err());
        assert!(ChunkLayout::new(16 << 20, 1).is_err());
        assert!(ChunkLayout::new(8 << 20, 1).is_ok());
    }
}
