//! `restore export --format qcow2` and `restore vm --format qcow2`: a restore-point disk written as
//! a qcow2 image (engine/restore's `Qcow2Writer`, docs/qcow2.md).

use std::path::Path;
use std::sync::Arc;

use blockvault_engine::{DiskReader, Progress};
use blockvault_restore::qcow2::Qcow2Writer;
use blockvault_vhdx::staged::StagedWrites;

use crate::chunk_feed::{feed_in_order, writer_channel};
use crate::{Error, Result};

/// Writes the disk `reader` reads as a qcow2 image at `path` (created or truncated). Chunks
/// arrive in disk order and go to one writer thread; the chunk size is a power of two of at least
/// 64 KiB, so every chunk is whole qcow2 clusters. The image's tables and header are written
/// only once every chunk arrived: on any failure the file is removed, never left as a valid
/// image with zeros where the failure struck.
pub async fn export_qcow2(
    reader: Arc<DiskReader>,
    path: &Path,
    progress: Arc<Progress>,
) -> Result<()> {
    let layout = *reader.layout();
    if !(layout.chunk_size() as u64).is_multiple_of(Qcow2Writer::cluster_size()) {
        return Err(Error::Input(format!(
            "chunk size {} is not a multiple of the qcow2 cluster size; export --format raw",
            layout.chunk_size()
        )));
    }
    let writing = || format!("writing {}", path.display());
    let file = std::fs::File::create(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    // Data goes past the page cache where the file system allows: it is written once and never
    // read back here.
    let stage = StagedWrites::open(path, &file);
    let mut w = Qcow2Writer::new(file, layout.disk_size()).map_err(|e| Error::io(writing(), e))?;
    if let Some(stage) = stage {
        w = w.with_stage(stage);
    }
    let (tx, mut rx) = writer_channel(&reader);
    // The channel closes both when the last chunk was sent and when fetching failed: the thread
    // gives the writer back, and only a complete feed finishes the image.
    let writer = std::thread::spawn(move || -> std::io::Result<Qcow2Writer> {
        while let Some((offset, data)) = rx.blocking_recv() {
            w.write_at(offset, &data)?;
        }
        Ok(w)
    });
    let fetched = feed_in_order(&reader, &progress, tx).await;
    let done = async {
        let written = tokio::task::spawn_blocking(move || writer.join())
            .await
            .map_err(|e| Error::io(writing(), std::io::Error::other(e.to_string())))?
            .map_err(|_| {
                Error::io(
                    writing(),
                    std::io::Error::other("the qcow2 writer panicked"),
                )
            })?;
        fetched?;
        let w = written.map_err(|e| Error::io(writing(), e))?;
        tokio::task::spawn_blocking(move || w.finish().map(|_| ()))
            .await
            .map_err(|e| Error::io(writing(), std::io::Error::other(e.to_string())))?
            .map_err(|e| Error::io(writing(), e))
    }
    .await;
    if done.is_err() {
        let _ = std::fs::remove_file(path);
    }
    done
}
