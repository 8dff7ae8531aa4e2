//! Hydration: copies a mounted restore point into a local raw file in the background, taking
//! the chunks the guest reads first, so the machine can later run from local storage alone.
//!
//! The copy is written to `FILE.part` and renamed to `FILE` once every chunk is durable, so a
//! file under the final name is always complete. Zero chunks stay holes of the sparse file.
//!
//! A stopped hydration resumes: every couple of seconds the part file is synced and the chunks
//! known to be in it are recorded in `FILE.part.done` (a header naming the point, disk and
//! layout, then one bit per chunk, replaced atomically). The record is taken before the sync, so
//! it never names a chunk that is not durable; the next mount with the same `--hydrate-to` copies
//! only the rest.
//!
//! A failed sync of the part file ends the hydration: Linux reports a failed write-back once and
//! leaves the pages clean, so the next sync would succeed without the lost chunks on disk. From
//! then on nothing is recorded, the copy stops and the part is never renamed or merged into;
//! the next mount resumes from the last record, which only names chunks synced before.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use tokio::sync::mpsc;

use crate::mounted::MountedDisk;
use crate::random_read::RandomReader;
use crate::{Error, Result};

/// Progress of one hydration, readable while it runs.
#[derive(Debug)]
pub struct Hydration {
    path: PathBuf,
    total: u64,
    done: AtomicU64,
    resumed: u64,
    complete: AtomicBool,
    error: Mutex<Option<String>>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HydrationStatus {
    pub path: PathBuf,
    pub bytes_total: u64,
    pub bytes_done: u64,
    /// Bytes found already copied by an earlier, stopped hydration of the same disk.
    pub bytes_resumed: u64,
    pub complete: bool,
    pub error: Option<String>,
}

impl Hydration {
    pub fn status(&self) -> HydrationStatus {
        HydrationStatus {
            path: self.path.clone(),
            bytes_total: self.total,
            bytes_done: self.done.load(Ordering::Relaxed),
            bytes_resumed: self.resumed,
            complete: self.complete.load(Ordering::Acquire),
            error: self
                .error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

struct Plan {
    claimed: Vec<bool>,
    next: u64,
}

/// How often the part file is synced and the record of copied chunks rewritten.
const JOURNAL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// How the part file is synced (`all`: `fsync`, else `fdatasync`); tests replace it to make a
/// sync fail.
type SyncFn = fn(&std::fs::File, bool) -> std::io::Result<()>;

fn real_sync(f: &std::fs::File, all: bool) -> std::io::Result<()> {
    if all {
        f.sync_all()
    } else {
        f.sync_data()
    }
}

/// The part file, synced only through `sync`, which makes a failure final (module comment).
struct PartFile {
    file: std::fs::File,
    path: PathBuf,
    sync_fn: SyncFn,
    /// Why a sync failed, once one has.
    lost: OnceLock<String>,
}

impl PartFile {
    fn sync(&self, all: bool) -> Result<()> {
        self.usable()?;
        (self.sync_fn)(&self.file, all).map_err(|e| {
            tracing::error!(path = %self.path.display(), error = %e, "syncing the hydration's part file failed; the hydration stops");
            let _ = self.lost.set(e.to_string());
            self.lost_error()
        })
    }

    fn usable(&self) -> Result<()> {
        match self.lost.get() {
            None => Ok(()),
            Some(_) => Err(self.lost_error()),
        }
    }

    fn lost_error(&self) -> Error {
        let why = self.lost.get().map(String::as_str).unwrap_or_default();
        Error::Output {
            path: self.path.clone(),
            source: std::io::Error::other(format!(
                "syncing the hydration's part file failed ({why}); chunks written since its last \
                 record may not be on disk, so nothing more is recorded and the hydration stops \
                 (the next mount resumes from the last record)"
            )),
        }
    }
}

/// The record of chunks durable in a part file (`FILE.part.done`).
struct Journal {
    path: PathBuf,
    header: String,
    /// The header once a merge of the overlay `merging=<overlay>` into the part file has begun:
    /// the part then holds some of that overlay's blocks, and is a copy of the point plus those
    /// writes, which only a mount of the same overlay may resume (its merge rewrites them all).
    /// `None` for a read-only mount, which must never take such a part as a copy of the point.
    merging: Option<String>,
    /// Set once the merge is recorded; held while the record is written, so that a progress
    /// record still being written when the copy ends can never replace the merge's.
    merge_recorded: Mutex<bool>,
}

impl Journal {
    fn new(part: &Path, reader: &RandomReader, overlay: Option<String>) -> Self {
        let d = reader.disk_reader();
        let header = format!(
            "blockvault hydration v1 point={} disk={} size={} chunk={}\n",
            d.point(),
            d.name(),
            reader.size(),
            reader.layout().chunk_size()
        );
        Self::with_header(part, header, overlay)
    }

    fn with_header(part: &Path, header: String, overlay: Option<String>) -> Self {
        Self {
            path: PathBuf::from(format!("{}.done", part.display())),
            merging: overlay.map(|o| format!("{} merging={o}\n", header.trim_end())),
            header,
            merge_recorded: Mutex::new(false),
        }
    }

    /// The chunks an earlier hydration of this very disk recorded, if its record is intact and
    /// its part file holds nothing but the point (or what this mount's overlay merges again).
    fn load(&self, count: usize) -> Option<Vec<bool>> {
        let bytes = std::fs::read(&self.path).ok()?;
        let bits = bytes.strip_prefix(self.header.as_bytes()).or_else(|| {
            self.merging
                .as_ref()
                .and_then(|m| bytes.strip_prefix(m.as_bytes()))
        })?;
        if bits.len() != count.div_ceil(8) {
            return None;
        }
        Some(
            (0..count)
                .map(|s| bits[s / 8] & (1 << (s % 8)) != 0)
                .collect(),
        )
    }

    /// Replaces the record with `copied` (write to a temporary file, then rename).
    fn store(&self, copied: &[bool]) -> std::io::Result<()> {
        let recorded = self
            .merge_recorded
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *recorded {
            return Ok(());
        }
        self.store_as(&self.header, copied)
    }

    /// Records that every chunk is in and the overlay's merge begins.
    fn store_merging(&self, copied: &[bool]) -> std::io::Result<()> {
        let header = self.merging.as_ref().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a read-only mount merges nothing",
            )
        })?;
        let mut recorded = self
            .merge_recorded
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.store_as(header, copied)?;
        *recorded = true;
        Ok(())
    }

    fn store_as(&self, header: &str, copied: &[bool]) -> std::io::Result<()> {
        let mut out = header.as_bytes().to_vec();
        let mut bits = vec![0u8; copied.len().div_ceil(8)];
        for (s, _) in copied.iter().enumerate().filter(|(_, c)| **c) {
            bits[s / 8] |= 1 << (s % 8);
        }
        out.extend_from_slice(&bits);
        // Synced before the rename, so after a crash the record is the old one or the new one;
        // the directory after it, so that a merge record is durable before the merge writes the
        // guest's blocks into the part file (lost, a crash left a part file holding them under a
        // record that any mount resumes as a plain copy of the point).
        let tmp = PathBuf::from(format!("{}.tmp", self.path.display()));
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, &out)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        let dir = match self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(d) => d.to_owned(),
            None => PathBuf::from("."),
        };
        std::fs::File::open(dir)?.sync_all()
    }

    fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Starts hydrating `disk` into `path`; returns at once with the progress handle. A writable
/// disk's overlay is merged into the copy once every chunk is in it, and the disk is served from
/// `path` from then on (`MountedDisk::switch_to_local`), so the guest's writes, earlier and later,
/// all end up in the file.
pub fn start_hydration(
    disk: Arc<MountedDisk>,
    path: PathBuf,
    workers: usize,
) -> Result<Arc<Hydration>> {
    let reader = disk.reader().clone();
    if path.exists() {
        return Err(Error::Invalid(format!(
            "{} already exists (a finished hydration, perhaps in use by a VM); remove it or choose another path",
            path.display()
        )));
    }
    let count = reader.layout().chunk_count();
    let total = (0..count)
        .filter(|s| reader.is_allocated(*s))
        .map(|s| u64::from(reader.layout().chunk_len(s)))
        .sum();
    let part = PathBuf::from(format!("{}.part", path.display()));
    let overlay = disk.overlay().map(|o| o.identity());
    let journal = Arc::new(Journal::new(&part, &reader, overlay));
    let resumed_slots = part
        .is_file()
        .then(|| journal.load(count as usize))
        .flatten();
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&part)
        .map_err(werr(&part))?;
    let file = PartFile {
        file,
        path: part.clone(),
        sync_fn: real_sync,
        lost: OnceLock::new(),
    };
    // Locked before anything is changed: another mount hydrating into the same file keeps it.
    crate::exclusive::lock(&file.file, &part, "another hydration into this file")?;
    if resumed_slots.is_none() {
        file.file.set_len(0).map_err(werr(&part))?;
    }
    file.file.set_len(reader.size()).map_err(werr(&part))?;
    let file = Arc::new(file);
    let claimed = resumed_slots.unwrap_or_else(|| {
        journal.remove();
        vec![false; count as usize]
    });
    let resumed = (0..count)
        .filter(|&s| claimed[s as usize] && reader.is_allocated(s))
        .map(|s| u64::from(reader.layout().chunk_len(s)))
        .sum();
    if resumed > 0 {
        tracing::info!(path = %part.display(), bytes = resumed, "resuming hydration");
    }
    let h = Arc::new(Hydration {
        path: path.clone(),
        total,
        done: AtomicU64::new(resumed),
        resumed,
        complete: AtomicBool::new(false),
        error: Mutex::new(None),
    });
    let (tx, rx) = mpsc::channel(1024);
    reader.set_demand(tx);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let copied = Arc::new(Mutex::new(claimed.clone()));
    let plan = Arc::new(Mutex::new(Plan { claimed, next: 0 }));
    let recorder = tokio::spawn(record_progress(
        journal.clone(),
        file.clone(),
        copied.clone(),
    ));
    let h2 = h.clone();
    tokio::spawn(async move {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..workers.max(1) {
            let (reader, plan, rx, file, h, part, copied) = (
                reader.clone(),
                plan.clone(),
                rx.clone(),
                file.clone(),
                h2.clone(),
                part.clone(),
                copied.clone(),
            );
            set.spawn(async move {
                while let Some((slot, demanded)) = claim(&reader, &plan, &rx).await {
                    // After a failed sync nothing copied can be recorded: stop.
                    file.usable()?;
                    // Demanded chunks were just read by the guest and sit in the cache; the
                    // sequential sweep bypasses it so it never evicts the guest's working set.
                    let data = if demanded {
                        reader.chunk(slot).await
                    } else {
                        reader
                            .disk_reader()
                            .fetch_chunk(slot)
                            .await
                            .map(Option::unwrap_or_default)
                    }?;
                    let off = reader.layout().chunk_range(slot).start;
                    let (f, p) = (file.clone(), part.clone());
                    let n = data.len() as u64;
                    tokio::task::spawn_blocking(move || {
                        f.file
                            .write_all_at(&data, off)
                            .map_err(|source| Error::Output { path: p, source })
                    })
                    .await
                    .map_err(Error::task)??;
                    copied.lock().unwrap_or_else(PoisonError::into_inner)[slot as usize] = true;
                    h.done.fetch_add(n, Ordering::Relaxed);
                }
                Ok::<_, Error>(())
            });
        }
        let mut failed = None;
        while let Some(r) = set.join_next().await {
            match r.map_err(Error::task).and_then(|r| r) {
                Ok(()) => {}
                Err(e) => {
                    failed.get_or_insert(e);
                    set.abort_all();
                }
            }
        }
        recorder.abort();
        let finish = match failed {
            Some(e) => {
                // Keep what was copied for the next attempt.
                let (j, f, c) = (journal.clone(), file.clone(), copied.clone());
                let _ = tokio::task::spawn_blocking(move || record_once(&j, &f, &c)).await;
                Err(e)
            }
            None if disk.writable() => {
                // Every chunk is durable: record it, and that the merge begins, so that a stop
                // during the merge resumes straight into the merge with this overlay, and only
                // with it.
                let (j, f, c) = (journal.clone(), file.clone(), copied.clone());
                let recorded = tokio::task::spawn_blocking(move || -> Result<()> {
                    let snapshot = c.lock().unwrap_or_else(PoisonError::into_inner).clone();
                    f.sync(false)?;
                    j.store_merging(&snapshot).map_err(werr(&j.path))
                })
                .await
                .map_err(Error::task)
                .and_then(|r| r);
                match recorded {
                    Ok(()) => match disk.switch_to_local(&part, &path).await {
                        Ok(n) => {
                            journal.remove();
                            tracing::info!(path = %path.display(), bytes = n, "overlay merged into the hydrated file; serving from it");
                            Ok(())
                        }
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                }
            }
            None => {
                let (f, path) = (file.clone(), path.clone());
                tokio::task::spawn_blocking(move || finish_copy(&f, &journal, &path))
                    .await
                    .map_err(Error::task)
                    .and_then(|r| r)
            }
        };
        match finish {
            Ok(()) => {
                h2.complete.store(true, Ordering::Release);
                tracing::info!(path = %h2.path.display(), "hydration complete");
            }
            Err(e) => {
                tracing::warn!(error = %e, "hydration failed");
                *h2.error.lock().unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
            }
        }
    });
    Ok(h)
}

/// Renames a complete part file (every chunk copied) to `path`, once it is durable.
fn finish_copy(part: &PartFile, journal: &Journal, path: &Path) -> Result<()> {
    part.sync(true)?;
    crate::exclusive::rename_no_replace(&part.path, path).map_err(werr(path))?;
    journal.remove();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(werr(dir))?;
    }
    Ok(())
}

/// Every `JOURNAL_INTERVAL`, makes the chunks copied so far durable and records them; ends
/// after a failed sync of the part file, which nothing later can make good.
async fn record_progress(
    journal: Arc<Journal>,
    file: Arc<PartFile>,
    copied: Arc<Mutex<Vec<bool>>>,
) {
    let mut tick = tokio::time::interval(JOURNAL_INTERVAL);
    tick.tick().await;
    loop {
        tick.tick().await;
        let (j, f, c) = (journal.clone(), file.clone(), copied.clone());
        match tokio::task::spawn_blocking(move || record_once(&j, &f, &c)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) if file.usable().is_err() => return,
            Ok(Err(e)) => tracing::debug!("hydration record {}: {e}", journal.path.display()),
            Err(_) => return,
        }
    }
}

/// Takes the set of written chunks, then syncs the file, then records the set: every chunk the
/// record names was written before the sync and is therefore durable.
fn record_once(journal: &Journal, file: &PartFile, copied: &Mutex<Vec<bool>>) -> Result<()> {
    let snapshot = copied
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    file.sync(false)?;
    journal.store(&snapshot).map_err(werr(&journal.path))
}

fn werr(p: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let p = p.to_owned();
    move |source| Error::Output { path: p, source }
}

/// The next chunk to copy: one the guest asked for, else the next in disk order.
async fn claim(
    reader: &RandomReader,
    plan: &Mutex<Plan>,
    rx: &tokio::sync::Mutex<mpsc::Receiver<u64>>,
) -> Option<(u64, bool)> {
    loop {
        let demanded = rx.lock().await.try_recv().ok();
        let mut p = plan.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = demanded {
            if let Some(c) = p.claimed.get_mut(s as usize).filter(|c| !**c) {
                *c = true;
                return Some((s, true));
            }
            continue;
        }
        while p.next < p.claimed.len() as u64 {
            let s = p.next;
            p.next += 1;
            if reader.is_allocated(s) && !p.claimed[s as usize] {
                p.claimed[s as usize] = true;
                return Some((s, false));
            }
        }
        return None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Succeeds, fails, then succeeds for good: a sync after a lost write-back, as Linux's.
    fn second_sync_fails(f: &std::fs::File, all: bool) -> std::io::Result<()> {
        static CALLS: AtomicU64 = AtomicU64::new(0);
        if CALLS.fetch_add(1, Ordering::SeqCst) == 1 {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        real_sync(f, all)
    }

    #[test]
    fn after_a_failed_sync_nothing_is_recorded_and_the_part_is_never_renamed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let part_path = dir.path().join("disk.raw.part");
        let part = PartFile {
            file: std::fs::File::create(&part_path).unwrap(),
            path: part_path.clone(),
            sync_fn: second_sync_fails,
            lost: OnceLock::new(),
        };
        let journal = Journal::with_header(&part_path, "test header\n".into(), None);
        let copied = Mutex::new(vec![false; 8]);
        let copy = |slot: usize| {
            part.file
                .write_all_at(&[slot as u8 + 1], slot as u64)
                .unwrap();
            copied.lock().unwrap()[slot] = true;
        };
        copy(0);
        record_once(&journal, &part, &copied).unwrap();
        assert_eq!(journal.load(8).unwrap()[..2], [true, false]);
        copy(1);
        let e = record_once(&journal, &part, &copied)
            .unwrap_err()
            .to_string();
        assert!(e.contains("disk.raw.part") && e.contains("resumes"), "{e}");
        // The next sync succeeds, but chunk 1's write-back may be what was lost.
        copy(2);
        assert!(record_once(&journal, &part, &copied).is_err());
        assert_eq!(journal.load(8).unwrap()[..3], [true, false, false]);
        copy(3);
        let e = finish_copy(&part, &journal, &path).unwrap_err().to_string();
        assert!(e.contains("may not be on disk"), "{e}");
        assert!(!path.exists() && part_path.exists());
        assert_eq!(journal.load(8).unwrap()[..4], [true, false, false, false]);
    }
}
