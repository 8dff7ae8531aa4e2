//! Copy-on-write overlay of a mounted restore point: a sparse data file with the disk's own
//! offsets plus a persisted allocation map, one byte per 4 KiB block.
//!
//! Map file layout (`<disk>.map`, all integers little-endian; do not change without bumping the
//! version):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `BVOVMAP1` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | block size (4096) |
//! | 16 | 8 | disk size in bytes |
//! | 24 | 64 | restore point id, lowercase hex, zero-padded |
//! | 88 | 16 | overlay id: 128 random bits |
//! | 104 | 3992 | zero |
//! | 4096 | one byte per block | 0 = backup, 1 = data in the overlay file, 2 = zeroes |
//!
//! The overlay id names this overlay, not its path, in a hydration's record of a merge begun: an
//! overlay deleted and created again at the same path is another overlay, whose merge must not
//! resume a part file holding the deleted one's blocks. It is drawn when the overlay is created;
//! a map written before the field existed (all zero there) gets one when it is next opened, so
//! no merge it began can be resumed (its record named the overlay by path) and it is copied over.
//!
//! Durability: the map is only ever written after the data it describes has been fsynced (a
//! flush snapshots the map, fsyncs the data file, then writes and fsyncs the snapshot), so after
//! a crash the map never claims a block whose data is not durable. Writes not yet flushed may be
//! lost, as the NBD protocol allows.
//!
//! A failed fsync of the data file is final: Linux reports a failed write-back once and leaves the
//! pages clean, so a later fsync would succeed without the lost data ever reaching the disk, and
//! a map written after it would name blocks that hold nothing. The overlay therefore refuses every
//! later flush, write and zeroing (reads go on); the map on disk stays as the last successful
//! flush left it. A failed write or fsync of the map file is retried at the next flush: the map is
//! in memory and its pages are written again.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use crate::{Error, Result};

pub const OVERLAY_BLOCK: u64 = 4096;
const MAGIC: &[u8; 8] = b"BVOVMAP1";
const VERSION: u32 = 1;
const HEADER: u64 = 4096;
/// Where the overlay id is in the header, and its length.
const ID_AT: usize = 88;
const ID_LEN: usize = 16;
/// The map is written back in pages of this many entries.
const MAP_PAGE: usize = 4096;
/// First words of `<disk>.local`, followed by the restore point id, a space and the file's path.
const LOCAL_RECORD: &str = "blockvault overlay merged v1 ";

/// State of one overlay block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BlockState {
    Backup = 0,
    Data = 1,
    Zero = 2,
}

impl BlockState {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Backup),
            1 => Some(Self::Data),
            2 => Some(Self::Zero),
            _ => None,
        }
    }
}

struct MapState {
    blocks: Vec<u8>,
    dirty: BTreeSet<usize>,
}

/// The writable layer of one disk, shared by every connection of its export.
pub struct Overlay {
    data: Arc<File>,
    map_file: Arc<File>,
    data_path: PathBuf,
    map_path: PathBuf,
    /// `<disk>.local`: written when the overlay has been merged into a hydrated local file.
    local_path: PathBuf,
    point: String,
    /// The overlay id (header offset 88), as lowercase hex.
    id: String,
    size: u64,
    map: RwLock<MapState>,
    /// Serialises flushes so two snapshots never race to the map file.
    flushing: tokio::sync::Mutex<()>,
    dirty_data: Mutex<bool>,
    /// Blocks written or zeroed since `track_changes` was called (for merging the overlay into a
    /// local copy while the guest keeps writing).
    tracked: Mutex<Option<BTreeSet<u64>>>,
    /// Why an fsync of the data file failed, once one has (see the module comment).
    data_lost: OnceLock<String>,
    syncs: Syncs,
}

/// How the data and map files are fsynced: the real `fdatasync`, replaced only by tests that
/// need a sync to fail.
#[derive(Clone, Copy)]
struct Syncs {
    data: fn(&File) -> std::io::Result<()>,
    map: fn(&File) -> std::io::Result<()>,
}

impl Default for Syncs {
    fn default() -> Self {
        Self {
            data: File::sync_data,
            map: File::sync_data,
        }
    }
}

/// 128 random bits for a new overlay id.
fn new_id() -> std::io::Result<[u8; ID_LEN]> {
    let mut id = [0u8; ID_LEN];
    std::io::Read::read_exact(&mut File::open("/dev/urandom")?, &mut id)?;
    Ok(id)
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Output {
        path: path.to_owned(),
        source,
    }
}

/// Whether `n` is a multiple of the block size (a power of two).
fn whole_blocks(n: u64) -> bool {
    n & (OVERLAY_BLOCK - 1) == 0
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(Error::task)?
}

impl Overlay {
    /// Opens the overlay of `disk` in directory `dir`, creating it when absent. An existing
    /// overlay must belong to the same restore point and disk size.
    pub fn open(dir: &Path, disk: &str, point: &str, size: u64) -> Result<Self> {
        if !whole_blocks(size) {
            return Err(Error::Disk {
                disk: disk.into(),
                detail: format!(
                    "size {size} is not a multiple of {OVERLAY_BLOCK}; a writable overlay needs whole 4 KiB blocks"
                ),
            });
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let data_path = dir.join(format!("{disk}.data"));
        let map_path = dir.join(format!("{disk}.map"));
        let nblocks = (size / OVERLAY_BLOCK) as usize;
        let exists = map_path.exists();
        let map_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&map_path)
            .map_err(io(&map_path))?;
        crate::exclusive::lock(&map_file, &map_path, "a writable mount of this overlay")?;
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(io(&data_path))?;
        let bad = |detail: String| Error::Disk {
            disk: disk.into(),
            detail: format!("overlay map {}: {detail}", map_path.display()),
        };
        let (blocks, id) = if exists {
            let mut header = [0u8; ID_AT + ID_LEN];
            map_file
                .read_exact_at(&mut header, 0)
                .map_err(|e| bad(format!("cannot read the header: {e}")))?;
            if &header[0..8] != MAGIC {
                return Err(bad("not a blockvault overlay map (bad magic)".into()));
            }
            let version = u32::from_le_bytes(header[8..12].try_into().unwrap_or_default());
            let block = u32::from_le_bytes(header[12..16].try_into().unwrap_or_default());
            let disk_size = u64::from_le_bytes(header[16..24].try_into().unwrap_or_default());
            if version != VERSION || u64::from(block) != OVERLAY_BLOCK {
                return Err(bad(format!(
                    "unsupported version {version} / block size {block}"
                )));
            }
            if disk_size != size {
                return Err(bad(format!(
                    "made for a disk of {disk_size} bytes, this disk has {size}"
                )));
            }
            let owner = String::from_utf8_lossy(&header[24..ID_AT])
                .trim_end_matches('\0')
                .to_owned();
            if owner != point {
                return Err(bad(format!(
                    "belongs to restore point {owner}, not {point}"
                )));
            }
            let mut blocks = vec![0u8; nblocks];
            map_file
                .read_exact_at(&mut blocks, HEADER)
                .map_err(|e| bad(format!("truncated block map: {e}")))?;
            if let Some(i) = blocks
                .iter()
                .position(|b| BlockState::from_byte(*b).is_none())
            {
                return Err(bad(format!("block {i} has invalid state {}", blocks[i])));
            }
            let mut id: [u8; ID_LEN] = header[ID_AT..].try_into().unwrap_or_default();
            if id == [0; ID_LEN] {
                // Made before overlays had ids (module comment): one is drawn now, once.
                id = new_id().map_err(|e| bad(format!("cannot draw an overlay id: {e}")))?;
                map_file
                    .write_all_at(&id, ID_AT as u64)
                    .and_then(|()| map_file.sync_data())
                    .map_err(|e| bad(format!("cannot write the overlay id: {e}")))?;
            }
            (blocks, id)
        } else {
            if point.is_empty() || point.len() > 64 || !point.is_ascii() {
                return Err(Error::Invalid(format!(
                    "restore point id '{point}' does not fit the overlay header"
                )));
            }
            let mut header = vec![0u8; HEADER as usize];
            header[0..8].copy_from_slice(MAGIC);
            header[8..12].copy_from_slice(&VERSION.to_le_bytes());
            header[12..16].copy_from_slice(&(OVERLAY_BLOCK as u32).to_le_bytes());
            header[16..24].copy_from_slice(&size.to_le_bytes());
            header[24..24 + point.len()].copy_from_slice(point.as_bytes());
            let id = new_id().map_err(|e| bad(format!("cannot draw an overlay id: {e}")))?;
            header[ID_AT..ID_AT + ID_LEN].copy_from_slice(&id);
            data.set_len(0).map_err(io(&data_path))?;
            data.set_len(size).map_err(io(&data_path))?;
            data.sync_all().map_err(io(&data_path))?;
            map_file
                .set_len(HEADER + nblocks as u64)
                .map_err(io(&map_path))?;
            map_file.write_all_at(&header, 0).map_err(io(&map_path))?;
            map_file.sync_all().map_err(io(&map_path))?;
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(dir))?;
            (vec![0u8; nblocks], id)
        };
        Ok(Self {
            data: Arc::new(data),
            map_file: Arc::new(map_file),
            data_path,
            map_path,
            local_path: dir.join(format!("{disk}.local")),
            point: point.to_owned(),
            id: hex::encode(id),
            size,
            map: RwLock::new(MapState {
                blocks,
                dirty: BTreeSet::new(),
            }),
            flushing: tokio::sync::Mutex::new(()),
            dirty_data: Mutex::new(false),
            tracked: Mutex::new(None),
            data_lost: OnceLock::new(),
            syncs: Syncs::default(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn data_path(&self) -> &Path {
        &self.data_path
    }

    /// What names this overlay in a hydration's record of a merge begun: its random id (not its
    /// path, which a new overlay may take after this one is deleted).
    pub fn identity(&self) -> String {
        format!("overlay-{}", self.id)
    }

    /// The local file this overlay was merged into, if it was (`<disk>.local`, see
    /// `MountedDisk::switch_to_local`). A record for another restore point is an error.
    pub fn merged_into(&self) -> Result<Option<PathBuf>> {
        let text = match std::fs::read_to_string(&self.local_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&self.local_path)(e)),
        };
        let bad = || {
            Error::Invalid(format!(
            "{} is not a blockvault merge record; remove it only if the disk's local file is not in use",
            self.local_path.display()
        ))
        };
        let line = text.strip_prefix(LOCAL_RECORD).ok_or_else(bad)?;
        let (point, file) = line
            .trim_end_matches('\n')
            .split_once(' ')
            .ok_or_else(bad)?;
        if point != self.point {
            return Err(Error::Invalid(format!(
                "{} says the overlay of restore point {point} was merged, not {}",
                self.local_path.display(),
                self.point
            )));
        }
        Ok(Some(PathBuf::from(file)))
    }

    /// Records, durably, that the overlay has been merged into `file`, which holds the disk from
    /// now on.
    pub fn record_merged_into(&self, file: &Path) -> Result<()> {
        let tmp = self.local_path.with_extension("local.tmp");
        let body = format!("{LOCAL_RECORD}{} {}\n", self.point, file.display());
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            std::io::Write::write_all(&mut f, body.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.local_path)?;
            if let Some(dir) = self.local_path.parent() {
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(io(&self.local_path))
    }

    /// Runs of equal block state over `offset..offset+len` (both 4 KiB aligned).
    pub fn runs(&self, offset: u64, len: u64) -> Vec<(u64, u64, BlockState)> {
        self.runs_upto(offset, len, usize::MAX)
    }

    /// The first `max` runs of `runs(offset, len)` (they may cover less than the range).
    pub fn runs_upto(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, u64, BlockState)> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<(u64, u64, BlockState)> = Vec::new();
        let first = offset / OVERLAY_BLOCK;
        let last = (offset + len).div_ceil(OVERLAY_BLOCK);
        for b in first..last {
            let st = BlockState::from_byte(map.blocks[b as usize]).unwrap_or(BlockState::Backup);
            let from = (b * OVERLAY_BLOCK).max(offset);
            let to = ((b + 1) * OVERLAY_BLOCK).min(offset + len);
            match out.last_mut() {
                Some((_, l, s)) if *s == st => *l += to - from,
                _ => {
                    if out.len() == max {
                        break;
                    }
                    out.push((from, to - from, st));
                }
            }
        }
        out
    }

    fn mark(&self, offset: u64, len: u64, st: BlockState) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        let first = (offset / OVERLAY_BLOCK) as usize;
        let last = (offset + len).div_ceil(OVERLAY_BLOCK) as usize;
        if let Some(t) = self
            .tracked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            t.extend(first as u64..last as u64);
        }
        for b in first..last {
            if map.blocks[b] != st as u8 {
                map.blocks[b] = st as u8;
                map.dirty.insert(b / MAP_PAGE);
            }
        }
    }

    /// Reads overlay data (only meaningful where the map says `Data`).
    pub async fn read_data(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let f = self.data.clone();
        let p = self.data_path.clone();
        blocking(move || {
            let mut buf = vec![0u8; len as usize];
            f.read_exact_at(&mut buf, offset).map_err(io(&p))?;
            Ok(buf)
        })
        .await
    }

    /// Fails once an fsync of the data file has failed: nothing written since the last
    /// successful flush can be known to be on disk, and no later flush can make it so.
    fn usable(&self) -> Result<()> {
        match self.data_lost.get() {
            None => Ok(()),
            Some(why) => Err(Error::Output {
                path: self.data_path.clone(),
                source: std::io::Error::other(format!(
                    "an fsync of the overlay data file failed ({why}); writes since the last \
                     successful flush may be lost, so the overlay takes no more writes or flushes \
                     (reads go on; mounting it again gives what that flush made durable)"
                )),
            }),
        }
    }

    /// Writes whole blocks.
    pub async fn write(&self, offset: u64, data: bytes::Bytes) -> Result<()> {
        self.aligned(offset, data.len() as u64)?;
        self.usable()?;
        let f = self.data.clone();
        let p = self.data_path.clone();
        let len = data.len() as u64;
        blocking(move || f.write_all_at(&data, offset).map_err(io(&p))).await?;
        *self
            .dirty_data
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
        self.mark(offset, len, BlockState::Data);
        Ok(())
    }

    /// Makes whole blocks read as zeroes (also used for trim).
    pub fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.aligned(offset, len)?;
        self.usable()?;
        self.mark(offset, len, BlockState::Zero);
        Ok(())
    }

    fn aligned(&self, offset: u64, len: u64) -> Result<()> {
        if !whole_blocks(offset)
            || !whole_blocks(len)
            || offset.checked_add(len).is_none_or(|e| e > self.size)
        {
            return Err(Error::Invalid(format!(
                "overlay access of {len} bytes at {offset} is not whole 4 KiB blocks inside the disk"
            )));
        }
        Ok(())
    }

    /// Makes every write and zeroing that has returned durable, data first, then the map.
    pub async fn flush(&self) -> Result<()> {
        let _one = self.flushing.lock().await;
        self.usable()?;
        let pages: Vec<(usize, Vec<u8>)> = {
            let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
            let dirty = std::mem::take(&mut map.dirty);
            dirty
                .into_iter()
                .map(|p| {
                    let from = p * MAP_PAGE;
                    let to = (from + MAP_PAGE).min(map.blocks.len());
                    (p, map.blocks[from..to].to_vec())
                })
                .collect()
        };
        let sync_data = std::mem::take(
            &mut *self
                .dirty_data
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        if sync_data {
            let (data, sync) = (self.data.clone(), self.syncs.data);
            let synced = tokio::task::spawn_blocking(move || sync(&data))
                .await
                .map_err(Error::task)?;
            if let Err(e) = synced {
                // Not retried: the failed write-back left its pages clean, so the next fsync
                // would succeed over data that never reached the disk (see the module comment).
                tracing::error!(path = %self.data_path.display(), error = %e, "overlay data fsync failed; the overlay takes no more writes");
                let _ = self.data_lost.set(e.to_string());
                return self.usable();
            }
        }
        let (mf, mp, sync_map) = (self.map_file.clone(), self.map_path.clone(), self.syncs.map);
        let res = blocking(move || {
            if !pages.is_empty() {
                for (p, bytes) in &pages {
                    mf.write_all_at(bytes, HEADER + (p * MAP_PAGE) as u64)
                        .map_err(io(&mp))?;
                }
                sync_map(&mf).map_err(io(&mp))?;
            }
            Ok(())
        })
        .await;
        if let Err(e) = &res {
            tracing::warn!(error = %e, "overlay map write failed");
            // The data is durable; the map on disk may be torn between old and new pages, and
            // the whole map in memory is written again at the next flush.
            let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
            let n = map.blocks.len().div_ceil(MAP_PAGE);
            map.dirty.extend(0..n);
        }
        res
    }

    /// From now on, remembers which blocks are written or zeroed.
    pub fn track_changes(&self) {
        *self.tracked.lock().unwrap_or_else(PoisonError::into_inner) = Some(BTreeSet::new());
    }

    /// Forgets the blocks changed and stops remembering them (a merge that failed: the guest
    /// writes on to the overlay, and the set would grow with every block it writes).
    pub fn stop_tracking_changes(&self) {
        *self.tracked.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// The blocks changed since `track_changes` (or the last call), as `(offset, len)` runs of
    /// adjacent blocks; tracking goes on.
    pub fn take_changes(&self) -> Vec<(u64, u64)> {
        let set = self
            .tracked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for b in set {
            match runs.last_mut() {
                Some((o, l)) if *o + *l == b * OVERLAY_BLOCK => *l += OVERLAY_BLOCK,
                _ => runs.push((b * OVERLAY_BLOCK, OVERLAY_BLOCK)),
            }
        }
        runs
    }

    /// Bytes of the disk the overlay holds (data or zeroes).
    pub fn changed_bytes(&self) -> u64 {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        map.blocks.iter().filter(|b| **b != 0).count() as u64 * OVERLAY_BLOCK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POINT: &str = "ab01ab01ab01ab01";

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn changes_are_tracked_in_runs_until_tracking_stops() {
        let dir = tempfile::tempdir().unwrap();
        let o = Overlay::open(dir.path(), "sys", POINT, 1 << 20).unwrap();
        o.zero(0, 4096).unwrap();
        o.track_changes();
        o.zero(8192, 8192).unwrap();
        o.zero(16384, 4096).unwrap();
        o.zero(65536, 4096).unwrap();
        assert_eq!(o.take_changes(), vec![(8192, 12288), (65536, 4096)]);
        assert!(o.take_changes().is_empty());
        o.zero(4096, 4096).unwrap();
        o.stop_tracking_changes();
        o.zero(131072, 4096).unwrap();
        assert!(o.take_changes().is_empty());
    }

    #[test]
    fn runs_upto_stops_at_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let o = Overlay::open(dir.path(), "sys", POINT, 1 << 20).unwrap();
        for b in (0..64).step_by(2) {
            o.zero(b * 4096, 4096).unwrap();
        }
        assert_eq!(o.runs(0, 64 * 4096).len(), 64);
        let first = o.runs_upto(0, 64 * 4096, 5);
        assert_eq!(first, o.runs(0, 64 * 4096)[..5]);
        assert_eq!(o.runs_upto(0, 64 * 4096, 100).len(), 64);
    }

    #[test]
    fn flushed_writes_survive_reopen_and_unflushed_map_changes_do_not() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let o = Overlay::open(dir.path(), "sys", POINT, 1 << 20).unwrap();
            o.write(8192, bytes::Bytes::from(vec![7u8; 8192]))
                .await
                .unwrap();
            o.zero(65536, 4096).unwrap();
            o.flush().await.unwrap();
            // Not flushed: the map on disk must not name this block.
            o.write(131072, bytes::Bytes::from(vec![9u8; 4096]))
                .await
                .unwrap();
            drop(o);
            let o = Overlay::open(dir.path(), "sys", POINT, 1 << 20).unwrap();
            assert_eq!(
                o.runs(0, 16384),
                vec![
                    (0, 8192, BlockState::Backup),
                    (8192, 8192, BlockState::Data)
                ]
            );
            assert_eq!(o.runs(65536, 8192)[0], (65536, 4096, BlockState::Zero));
            assert_eq!(
                o.runs(131072, 4096),
                vec![(131072, 4096, BlockState::Backup)]
            );
            assert_eq!(o.read_data(8192, 8192).await.unwrap(), vec![7u8; 8192]);
            assert_eq!(o.changed_bytes(), 3 * 4096);
        });
    }

    fn eio(_: &File) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::EIO))
    }

    #[test]
    fn a_failed_data_fsync_fails_every_later_flush_write_and_zeroing() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let mut o = Overlay::open(dir.path(), "sys", POINT, 1 << 20).unwrap();
            o.write(0, bytes::Bytes::from(vec![1u8; 4096]))
                .await
                .unwrap();
            o.flush().await.unwrap();
            o.write(8192, bytes::Bytes::from(vec![2u8; 4096]))
                .await
                .unwrap();
            o.syncs.data = eio;
            let e = o.flush().await.unwrap_err().to_string();
            assert!(e.contains("sys.data") && e.contains("may be lost"), "{e}");
            // The next fsync would succeed, as Linux's does after a lost write-back: the
            // overlay must not take that for the data being on disk.
            o.syncs.data = File::sync_data;
            let e = o.flush().await.unwrap_err().to_string();
            assert!(e.contains("sys.data") && e.contains("may be lost"), "{e}");
            assert!(o
                .write(16384, bytes::Bytes::from(vec![3u8; 4096]))
                .await
                .is_err());
            assert!(o.zero(16384, 4096).is_err());
            assert!(o.flush().await.is_err());
            assert_eq!(o.read_data(0, 4096).await.unwrap(), vec![1u8; 4096]);
            drop(o);
            // The map on disk is the one of the last successful flush.
            let o = Overlay::open(dir.path(), "sys", POINT, 1 << 20).unwrap();
            assert_eq!(
                o.runs(0, 12288),
                vec![
                    (0, 4096, BlockState::Data),
                    (4096, 8192, BlockState::Backup)
                ]
            );
        });
    }

    #[test]
    fn a_failed_map_fsync_is_retried_at_the_next_flush() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let mut o = Overlay::open(dir.path(), "sys", POINT, 1 << 20).unwrap();
            o.write(8192, bytes::Bytes::from(vec![2u8; 4096]))
                .await
                .unwrap();
            o.syncs.map = eio;
            assert!(o.flush().await.is_err());
            o.syncs.map = File::sync_data;
            o.flush().await.unwrap();
            o.zero(0, 4096).unwrap();
            o.flush().await.unwrap();
            drop(o);
            let o = Overlay::open(dir.path(), "sys", POINT, 1 << 20).unwrap();
            assert_eq!(
                o.runs(0, 12288),
                vec![
                    (0, 4096, BlockState::Zero),
                    (4096, 4096, BlockState::Backup),
                    (8192, 4096, BlockState::Data)
                ]
            );
        });
    }

    #[test]
    fn the_identity_is_the_overlays_own_and_survives_reopen_but_not_recreation() {
        let dir = tempfile::tempdir().unwrap();
        let o = Overlay::open(dir.path(), "sys", POINT, 1 << 20).unwrap();
        let first = o.identity();
        drop(o);
        let o = Overlay::open(dir.path(), "sys", POINT, 1 << 20).unwrap();
        assert_eq!(o.identity(), first);
        drop(o);
        // A map from before overlay ids: it gets one, kept from then on.
        let map = dir.path().join("sys.map");
        let f = OpenOptions::new().write(true).open(&map).unwrap();
        f.write_all_at(&[0; ID_LEN], ID_AT as u64).unwrap();
        let o = Overlay::open(dir.path(), "sys", POINT, 1 << 20).unwrap();
        let drawn = o.identity();
        assert_ne!(drawn, first);
        drop(o);
        assert_eq!(
            Overlay::open(dir.path(), "sys", POINT, 1 << 20)
                .unwrap()
                .identity(),
            drawn
        );
        std::fs::remove_dir_all(dir.path()).unwrap();
        let o = Overlay::open(dir.path(), "sys", POINT, 1 << 20).unwrap();
        assert!(o.identity() != first && o.identity() != drawn);
    }

    #[test]
    fn refuses_foreign_or_damaged_maps_and_misaligned_access() {
        let dir = tempfile::tempdir().unwrap();
        let o = Overlay::open(dir.path(), "sys", POINT, 1 << 20).unwrap();
        assert!(matches!(o.zero(100, 4096), Err(Error::Invalid(_))));
        assert!(matches!(o.zero(0, 2 << 20), Err(Error::Invalid(_))));
        drop(o);
        let other = POINT.replace("ab", "cd");
        let e = Overlay::open(dir.path(), "sys", &other, 1 << 20)
            .err()
            .unwrap();
        assert!(e.to_string().contains("belongs to restore point"), "{e}");
        let e = Overlay::open(dir.path(), "sys", POINT, 2 << 20)
            .err()
            .unwrap();
        assert!(e.to_string().contains("made for a disk of"), "{e}");
        let map = dir.path().join("sys.map");
        let f = OpenOptions::new().write(true).open(&map).unwrap();
        f.write_all_at(&[9], HEADER + 3).unwrap();
        let e = Overlay::open(dir.path(), "sys", POINT, 1 << 20)
            .err()
            .unwrap();
        assert!(e.to_string().contains("block 3 has invalid state 9"), "{e}");
        f.write_all_at(b"garbage!", 0).unwrap();
        let e = Overlay::open(dir.path(), "sys", POINT, 1 << 20)
            .err()
            .unwrap();
        assert!(e.to_string().contains("bad magic"), "{e}");
        assert!(Overlay::open(dir.path(), "odd", POINT, 1000).is_err());
    }
}
