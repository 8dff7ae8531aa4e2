//! A restore-point disk as a block device: backup reads merged under an optional copy-on-write
//! overlay. Every connection of an export shares one `MountedDisk`, so all see the same data.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::overlay::{BlockState, Overlay};
use crate::random_read::{RandomReader, Segment};
use crate::{Error, Result};

/// One `base:allocation` run: `zero` reads as zeroes, `hole` is not allocated anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRun {
    pub length: u64,
    pub hole: bool,
    pub zero: bool,
}

pub struct MountedDisk {
    reader: Arc<RandomReader>,
    overlay: Option<Overlay>,
    /// The hydrated local file once the overlay has been merged into it: from then on every read
    /// and write goes there. Requests hold the read side for their whole duration, so the switch
    /// (which takes the write side) sees no request half done.
    local: tokio::sync::RwLock<Option<Arc<LocalFile>>>,
}

/// A complete local copy of the disk, serving reads and writes after the switch-over.
pub struct LocalFile {
    file: std::fs::File,
    path: PathBuf,
}

impl LocalFile {
    fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| Error::Output {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            file,
            path: path.to_owned(),
        })
    }

    fn err(&self) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Output {
            path: self.path.clone(),
            source,
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(Error::task)?
}

/// Bytes of zeroes written at once by write-zeroes on the local file and by merges.
const ZERO_STEP: u64 = 1 << 20;

impl MountedDisk {
    pub fn new(reader: Arc<RandomReader>, overlay: Option<Overlay>) -> Result<Self> {
        if let Some(o) = &overlay {
            if o.size() != reader.size() {
                return Err(Error::Invalid(format!(
                    "overlay of {} bytes for a disk of {} bytes",
                    o.size(),
                    reader.size()
                )));
            }
        }
        Ok(Self {
            reader,
            overlay,
            local: tokio::sync::RwLock::new(None),
        })
    }

    /// A disk whose overlay was merged into `file` by an earlier mount: served from the file.
    pub fn new_local(reader: Arc<RandomReader>, overlay: Overlay, file: &Path) -> Result<Self> {
        let local = LocalFile::open(file)?;
        let len = local.file.metadata().map_err(local.err())?.len();
        if len != reader.size() {
            return Err(Error::Invalid(format!(
                "{} holds {len} bytes; the disk has {}",
                file.display(),
                reader.size()
            )));
        }
        let d = Self::new(reader, Some(overlay))?;
        *d.local.try_write().expect("not shared yet") = Some(Arc::new(local));
        Ok(d)
    }

    pub fn size(&self) -> u64 {
        self.reader.size()
    }

    pub fn writable(&self) -> bool {
        self.overlay.is_some()
    }

    pub fn reader(&self) -> &Arc<RandomReader> {
        &self.reader
    }

    pub fn overlay(&self) -> Option<&Overlay> {
        self.overlay.as_ref()
    }

    /// The local file the disk is served from, once switched over.
    pub fn local_path(&self) -> Option<PathBuf> {
        self.local
            .try_read()
            .ok()
            .and_then(|g| g.as_ref().map(|l| l.path.clone()))
    }

    pub async fn read_at(&self, offset: u64, len: u64) -> Result<Vec<Segment>> {
        let local = self.local.read().await;
        if let Some(l) = local.as_ref() {
            self.reader.check(offset, len)?;
            let l = l.clone();
            let buf = blocking(move || {
                let mut buf = vec![0u8; len as usize];
                l.file.read_exact_at(&mut buf, offset).map_err(l.err())?;
                Ok(buf)
            })
            .await?;
            return Ok(vec![Segment::Data(Bytes::from(buf))]);
        }
        let Some(o) = &self.overlay else {
            return self.reader.read_at(offset, len).await;
        };
        let mut out = Vec::new();
        for (from, n, st) in o.runs(offset, len) {
            match st {
                BlockState::Backup => out.extend(self.reader.read_at(from, n).await?),
                BlockState::Data => {
                    out.push(Segment::Data(Bytes::from(o.read_data(from, n).await?)))
                }
                BlockState::Zero => out.push(Segment::Zero(n)),
            }
        }
        Ok(out)
    }

    /// Prefetches the range into the chunk cache (NBD_CMD_CACHE): chunk by chunk, within the
    /// cache's prefetch budget, nothing held once fetched, so a client asking for gigabytes
    /// costs fetches, not memory. Nothing to do once served from the local file.
    pub async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.reader.check(offset, len)?;
        if len == 0 || self.local.read().await.is_some() {
            return Ok(());
        }
        let chunk = u64::from(self.reader.layout().chunk_size());
        let slots: Vec<u64> = (offset / chunk..(offset + len).div_ceil(chunk)).collect();
        self.reader.prefetch(&slots).await;
        Ok(())
    }

    fn overlay_mut(&self) -> Result<&Overlay> {
        self.overlay
            .as_ref()
            .ok_or_else(|| Error::Invalid("the mount is read-only".into()))
    }

    pub async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        let o = self.overlay_mut()?;
        let local = self.local.read().await;
        match local.as_ref() {
            Some(l) => {
                self.reader.check(offset, data.len() as u64)?;
                let l = l.clone();
                blocking(move || l.file.write_all_at(&data, offset).map_err(l.err())).await
            }
            None => o.write(offset, data).await,
        }
    }

    /// Zeroes a range; `deallocate` lets the local file give the space back (a trim, or a
    /// WRITE_ZEROES without NO_HOLE), else the range stays allocated.
    pub async fn write_zeroes(&self, offset: u64, len: u64, deallocate: bool) -> Result<()> {
        let o = self.overlay_mut()?;
        let local = self.local.read().await;
        match local.as_ref() {
            Some(l) => {
                self.reader.check(offset, len)?;
                let l = l.clone();
                blocking(move || zero_range(&l.file, offset, len, deallocate).map_err(l.err()))
                    .await
            }
            None => o.zero(offset, len),
        }
    }

    pub async fn flush(&self) -> Result<()> {
        let local = self.local.read().await;
        match (local.as_ref(), &self.overlay) {
            (Some(l), _) => {
                let l = l.clone();
                blocking(move || l.file.sync_data().map_err(l.err())).await
            }
            (None, Some(o)) => o.flush().await,
            (None, None) => Ok(()),
        }
    }

    /// Allocation status from `offset`, covering `len` bytes or, on a fragmented overlay, the
    /// first `MAX_STATUS_RUNS` runs of it.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<StatusRun>> {
        if self.local_path().is_some() {
            self.reader.check(offset, len)?;
            return Ok(vec![StatusRun {
                length: len,
                hole: false,
                zero: false,
            }]);
        }
        let backup = |from: u64, n: u64| -> Result<Vec<StatusRun>> {
            Ok(self
                .reader
                .map(from, n)?
                .into_iter()
                .map(|r| StatusRun {
                    length: r.length,
                    hole: r.zero,
                    zero: r.zero,
                })
                .collect())
        };
        let runs = match &self.overlay {
            None => backup(offset, len)?,
            Some(o) => {
                let mut v = Vec::new();
                // A reply may describe less than the range asked for (the client asks again
                // from where it ends): a fragmented overlay costs a bounded reply, not one run
                // per 4 KiB block of a 4 GiB request.
                for (from, n, st) in o.runs_upto(offset, len, MAX_STATUS_RUNS) {
                    match st {
                        BlockState::Backup => v.extend(backup(from, n)?),
                        BlockState::Data => v.push(StatusRun {
                            length: n,
                            hole: false,
                            zero: false,
                        }),
                        BlockState::Zero => v.push(StatusRun {
                            length: n,
                            hole: true,
                            zero: true,
                        }),
                    }
                }
                v
            }
        };
        let mut merged: Vec<StatusRun> = Vec::with_capacity(runs.len());
        for r in runs {
            match merged.last_mut() {
                Some(m) if m.hole == r.hole && m.zero == r.zero => m.length += r.length,
                _ => merged.push(r),
            }
        }
        Ok(merged)
    }

    /// Merges the overlay into `part`, a complete copy of the restore point (a hydration whose
    /// every chunk is durable), renames it to `file` and serves the disk from it from then on.
    /// The guest keeps reading and writing meanwhile: a first pass copies the overlay while
    /// remembering what the guest changes; then requests are held for a second pass over just
    /// those changes, the part file is synced and linked as `file`, the overlay directory records
    /// that `file` now holds the disk (`<disk>.local`), and the part name is removed. Returns the
    /// bytes merged.
    pub async fn switch_to_local(&self, part: &Path, file: &Path) -> Result<u64> {
        let Some(o) = &self.overlay else {
            return Err(Error::Invalid(
                "a read-only mount has nothing to merge".into(),
            ));
        };
        let target = Arc::new(LocalFile::open(part)?);
        o.track_changes();
        let res = self.merge_and_switch(o, target, part, file).await;
        if res.is_err() {
            // The guest stays on the overlay; nothing will take the changes it writes now.
            o.stop_tracking_changes();
        }
        res
    }

    /// `switch_to_local` once the overlay tracks the guest's changes.
    async fn merge_and_switch(
        &self,
        o: &Overlay,
        target: Arc<LocalFile>,
        part: &Path,
        file: &Path,
    ) -> Result<u64> {
        // What the passes copy is first made durable in the overlay's map: killed mid-merge,
        // the next mount would otherwise read a block the map never named from the backup,
        // while the part file, which the journal calls complete, already holds the guest's.
        o.flush().await?;
        let everything: Vec<(u64, u64)> = o
            .runs(0, o.size())
            .into_iter()
            .filter(|r| r.2 != BlockState::Backup)
            .map(|r| (r.0, r.1))
            .collect();
        let mut merged = self.merge(o, &target, &everything).await?;
        blockvault_repo::test_hold("hydration-merge-pass").await;
        // Made durable before requests are held: the sync below then has only the second
        // pass's few blocks to write, and the guest waits milliseconds, not for the whole merge.
        let t = target.clone();
        blocking(move || t.file.sync_data().map_err(t.err())).await?;
        let mut local = self.local.write().await;
        o.flush().await?;
        let changed = o.take_changes();
        merged += self.merge(o, &target, &changed).await?;
        let t = target.clone();
        blocking(move || t.file.sync_all().map_err(t.err())).await?;
        // `file` is linked to the part file before the merge is recorded: a file of that name
        // that appeared meanwhile makes the switch fail here, with nothing recorded, and the
        // guest goes on writing to the overlay. Once the record says `file`, the disk is served
        // from it whatever fails after, or the guest's next writes would go to an overlay the
        // next mount no longer reads.
        let (from, to) = (part.to_owned(), file.to_owned());
        let opened = blocking(move || {
            std::fs::hard_link(&from, &to).map_err(|source| Error::Output {
                path: to.clone(),
                source,
            })?;
            sync_parent(&to)?;
            LocalFile::open(&to)
        })
        .await?;
        blockvault_repo::test_hold("hydration-linked").await;
        let recorded = o.record_merged_into(file);
        if recorded.is_err() && o.merged_into().ok().flatten().as_deref() != Some(file) {
            // Not recorded: the overlay still holds the disk. The link goes again.
            let _ = std::fs::remove_file(file);
            return recorded.map(|_| 0);
        }
        if let Err(e) = recorded {
            tracing::warn!(error = %e, "recording the merge reported an error, but the record is there");
        }
        blockvault_repo::test_hold("hydration-merged").await;
        *local = Some(Arc::new(opened));
        drop(local);
        let from = part.to_owned();
        let unlinked = blocking(move || {
            std::fs::remove_file(&from).map_err(|source| Error::Output {
                path: from.clone(),
                source,
            })?;
            sync_parent(&from)
        })
        .await;
        if let Err(e) = unlinked {
            // The next mount removes a part file that is the same file as `file`.
            tracing::warn!(error = %e, "removing the part file after the merge");
        }
        Ok(merged)
    }

    /// Copies the overlay's view of `runs` (data and zeroes; blocks still on the backup are
    /// skipped) into `target`.
    async fn merge(
        &self,
        o: &Overlay,
        target: &Arc<LocalFile>,
        runs: &[(u64, u64)],
    ) -> Result<u64> {
        let mut merged = 0;
        for &(offset, len) in runs {
            for (from, n, st) in o.runs(offset, len) {
                let mut pos = from;
                while pos < from + n {
                    let step = (from + n - pos).min(ZERO_STEP);
                    let t = target.clone();
                    match st {
                        BlockState::Backup => break,
                        BlockState::Data => {
                            let buf = o.read_data(pos, step).await?;
                            blocking(move || t.file.write_all_at(&buf, pos).map_err(t.err()))
                                .await?;
                        }
                        BlockState::Zero => {
                            blocking(move || zero_range(&t.file, pos, step, true).map_err(t.err()))
                                .await?;
                        }
                    }
                    merged += step;
                    pos += step;
                }
            }
        }
        Ok(merged)
    }
}

/// Most overlay runs one block-status reply describes.
pub const MAX_STATUS_RUNS: usize = 8192;

/// Zeroes a range of the local file without writing zeroes where the file system can: a guest's
/// `fstrim` must not allocate every free block of its disk in the host's file, and a FAST_ZERO
/// request must be fast.
fn zero_range(f: &std::fs::File, offset: u64, len: u64, deallocate: bool) -> std::io::Result<()> {
    use rustix::fs::FallocateFlags;
    let flags = FallocateFlags::KEEP_SIZE
        | if deallocate {
            FallocateFlags::PUNCH_HOLE
        } else {
            FallocateFlags::ZERO_RANGE
        };
    match rustix::fs::fallocate(f, flags, offset, len) {
        Ok(()) => Ok(()),
        Err(e) if [rustix::io::Errno::OPNOTSUPP, rustix::io::Errno::NOSYS].contains(&e) => {
            write_zeroes(f, offset, len)
        }
        Err(e) => Err(e.into()),
    }
}

fn write_zeroes(f: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; len.min(ZERO_STEP) as usize];
    let mut pos = offset;
    while pos < offset + len {
        let n = (offset + len - pos).min(ZERO_STEP) as usize;
        f.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// Makes a rename into `path`'s directory durable.
fn sync_parent(path: &Path) -> Result<()> {
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_owned(),
        None => PathBuf::from("."),
    };
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| Error::Output { path: dir, source })
}
