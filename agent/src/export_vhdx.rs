//! Exports a disk of a restore point as a dynamic VHDX file. Chunks are fetched in parallel but
//! handed to one writer thread in disk order, so the writer fills each VHDX block sequentially and
//! holds at most one partial block; zero chunks are never written, so their blocks stay
//! unallocated (NOT_PRESENT, which reads as zeros in a dynamic disk).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockvault_engine::{DiskReader, Error, Progress, Result};

use crate::chunk_feed::{feed_in_order, writer_channel};
use crate::vhdx::VhdxWriter;

/// Hyper-V's default block size for dynamic disks.
pub const DEFAULT_BLOCK_SIZE: u32 = 32 << 20;

/// How the VHDX file is laid out.
#[derive(Clone, Debug)]
pub struct VhdxExportOptions {
    pub block_size: u32,
    /// 512 or 4096; the size of the exported disk must be a multiple of it.
    pub logical_sector_size: u32,
}

impl Default for VhdxExportOptions {
    fn default() -> Self {
        Self {
            block_size: DEFAULT_BLOCK_SIZE,
            logical_sector_size: 512,
        }
    }
}

fn output_error(path: &Path, e: crate::vhdx::Error) -> Error {
    Error::Output {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    }
}

/// Writes the whole disk `reader` reads to a new VHDX file at `path` (replacing any file there).
pub async fn export_vhdx(
    reader: Arc<DiskReader>,
    path: &Path,
    opts: &VhdxExportOptions,
    progress: Arc<Progress>,
) -> Result<()> {
    let layout = *reader.layout();
    let writer = VhdxWriter::create(
        path,
        layout.disk_size(),
        opts.block_size,
        opts.logical_sector_size,
    )
    .map_err(|e| output_error(path, e))?;
    let (tx, mut rx) = writer_channel(&reader);
    let out: PathBuf = path.to_path_buf();
    let write_thread = tokio::task::spawn_blocking(move || -> Result<()> {
        let mut writer = writer;
        while let Some((offset, data)) = rx.blocking_recv() {
            writer
                .write_at(offset, &data)
                .map_err(|e| output_error(&out, e))?;
        }
        writer.finish().map_err(|e| output_error(&out, e))
    });
    let failed = feed_in_order(&reader, &progress, tx).await.err();
    let written = write_thread
        .await
        .map_err(|e| Error::Invalid(format!("background task failed: {e}")))?;
    if let Some(e) = failed {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}
