//! The exports to image formats (VHDX, qcow2) write on a thread of their own; this feeds that
//! thread a restore point's chunks in disk order.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use blockvault_engine::{DiskReader, Progress, Result};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

/// A chunk for the writer: its offset on the disk and its bytes.
pub(crate) type Piece = (u64, Bytes);

/// A channel to the writer, bounded so the fetchers run ahead of it by a few chunks only.
pub(crate) fn writer_channel(reader: &DiskReader) -> (mpsc::Sender<Piece>, mpsc::Receiver<Piece>) {
    mpsc::channel(reader.options().parallel.max(1) * 2)
}

/// Sends every stored chunk of the disk as `(offset, bytes)`, in disk order; zero chunks are
/// skipped (the image formats leave them unallocated) but counted as progress, whose total is
/// the disk's size. Returns the first
/// fetch error; stops quietly when the writer has gone (its own error tells why).
pub(crate) async fn feed_in_order(
    reader: &Arc<DiskReader>,
    progress: &Progress,
    tx: mpsc::Sender<Piece>,
) -> Result<()> {
    let layout = *reader.layout();
    progress
        .bytes_total
        .store(layout.disk_size(), Ordering::Relaxed);
    let mut chunks = std::pin::pin!(reader.chunks_in_order());
    while let Some((slot, data)) = chunks.next().await {
        if let Some(d) = data? {
            let offset = slot * layout.chunk_size() as u64;
            if tx.send((offset, d)).await.is_err() {
                return Ok(());
            }
        }
        progress
            .bytes_done
            .fetch_add(layout.chunk_len(slot) as u64, Ordering::Relaxed);
    }
    Ok(())
}
