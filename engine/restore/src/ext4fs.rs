//! ext2/3/4 through the `ext4-view` crate (which also replays the journal in memory).
//!
//! The crate verifies the crc32c of every directory block it reads, on every component of every
//! path it resolves, and it opens files by path only: a tree extraction resolved each file's
//! path from the root, checking the same directory blocks again and again (three quarters of
//! its time). So a volume holds two handles on the same disk. `fs` answers everything and
//! verifies every checksum; it lists each directory of an extraction once, reading and checking
//! all its blocks and the inodes of its entries. `listed` is given the superblock without the
//! metadata-checksum feature, so it parses the same structures without checking them again; it
//! only opens files that a listing by `fs` has just given as regular, by a path made of names
//! from such listings, whose directory blocks and inodes `fs` has therefore verified. (What it
//! reads beyond those, the extent-tree blocks of a file with more than four extents, goes
//! unchecked.) A restore point never changes, so the bytes `listed` reads are the ones `fs`
//! verified.

use std::sync::Arc;

use ext4_view::{Ext4, Ext4Error, Metadata};

use crate::detect::FsKind;
use crate::device::Window;
use crate::error::BoxedError;
use crate::ext4_unwritten::InodeTables;
use crate::volume::{
    display_path, Entry, EntryKind, ListedFiles, ListedFilesMaker, Listing, OpenFile, Volume,
};
use crate::{guarded, Error, Result};

pub struct Ext4Volume {
    fs: Ext4,
    tables: Option<InodeTables>,
    /// Opens listed files without checking checksums again (see the module's note); made on
    /// first use.
    listed: Option<ListedExt4>,
    window: Window,
    what: String,
}

/// Byte of the superblock (from the start of the file system) holding the metadata-checksum
/// feature bit, 0x400 of the little-endian `s_feature_ro_compat` at 0x64.
const RO_COMPAT_CSUM_BYTE: u64 = 1024 + 0x64 + 1;
const RO_COMPAT_CSUM_BIT: u8 = 0x04;

/// A window whose primary superblock reads without the metadata-checksum feature.
struct UncheckedReads(Window);

impl ext4_view::Ext4Read for UncheckedReads {
    fn read(&mut self, start_byte: u64, dst: &mut [u8]) -> std::result::Result<(), BoxedError> {
        self.0
            .read_exact_at(start_byte, dst)
            .map_err(|e| Box::new(e) as BoxedError)?;
        if let Some(i) = RO_COMPAT_CSUM_BYTE
            .checked_sub(start_byte)
            .and_then(|i| usize::try_from(i).ok())
        {
            if let Some(b) = dst.get_mut(i) {
                *b &= !RO_COMPAT_CSUM_BIT;
            }
        }
        Ok(())
    }
}

/// The handle that opens listed files (one per thread: the crate's handle is not `Send`).
pub struct ListedExt4 {
    fs: Ext4,
    tables: Option<InodeTables>,
    window: Window,
    what: String,
}

impl ListedExt4 {
    fn open(w: Window, what: &str) -> Result<Self> {
        let tables = inode_tables(&mut w.clone());
        let fs = guarded(&format!("the ext4 file system of {what}"), || {
            Ext4::load(Box::new(UncheckedReads(w.clone()))).map_err(|e| Error::Corrupt {
                what: format!("the ext4 file system of {what}"),
                detail: e.to_string(),
            })
        })?;
        Ok(Self {
            fs,
            tables,
            window: w,
            what: what.to_string(),
        })
    }
}

fn inode_tables(w: &mut Window) -> Option<InodeTables> {
    let mut sb = [0u8; 1024];
    w.read_exact_at(1024, &mut sb).ok()?;
    InodeTables::from_superblock(&sb)
}

/// Refuses a file that `ext4-view` would read wrong (see `ext4_unwritten`).
fn check_extents(
    tables: Option<&mut InodeTables>,
    w: &mut Window,
    f: &ext4_view::File,
    what: &str,
    path: &[Vec<u8>],
) -> Result<()> {
    let (Some(t), Some(ino)) = (tables, inode_of(f)) else {
        return Ok(());
    };
    let shown = || format!("{} in the ext4 file system of {what}", display_path(path));
    match t.has_unwritten_extents(w, ino) {
        Ok(false) => Ok(()),
        Ok(true) => Err(Error::Unsupported {
            what: shown(),
            found: "preallocated (unwritten) extents, which the ext4 reader would return as \
                    the stale contents of their blocks"
                .into(),
        }),
        Err(e) => Err(Error::Corrupt {
            what: shown(),
            detail: format!("its extent tree: {e}"),
        }),
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

/// Block groups a file system may have at most: 128 TiB with 4 KiB blocks and the usual 32,768
/// blocks per group, twice a VHDX's largest disk.
const MAX_BLOCK_GROUPS: u64 = 1 << 20;

/// Refuses a superblock whose geometry the crate would size its tables from beyond reason: more
/// blocks than the partition holds (a truncated or hostile file system), or more than
/// [`MAX_BLOCK_GROUPS`] groups. The crate allocates one descriptor per group before reading any,
/// so this bounds its memory by a real file system's, not by what a superblock claims.
fn check_geometry(sb: &[u8; 1024], partition_len: u64) -> std::result::Result<(), String> {
    let log = u32_at(sb, 24);
    let per_group = u32_at(sb, 32) as u64;
    // The crate takes the high half of the block count whether or not the 64-bit feature is
    // set, so the check does too.
    let blocks = (u32_at(sb, 0x150) as u64) << 32 | u32_at(sb, 4) as u64;
    if log > 6 {
        // The stored exponent as it is: any u32, so not added to.
        return Err(format!("its superblock gives block size 1024 << {log}"));
    }
    if per_group < 8 {
        return Err(format!("its superblock gives {per_group} blocks per group"));
    }
    let block = 1024u64 << log;
    if blocks.checked_mul(block).is_none_or(|b| b > partition_len) {
        return Err(format!(
            "it claims {blocks} blocks of {block} bytes but only {partition_len} bytes are there \
             (truncated?)"
        ));
    }
    let groups = blocks.div_ceil(per_group);
    if groups > MAX_BLOCK_GROUPS {
        return Err(format!(
            "it claims {groups} block groups, more than {MAX_BLOCK_GROUPS}"
        ));
    }
    Ok(())
}

impl Ext4Volume {
    pub fn open(mut w: Window, what: &str) -> Result<Self> {
        let mut sb = [0u8; 1024];
        w.read_exact_at(1024, &mut sb).map_err(|e| Error::Corrupt {
            what: format!("the ext4 file system of {what}"),
            detail: format!("its superblock cannot be read: {e}"),
        })?;
        let corrupt = |detail: String| Error::Corrupt {
            what: format!("the ext4 file system of {what}"),
            detail,
        };
        check_geometry(&sb, w.len()).map_err(corrupt)?;
        let fs = guarded(&format!("the ext4 file system of {what}"), || {
            Ext4::load(Box::new(w.clone())).map_err(|e| corrupt(e.to_string()))
        })?;
        Ok(Self {
            fs,
            tables: InodeTables::from_superblock(&sb),
            listed: None,
            window: w,
            what: what.to_string(),
        })
    }

    fn err(&self, path: &[Vec<u8>], e: Ext4Error) -> Error {
        ext4_err(&self.what, path, e)
    }

    fn path(path: &[Vec<u8>]) -> Vec<u8> {
        fs_path(path)
    }
}

fn ext4_err(what: &str, path: &[Vec<u8>], e: Ext4Error) -> Error {
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
            what: format!("{p} in the ext4 file system of {what}"),
            detail: other.to_string(),
        },
    }
}

fn fs_path(path: &[Vec<u8>]) -> Vec<u8> {
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
        let p = Self::path(path);
        let mut f = guarded(&self.what, || {
            let pp = ext4_view::Path::try_from(p.as_slice())
                .map_err(|e| Error::Invalid(format!("{}: {e}", display_path(path))))?;
            // `open` follows a final symbolic link: look at the path itself first.
            let meta = self
                .fs
                .symlink_metadata(pp)
                .map_err(|e| self.err(path, e))?;
            if !meta.file_type().is_regular_file() {
                return Err(Error::NotAFile(display_path(path)));
            }
            self.fs.open(pp).map_err(|e| self.err(path, e))
        })?;
        check_extents(self.tables.as_mut(), &mut self.window, &f, &self.what, path)?;
        read_all(&mut f, &self.what, path, piece, out)
    }

    fn open_listed(&mut self, path: &[Vec<u8>]) -> Result<Box<dyn OpenFile + '_>> {
        if self.listed.is_none() {
            self.listed = Some(ListedExt4::open(self.window.clone(), &self.what)?);
        }
        self.listed.as_mut().expect("made above").open_listed(path)
    }

    fn listed_files_maker(&self) -> Option<ListedFilesMaker> {
        let (w, what) = (self.window.clone(), self.what.clone());
        Some(Arc::new(move || {
            Ok(Box::new(ListedExt4::open(w.clone(), &what)?) as Box<dyn ListedFiles>)
        }))
    }
}

impl ListedFiles for ListedExt4 {
    /// Opens by path without looking at the path itself first (`open` follows a final symbolic
    /// link, but a listed regular file is not one).
    fn open_listed(&mut self, path: &[Vec<u8>]) -> Result<Box<dyn OpenFile + '_>> {
        let p = fs_path(path);
        let f = guarded(&self.what, || {
            let pp = ext4_view::Path::try_from(p.as_slice())
                .map_err(|e| Error::Invalid(format!("{}: {e}", display_path(path))))?;
            self.fs.open(pp).map_err(|e| ext4_err(&self.what, path, e))
        })?;
        check_extents(self.tables.as_mut(), &mut self.window, &f, &self.what, path)?;
        Ok(Box::new(Ext4File {
            f,
            what: &self.what,
            path: path.to_vec(),
        }))
    }
}

struct Ext4File<'a> {
    f: ext4_view::File,
    what: &'a str,
    path: Vec<Vec<u8>>,
}

/// The inode number of an open file. The crate's API does not give it, but its `Debug` form of a
/// file does (`File { inode: 12, position: 0, .. }`); anything else reads as unknown, and the
/// file is then treated as having no other names.
fn inode_of(f: &ext4_view::File) -> Option<u64> {
    let d = format!("{f:?}");
    let rest = d.strip_prefix("File { inode: ")?;
    let end = rest.find(',')?;
    let n = &rest[..end];
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse::<u32>().ok().filter(|n| *n != 0).map(u64::from)
}

impl OpenFile for Ext4File<'_> {
    fn id(&self) -> Option<u64> {
        inode_of(&self.f)
    }

    fn read(&mut self, piece: usize, out: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<u64> {
        read_all(&mut self.f, self.what, &self.path, piece, out)
    }
}

/// Reads an open file from its start in pieces of at most `piece` bytes.
fn read_all(
    f: &mut ext4_view::File,
    what: &str,
    path: &[Vec<u8>],
    piece: usize,
    out: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> Result<u64> {
    guarded(what, || {
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
                    .map_err(|e| ext4_err(what, path, e))?;
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
                what: format!("{} in the ext4 file system of {what}", display_path(path)),
                detail: format!("{off} bytes could be read of its {size}"),
            });
        }
        Ok(size)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn superblock(log: u32, per_group: u32, blocks_lo: u32, blocks_hi: u32) -> [u8; 1024] {
        let mut b = [0u8; 1024];
        b[4..8].copy_from_slice(&blocks_lo.to_le_bytes());
        b[24..28].copy_from_slice(&log.to_le_bytes());
        b[32..36].copy_from_slice(&per_group.to_le_bytes());
        b[0x150..0x154].copy_from_slice(&blocks_hi.to_le_bytes());
        b
    }

    #[test]
    fn geometry_beyond_the_partition_or_the_group_limit_is_refused() {
        let tib = 1u64 << 40;
        assert_eq!(
            check_geometry(&superblock(2, 32768, 1 << 20, 0), tib),
            Ok(())
        );
        // The high half counts without the 64-bit feature too, as the crate reads it.
        let e = check_geometry(&superblock(2, 32768, 1 << 20, 1), 8 << 30).unwrap_err();
        assert!(e.contains("claims 4296015872 blocks"), "{e}");
        // Within the partition, but 8 blocks per group: 33,554,432 groups.
        let e = check_geometry(&superblock(2, 8, 1 << 28, 0), tib).unwrap_err();
        assert!(
            e.contains("33554432 block groups, more than 1048576"),
            "{e}"
        );
        let e = check_geometry(&superblock(u32::MAX, 32768, 1, 0), tib).unwrap_err();
        assert!(e.contains("1024 << 4294967295"), "{e}");
        let e = check_geometry(&superblock(2, 4, 1, 0), tib).unwrap_err();
        assert!(e.contains("4 blocks per group"), "{e}");
    }
}
