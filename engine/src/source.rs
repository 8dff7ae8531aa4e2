//! What a backup reads from: a disk image with random access and a notion of which ranges may hold
//! data. The raw-file source lives here because restore paths and tests use it too; the agent adds
//! VHDX.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use blockvault_chunker::RangeSet;
use blockvault_repo::SourceInfo;

/// A disk as the backup pipeline sees it. Called from several threads at once.
pub trait DiskSource: Send + Sync {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Ranges that may hold non-zero data. Everything else reads as zeros and is never read.
    fn allocated(&self) -> io::Result<RangeSet>;
    /// Fills `buf` from `offset`; reading past the end is an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// How the restore point describes this source.
    fn describe(&self) -> SourceInfo;
    /// The disk's own identity where its format records one (a VHDX's virtual disk id), to
    /// match a changed-ranges document against.
    fn disk_id(&self) -> Option<String> {
        None
    }
}

/// A raw disk image (or block device). Holes of a sparse file are found with SEEK_DATA/SEEK_HOLE,
/// so a sparse 64 GiB image with 1 GiB written costs 1 GiB of reading.
pub struct RawFile {
    file: File,
    path: PathBuf,
    size: u64,
}

impl RawFile {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        let size = if meta.file_type().is_file() {
            meta.len()
        } else {
            // Block devices report length 0 in metadata; seeking to the end gives their size.
            rustix::fs::seek(&file, rustix::fs::SeekFrom::End(0)).map_err(io::Error::from)?
        };
        Ok(Self {
            file,
            path: path.to_path_buf(),
            size,
        })
    }
}

impl DiskSource for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn allocated(&self) -> io::Result<RangeSet> {
        let mut ranges = Vec::new();
        let mut pos = 0u64;
        while pos < self.size {
            let data = match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(pos)) {
                Ok(d) => d,
                // ENXIO: no data after pos.
                Err(rustix::io::Errno::NXIO) => break,
                // File systems without SEEK_DATA: treat everything as data.
                Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::OPNOTSUPP) => {
                    return Ok(RangeSet::full(self.size))
                }
                Err(e) => return Err(e.into()),
            };
            let hole = match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Hole(data)) {
                Ok(h) => h,
                Err(rustix::io::Errno::NXIO) => self.size,
                Err(e) => return Err(e.into()),
            };
            ranges.push(data..hole.min(self.size));
            pos = hole;
        }
        Ok(RangeSet::from_ranges(ranges))
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset + buf.len() as u64 > self.size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read past the end of {} ({} bytes)",
                    self.path.display(),
                    self.size
                ),
            ));
        }
        self.file.read_exact_at(buf, offset)
    }

    fn describe(&self) -> SourceInfo {
        SourceInfo {
            format: "raw".into(),
            path: self.path.display().to_string(),
            logical_sector_size: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn sparse_file_reports_its_data_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        let mut f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(&vec![1u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        let src = RawFile::open(&p).unwrap();
        let alloc = src.allocated().unwrap();
        assert!(alloc.contains(8 << 20));
        assert!(alloc.contains((9 << 20) - 1));
        // File systems may round extents, but a 64 MiB file with 1 MiB written is mostly holes.
        assert!(alloc.total_len() < 16 << 20, "{alloc:?}");
        let mut buf = [0u8; 4];
        assert!(src.read_at((64 << 20) - 2, &mut buf).is_err());
    }
}
