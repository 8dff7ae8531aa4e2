//! Integrity verification. Without `read_data`: every chunk and page any restore point references is
//! known to the index and its pack exists. With it: every pack is downloaded and every blob in it
//! decrypted, decompressed and re-hashed. Damage is reported per object with the restore points it
//! affects.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use blockvault_repo::{ChunkId, PackId, PointManifest, Repository, SLOTS_PER_PAGE};
use futures::StreamExt;
use serde::Serialize;

use crate::progress::Progress;
use crate::Result;

#[derive(Clone, Debug)]
pub struct VerifyOptions {
    pub read_data: bool,
    /// Packs downloaded at once with `read_data`.
    pub parallel: usize,
}

/// One damaged or missing object.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    pub object: String,
    pub detail: String,
    pub affected_points: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub points: usize,
    pub chunks_referenced: usize,
    pub packs: usize,
    pub packs_read: usize,
    pub bytes_read: u64,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Which points reference which chunk.
struct References {
    points: Vec<String>,
    by_chunk: HashMap<ChunkId, Vec<u32>>,
}

impl References {
    fn add(&mut self, id: ChunkId, point: u32) {
        let v = self.by_chunk.entry(id).or_default();
        if v.last() != Some(&point) {
            v.push(point);
        }
    }

    fn affected<'a>(&self, ids: impl IntoIterator<Item = &'a ChunkId>) -> Vec<String> {
        let mut set = BTreeSet::new();
        for id in ids {
            if let Some(v) = self.by_chunk.get(id) {
                set.extend(v.iter().copied());
            }
        }
        set.into_iter()
            .map(|i| self.points[i as usize].clone())
            .collect()
    }
}

pub async fn verify(
    repo: Arc<Repository>,
    opts: VerifyOptions,
    progress: Arc<Progress>,
) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let sync = repo.sync_index(true).await?;
    for p in sync.unreadable_packs {
        report.problems.push(Problem {
            object: p.split(':').next().unwrap_or_default().to_string(),
            detail: p,
            affected_points: Vec::new(),
        });
    }

    let (points, unreadable) = repo.list_points().await?;
    for (id, e) in unreadable {
        report.problems.push(Problem {
            object: format!("restore point {id} manifest"),
            detail: e.to_string(),
            affected_points: vec![id.to_hex()],
        });
    }
    report.points = points.len();
    let refs = collect_references(&repo, &points, &mut report).await;
    report.chunks_referenced = refs.by_chunk.len();

    let packs = repo.list_packs().await?;
    report.packs = packs.len();
    let listed: HashSet<PackId> = packs.iter().map(|(id, _)| *id).collect();

    // Every reference resolves to a stored pack.
    let mut located: HashMap<PackId, Vec<ChunkId>> = HashMap::new();
    let mut missing = Vec::new();
    for id in refs.by_chunk.keys() {
        let (r, id) = (repo.clone(), *id);
        let loc = tokio::task::spawn_blocking(move || r.lookup(&id))
            .await
            .map_err(crate::Error::task)??;
        match loc {
            Some(l) if listed.contains(&l.pack) => located.entry(l.pack).or_default().push(id),
            Some(l) => missing.push((id, format!("its pack {} is missing", l.pack))),
            None => missing.push((id, "no pack holds it".to_string())),
        }
    }
    for (id, why) in missing {
        report.problems.push(Problem {
            object: format!("chunk {id}"),
            detail: format!("referenced chunk is missing: {why}"),
            affected_points: refs.affected([&id]),
        });
    }

    if opts.read_data {
        let total: u64 = packs.iter().map(|(_, s)| *s).sum();
        progress
            .bytes_total
            .store(total, std::sync::atomic::Ordering::Relaxed);
        let mut results = futures::stream::iter(packs.iter().copied())
            .map(|(id, size)| {
                let repo = repo.clone();
                async move { (size, repo.verify_pack(&id).await) }
            })
            .buffer_unordered(opts.parallel.max(1));
        while let Some((size, r)) = results.next().await {
            report.packs_read += 1;
            report.bytes_read += size;
            Progress::add(&progress.bytes_done, size);
            match r {
                Ok(v) if v.damaged.is_empty() => {}
                Ok(v) => {
                    let ids: Vec<ChunkId> = v.damaged.iter().map(|(id, _)| *id).collect();
                    report.problems.push(Problem {
                        object: format!("pack {}", v.id),
                        detail: format!(
                            "{} of {} blobs damaged; first: {}",
                            v.damaged.len(),
                            v.entries.len(),
                            v.damaged[0].1
                        ),
                        affected_points: refs.affected(&ids),
                    });
                }
                Err(d) => {
                    let ids = located.get(&d.id).cloned().unwrap_or_default();
                    report.problems.push(Problem {
                        object: format!("pack {}", d.id),
                        detail: d.error,
                        affected_points: refs.affected(&ids),
                    });
                }
            }
        }
    }
    Ok(report)
}

async fn collect_references(
    repo: &Repository,
    points: &[PointManifest],
    report: &mut VerifyReport,
) -> References {
    let mut refs = References {
        points: points.iter().map(|p| p.id.to_hex()).collect(),
        by_chunk: HashMap::new(),
    };
    for (pi, point) in points.iter().enumerate() {
        let pi = pi as u32;
        for cfg in &point.configs {
            for b in &cfg.blobs {
                refs.add(b.0, pi);
            }
        }
        for disk in &point.disks {
            let chunks = disk.size.div_ceil(point.chunk_size as u64);
            for (page_no, page_id) in disk.pages.iter().enumerate() {
                let Some(page_id) = page_id else { continue };
                refs.add(page_id.0, pi);
                let first = page_no as u64 * SLOTS_PER_PAGE as u64;
                let slots = chunks.saturating_sub(first).min(SLOTS_PER_PAGE as u64) as usize;
                match repo.load_page(&page_id.0, slots).await {
                    Ok(page) => {
                        for id in page.slots.iter().flatten() {
                            refs.add(*id, pi);
                        }
                    }
                    Err(e) => report.problems.push(Problem {
                        object: format!("chunk-map page {} of disk '{}'", page_id.0, disk.name),
                        detail: e.to_string(),
                        affected_points: vec![point.id.to_hex()],
                    }),
                }
            }
        }
    }
    refs
}
