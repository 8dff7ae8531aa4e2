//! ext2/3/4 through the `ext4-view` crate (which also replays the journal in memory).

use ext4_view::{Ext4, Ext4Error, Metadata};

use crate::detect::FsKind;
use crate::device::Window;
use crate::volume::{display_path, Entry, EntryKind, Listing, Volume};
use crate::{guarded, Error, Result};

pub struct Ext4Volume {
    fs: Ext4,
    what: String,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

impl Ext4Volume {
    pub fn open(mut w: Window, what: &str) -> Result<Self> {
        // The crate sizes its tables from the superblock; a superblock claiming more blocks than
        // the partition holds (a truncated or hostile file system) is refused first, so memory
        // stays proportional to the partition.
        let mut sb = [0u8; 1024];
        w.read_exact_at(1024, &mut sb).map_err(|e| Error::Corrupt {
            what: format!("the ext4 file system of {what}"),
            detail: format!("its superblock cannot be read: {e}"),
        })?;
        let log = u32_at(&sb, 24);
        let per_group = u32_at(&sb, 32) as u64;
        let incompat = u32_at(&sb, 0x60);
        let mut blocks = u32_at(&sb, 4) as u64;
        if incompat & 0x80 != 0 {
            blocks |= (u32_at(&sb, 0x150) as u64) << 32;
        }
        let corrupt = |detail: String| Error::Corrupt {
            what: format!("the ext4 file system of {what}"),
            detail,
        };
        if log > 6 || per_group < 8 {
            return Err(corrupt(format!(
                "its superblock gives block size 2^{} and {per_group} blocks per group",
                10 + log
            )));
        }
        let block = 1024u64 << log;
        if blocks.checked_mul(block).is_none_or(|b| b > w.len()) {
            return Err(corrupt(format!(
                "it claims {blocks} blocks of {block} bytes but only {} bytes are there (truncated?)",
                w.len()
            )));
        }
        let fs = guarded(&format!("the ext4 file system of {what}"), || {
            Ext4::load(Box::new(w)).map_err(|e| corrupt(e.to_string()))
        })?;
        Ok(Self {
            fs,
            what: what.to_string(),
        })
    }

    fn err(&self, path: &[Vec<u8>], e: Ext4Error) -> Error {
        let p = display_path(path);
        match e {
            Ext4Error::NotFound => Error::NotFound(p),
            Ext4Error::NotADirectory => Error::NotADirectory(p),
            Ext4Error::IsADirectory | Ext4Error::IsASpecialFile => Error::NotAFile(p),
            Ext4Error::Io(e) => Error::Read {
                offset: 0,
                source: std::io::Error::other(e),
            },
            other => Error::Corrupt {
                what: format!("{p} in the ext4 file system of {}", self.what),
                detail: other.to_string(),
            },
        }
    }

    fn path(path: &[Vec<u8>]) -> Vec<u8> {
        let mut p = Vec::with_capacity(64);
        for c in path {
            p.push(b'/');
            p.extend_from_slice(c);
        }
        if p.is_empty() {
            p.push(b'/');
        }
        p
    }
}

fn ts(t: ext4_view::Timestamp) -> Option<(i64, u32)> {
    Some((t.seconds(), t.nanoseconds()))
}

fn entry(name: &[u8], m: &Metadata) -> Entry {
    let ft = m.file_type();
    let kind = if ft.is_regular_file() {
        EntryKind::File
    } else if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_symlink() {
        EntryKind::Symlink
    } else {
        EntryKind::Other
    };
    Entry {
        name: String::from_utf8_lossy(name).into_owned(),
        raw_name: name.to_vec(),
        kind,
        size: m.len(),
        mtime: ts(m.modified()),
        atime: ts(m.accessed()),
        crtime: m.created().and_then(ts),
        mode: Some(m.mode() as u32),
        uid: Some(m.uid()),
        gid: Some(m.gid()),
        attributes: Vec::new(),
    }
}

impl Volume for Ext4Volume {
    fn kind(&self) -> FsKind {
        FsKind::Ext4
    }

    fn stat(&mut self, path: &[Vec<u8>]) -> Result<Entry> {
        let p = Self::path(path);
        let r = guarded(&self.what, || {
            let p = ext4_view::Path::try_from(p.as_slice())
                .map_err(|e| Error::Invalid(format!("{}: {e}", display_path(path))))?;
            self.fs.symlink_metadata(p).map_err(|e| self.err(path, e))
        })?;
        let name = path.last().cloned().unwrap_or_default();
        Ok(entry(&name, &r))
    }

    fn list(&mut self, path: &[Vec<u8>], limit: usize) -> Result<Listing> {
        let p = Self::path(path);
        guarded(&self.what, || {
            let pp = ext4_view::Path::try_from(p.as_slice())
                .map_err(|e| Error::Invalid(format!("{}: {e}", display_path(path))))?;
            let rd = self.fs.read_dir(pp).map_err(|e| self.err(path, e))?;
            let mut out = Listing {
                entries: Vec::new(),
                truncated: false,
            };
            for e in rd {
                let e = e.map_err(|e| self.err(path, e))?;
                let name = e.file_name();
                let name: &[u8] = name.as_ref();
                if name == b"." || name == b".." {
                    continue;
                }
                if out.entries.len() >= limit {
                    out.truncated = true;
                    break;
                }
                let m = e.metadata().map_err(|e| self.err(path, e))?;
                out.entries.push(entry(name, &m));
            }
            Ok(out)
        })
    }

    fn read_link(&mut self, path: &[Vec<u8>]) -> Result<Vec<u8>> {
        let p = Self::path(path);
        guarded(&self.what, || {
            let pp = ext4_view::Path::try_from(p.as_slice())
                .map_err(|e| Error::Invalid(format!("{}: {e}", display_path(path))))?;
            let t = self.fs.read_link(pp).map_err(|e| self.err(path, e))?;
            Ok(t.as_ref().to_vec())
        })
    }

    fn read_file(
        &mut self,
        path: &[Vec<u8>],
        piece: usize,
        out: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<u64> {
        self.read(path, true, piece, out)
    }

    fn read_listed_file(
        &mut self,
        path: &[Vec<u8>],
        piece: usize,
        out: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<u64> {
        self.read(path, false, piece, out)
    }
}

impl Ext4Volume {
    /// Reads the regular file at `path`; `check` first looks at the path itself, which `open`
    /// cannot do (it follows a final symbolic link). Every lookup walks the path from the root
    /// through each directory's entries, so a listed file skips the check: that halves the
    /// lookups of a tree extraction.
    fn read(
        &mut self,
        path: &[Vec<u8>],
        check: bool,
        piece: usize,
        out: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<u64> {
        let p = Self::path(path);
        guarded(&self.what, || {
            let pp = ext4_view::Path::try_from(p.as_slice())
                .map_err(|e| Error::Invalid(format!("{}: {e}", display_path(path))))?;
            if check {
                let meta = self
                    .fs
                    .symlink_metadata(pp)
                    .map_err(|e| self.err(path, e))?;
                if !meta.file_type().is_regular_file() {
                    return Err(Error::NotAFile(display_path(path)));
                }
            }
            let mut f = self.fs.open(pp).map_err(|e| self.err(path, e))?;
            let size = f.metadata().len();
            // A piece never larger than the file: most files are small, and a zeroed 1 MiB
            // buffer per file costs more than reading it.
            let len = piece
                .clamp(4096, 8 << 20)
                .min(usize::try_from(size.next_multiple_of(4096)).unwrap_or(usize::MAX))
                .max(4096);
            let mut buf = vec![0u8; len];
            let mut off = 0u64;
            while off < size {
                // The crate hands out at most one block per call; gather a piece.
                let mut filled = 0;
                while filled < buf.len() {
                    let n = f
                        .read_bytes(&mut buf[filled..])
                        .map_err(|e| self.err(path, e))?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                if filled == 0 {
                    break;
                }
                out(off, &buf[..filled])?;
                off += filled as u64;
            }
            if off != size {
                return Err(Error::Corrupt {
                    what: format!(
                        "{} in the ext4 file system of {}",
                        display_path(path),
                        self.what
                    ),
                    detail: format!("{off} bytes could be read of its {size}"),
                });
            }
            Ok(size)
        })
    }
}
