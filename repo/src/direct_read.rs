//! Reads of local pack files around the page cache (`O_DIRECT`), for verification, and the
//! alignment helpers that exports' direct writes share (`engine/src/direct_write.rs`).
//!
//! Verify reads every byte once, so the page cache only costs it: copying 1.4 GB out of it took
//! a fifth of verify's CPU (docs/BENCHMARKS.md, "Verify reads around the page cache"), and a
//! nightly scan of a large repository would push out every other cached page. Reading around it
//! also checks what the disk holds, not a cached copy of a pack written minutes ago. Exports
//! write around the cache too, as they write each byte once (`engine/src/direct_write.rs`).
//!
//! Direct reads need the buffer, the offset and the length aligned to the device's logical
//! block; [`ALIGN`] (4 KiB) covers the usual 512-byte and 4 KiB devices. A file system that
//! refuses `O_DIRECT` (tmpfs before Linux 6.6) is read through the page cache instead, and so is
//! a file whose direct reads fail with `EINVAL` (a device with larger blocks).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Alignment of direct reads: buffer address, file offset and length.
pub const ALIGN: u64 = 4096;

/// Opens `path` for direct reads; `None` when its file system does not do them.
pub(crate) fn open(path: &Path) -> io::Result<Option<File>> {
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if refused(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(crate) fn align_down(x: u64) -> u64 {
    x - x % ALIGN
}

pub(crate) fn align_up(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}

/// `len` bytes of `buf` starting at an [`ALIGN`] boundary; `buf` grows (once) to hold them.
pub fn aligned_mut(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    let need = len + ALIGN as usize;
    if buf.len() < need {
        // Grown, never cleared: no zero-filling per read.
        buf.resize(need, 0);
    }
    let skip = buf.as_ptr().align_offset(ALIGN as usize);
    &mut buf[skip..skip + len]
}

/// Fills `buf` (aligned, as its length) from `offset` (aligned); the bytes read, fewer only at
/// the end of the file.
pub(crate) fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                // A read that stops off a block boundary stopped at the end of the file; a
                // further read from there would be unaligned.
                if !(n as u64).is_multiple_of(ALIGN) {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Whether a read or write failed because the file's device wants another alignment.
pub fn refused(e: &io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error())
}

/// A temporary directory on a file system whose direct reads bypass its cache (they refuse an
/// unaligned offset): the default one, else `/var/tmp` (where `/tmp` is a tmpfs, which refuses
/// `O_DIRECT` or, since Linux 6.6, takes it as buffered, `/var/tmp` is normally on disk).
#[cfg(test)]
pub(crate) fn disk_tempdir() -> tempfile::TempDir {
    let does_direct = |dir: &tempfile::TempDir| {
        let probe = dir.path().join("probe");
        if std::fs::write(&probe, vec![0u8; 2 * ALIGN as usize]).is_err() {
            return false;
        }
        let Ok(Some(file)) = open(&probe) else {
            return false;
        };
        let mut buf = Vec::new();
        file.read_at(aligned_mut(&mut buf, ALIGN as usize), 1)
            .is_err_and(|e| refused(&e))
    };
    let default = tempfile::tempdir().expect("a temporary directory");
    if does_direct(&default) {
        return default;
    }
    let var_tmp = tempfile::tempdir_in("/var/tmp").expect("a directory under /var/tmp");
    assert!(
        does_direct(&var_tmp),
        "neither {} nor /var/tmp takes O_DIRECT reads: set TMPDIR to a disk-backed directory",
        std::env::temp_dir().display()
    );
    var_tmp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_reads_return_the_file_and_stop_at_its_end() {
        let dir = disk_tempdir();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..3 * ALIGN as usize + 100).map(|i| i as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = open(&path)
            .unwrap()
            .expect("disk_tempdir does direct reads");
        let mut buf = Vec::new();
        let whole = aligned_mut(&mut buf, 8 * ALIGN as usize);
        assert_eq!(whole.as_ptr() as usize % ALIGN as usize, 0);
        let got = read_at(&file, whole, ALIGN).unwrap();
        assert_eq!(got, data.len() - ALIGN as usize);
        assert_eq!(&whole[..got], &data[ALIGN as usize..]);
        // Past the end: nothing, not an error.
        let again = aligned_mut(&mut buf, ALIGN as usize);
        assert_eq!(read_at(&file, again, 4 * ALIGN).unwrap(), 0);
        // An unaligned offset is what a device with larger blocks answers too.
        let err = file.read_at(aligned_mut(&mut buf, 4096), 1).unwrap_err();
        assert!(refused(&err), "{err}");
        assert_eq!(
            (align_down(4097), align_up(4097), align_up(4096)),
            (4096, 8192, 4096)
        );
    }
}
