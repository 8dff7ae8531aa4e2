//! Where the bytes of a VHDX file come from: a positional-read trait (a file,
//! or memory for tests and fuzzing) and the replay overlay on top of it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// A source of bytes addressed by offset, shareable between threads.
pub trait ReadAt: Send + Sync {
    /// Fills `buf` from `offset`; reading past the end is `UnexpectedEof`.
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Current length in bytes.
    fn size(&self) -> io::Result<u64>;
}

impl ReadAt for File {
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

fn slice_read(data: &[u8], offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let end = offset.checked_add(buf.len() as u64);
    match end {
        Some(end) if end <= data.len() as u64 => {
            buf.copy_from_slice(&data[offset as usize..end as usize]);
            Ok(())
        }
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "read of {} bytes at {offset} past end of {}-byte source",
                buf.len(),
                data.len()
            ),
        )),
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        slice_read(self, offset, buf)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl ReadAt for Arc<[u8]> {
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        slice_read(self, offset, buf)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

/// One 4 KiB sector written by log replay.
#[derive(Clone, Debug)]
pub(crate) enum Sector {
    Data(Box<[u8]>),
    Zero,
}

/// The file as it would be after log replay: replayed sectors laid over the
/// source, and the length extended to what the log says (reads there give
/// zeros, as the file would be extended with zeros).
pub(crate) struct FileView {
    src: Arc<dyn ReadAt>,
    physical_len: u64,
    logical_len: u64,
    overlay: BTreeMap<u64, Sector>,
}

impl FileView {
    pub fn new(src: Arc<dyn ReadAt>, physical_len: u64) -> FileView {
        FileView {
            src,
            physical_len,
            logical_len: physical_len,
            overlay: BTreeMap::new(),
        }
    }

    pub fn set_overlay(&mut self, overlay: BTreeMap<u64, Sector>, logical_len: u64) {
        self.overlay = overlay;
        self.logical_len = logical_len.max(self.physical_len);
    }

    pub fn len(&self) -> u64 {
        self.logical_len
    }

    pub fn physical_len(&self) -> u64 {
        self.physical_len
    }

    pub fn source(&self) -> &Arc<dyn ReadAt> {
        &self.src
    }

    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len() as u64;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "offset overflow"))?;
        if end > self.logical_len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {len} bytes at {offset} past end of file ({} bytes)",
                    self.logical_len
                ),
            ));
        }
        if self.overlay.is_empty() && end <= self.physical_len {
            return self.src.read_exact_at(offset, buf);
        }
        // Source part, then zeros for the part the log extended.
        let phys_end = end.min(self.physical_len);
        if offset < phys_end {
            let n = (phys_end - offset) as usize;
            self.src.read_exact_at(offset, &mut buf[..n])?;
            buf[n..].fill(0);
        } else {
            buf.fill(0);
        }
        let first = offset & !4095;
        for (&sec, data) in self.overlay.range(first..end) {
            let s = sec.max(offset);
            let e = (sec + 4096).min(end);
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match data {
                Sector::Data(d) => dst.copy_from_slice(&d[(s - sec) as usize..(e - sec) as usize]),
                Sector::Zero => dst.fill(0),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_and_extension() {
        let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
        let mut v = FileView::new(Arc::new(data.clone()), data.len() as u64);
        let mut ov = BTreeMap::new();
        ov.insert(4096, Sector::Data(vec![0xAA; 4096].into_boxed_slice()));
        ov.insert(4 * 4096, Sector::Data(vec![0xBB; 4096].into_boxed_slice()));
        ov.insert(0, Sector::Zero);
        v.set_overlay(ov, 6 * 4096);
        let mut buf = vec![0u8; 6 * 4096];
        v.read_exact_at(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..8192].iter().all(|&b| b == 0xAA));
        assert_eq!(&buf[8192..12288], &data[8192..12288]);
        assert!(buf[12288..16384].iter().all(|&b| b == 0));
        assert!(buf[16384..20480].iter().all(|&b| b == 0xBB));
        let mut small = [0u8; 10];
        v.read_exact_at(4090, &mut small).unwrap();
        assert_eq!(&small[..6], &[0; 6]);
        assert_eq!(&small[6..], &[0xAA; 4]);
        assert!(v.read_exact_at(6 * 4096 - 1, &mut small).is_err());
    }
}
