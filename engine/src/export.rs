//! Writes a disk of a restore point out as a raw image: to a file (zero chunks left as holes) or to
//! a stream (zeros written out).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::progress::Progress;
use crate::{DiskReader, Error, Result};

pub enum ExportTarget {
    /// A regular file (created or truncated) or a block device.
    Path(PathBuf),
    /// Standard output, or any byte stream.
    Stream(Box<dyn tokio::io::AsyncWrite + Unpin + Send>),
}

/// Exports the whole disk. Chunks are fetched `reader.options().parallel` at a time and written in
/// order.
pub async fn export_raw(
    reader: Arc<DiskReader>,
    target: ExportTarget,
    progress: Arc<Progress>,
) -> Result<()> {
    let layout = *reader.layout();
    progress
        .bytes_total
        .store(layout.disk_size(), std::sync::atomic::Ordering::Relaxed);
    let parallel = reader.options().parallel.max(1);
    let mut chunks = futures::stream::iter(0..layout.chunk_count())
        .map(|slot| {
            let reader = reader.clone();
            async move { (slot, reader.fetch_chunk(slot).await) }
        })
        .buffered(parallel);
    match target {
        ExportTarget::Path(path) => {
            let out_err = |source| Error::Output {
                path: path.clone(),
                source,
            };
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(out_err)?;
            let is_file = file.metadata().map_err(out_err)?.is_file();
            if is_file {
                // Truncate to zero first so the old contents cannot show through the holes.
                file.set_len(0).map_err(out_err)?;
                file.set_len(layout.disk_size()).map_err(out_err)?;
            }
            let file = Arc::new(file);
            let zeros = bytes::Bytes::from(vec![0u8; layout.chunk_size() as usize]);
            while let Some((slot, data)) = chunks.next().await {
                let offset = slot * layout.chunk_size() as u64;
                let len = layout.chunk_len(slot) as usize;
                let data = match data? {
                    Some(d) => d,
                    None if is_file => {
                        Progress::add(&progress.bytes_done, len as u64);
                        continue;
                    }
                    None => zeros.slice(..len),
                };
                let f = file.clone();
                tokio::task::spawn_blocking(move || f.write_all_at(&data, offset))
                    .await
                    .map_err(Error::task)?
                    .map_err(out_err)?;
                Progress::add(&progress.bytes_done, len as u64);
            }
            let f = file.clone();
            tokio::task::spawn_blocking(move || f.sync_all())
                .await
                .map_err(Error::task)?
                .map_err(out_err)?;
        }
        ExportTarget::Stream(mut w) => {
            let out_err = |source| Error::Output {
                path: PathBuf::from("<stream>"),
                source,
            };
            let zeros = vec![0u8; layout.chunk_size() as usize];
            while let Some((slot, data)) = chunks.next().await {
                let len = layout.chunk_len(slot) as usize;
                match data? {
                    Some(d) => w.write_all(&d).await.map_err(out_err)?,
                    None => w.write_all(&zeros[..len]).await.map_err(out_err)?,
                }
                Progress::add(&progress.bytes_done, len as u64);
            }
            w.flush().await.map_err(out_err)?;
        }
    }
    Ok(())
}
