//! Writes files and trees read from a [`Volume`] under a target directory.
//!
//! Safety on the host comes from never resolving a path: every object is created relative to an
//! open handle of its parent directory, by a single name that was checked to be a plain name (no
//! `/`, NUL, `.` or `..`), with `O_NOFOLLOW` and create-only flags. A symlink in the backup is
//! created as a symlink and never opened, so nothing is ever written through one; an existing
//! file or directory of the same name stops the extraction instead of being reused.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};
use serde::Serialize;

use crate::volume::{display_path, Entry, EntryKind, Volume};
use crate::{Error, Result};

/// Entries of one directory extracted at most.
const MAX_DIR_ENTRIES: u64 = 1_000_000;

#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// Objects (files, directories, links) extracted at most; a tree with more is an error.
    pub max_entries: u64,
    /// Directory depth below the extracted path at most (a directory loop in a damaged file
    /// system ends here).
    pub max_depth: usize,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        Self {
            max_entries: 10_000_000,
            max_depth: 256,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ExtractReport {
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub bytes: u64,
    /// Objects not extracted, with the reason (the first 1000).
    pub skipped: Vec<String>,
    pub skipped_total: u64,
}

impl ExtractReport {
    fn skip(&mut self, path: &[Vec<u8>], why: &str) {
        self.skipped_total += 1;
        if self.skipped.len() < 1000 {
            self.skipped.push(format!("{}: {why}", display_path(path)));
        }
    }
}

enum Work {
    Visit {
        path: Vec<Vec<u8>>,
        parent: Arc<OwnedFd>,
        entry: Entry,
        depth: usize,
    },
    /// Set a directory's permissions and times once its contents are written (writing them
    /// changes its modification time).
    Finish { dir: Arc<OwnedFd>, entry: Entry },
}

fn out_err(path: &Path, e: impl Into<std::io::Error>) -> Error {
    Error::Output {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// Why `name` cannot be created as one directory entry, if it cannot.
fn bad_name(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() || name == b"." || name == b".." {
        Some("not a usable file name")
    } else if name.contains(&b'/') || name.contains(&0) {
        Some("its name holds '/' or NUL")
    } else {
        None
    }
}

fn timestamps(e: &Entry) -> Timestamps {
    let t = |v: Option<(i64, u32)>| match v {
        Some((s, n)) => Timespec {
            tv_sec: s,
            tv_nsec: n as _,
        },
        None => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT as _,
        },
    };
    Timestamps {
        last_access: t(e.atime.or(e.mtime)),
        last_modification: t(e.mtime),
    }
}

/// Permission bits to give an extracted object: the file system's own (ext4) without set-id and
/// sticky bits, else a default by kind (NTFS read-only files lose their write bits).
fn mode_of(e: &Entry) -> Mode {
    let bits = match e.mode {
        Some(m) => m & 0o777,
        None if e.kind == EntryKind::Dir => 0o755,
        None if e.attributes.iter().any(|a| a == "readonly") => 0o444,
        None => 0o644,
    };
    Mode::from_raw_mode(bits as _)
}

/// Extracts `src` (a file, link or directory tree of `vol`) into the directory `to`, created if
/// missing. The root of a file system is extracted as its contents; anything else keeps its
/// name.
pub fn extract(
    vol: &mut dyn Volume,
    src: &[Vec<u8>],
    to: &Path,
    opts: &ExtractOptions,
) -> Result<ExtractReport> {
    std::fs::create_dir_all(to).map_err(|e| out_err(to, e))?;
    let root = Arc::new(
        rustix::fs::open(
            to,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| out_err(to, e))?,
    );
    let mut report = ExtractReport::default();
    let top = vol.stat(src)?;
    let mut stack = Vec::new();
    if src.is_empty() {
        // The root: its contents go straight into `to`.
        list_into(vol, src, root, 0, opts, &mut stack)?;
    } else {
        stack.push(Work::Visit {
            path: src.to_vec(),
            parent: root,
            entry: top,
            depth: 0,
        });
    }
    let mut seen = 0u64;
    while let Some(w) = stack.pop() {
        match w {
            Work::Finish { dir, entry } => {
                rustix::fs::fchmod(&*dir, mode_of(&entry)).map_err(|e| out_err(to, e))?;
                rustix::fs::futimens(&*dir, &timestamps(&entry)).map_err(|e| out_err(to, e))?;
            }
            Work::Visit {
                path,
                parent,
                entry,
                depth,
            } => {
                seen += 1;
                if seen > opts.max_entries {
                    return Err(Error::Limit(format!(
                        "{} holds more than {} objects; extract a smaller part of it",
                        display_path(src),
                        opts.max_entries
                    )));
                }
                let name = path.last().expect("a visited path has a name").clone();
                let shown = to.join(&display_path(&path)[1..]);
                if let Some(why) = bad_name(&name) {
                    report.skip(&path, why);
                    continue;
                }
                let name = {
                    use std::os::unix::ffi::OsStringExt;
                    std::ffi::OsString::from_vec(name)
                };
                match entry.kind {
                    EntryKind::Dir => {
                        if depth >= opts.max_depth {
                            return Err(Error::Limit(format!(
                                "{} lies more than {} directories deep (a directory loop?)",
                                display_path(&path),
                                opts.max_depth
                            )));
                        }
                        rustix::fs::mkdirat(&*parent, &name, Mode::from_raw_mode(0o700))
                            .map_err(|e| exists_or(&shown, e))?;
                        let dir = Arc::new(
                            rustix::fs::openat(
                                &*parent,
                                &name,
                                OFlags::DIRECTORY
                                    | OFlags::NOFOLLOW
                                    | OFlags::RDONLY
                                    | OFlags::CLOEXEC,
                                Mode::empty(),
                            )
                            .map_err(|e| out_err(&shown, e))?,
                        );
                        report.directories += 1;
                        stack.push(Work::Finish {
                            dir: dir.clone(),
                            entry,
                        });
                        list_into(vol, &path, dir, depth + 1, opts, &mut stack)?;
                    }
                    EntryKind::File => {
                        let fd = rustix::fs::openat(
                            &*parent,
                            &name,
                            OFlags::WRONLY
                                | OFlags::CREATE
                                | OFlags::EXCL
                                | OFlags::NOFOLLOW
                                | OFlags::CLOEXEC,
                            Mode::from_raw_mode(0o600),
                        )
                        .map_err(|e| exists_or(&shown, e))?;
                        let file = File::from(fd);
                        let size = write_file(vol, &path, &file, &shown)?;
                        rustix::fs::fchmod(&file, mode_of(&entry))
                            .map_err(|e| out_err(&shown, e))?;
                        rustix::fs::futimens(&file, &timestamps(&entry))
                            .map_err(|e| out_err(&shown, e))?;
                        report.files += 1;
                        report.bytes += size;
                    }
                    EntryKind::Symlink => {
                        let target = match vol.read_link(&path) {
                            Ok(t) => t,
                            Err(e) => {
                                report.skip(&path, &format!("its link target cannot be read: {e}"));
                                continue;
                            }
                        };
                        if target.is_empty() || target.contains(&0) {
                            report.skip(&path, "its link target is empty or holds NUL");
                            continue;
                        }
                        rustix::fs::symlinkat(target.as_slice(), &*parent, &name)
                            .map_err(|e| exists_or(&shown, e))?;
                        rustix::fs::utimensat(
                            &*parent,
                            &name,
                            &timestamps(&entry),
                            AtFlags::SYMLINK_NOFOLLOW,
                        )
                        .map_err(|e| out_err(&shown, e))?;
                        report.symlinks += 1;
                    }
                    EntryKind::Other => report.skip(&path, "not a file, directory or symlink"),
                }
            }
        }
    }
    Ok(report)
}

fn exists_or(path: &Path, e: rustix::io::Errno) -> Error {
    if e == rustix::io::Errno::EXIST {
        Error::Exists {
            path: path.to_path_buf(),
        }
    } else {
        out_err(path, e)
    }
}

fn list_into(
    vol: &mut dyn Volume,
    path: &[Vec<u8>],
    dir: Arc<OwnedFd>,
    depth: usize,
    opts: &ExtractOptions,
    stack: &mut Vec<Work>,
) -> Result<()> {
    // One listing is held in memory at a time per directory being walked: bound it.
    let limit = opts.max_entries.min(MAX_DIR_ENTRIES) as usize;
    let listing = vol.list(path, limit)?;
    if listing.truncated {
        return Err(Error::Limit(format!(
            "{} holds more than {limit} entries",
            display_path(path)
        )));
    }
    for entry in listing.entries.into_iter().rev() {
        let mut child = path.to_vec();
        child.push(entry.raw_name.clone());
        stack.push(Work::Visit {
            path: child,
            parent: dir.clone(),
            entry,
            depth,
        });
    }
    Ok(())
}

/// Copies one file's data; all-zero pieces are left as holes (the size is set at the end).
fn write_file(vol: &mut dyn Volume, path: &[Vec<u8>], file: &File, shown: &Path) -> Result<u64> {
    let size = vol.open_listed(path)?.read(1 << 20, &mut |off, data| {
        // Write runs of 4 KiB blocks that hold data; all-zero blocks stay holes.
        let mut run: Option<usize> = None;
        for (i, b) in data.chunks(4096).enumerate() {
            let zero = b.iter().all(|x| *x == 0);
            match (zero, run) {
                (false, None) => run = Some(i * 4096),
                (true, Some(start)) => {
                    file.write_all_at(&data[start..i * 4096], off + start as u64)
                        .map_err(|e| out_err(shown, e))?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run {
            file.write_all_at(&data[start..], off + start as u64)
                .map_err(|e| out_err(shown, e))?;
        }
        Ok(())
    })?;
    file.set_len(size).map_err(|e| out_err(shown, e))?;
    Ok(size)
}
