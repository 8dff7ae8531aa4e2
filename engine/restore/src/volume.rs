//! One readable file system, whatever it is: listing, metadata, reading files and links. Paths are
//! lists of name components (raw bytes; NTFS names are converted from UTF-16 to UTF-8).

use std::sync::Arc;

use serde::Serialize;

use crate::detect::FsKind;
use crate::device::{ReadAt, Window};
use crate::partitions::PartitionTable;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// Devices, fifos, sockets, NTFS reparse points other than links: listed, never extracted.
    Other,
}

/// One directory entry with what the file system records about it.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// The name for display (lossy for names that are not UTF-8).
    pub name: String,
    #[serde(skip)]
    pub raw_name: Vec<u8>,
    pub kind: EntryKind,
    pub size: u64,
    /// Modification, access, and (where recorded) creation time: seconds and nanoseconds since
    /// 1970-01-01 UTC.
    pub mtime: Option<(i64, u32)>,
    pub atime: Option<(i64, u32)>,
    pub crtime: Option<(i64, u32)>,
    /// Unix permission bits (ext4 only).
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// NTFS file attribute flags (read-only, hidden, system, compressed ...), as names.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attributes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub entries: Vec<Entry>,
    /// True when the directory has more entries than the limit asked for.
    pub truncated: bool,
}

/// A file system opened for reading.
pub trait Volume {
    fn kind(&self) -> FsKind;
    /// Metadata of the object at `path` (the root for an empty path).
    fn stat(&mut self, path: &[Vec<u8>]) -> Result<Entry>;
    /// At most `limit` entries of the directory at `path`, without `.` and `..`.
    fn list(&mut self, path: &[Vec<u8>], limit: usize) -> Result<Listing>;
    /// Where the symbolic link at `path` points.
    fn read_link(&mut self, path: &[Vec<u8>]) -> Result<Vec<u8>>;
    /// Reads the regular file at `path` in pieces of at most `piece` bytes, handing each to `out`
    /// with its offset; returns the file's size. Holes may be skipped (never handed out).
    fn read_file(
        &mut self,
        path: &[Vec<u8>],
        piece: usize,
        out: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<u64>;
    /// Opens for reading a path that a listing of this volume just gave as a regular file (a
    /// walk of directory entries, never through a symbolic link): a volume may skip checking it
    /// again.
    fn open_listed(&mut self, path: &[Vec<u8>]) -> Result<Box<dyn OpenFile + '_>> {
        Ok(Box::new(ByPath {
            vol: self,
            path: path.to_vec(),
        }))
    }
    /// Makes, on another thread, more openers of listed files of this volume, where it can.
    fn listed_files_maker(&self) -> Option<ListedFilesMaker> {
        None
    }
}

/// A regular file opened for reading.
pub trait OpenFile {
    /// The same for every name of one file (its inode number), where the file system tells.
    fn id(&self) -> Option<u64>;
    /// Reads the file from its start in pieces of at most `piece` bytes, handing each to `out`
    /// with its offset; returns the file's size. Holes may be skipped (never handed out).
    fn read(&mut self, piece: usize, out: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<u64>;
}

/// Opens files that a listing of a volume gave as regular (see [`Volume::open_listed`]).
pub trait ListedFiles {
    fn open_listed(&mut self, path: &[Vec<u8>]) -> Result<Box<dyn OpenFile + '_>>;
}

/// Makes a [`ListedFiles`] of a volume; called on the thread that uses it.
pub type ListedFilesMaker = Arc<dyn Fn() -> Result<Box<dyn ListedFiles>> + Send + Sync>;

/// A file read through [`Volume::read_file`] (no identity).
struct ByPath<'a, V: ?Sized> {
    vol: &'a mut V,
    path: Vec<Vec<u8>>,
}

impl<V: Volume + ?Sized> OpenFile for ByPath<'_, V> {
    fn id(&self) -> Option<u64> {
        None
    }

    fn read(&mut self, piece: usize, out: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<u64> {
        self.vol.read_file(&self.path, piece, out)
    }
}

/// A parsed `[pN:]/path` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// `p2`, or None when the path named no partition.
    pub partition: Option<String>,
    pub path: Vec<Vec<u8>>,
}

/// Splits `p2:/Users/ann` into the partition and path components. `.` components are dropped;
/// `..` is refused (paths inside a backup are always absolute and plain).
pub fn parse_location(s: &str) -> Result<Location> {
    let (partition, rest) = match s.split_once(':') {
        Some((p, r))
            if p == "disk"
                || (p.len() > 1
                    && p.starts_with('p')
                    && p[1..].bytes().all(|b| b.is_ascii_digit())) =>
        {
            (Some(p.to_string()), r)
        }
        _ => (None, s),
    };
    Ok(Location {
        partition,
        path: split_path(rest)?,
    })
}

/// `/a/b/c` (or `a\b\c`) into components.
pub fn split_path(p: &str) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for c in p.split(['/', '\\']) {
        match c {
            "" | "." => {}
            ".." => {
                return Err(Error::Invalid(format!(
                    "{p}: '..' is not allowed in a path inside the backup"
                )))
            }
            c => out.push(c.as_bytes().to_vec()),
        }
    }
    Ok(out)
}

pub(crate) fn display_path(path: &[Vec<u8>]) -> String {
    let mut s = String::new();
    for c in path {
        s.push('/');
        s.push_str(&String::from_utf8_lossy(c));
    }
    if s.is_empty() {
        s.push('/');
    }
    s
}

/// Opens the file system of the partition named `selector` (`p2`, or `disk`/None for a
/// whole-disk file system or a disk with a single readable partition).
pub fn open_volume(
    dev: &Arc<dyn ReadAt>,
    table: &PartitionTable,
    selector: &str,
) -> Result<Box<dyn Volume>> {
    let p = table
        .partitions
        .iter()
        .find(|p| p.selector() == selector)
        .ok_or_else(|| Error::NoSuchPartition {
            wanted: selector.to_string(),
            available: if table.partitions.is_empty() {
                "no partitions".into()
            } else {
                table
                    .partitions
                    .iter()
                    .map(|p| format!("{} ({})", p.selector(), p.filesystem))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })?;
    let what = if p.index == 0 {
        "the disk".to_string()
    } else {
        format!("partition {}", p.selector())
    };
    if let Some(problem) = &p.problem {
        return Err(Error::Corrupt {
            what,
            detail: problem.clone(),
        });
    }
    let w = Window::new(dev.clone(), p.start, p.size);
    match &p.filesystem {
        FsKind::Ntfs => Ok(Box::new(crate::ntfsfs::NtfsVolume::open(w, &what)?)),
        FsKind::Ext4 => Ok(Box::new(crate::ext4fs::Ext4Volume::open(w, &what)?)),
        other => Err(Error::Unsupported {
            what,
            found: other.name(),
        }),
    }
}
