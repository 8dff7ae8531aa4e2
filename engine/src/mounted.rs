//! A restore-point disk as a block device: backup reads merged under an optional copy-on-write
//! overlay. Every connection of an export shares one `MountedDisk`, so all see the same data.

use std::os::unix::fs::FileExt;
use std::path::Path;
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
}

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
        Ok(Self { reader, overlay })
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

    pub async fn read_at(&self, offset: u64, len: u64) -> Result<Vec<Segment>> {
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

    fn overlay_mut(&self) -> Result<&Overlay> {
        self.overlay
            .as_ref()
            .ok_or_else(|| Error::Invalid("the mount is read-only".into()))
    }

    pub async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        self.overlay_mut()?.write(offset, data).await
    }

    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.overlay_mut()?.zero(offset, len)
    }

    pub async fn flush(&self) -> Result<()> {
        match &self.overlay {
            Some(o) => o.flush().await,
            None => Ok(()),
        }
    }

    /// Allocation status from `offset`, covering `len` bytes.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<StatusRun>> {
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
                for (from, n, st) in o.runs(offset, len) {
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

    /// Writes the overlay's blocks (data and zeroes) into `file`, a complete copy of the restore
    /// point (a finished hydration), making it the disk as the guest last flushed it.
    pub async fn fold_into(&self, file: &Path) -> Result<u64> {
        let Some(o) = &self.overlay else {
            return Ok(0);
        };
        o.flush().await?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(file)
            .map_err(|source| Error::Output {
                path: file.to_owned(),
                source,
            })?;
        let mut folded = 0;
        let zeros = vec![0u8; 1 << 20];
        for (from, n, st) in o.runs(0, o.size()) {
            let mut pos = from;
            while pos < from + n {
                let step = (from + n - pos).min(1 << 20);
                let werr = |source: std::io::Error| Error::Output {
                    path: file.to_owned(),
                    source,
                };
                match st {
                    BlockState::Backup => break,
                    BlockState::Data => {
                        let buf = o.read_data(pos, step).await?;
                        f.write_all_at(&buf, pos).map_err(werr)?;
                    }
                    BlockState::Zero => {
                        f.write_all_at(&zeros[..step as usize], pos).map_err(werr)?;
                    }
                }
                folded += step;
                pos += step;
            }
        }
        f.sync_all().map_err(|source| Error::Output {
            path: file.to_owned(),
            source,
        })?;
        Ok(folded)
    }
}
