//! File-level restore without a kernel mount: partition tables (GPT, MBR) and file systems (NTFS,
//! ext2/3/4) are read in user space from anything that answers positioned reads ([`ReadAt`]), and
//! files are written out under a target directory without ever following a host symlink or
//! leaving that directory. Also the qcow2 image writer used by `restore vm --format qcow2`.
//!
//! Nothing here knows about the repository: the CLI hands in a [`ReadAt`] backed by a restore
//! point's reader, tests and the fuzz target hand in bytes in memory.

mod detect;
mod device;
mod error;
mod ext4_unwritten;
mod ext4fs;
mod extract;
pub mod lznt1;
mod ntfsfs;
mod partitions;
pub mod qcow2;
mod volume;

pub use detect::{detect, FsKind};
pub use device::{FileDisk, MemDisk, ReadAt};
pub use error::{Error, Result};
pub use extract::{extract, ExtractOptions, ExtractReport};
pub use partitions::{partitions, Partition, PartitionTable};
pub use volume::{
    open_volume, parse_location, split_path, Entry, EntryKind, ListedFiles, ListedFilesMaker,
    Listing, Location, OpenFile, Volume,
};

/// Runs a file-system or partition-table parse, turning a panic inside a third-party parser into
/// an error: a hostile guest disk must never take the process down.
///
/// The panic is reported once, in the error (with where the parser panicked), not also on
/// standard error by the panic hook: the first call installs a hook that keeps quiet about
/// panics raised inside `guarded` on the same thread and hands every other panic to the hook it
/// replaced. So a fuzz target whose hook aborts on a panic (libFuzzer's) aborts only on panics
/// that would take the process down, as in production.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    quiet_inside_guarded();
    GUARDED.with(|g| g.set(g.get() + 1));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(g.get() - 1));
    match r {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".into());
            let at = PANICKED_AT
                .with(|a| a.take())
                .map(|a| format!(", at {a}"))
                .unwrap_or_default();
            Err(Error::Corrupt {
                what: what.to_string(),
                detail: format!("the parser gave up ({msg}{at})"),
            })
        }
    }
}

thread_local! {
    /// How many `guarded` calls this thread is inside.
    static GUARDED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    /// Where the last panic inside `guarded` on this thread was raised.
    static PANICKED_AT: std::cell::Cell<Option<String>> = const { std::cell::Cell::new(None) };
}

fn quiet_inside_guarded() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let outer = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED.with(|g| g.get()) == 0 {
                return outer(info);
            }
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()));
            PANICKED_AT.with(|a| a.set(at));
        }));
    });
}

/// Runs the whole restore path over `data` taken as a disk image: partition table, file-system
/// detection, and a bounded listing and read of every file found. Used by the fuzz target and its
/// corpus test; never panics, whatever the bytes.
pub fn fuzz_disk_image(data: &[u8]) {
    let image = decode_sparse(data).unwrap_or_else(|| data.to_vec());
    let dev: std::sync::Arc<dyn ReadAt> = std::sync::Arc::new(MemDisk::new(image));
    let Ok(table) = partitions(&dev) else {
        return;
    };
    for p in &table.partitions {
        let Ok(mut vol) = open_volume(&dev, &table, &p.selector()) else {
            continue;
        };
        let mut budget = 2000usize;
        let mut stack: Vec<Vec<Vec<u8>>> = vec![Vec::new()];
        while let Some(path) = stack.pop() {
            let Ok(list) = vol.list(&path, 200) else {
                continue;
            };
            for e in list.entries {
                if budget == 0 {
                    return;
                }
                budget -= 1;
                let mut child = path.clone();
                child.push(e.raw_name.clone());
                match e.kind {
                    EntryKind::Dir if child.len() < 16 => stack.push(child),
                    EntryKind::File => {
                        let mut sink = std::io::sink();
                        let _ = vol.read_file(&child, 1 << 20, &mut |_, b| {
                            use std::io::Write;
                            sink.write_all(b).map_err(|e| Error::Invalid(e.to_string()))
                        });
                    }
                    EntryKind::Symlink => {
                        let _ = vol.read_link(&child);
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Magic of the sparse image encoding used by the fuzz corpus.
pub const SPARSE_MAGIC: &[u8; 8] = b"BVSPARSE";
/// Largest image a sparse encoding may expand to.
const SPARSE_MAX: u64 = 256 << 20;

/// Encodes an image as `BVSPARSE`, its size (u64 LE), then runs of 512-byte blocks: (offset u64
/// LE, length u32 LE, kind u8, then the bytes for kind 0, or one fill byte for kind 1). All-zero
/// blocks are left out, so real file-system images shrink to a few KiB.
pub fn encode_sparse(img: &[u8]) -> Vec<u8> {
    #[derive(PartialEq, Clone, Copy)]
    enum Class {
        Zero,
        Fill(u8),
        Data,
    }
    let class = |b: &[u8]| {
        if b.iter().all(|x| *x == b[0]) {
            if b[0] == 0 {
                Class::Zero
            } else {
                Class::Fill(b[0])
            }
        } else {
            Class::Data
        }
    };
    let mut out = SPARSE_MAGIC.to_vec();
    out.extend_from_slice(&(img.len() as u64).to_le_bytes());
    let blocks: Vec<&[u8]> = img.chunks(512).collect();
    let mut i = 0;
    while i < blocks.len() {
        let c = class(blocks[i]);
        let mut j = i + 1;
        while j < blocks.len() && class(blocks[j]) == c {
            j += 1;
        }
        let (start, end) = (i * 512, (j * 512).min(img.len()));
        match c {
            Class::Zero => {}
            Class::Fill(b) => {
                out.extend_from_slice(&(start as u64).to_le_bytes());
                out.extend_from_slice(&((end - start) as u32).to_le_bytes());
                out.push(1);
                out.push(b);
            }
            Class::Data => {
                out.extend_from_slice(&(start as u64).to_le_bytes());
                out.extend_from_slice(&((end - start) as u32).to_le_bytes());
                out.push(0);
                out.extend_from_slice(&img[start..end]);
            }
        }
        i = j;
    }
    out
}

/// Decodes [`encode_sparse`]'s format; None if `data` is not in it. Runs past the declared size
/// or a size above 256 MiB are cut, never followed.
pub fn decode_sparse(data: &[u8]) -> Option<Vec<u8>> {
    let rest = data.strip_prefix(SPARSE_MAGIC.as_slice())?;
    let size = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?).min(SPARSE_MAX) as usize;
    let mut img = vec![0u8; size];
    let mut r = &rest[8..];
    while r.len() >= 13 {
        let off = u64::from_le_bytes(r[..8].try_into().ok()?);
        let len = u32::from_le_bytes(r[8..12].try_into().ok()?) as usize;
        let kind = r[12];
        r = &r[13..];
        let off = usize::try_from(off).unwrap_or(usize::MAX).min(size);
        let n = len.min(size - off);
        if kind == 1 {
            let Some(b) = r.first() else { break };
            img[off..off + n].fill(*b);
            r = &r[1..];
        } else {
            let bytes = &r[..len.min(r.len())];
            let m = n.min(bytes.len());
            img[off..off + m].copy_from_slice(&bytes[..m]);
            r = &r[bytes.len()..];
        }
    }
    Some(img)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_parser_panic_becomes_an_error_naming_the_volume_the_panic_and_where() {
        let r: crate::Result<()> = crate::guarded("the test volume", || {
            let v: Vec<u8> = Vec::new();
            std::hint::black_box(&v[v.len() + 8..]);
            Ok(())
        });
        let e = r.unwrap_err().to_string();
        assert!(e.contains("the test volume"), "{e}");
        assert!(e.contains("range start index 8 out of range"), "{e}");
        assert!(e.contains("engine/restore/src/lib.rs:"), "{e}");
        assert_eq!(crate::guarded("the test volume", || Ok(1)).unwrap(), 1);
        assert_eq!(super::GUARDED.with(|g| g.get()), 0);
    }
}
