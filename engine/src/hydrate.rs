//! Hydration: copies a mounted restore point into a local raw file in the background, taking
//! the chunks the guest reads first, so the machine can later run from local storage alone.
//!
//! The copy is written to `FILE.part` and renamed to `FILE` once every chunk is durable, so a
//! file under the final name is always complete. Zero chunks stay holes of the sparse file.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::mpsc;

use crate::random_read::RandomReader;
use crate::{Error, Result};

/// Progress of one hydration, readable while it runs.
#[derive(Debug)]
pub struct Hydration {
    path: PathBuf,
    total: u64,
    done: AtomicU64,
    complete: AtomicBool,
    error: Mutex<Option<String>>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct HydrationStatus {
    pub path: PathBuf,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub complete: bool,
    pub error: Option<String>,
}

impl Hydration {
    pub fn status(&self) -> HydrationStatus {
        HydrationStatus {
            path: self.path.clone(),
            bytes_total: self.total,
            bytes_done: self.done.load(Ordering::Relaxed),
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

/// Starts hydrating `reader`'s disk into `path`; returns at once with the progress handle.
pub fn start_hydration(
    reader: Arc<RandomReader>,
    path: PathBuf,
    workers: usize,
) -> Result<Arc<Hydration>> {
    let count = reader.layout().chunk_count();
    let total = (0..count)
        .filter(|s| reader.is_allocated(*s))
        .map(|s| u64::from(reader.layout().chunk_len(s)))
        .sum();
    let part = PathBuf::from(format!("{}.part", path.display()));
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&part)
        .map_err(werr(&part))?;
    file.set_len(reader.size()).map_err(werr(&part))?;
    let file = Arc::new(file);
    let h = Arc::new(Hydration {
        path: path.clone(),
        total,
        done: AtomicU64::new(0),
        complete: AtomicBool::new(false),
        error: Mutex::new(None),
    });
    let (tx, rx) = mpsc::channel(1024);
    reader.set_demand(tx);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let plan = Arc::new(Mutex::new(Plan {
        claimed: vec![false; count as usize],
        next: 0,
    }));
    let h2 = h.clone();
    tokio::spawn(async move {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..workers.max(1) {
            let (reader, plan, rx, file, h, part) = (
                reader.clone(),
                plan.clone(),
                rx.clone(),
                file.clone(),
                h2.clone(),
                part.clone(),
            );
            set.spawn(async move {
                while let Some((slot, demanded)) = claim(&reader, &plan, &rx).await {
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
                        f.write_all_at(&data, off)
                            .map_err(|source| Error::Output { path: p, source })
                    })
                    .await
                    .map_err(Error::task)??;
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
        let finish = match failed {
            Some(e) => Err(e),
            None => {
                let (f, part, path) = (file.clone(), part.clone(), path.clone());
                tokio::task::spawn_blocking(move || -> Result<()> {
                    f.sync_all().map_err(werr(&part))?;
                    std::fs::rename(&part, &path).map_err(werr(&path))?;
                    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                        std::fs::File::open(dir)
                            .and_then(|d| d.sync_all())
                            .map_err(werr(dir))?;
                    }
                    Ok(())
                })
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
