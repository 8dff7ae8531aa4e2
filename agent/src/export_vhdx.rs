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
    // The channel closes both when the last chunk was sent and when fetching failed: the thread
    // gives the writer back, and only a complete feed finishes the image (its BAT, metadata and
    // headers). A failed export never holds a VHDX that opens, even for the moment before its
    // removal.
    let write_thread = tokio::task::spawn_blocking(move || -> Result<VhdxWriter> {
        let mut writer = writer;
        while let Some((offset, data)) = rx.blocking_recv() {
            writer
                .write_at(offset, &data)
                .map_err(|e| output_error(&out, e))?;
        }
        Ok(writer)
    });
    let fed = feed_in_order(&reader, &progress, tx).await;
    let written = write_thread.await.map_err(Error::task);
    let finished = match (fed, written) {
        (Ok(()), Ok(Ok(writer))) => {
            let out = path.to_path_buf();
            tokio::task::spawn_blocking(move || writer.finish().map_err(|e| output_error(&out, e)))
                .await
                .map_err(Error::task)
                .and_then(|r| r)
        }
        (Err(e), _) | (Ok(()), Err(e)) | (Ok(()), Ok(Err(e))) => Err(e),
    };
    if finished.is_err() {
        let _ = std::fs::remove_file(path);
    }
    finished
}
