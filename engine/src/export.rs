//! Writes a disk of a restore point out as a raw image: to a file (zero chunks left as holes) or to
//! a stream (zeros written out).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use std::io::Write;

use crate::direct_write::DirectWriter;
use crate::progress::Progress;
use crate::{DiskReader, Error, Result};

pub enum ExportTarget {
    /// A regular file (created or truncated) or a block device.
    Path(PathBuf),
    /// Standard output, or any byte stream. Written by a thread of its own: a blocking write
    /// straight from the chunk buffer costs no copy, where an async stdout copies every byte into
    /// its own buffer and hops to the blocking pool for every chunk.
    Stream(Box<dyn std::io::Write + Send>),
}

/// Exports the whole disk. Chunks are fetched `reader.options().parallel` at a time and written in
/// order. Chunks the repository cannot give back (damaged or missing) fail the export, naming every
/// lost byte range; the output file is removed.
pub async fn export_raw(
    reader: Arc<DiskReader>,
    target: ExportTarget,
    progress: Arc<Progress>,
) -> Result<()> {
    export_raw_with(reader, target, progress, false)
        .await
        .map(|_| ())
}

/// Chunk writes to a file in flight at once.
const WRITES_IN_FLIGHT: usize = 4;
/// Largest run of adjacent chunks written at once: fewer, larger writes cost fewer system calls
/// and fewer thread wake-ups than a write per chunk.
const RUN_BYTES: usize = 2 << 20;

/// Writes `parts`, which lie end to end from `offset`, on a blocking thread: directly when the
/// writer takes them, else through the page cache. Gives the bytes written.
fn write_run(
    file: &Arc<std::fs::File>,
    direct: &Option<Arc<DirectWriter>>,
    parts: Vec<bytes::Bytes>,
    offset: u64,
) -> tokio::task::JoinHandle<std::io::Result<usize>> {
    let (f, d) = (file.clone(), direct.clone());
    tokio::task::spawn_blocking(move || {
        let written = match &d {
            Some(d) => d.write_run(&parts, offset)?,
            None => false,
        };
        let mut at = offset;
        for p in &parts {
            if !written {
                f.write_all_at(p, at)?;
            }
            at += p.len() as u64;
        }
        Ok((at - offset) as usize)
    })
}

/// True for errors that mean the stored data is damaged or missing (as opposed to a failing store
/// or output): the chunk is lost, and the rest of the disk can still be exported.
fn is_data_loss(e: &Error) -> bool {
    use blockvault_repo::Error as R;
    let repo = match e {
        Error::Chunk { source, .. } => Some(&**source),
        Error::Repo(r) => Some(r),
        Error::Disk { .. } => return true,
        _ => None,
    };
    matches!(
        repo,
        Some(
            R::Tampered { .. }
                | R::Malformed { .. }
                | R::ChunkMissing { .. }
                | R::PackMissing { .. }
        )
    )
}

/// A regular output file until the export finishes: on any failure (lost data without
/// `--allow-damaged`, a store or output error, a cancel) it must not pass for the disk, so it is
/// removed; a path that cannot be unlinked (standard output as `/proc/self/fd/1`) is truncated
/// to nothing instead.
struct Unfinished {
    path: PathBuf,
    file: Arc<std::fs::File>,
    finished: bool,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let _ = self.file.set_len(0);
        if !self.path.starts_with("/proc") {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// [`export_raw`], and with `allow_damaged` lost chunks are written as zeros instead of failing
/// the export. Returns the lost byte ranges `[start, end)`.
pub async fn export_raw_with(
    reader: Arc<DiskReader>,
    target: ExportTarget,
    progress: Arc<Progress>,
    allow_damaged: bool,
) -> Result<Vec<(u64, u64)>> {
    let mut lost: Vec<(u64, u64)> = Vec::new();
    let mut first_loss: Option<String> = None;
    let mut note_loss = |slot: u64, e: Error, lost: &mut Vec<(u64, u64)>| -> Result<()> {
        if !is_data_loss(&e) {
            return Err(e);
        }
        let layout = reader.layout();
        let start = slot * layout.chunk_size() as u64;
        let end = start + layout.chunk_len(slot) as u64;
        match lost.last_mut() {
            Some(l) if l.1 == start => l.1 = end,
            _ => lost.push((start, end)),
        }
        if first_loss.is_none() {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            first_loss = Some(msg);
        }
        Ok(())
    };
    let layout = *reader.layout();
    progress
        .bytes_total
        .store(layout.disk_size(), std::sync::atomic::Ordering::Relaxed);
    let parallel = reader.options().parallel.max(1);
    let mut chunks = std::pin::pin!(reader.chunks_in_order());
    let mut unfinished: Option<Unfinished> = None;
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
            let file = Arc::new(file);
            if is_file {
                unfinished = Some(Unfinished {
                    path: path.clone(),
                    file: file.clone(),
                    finished: false,
                });
                // Truncate to zero first so the old contents cannot show through the holes.
                file.set_len(0).map_err(out_err)?;
                file.set_len(layout.disk_size()).map_err(out_err)?;
            }
            let zeros = bytes::Bytes::from(vec![0u8; layout.chunk_size() as usize]);
            // Several writes in flight: a direct write returns only when the device has the
            // data, so one at a time would leave the device idle between chunks.
            let direct = DirectWriter::open(&path, layout.chunk_size() as usize).map(Arc::new);
            let mut writing = futures::stream::FuturesUnordered::new();
            // The run of chunks gathered for the next write: its parts, bytes and end offset.
            let (mut run, mut run_bytes, mut run_end) = (Vec::new(), 0usize, 0u64);
            let finish = |done: std::result::Result<
                std::io::Result<usize>,
                tokio::task::JoinError,
            >|
             -> Result<()> {
                let len = done.map_err(Error::task)?.map_err(out_err)?;
                Progress::add(&progress.bytes_done, len as u64);
                Ok(())
            };
            while let Some((slot, data)) = chunks.next().await {
                let offset = slot * layout.chunk_size() as u64;
                let len = layout.chunk_len(slot) as usize;
                let data = match data {
                    Ok(d) => d,
                    Err(e) => {
                        note_loss(slot, e, &mut lost)?;
                        if !allow_damaged && !is_file {
                            // A device cannot be taken back like a file: stop at the first
                            // lost chunk rather than fill it with zeros for the rest.
                            break;
                        }
                        None
                    }
                };
                let data = match data {
                    Some(d) => d,
                    None if is_file => {
                        Progress::add(&progress.bytes_done, len as u64);
                        continue;
                    }
                    None => zeros.slice(..len),
                };
                // Chunks that lie end to end go out together, in one vectored write.
                if !run.is_empty() && (offset != run_end || run_bytes + len > RUN_BYTES) {
                    if writing.len() >= WRITES_IN_FLIGHT {
                        if let Some(done) = writing.next().await {
                            finish(done)?;
                        }
                    }
                    let parts = std::mem::take(&mut run);
                    writing.push(write_run(&file, &direct, parts, run_end - run_bytes as u64));
                    run_bytes = 0;
                }
                run.push(data);
                run_bytes += len;
                run_end = offset + len as u64;
            }
            if !run.is_empty() {
                writing.push(write_run(&file, &direct, run, run_end - run_bytes as u64));
            }
            while let Some(done) = writing.next().await {
                finish(done)?;
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
            // Bounded, so a slow reader of the stream holds back fetching instead of memory.
            let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(parallel * 2);
            let writer = std::thread::spawn(move || -> std::io::Result<()> {
                while let Some(data) = rx.blocking_recv() {
                    w.write_all(&data)?;
                }
                w.flush()
            });
            let zeros = bytes::Bytes::from(vec![0u8; layout.chunk_size() as usize]);
            let mut fetched = Ok(());
            while let Some((slot, data)) = chunks.next().await {
                let len = layout.chunk_len(slot) as usize;
                let data = match data {
                    Ok(Some(d)) => d,
                    Ok(None) => zeros.slice(..len),
                    Err(e) => match note_loss(slot, e, &mut lost) {
                        Ok(()) if allow_damaged => zeros.slice(..len),
                        // A stream cannot be taken back: it ends at the first lost chunk, so
                        // whoever reads it (`| dd of=/dev/...`) gets a short image, never one
                        // with zeros where the data was.
                        Ok(()) => break,
                        Err(e) => {
                            fetched = Err(e);
                            break;
                        }
                    },
                };
                if tx.send(data).await.is_err() {
                    break; // the writer stopped; its error is reported below
                }
                Progress::add(&progress.bytes_done, len as u64);
            }
            drop(tx);
            let written = tokio::task::spawn_blocking(move || writer.join())
                .await
                .map_err(Error::task)?
                .map_err(|_| Error::Invalid("the stream writer panicked".into()))?;
            fetched?;
            written.map_err(out_err)?;
        }
    }
    if !lost.is_empty() && !allow_damaged {
        // `unfinished` removes the file: with holes where data was lost, it must not pass for
        // the disk.
        return Err(Error::Lost {
            point: reader.point().to_string(),
            disk: reader.name().to_string(),
            ranges: lost,
            first: first_loss.unwrap_or_default(),
        });
    }
    if let Some(u) = &mut unfinished {
        u.finished = true;
    }
    Ok(lost)
}
