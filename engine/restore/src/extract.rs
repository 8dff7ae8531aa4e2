//! Writes files and trees read from a [`Volume`] under a target directory.
//!
//! Safety on the host comes from never resolving a path: every object is created relative to an
//! open handle of its parent directory, by a single name that was checked to be a plain name (no
//! `/`, NUL, `.` or `..`), with `O_NOFOLLOW` and create-only flags. A symlink in the backup is
//! created as a symlink and never opened, so nothing is ever written through one; an existing
//! file or directory of the same name stops the extraction instead of being reused. The one
//! lookup by path, of the first name of a hard-linked file, is confined below the target
//! (`RESOLVE_BENEATH`) and refuses symlinks, and what it links is checked to be the file this
//! extraction wrote.
//!
//! The calling thread walks the tree (directories, symlinks) and hands regular files to worker
//! threads where the volume can open files on other threads; a directory gets its permissions
//! and times when the last of its entries is written.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use serde::Serialize;

use crate::volume::{display_path, Entry, EntryKind, ListedFiles, OpenFile, Volume};
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
    /// Threads writing regular files beside the one walking the tree (0: the walking thread
    /// writes them), where the volume allows.
    pub threads: usize,
    /// Memory the objects listed but not yet extracted may hold (their paths and names): a
    /// directory loop through wide directories piles up millions of them, each with a path
    /// hundreds of names long, before the depth limit ends it. The default takes a directory of
    /// the largest size extracted (a million entries).
    pub max_pending_bytes: usize,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        Self {
            max_entries: 10_000_000,
            max_depth: 256,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
            max_pending_bytes: 1 << 30,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ExtractReport {
    /// Regular files, hard links among them.
    pub files: u64,
    /// Files extracted as a hard link of another name of the same file (an inode with several
    /// names in the extracted tree).
    pub hard_links: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub bytes: u64,
    /// Objects not extracted, with the reason (the first 1000).
    pub skipped: Vec<String>,
    pub skipped_total: u64,
    /// Files inside the tree whose content the reader refuses (an EFS-encrypted NTFS file, an
    /// ext4 file with preallocated extents), with the reason (the first 1000). The rest of the
    /// tree is extracted; the caller reports the extraction as incomplete.
    pub refused: Vec<String>,
    pub refused_total: u64,
}

impl ExtractReport {
    fn skip(&mut self, path: &[Vec<u8>], why: &str) {
        self.skipped_total += 1;
        if self.skipped.len() < 1000 {
            self.skipped.push(format!("{}: {why}", display_path(path)));
        }
    }
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

/// A directory created on the host, open; its permissions and times are set when the last
/// reference goes, after everything in it is written (writing changes its modification time).
struct HostDir {
    fd: OwnedFd,
    finish: Option<(Entry, PathBuf)>,
    shared: Arc<Shared>,
}

impl Drop for HostDir {
    fn drop(&mut self) {
        if let Some((entry, shown)) = self.finish.take() {
            let r = rustix::fs::fchmod(&self.fd, mode_of(&entry))
                .and_then(|()| rustix::fs::futimens(&self.fd, &timestamps(&entry)));
            if let Err(e) = r {
                self.shared.fail(out_err(&shown, e));
            }
        }
    }
}

/// What the walking thread and the file writers share.
struct Shared {
    /// The target directory.
    root: OwnedFd,
    /// Components of a backup path before its name on the host (the extracted path's parent).
    skip: usize,
    /// Components of the path asked for: a file with more is inside the tree extracted.
    asked: usize,
    /// The first error; every thread stops at it.
    error: Mutex<Option<Error>>,
    stop: AtomicBool,
    /// Files seen, by their identity on the volume (inode), for hard links.
    names: Mutex<HashMap<u64, FirstName>>,
    named: Condvar,
    /// Threads waiting on `named`, changed only with `names` locked: most files have one name,
    /// and waking nobody still costs a system call per file.
    waiting: AtomicUsize,
}

enum FirstName {
    /// Being created by another thread.
    Creating,
    /// Written at this path below the target, as this host file.
    Created { rel: Vec<u8>, dev: u64, ino: u64 },
    /// Could not be made: later names are copies.
    Failed,
}

impl Shared {
    fn fail(&self, e: Error) {
        let mut g = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(e);
        }
        self.stop.store(true, Ordering::Relaxed);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn set_name(&self, id: u64, n: FirstName) {
        let mut m = self.names.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(id, n);
        if self.waiting.load(Ordering::Relaxed) > 0 {
            self.named.notify_all();
        }
    }
}

/// A regular file to write.
struct FileJob {
    path: Vec<Vec<u8>>,
    parent: Arc<HostDir>,
    name: OsString,
    entry: Entry,
    shown: PathBuf,
}

#[derive(Default)]
struct Counts {
    files: u64,
    hard_links: u64,
    bytes: u64,
    refused: Vec<String>,
    refused_total: u64,
}

impl Counts {
    fn refuse(&mut self, path: &[Vec<u8>], e: &Error) {
        self.refused_total += 1;
        if self.refused.len() < 1000 {
            self.refused.push(format!("{}: {e}", display_path(path)));
        }
    }
}

/// The walking thread's opener of listed files.
struct Inline<'a>(&'a mut dyn Volume);

impl ListedFiles for Inline<'_> {
    fn open_listed(&mut self, path: &[Vec<u8>]) -> Result<Box<dyn OpenFile + '_>> {
        self.0.open_listed(path)
    }
}

/// Files queued for the writers at most (each holds its directory open).
const QUEUE: usize = 64;

/// Extracts `src` (a file, link or directory tree of `vol`) into the directory `to`, created if
/// missing. The root of a file system is extracted as its contents; anything else keeps its
/// name. Names of one file (hard links) inside the tree become hard links of one another where
/// the target allows, copies otherwise.
pub fn extract(
    vol: &mut dyn Volume,
    src: &[Vec<u8>],
    to: &Path,
    opts: &ExtractOptions,
) -> Result<ExtractReport> {
    std::fs::create_dir_all(to).map_err(|e| out_err(to, e))?;
    let open_root = || {
        rustix::fs::open(
            to,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| out_err(to, e))
    };
    let root_fd = open_root()?;
    let shared = Arc::new(Shared {
        root: open_root()?,
        skip: src.len().saturating_sub(1),
        asked: src.len(),
        error: Mutex::new(None),
        stop: AtomicBool::new(false),
        names: Mutex::new(HashMap::new()),
        named: Condvar::new(),
        waiting: AtomicUsize::new(0),
    });
    let root = Arc::new(HostDir {
        fd: root_fd,
        finish: None,
        shared: shared.clone(),
    });
    let top = vol.stat(src)?;
    let maker = if opts.threads > 0 {
        vol.listed_files_maker()
    } else {
        None
    };
    let mut report = ExtractReport::default();
    let walk_with =
        |report: &mut ExtractReport,
         file: &mut dyn FnMut(FileJob, &mut dyn Volume) -> Result<()>| {
            walk(vol, src, to, top, root, opts, &shared, report, file)
        };
    let walked = match maker {
        None => {
            let mut counts = Counts::default();
            let r = walk_with(&mut report, &mut |job, vol| {
                put_file(&mut Inline(vol), job, &shared, &mut counts)
            });
            add(&mut report, &counts);
            r
        }
        Some(maker) => std::thread::scope(|s| {
            let (tx, rx) = mpsc::sync_channel::<FileJob>(QUEUE);
            let rx = Arc::new(Mutex::new(rx));
            let workers: Vec<_> = (0..opts.threads)
                .map(|_| {
                    let (maker, rx, shared) = (maker.clone(), rx.clone(), shared.clone());
                    s.spawn(move || {
                        let mut counts = Counts::default();
                        let mut files = match maker() {
                            Ok(f) => Some(f),
                            Err(e) => {
                                shared.fail(e);
                                None
                            }
                        };
                        loop {
                            let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                            let Ok(job) = job else { break };
                            if shared.stopped() {
                                continue;
                            }
                            if let Some(f) = files.as_mut() {
                                if let Err(e) = put_file(f.as_mut(), job, &shared, &mut counts) {
                                    shared.fail(e);
                                }
                            }
                        }
                        counts
                    })
                })
                .collect();
            let r = walk_with(&mut report, &mut |job, _| {
                tx.send(job)
                    .map_err(|_| Error::Invalid("the file writers stopped".into()))
            });
            drop(tx);
            for w in workers {
                match w.join() {
                    Ok(c) => add(&mut report, &c),
                    Err(p) => std::panic::resume_unwind(p),
                }
            }
            r
        }),
    };
    walked?;
    if let Some(e) = shared
        .error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        return Err(e);
    }
    Ok(report)
}

fn add(r: &mut ExtractReport, c: &Counts) {
    r.files += c.files;
    r.hard_links += c.hard_links;
    r.bytes += c.bytes;
    r.refused_total += c.refused_total;
    for x in &c.refused {
        if r.refused.len() < 1000 {
            r.refused.push(x.clone());
        }
    }
}

struct Visit {
    path: Vec<Vec<u8>>,
    parent: Arc<HostDir>,
    entry: Entry,
    depth: usize,
}

impl Visit {
    /// Memory its path and names hold, roughly.
    fn bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.path.iter().map(|c| c.len() + 24).sum::<usize>()
            + self.entry.name.len()
            + self.entry.raw_name.len()
    }
}

/// Visits to make, depth first, with what they hold.
#[derive(Default)]
struct Pending {
    visits: Vec<Visit>,
    bytes: usize,
}

impl Pending {
    fn push(&mut self, v: Visit) {
        self.bytes += v.bytes();
        self.visits.push(v);
    }

    fn pop(&mut self) -> Option<Visit> {
        let v = self.visits.pop()?;
        self.bytes -= v.bytes();
        Some(v)
    }
}

/// Walks the tree under `src` depth first, listing through `vol`: creates directories and
/// symlinks, and hands each regular file to `file` with the same volume (the walking thread
/// reads and writes it there, or hands it to a writer thread).
#[allow(clippy::too_many_arguments)]
fn walk(
    vol: &mut dyn Volume,
    src: &[Vec<u8>],
    to: &Path,
    top: Entry,
    root: Arc<HostDir>,
    opts: &ExtractOptions,
    shared: &Arc<Shared>,
    report: &mut ExtractReport,
    file: &mut dyn FnMut(FileJob, &mut dyn Volume) -> Result<()>,
) -> Result<()> {
    let mut stack = Pending::default();
    if src.is_empty() {
        // The root: its contents go straight into `to`.
        list_into(vol, src, root, 0, opts, &mut stack)?;
    } else {
        stack.push(Visit {
            path: src.to_vec(),
            parent: root,
            entry: top,
            depth: 0,
        });
    }
    let mut seen = 0u64;
    while let Some(Visit {
        path,
        parent,
        entry,
        depth,
    }) = stack.pop()
    {
        if shared.stopped() {
            break;
        }
        seen += 1;
        if seen + stack.visits.len() as u64 > opts.max_entries {
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
        let name = OsString::from_vec(name);
        match entry.kind {
            EntryKind::Dir => {
                if depth >= opts.max_depth {
                    return Err(Error::Limit(format!(
                        "{} lies more than {} directories deep (a directory loop?)",
                        display_path(&path),
                        opts.max_depth
                    )));
                }
                rustix::fs::mkdirat(&parent.fd, &name, Mode::from_raw_mode(0o700))
                    .map_err(|e| exists_or(&shown, e))?;
                let fd = rustix::fs::openat(
                    &parent.fd,
                    &name,
                    OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| out_err(&shown, e))?;
                report.directories += 1;
                let dir = Arc::new(HostDir {
                    fd,
                    finish: Some((entry, shown)),
                    shared: shared.clone(),
                });
                list_into(vol, &path, dir, depth + 1, opts, &mut stack)?;
            }
            EntryKind::File => file(
                FileJob {
                    path,
                    parent,
                    name,
                    entry,
                    shown,
                },
                vol,
            )?,
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
                rustix::fs::symlinkat(target.as_slice(), &parent.fd, &name)
                    .map_err(|e| exists_or(&shown, e))?;
                rustix::fs::utimensat(
                    &parent.fd,
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
    Ok(())
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
    dir: Arc<HostDir>,
    depth: usize,
    opts: &ExtractOptions,
    stack: &mut Pending,
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
        stack.push(Visit {
            path: child,
            parent: dir.clone(),
            entry,
            depth,
        });
    }
    if stack.visits.len() as u64 > opts.max_entries || stack.bytes > opts.max_pending_bytes {
        return Err(Error::Limit(format!(
            "{} and the directories above it hold more objects waiting to be extracted than \
             this extraction takes ({} of them, {} MiB of names; a directory loop?); extract a \
             smaller part of it",
            display_path(path),
            stack.visits.len(),
            stack.bytes >> 20
        )));
    }
    Ok(())
}

/// Writes one regular file: a hard link of a name of the same file written before, where the
/// volume tells which names are one file and the target allows, else a copy of its data.
fn put_file(
    files: &mut dyn ListedFiles,
    job: FileJob,
    shared: &Shared,
    counts: &mut Counts,
) -> Result<()> {
    let mut f = match files.open_listed(&job.path) {
        Ok(f) => f,
        // A file inside the tree this reader will not read: left out and named, so that one
        // encrypted or preallocated file does not cost the rest of the tree. The file named
        // on the command line itself is an error.
        Err(e @ Error::Unsupported { .. }) if job.path.len() > shared.asked => {
            counts.refuse(&job.path, &e);
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let id = f.id();
    let mut first = false;
    if let Some(id) = id {
        let mut m = shared.names.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match m.get(&id) {
                None => {
                    m.insert(id, FirstName::Creating);
                    first = true;
                    break;
                }
                Some(FirstName::Creating) => {
                    shared.waiting.fetch_add(1, Ordering::Relaxed);
                    m = shared.named.wait(m).unwrap_or_else(|p| p.into_inner());
                    shared.waiting.fetch_sub(1, Ordering::Relaxed);
                }
                Some(FirstName::Created { rel, dev, ino }) => {
                    let (rel, dev, ino) = (rel.clone(), *dev, *ino);
                    drop(m);
                    if link_to(shared, &rel, (dev, ino), &job)? {
                        counts.files += 1;
                        counts.hard_links += 1;
                        return Ok(());
                    }
                    break;
                }
                Some(FirstName::Failed) => break,
            }
        }
    }
    let created = rustix::fs::openat(
        &job.parent.fd,
        &job.name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| exists_or(&job.shown, e))
    .and_then(|fd| {
        let st = rustix::fs::fstat(&fd).map_err(|e| out_err(&job.shown, e))?;
        Ok((fd, st))
    });
    if let (true, Some(id)) = (first, id) {
        shared.set_name(
            id,
            match &created {
                Ok((_, st)) => FirstName::Created {
                    rel: host_rel(&job.path[shared.skip..]),
                    dev: st.st_dev,
                    ino: st.st_ino,
                },
                Err(_) => FirstName::Failed,
            },
        );
    }
    let file = File::from(created?.0);
    let size = match write_file(f.as_mut(), &file, &job.shown) {
        Ok(size) => size,
        // Refused once reading began (NTFS tells encrypted data by its attribute): the file
        // begun is removed, not left short under its name.
        Err(e @ Error::Unsupported { .. }) if job.path.len() > shared.asked => {
            drop(file);
            rustix::fs::unlinkat(&job.parent.fd, &job.name, AtFlags::empty())
                .map_err(|e| out_err(&job.shown, e))?;
            counts.refuse(&job.path, &e);
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    rustix::fs::fchmod(&file, mode_of(&job.entry)).map_err(|e| out_err(&job.shown, e))?;
    rustix::fs::futimens(&file, &timestamps(&job.entry)).map_err(|e| out_err(&job.shown, e))?;
    counts.files += 1;
    counts.bytes += size;
    Ok(())
}

/// `a/b/c` of host names below the target.
fn host_rel(path: &[Vec<u8>]) -> Vec<u8> {
    path.join(&b'/')
}

/// Makes `job` a hard link of the file written at `rel` (the host file `id`). False when that
/// cannot be done (another device, a file system without hard links, a renamed or removed first
/// name...): then the caller copies.
fn link_to(shared: &Shared, rel: &[u8], id: (u64, u64), job: &FileJob) -> Result<bool> {
    let (dir, name) = match rel.iter().rposition(|b| *b == b'/') {
        Some(i) => (Some(&rel[..i]), &rel[i + 1..]),
        None => (None, rel),
    };
    let opened;
    let dir_fd = match dir {
        None => shared.root.as_fd(),
        Some(d) => {
            match rustix::fs::openat2(
                &shared.root,
                d,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
            ) {
                Ok(fd) => {
                    opened = fd;
                    opened.as_fd()
                }
                Err(_) => return Ok(false),
            }
        }
    };
    match rustix::fs::linkat(dir_fd, name, &job.parent.fd, &job.name, AtFlags::empty()) {
        Ok(()) => {}
        Err(rustix::io::Errno::EXIST) => {
            return Err(Error::Exists {
                path: job.shown.clone(),
            })
        }
        Err(_) => return Ok(false),
    }
    // The name linked is the file written, unless something else changed the target meanwhile.
    match rustix::fs::statat(&job.parent.fd, &job.name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if (st.st_dev, st.st_ino) == id => Ok(true),
        _ => {
            rustix::fs::unlinkat(&job.parent.fd, &job.name, AtFlags::empty())
                .map_err(|e| out_err(&job.shown, e))?;
            Ok(false)
        }
    }
}

/// Copies one file's data; all-zero pieces are left as holes (the size is set at the end, where
/// the file ends in one).
fn write_file(f: &mut dyn OpenFile, file: &File, shown: &Path) -> Result<u64> {
    let mut written_to = 0u64;
    let size = f.read(1 << 20, &mut |off, data| {
        // Write runs of 4 KiB blocks that hold data; all-zero blocks stay holes.
        let mut run: Option<usize> = None;
        for (i, b) in data.chunks(4096).enumerate() {
            let zero = b.iter().all(|x| *x == 0);
            match (zero, run) {
                (false, None) => run = Some(i * 4096),
                (true, Some(start)) => {
                    file.write_all_at(&data[start..i * 4096], off + start as u64)
                        .map_err(|e| out_err(shown, e))?;
                    written_to = off + (i * 4096) as u64;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run {
            file.write_all_at(&data[start..], off + start as u64)
                .map_err(|e| out_err(shown, e))?;
            written_to = off + data.len() as u64;
        }
        Ok(())
    })?;
    if written_to != size {
        file.set_len(size).map_err(|e| out_err(shown, e))?;
    }
    Ok(size)
}
